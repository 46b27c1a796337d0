"""Sliding-window block release on CPU: the same windowed model (every layer's window 128,
Mistral-7B-v0.1-shaped attention) and the same requests in a KV cache too small to hold the
batch, with out-of-window blocks given back (the engine's behaviour) and kept (release
switched off in this process), one after the other. Reports output throughput, preemptions
and the most requests running at once.

    python benchmarks/bench_window_blocks.py [--num-prompts 32] [--input-len 256] [--output-len 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from pagedserve import LLM, SamplingParams
from pagedserve.bench.common import add_batch_args, machine_info, random_token_prompts, write_json
from pagedserve.bench.models import BENCH_MODEL_SHAPE

WINDOW = 128
BLOCK = 16


def _model(path: str) -> str:
    from pagedserve.model.random_model import build_random_model

    if not os.path.isfile(os.path.join(path, "config.json")):
        build_random_model(path, "MistralForCausalLM", seed=0, sliding_window=WINDOW, **BENCH_MODEL_SHAPE)
    return path


def _run(model: str, prompts: list, sp: SamplingParams, blocks: int, release: bool) -> dict:
    probe = LLM(model, block_size=BLOCK)
    caches = probe.llm_engine.runner.kv_caches
    per_block = caches[0][0][0].numel() * 2 * caches[0][0].element_size() * len(caches)
    del probe
    llm = LLM(model, block_size=BLOCK, kv_cache_memory_bytes=blocks * per_block, enable_prefix_caching=False, seed=0)
    if not release:
        llm.llm_engine.kv.window = 0  # keep every block, as without this feature
    running = []
    schedule = llm.llm_engine.scheduler.schedule

    def watch():
        out = schedule()
        running.append(len(out.scheduled))
        return out

    llm.llm_engine.scheduler.schedule = watch
    llm.generate(prompts[:2], sp, use_tqdm=False)  # warm-up
    running.clear()
    preempted = llm.llm_engine.scheduler.num_preemptions
    t = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    seconds = time.perf_counter() - t
    return {"output_tok_per_s": len(prompts) * sp.max_tokens / seconds, "seconds": seconds,
            "preemptions": llm.llm_engine.scheduler.num_preemptions - preempted, "max_running": max(running)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_args(ap, output_len=256)
    ap.set_defaults(num_prompts=32, input_len=256, repeats=1)
    ap.add_argument("--blocks", type=int, default=128, help="KV cache size in blocks of 16 tokens")
    ns = ap.parse_args()
    model = _model(ns.model or os.path.join(tempfile.gettempdir(), "pagedserve-bench-mistral-swa-30m"))
    prompts = random_token_prompts(BENCH_MODEL_SHAPE["vocab_size"], ns.num_prompts, ns.input_len)
    sp = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
    runs = {name: _run(model, prompts, sp, ns.blocks, release) for name, release in (("kept", False),
                                                                                        ("released", True))}
    result = {"benchmark": "window_blocks", "model": model, "window": WINDOW, "block_size": BLOCK,
              "kv_blocks": ns.blocks, "num_prompts": ns.num_prompts, "input_len": ns.input_len,
              "output_len": ns.output_len, "runs": runs,
              "throughput_ratio": runs["released"]["output_tok_per_s"] / runs["kept"]["output_tok_per_s"],
              "machine": machine_info()}
    for name, r in runs.items():
        print(f"{name:9s} {r['output_tok_per_s']:7.1f} tok/s  preemptions {r['preemptions']:3d}  "
              f"max running {r['max_running']}")
    print(f"released / kept: {result['throughput_ratio']:.2f}x")
    write_json(ns.output_json, result)


if __name__ == "__main__":
    main()
