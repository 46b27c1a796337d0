"""float32 against bfloat16 on CPU, same model, same requests, one process: a batch's output
throughput and batch-1 decode time. CPUs with native bf16 matmuls (AVX512-BF16, AMX) run
bfloat16 faster; elsewhere it may be slower.

    python benchmarks/bench_cpu_dtype.py [--model DIR] [--num-prompts 64] [--input-len 128] [--output-len 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from pagedserve import LLM, SamplingParams
from pagedserve.bench.common import add_batch_args, machine_info, random_token_prompts, write_json
from pagedserve.bench.models import bench_model_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    add_batch_args(ap)
    ap.add_argument("--batch1-tokens", type=int, default=128)
    ns = ap.parse_args()
    model = bench_model_dir(ns.model)
    engines = {dt: LLM(model, dtype=dt, enable_prefix_caching=False, seed=0) for dt in ("float32", "bfloat16")}
    vocab = engines["float32"].llm_engine.config.vocab_size
    prompts = random_token_prompts(vocab, ns.num_prompts + 1, ns.input_len)
    batch, one = prompts[1:], prompts[:1]
    sp = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
    sp1 = SamplingParams(temperature=0.0, max_tokens=ns.batch1_tokens, ignore_eos=True)
    for llm in engines.values():  # warm-up
        llm.generate(batch[:4], sp, use_tqdm=False)
    tput: dict[str, list[float]] = {k: [] for k in engines}
    per_token: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(ns.repeats):  # interleaved, so drift hits both alike
        for dt, llm in engines.items():
            t = time.perf_counter()
            llm.generate(batch, sp, use_tqdm=False)
            tput[dt].append(ns.num_prompts * ns.output_len / (time.perf_counter() - t))
            t = time.perf_counter()
            llm.generate(one, sp1, use_tqdm=False)
            per_token[dt].append((time.perf_counter() - t) / ns.batch1_tokens * 1e3)
    best_tput = {k: max(v) for k, v in tput.items()}
    best_ms = {k: min(v) for k, v in per_token.items()}
    result = {"benchmark": "cpu_dtype", "model": model, "num_prompts": ns.num_prompts, "input_len": ns.input_len,
              "output_len": ns.output_len, "output_tok_per_s": best_tput, "batch1_ms_per_token": best_ms,
              "bf16_throughput_ratio": best_tput["bfloat16"] / best_tput["float32"],
              "bf16_batch1_speedup": best_ms["float32"] / best_ms["bfloat16"],
              "cpu_native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "machine": machine_info()}
    for dt in engines:
        print(f"{dt:9s} batch {ns.num_prompts}: {best_tput[dt]:7.1f} tok/s   batch 1: {best_ms[dt]:6.2f} ms/token")
    print(f"bfloat16 / float32: throughput {result['bf16_throughput_ratio']:.2f}x, "
          f"batch-1 decode {result['bf16_batch1_speedup']:.2f}x")
    write_json(ns.output_json, result)


if __name__ == "__main__":
    main()
