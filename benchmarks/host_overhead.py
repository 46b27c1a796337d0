"""Host time per engine step, by part, for a batch of decoding requests on a tiny model.

The GPU hides host work only while the host keeps ahead of it (async scheduling overlaps a
whole step); this measures what the host costs per step where it can be measured without a
GPU. The forward pass of the tiny model is reported apart ("forward") and is not host work
on a GPU. Usage:
    python benchmarks/host_overhead.py [--batch 256] [--steps 100] [--async-scheduling]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--async-scheduling", action="store_true")
    args = ap.parse_args()

    from pagedserve import LLM, SamplingParams
    from pagedserve.model.random_model import build_random_model, build_tokenizer
    from pagedserve.sampling_params import RequestOutputKind

    d = tempfile.mkdtemp()
    build_tokenizer(f"{d}/tok", vocab_size=1024)
    build_random_model(f"{d}/m", "LlamaForCausalLM", tokenizer_dir=f"{d}/tok", num_heads=4, num_kv_heads=2,
                       num_layers=1)
    llm = LLM(f"{d}/m", max_model_len=1024, max_num_seqs=args.batch, async_scheduling=args.async_scheduling)
    eng, runner = llm.llm_engine, llm.llm_engine.runner
    rng = random.Random(0)
    sp = SamplingParams(temperature=0, max_tokens=args.steps + 50, ignore_eos=True,
                        output_kind=RequestOutputKind.FINAL_ONLY)  # as LLM.generate
    for i in range(args.batch):
        eng.add_request(str(i), {"prompt_token_ids": [rng.randrange(4, 1000) for _ in range(args.prompt_len)]}, sp)
    sched = eng.scheduler
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        eng.step()
    for _ in range(5):
        eng.step()

    parts: dict[str, float] = collections.defaultdict(float)

    def wrap(obj, name: str, label: str) -> None:
        f = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            r = f(*a, **k)
            parts[label] += time.perf_counter() - t
            return r

        setattr(obj, name, timed)

    wrap(sched, "schedule", "schedule")
    wrap(runner, "_host_inputs", "host_inputs")
    wrap(runner.sampling_states, "build", "sampling_batch")
    wrap(runner, "_forward", "forward")
    wrap(runner.model, "compute_logits", "logits")
    wrap(runner, "sampler", "sampler")
    wrap(runner, "_collect_samples", "collect_samples")
    wrap(sched, "update_from_output", "update")
    wrap(eng.output_processor, "process", "process_outputs")
    t = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    total = 1000 * (time.perf_counter() - t) / args.steps
    ms = {k: 1000 * v / args.steps for k, v in parts.items()}
    ms["other"] = total - sum(ms.values())
    model_ms = ms["forward"] + ms["logits"] + ms["sampler"]
    print(json.dumps({"batch": args.batch, "async_scheduling": args.async_scheduling, "ms_per_step": total,
                      "host_ms_per_step": total - model_ms, "parts_ms": ms}, indent=1))


if __name__ == "__main__":
    main()
