"""Embedding throughput: pagedserve's LLM.embed against transformers' AutoModel in static
batches (right padding, last real token pooled, L2-normalized), on the same prompts in one
process. Prints prompt tokens per second for both, the ratio, and the largest difference
between the two sets of vectors.

    python benchmarks/bench_embed.py [--model DIR] [--num-prompts 256] [--min-len 16] [--max-len 512]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from pagedserve import LLM
from pagedserve.bench.common import machine_info, write_json
from pagedserve.bench.models import bench_model_dir


@torch.inference_mode()
def hf_embed(model, prompts: list[list[int]], batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, p in enumerate(batch):
            ids[j, : len(p)] = torch.tensor(p)
            mask[j, : len(p)] = 1
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = hidden[torch.arange(len(batch)), mask.sum(1) - 1]
        out.append(torch.nn.functional.normalize(last.float(), dim=-1))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model dir (default: build the ~30M benchmark model)")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--output-json", default=None)
    ns = ap.parse_args()
    from transformers import AutoModel

    model_dir = bench_model_dir(ns.model)
    llm = LLM(model_dir, runner="pooling", enable_prefix_caching=False, seed=0)
    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = llm.llm_engine.config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(ns.min_len, ns.max_len))]
               for _ in range(ns.num_prompts)]
    tokens = sum(len(p) for p in prompts)
    llm.embed([{"prompt_token_ids": p} for p in prompts[:8]], use_tqdm=False)  # warm-up
    hf_embed(hf, prompts[:8], ns.hf_batch_size)
    times: dict[str, list[float]] = {"pagedserve": [], "transformers": []}
    for _ in range(ns.repeats):  # interleaved, so drift hits both alike
        t = time.perf_counter()
        ours = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
        times["pagedserve"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = hf_embed(hf, prompts, ns.hf_batch_size)
        times["transformers"].append(time.perf_counter() - t)
    diff = float((torch.tensor([o.outputs.embedding for o in ours]) - ref).abs().max())
    best = {k: min(v) for k, v in times.items()}
    result = {"benchmark": "embed", "model": model_dir, "num_prompts": ns.num_prompts, "prompt_tokens": tokens,
              "min_len": ns.min_len, "max_len": ns.max_len, "hf_batch_size": ns.hf_batch_size, "seconds": best,
              "tokens_per_s": {k: tokens / v for k, v in best.items()},
              "speedup_vs_transformers": best["transformers"] / best["pagedserve"], "max_abs_diff": diff,
              "machine": machine_info()}
    for k, v in best.items():
        print(f"{k:14s} {v:7.2f} s  {tokens / v:9.1f} prompt tok/s")
    print(f"pagedserve / transformers: {best['transformers'] / best['pagedserve']:.2f}x; max |vector diff| {diff:.2e}")
    write_json(ns.output_json, result)


if __name__ == "__main__":
    main()
