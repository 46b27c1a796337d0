"""The cost of LoRA adapters: one batch of requests on the base model, then the same batch with
LoRA enabled but no adapter, with every request on one adapter, and spread over 4 adapters,
in one process (same prompts, same output lengths). Prints each time and its ratio to base.

    python benchmarks/bench_lora.py [--model DIR] [--num-prompts 64] [--rank 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from pagedserve import LLM, SamplingParams
from pagedserve.bench.common import add_batch_args, machine_info, random_token_prompts, write_json
from pagedserve.bench.models import bench_model_dir
from pagedserve.lora.random_adapter import make_adapter
from pagedserve.lora.request import LoRARequest


def main() -> None:
    ap = argparse.ArgumentParser()
    add_batch_args(ap)
    ap.add_argument("--rank", type=int, default=16)
    ns = ap.parse_args()
    model = bench_model_dir(ns.model)
    tmp = tempfile.mkdtemp(prefix="pagedserve-lora-bench-")
    dirs = [make_adapter(model, f"{tmp}/{i}", seed=i, rank=ns.rank, std=0.02)[0] for i in range(4)]
    loras = [LoRARequest(f"a{i}", i + 1, d) for i, d in enumerate(dirs)]
    base = LLM(model, enable_prefix_caching=False, seed=0)
    llm = LLM(model, enable_prefix_caching=False, seed=0, enable_lora=True, max_loras=4, max_lora_rank=ns.rank)
    vocab = base.llm_engine.config.vocab_size
    prompts = random_token_prompts(vocab, ns.num_prompts, ns.input_len)
    sp = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
    runs = {
        "base": (base, None),
        "lora_enabled_no_adapter": (llm, None),
        "one_adapter": (llm, loras[0]),
        "four_adapters": (llm, [loras[i % 4] for i in range(ns.num_prompts)]),
    }
    for engine, lora in runs.values():  # warm-up (and adapter loading)
        engine.generate(prompts[:4], sp, use_tqdm=False, lora_request=lora if not isinstance(lora, list) else lora[:4])
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(ns.repeats):  # interleaved, so drift hits every configuration alike
        for name, (engine, lora) in runs.items():
            t = time.perf_counter()
            outs = engine.generate(prompts, sp, use_tqdm=False, lora_request=lora)
            times[name].append(time.perf_counter() - t)
            assert sum(len(o.outputs[0].token_ids) for o in outs) == ns.num_prompts * ns.output_len
    best = {k: min(v) for k, v in times.items()}
    tokens = ns.num_prompts * ns.output_len
    result = {"benchmark": "lora", "model": model, "num_prompts": ns.num_prompts, "input_len": ns.input_len,
              "output_len": ns.output_len, "rank": ns.rank, "targets": "q,k,v,o,gate,up,down (every layer)",
              "seconds": best, "output_tok_per_s": {k: tokens / v for k, v in best.items()},
              "time_vs_base": {k: v / best["base"] for k, v in best.items()}, "machine": machine_info()}
    for k, v in best.items():
        print(f"{k:26s} {v:7.2f} s  {tokens / v:8.1f} tok/s  {v / best['base']:.2f}x base time")
    if ns.output_json:
        write_json(ns.output_json, result)


if __name__ == "__main__":
    main()
