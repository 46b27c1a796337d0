"""Sleep mode and weight updates against restarting the engine, in one process: the time to
give the memory back (sleep level 1 and 2) and take it again, to push a full set of weights
(collective_rpc("load_weights"), as a trainer does) and to reload them from disk, each against
building a new LLM on the same checkpoint (what an RL loop without sleep mode does). Outputs
after every round trip are checked equal to the first run's.

    python benchmarks/bench_sleep.py [--device cpu] [--output-json PATH]
"""

from __future__ import annotations

import argparse
import time

import torch

from pagedserve import LLM, SamplingParams
from pagedserve.bench.common import machine_info, random_token_prompts, write_json
from pagedserve.bench.models import BENCH_MODEL_SHAPE, bench_model_dir
from pagedserve.model.loader import iterate_safetensors


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the 30M benchmark model)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--output-json", default=None)
    ns = ap.parse_args()
    model = bench_model_dir(ns.model)
    prompts = random_token_prompts(BENCH_MODEL_SHAPE["vocab_size"], 8, 64)
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def run(llm: LLM) -> list:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]

    start = time.perf_counter()
    llm = LLM(model, enable_sleep_mode=True, device=ns.device, seed=0)
    cold_start_s = time.perf_counter() - start
    want = run(llm)
    runner = llm.llm_engine.runner
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_bytes = runner.kv_block_bytes() * llm.llm_engine.config.num_gpu_blocks
    times = {"sleep1_s": _timed(lambda: llm.sleep(level=1)), "wake1_s": _timed(llm.wake_up)}
    same = run(llm) == want
    times["sleep2_s"] = _timed(lambda: llm.sleep(level=2))
    times["wake_weights_s"] = _timed(lambda: llm.wake_up(tags=["weights"]))
    weights = list(iterate_safetensors(model, runner.config.dtype, torch.device("cpu")))  # a trainer's tensors
    times["load_weights_s"] = _timed(lambda: llm.collective_rpc("load_weights", args=(weights,)))
    times["wake_kv_s"] = _timed(lambda: llm.wake_up(tags=["kv_cache"]))
    same = same and run(llm) == want
    times["reload_weights_s"] = _timed(lambda: llm.collective_rpc("reload_weights"))
    same = same and run(llm) == want
    round_trip = times["sleep2_s"] + times["wake_weights_s"] + times["load_weights_s"] + times["wake_kv_s"]
    result = {"benchmark": "sleep_mode", "model": model, "device": str(runner.device),
              "weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "cold_start_s": cold_start_s, **times,
              "weight_update_round_trip_s": round_trip,
              "load_weights_gb_per_s": weight_bytes / times["load_weights_s"] / 1e9,
              "restart_over_wake1": cold_start_s / times["wake1_s"],
              "restart_over_update_round_trip": cold_start_s / round_trip,
              "outputs_unchanged": same, "machine": machine_info()}
    print(f"{result['device']}: weights {weight_bytes / 2**20:.0f} MiB, KV cache {kv_bytes / 2**20:.0f} MiB; "
          f"new LLM {cold_start_s:.2f} s")
    print(f"sleep(1) {times['sleep1_s'] * 1e3:.0f} ms, wake_up {times['wake1_s'] * 1e3:.0f} ms "
          f"({result['restart_over_wake1']:.1f}x faster than a new LLM)")
    print(f"sleep(2) + wake weights + load_weights ({result['load_weights_gb_per_s']:.2f} GB/s) + wake KV: "
          f"{round_trip * 1e3:.0f} ms ({result['restart_over_update_round_trip']:.1f}x faster than a new LLM); "
          f"reload_weights {times['reload_weights_s'] * 1e3:.0f} ms; outputs unchanged: {same}")
    write_json(ns.output_json, result)


if __name__ == "__main__":
    main()
