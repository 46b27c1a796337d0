"""Priority scheduling under load, on CPU: the same engine, model and requests under
scheduling_policy "fcfs" and "priority", one after the other. A backlog of background requests
(more than max_num_seqs) is queued first; urgent requests arrive while it runs, one every few
steps. Reports the urgent requests' time to first token and to completion, the background
requests' completion time, total throughput and preemptions, and the urgent TTFT ratio.

    python benchmarks/bench_priority.py [--num-prompts 32] [--urgent 4] [--input-len 128] [--output-len 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

from pagedserve import LLM, SamplingParams
from pagedserve.bench.common import add_batch_args, machine_info, random_token_prompts, write_json
from pagedserve.bench.models import BENCH_MODEL_SHAPE, bench_model_dir


def _run(model: str, policy: str, background: list, urgent: list, sp: SamplingParams, max_num_seqs: int,
         every: int) -> dict:
    llm = LLM(model, scheduling_policy=policy, max_num_seqs=max_num_seqs, seed=0)
    engine = llm.llm_engine
    llm.generate(background[:2], sp, use_tqdm=False)  # warm-up
    low = 1 if policy == "priority" else 0
    start = time.perf_counter()
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    for i, p in enumerate(background):
        added[f"bg{i}"] = start
        engine.add_request(f"bg{i}", p, sp, priority=low)
    steps = tokens = 0
    preempted = engine.scheduler.num_preemptions
    while engine.has_unfinished_requests() or len(added) < len(background) + len(urgent):
        k = steps // every
        if steps % every == 0 and k < len(urgent):
            added[f"u{k}"] = time.perf_counter()
            engine.add_request(f"u{k}", urgent[k], sp, priority=0)
        for out in engine.step():
            now = time.perf_counter()
            if out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                done[out.request_id] = now
                tokens += len(out.outputs[0].token_ids)
        steps += 1
    seconds = time.perf_counter() - start
    urgent_ids = [r for r in added if r.startswith("u")]
    bg_ids = [r for r in added if r.startswith("bg")]
    return {"urgent_ttft_s": statistics.mean(first[r] - added[r] for r in urgent_ids),
            "urgent_e2e_s": statistics.mean(done[r] - added[r] for r in urgent_ids),
            "background_e2e_s": statistics.mean(done[r] - added[r] for r in bg_ids),
            "output_tok_per_s": tokens / seconds, "seconds": seconds,
            "preemptions": engine.scheduler.num_preemptions - preempted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_args(ap, output_len=64)
    ap.set_defaults(num_prompts=32, input_len=128, repeats=1)
    ap.add_argument("--urgent", type=int, default=4, help="urgent requests, arriving while the backlog runs")
    ap.add_argument("--every", type=int, default=8, help="engine steps between urgent arrivals")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ns = ap.parse_args()
    model = bench_model_dir(ns.model)
    prompts = random_token_prompts(BENCH_MODEL_SHAPE["vocab_size"], ns.num_prompts + ns.urgent, ns.input_len)
    sp = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
    background, urgent = prompts[:ns.num_prompts], prompts[ns.num_prompts:]
    runs = {policy: _run(model, policy, background, urgent, sp, ns.max_num_seqs, ns.every)
            for policy in ("fcfs", "priority")}
    result = {"benchmark": "priority", "model": model, "num_prompts": ns.num_prompts, "urgent": ns.urgent,
              "every_steps": ns.every, "max_num_seqs": ns.max_num_seqs, "input_len": ns.input_len,
              "output_len": ns.output_len, "runs": runs,
              "urgent_ttft_ratio": runs["fcfs"]["urgent_ttft_s"] / runs["priority"]["urgent_ttft_s"],
              "throughput_ratio": runs["priority"]["output_tok_per_s"] / runs["fcfs"]["output_tok_per_s"],
              "machine": machine_info()}
    for name, r in runs.items():
        print(f"{name:8s} urgent TTFT {r['urgent_ttft_s']:6.2f} s  urgent e2e {r['urgent_e2e_s']:6.2f} s  "
              f"background e2e {r['background_e2e_s']:6.2f} s  {r['output_tok_per_s']:6.1f} tok/s  "
              f"preemptions {r['preemptions']}")
    print(f"urgent TTFT fcfs / priority: {result['urgent_ttft_ratio']:.1f}x; "
          f"throughput priority / fcfs: {result['throughput_ratio']:.2f}x")
    write_json(ns.output_json, result)


if __name__ == "__main__":
    main()
