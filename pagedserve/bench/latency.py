"""`pagedserve bench latency`: one fixed batch, warm-up then timed iterations; average and
percentiles, per batch and per output token; --compare runs transformers too."""

from __future__ import annotations

import argparse
import time

from pagedserve.bench.common import args_record, engine_kwargs, machine_info, percentiles, resolve_model, write_json
from pagedserve.bench.datasets import random_requests


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model dir (default: build the ~30M benchmark model)")
    p.add_argument("--backend", choices=["pagedserve", "hf"], default="pagedserve")
    p.add_argument("--compare", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters-warmup", type=int, default=2)
    p.add_argument("--num-iters", type=int, default=5)
    p.add_argument("--output-json", default=None)


def _timer(run, warmup: int, iters: int) -> list[float]:
    from tqdm.auto import tqdm

    for _ in range(warmup):
        run()
    times = []
    for _ in tqdm(range(iters), desc="timed iterations", dynamic_ncols=True):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return times


def main(ns: argparse.Namespace) -> int:
    from transformers import AutoConfig

    model = resolve_model(ns.model)
    cfg = AutoConfig.from_pretrained(model, local_files_only=True)
    reqs = random_requests(ns.batch_size, ns.input_len, ns.output_len, cfg.vocab_size,
                           special_ids=tuple(t for t in (cfg.eos_token_id,) if isinstance(t, int)))
    backends = ["pagedserve", "hf"] if ns.compare else [ns.backend]
    results = {}
    for name in backends:
        if name == "pagedserve":
            from pagedserve import LLM, SamplingParams

            # Each iteration repeats the same prompts: no prefix cache, so each pays its prefill.
            llm = LLM(model, **{**engine_kwargs(ns), "enable_prefix_caching": False})
            prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
            sp = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
            run = lambda: llm.generate(prompts, sp, use_tqdm=False)  # noqa: E731
        else:
            from pagedserve.bench.hf_backend import hf_generate_batch, load_hf_model

            hf, device, pad = load_hf_model(model, ns.dtype, ns.device)
            run = lambda: hf_generate_batch(hf, reqs, pad, device, max_new_tokens=ns.output_len)  # noqa: E731
        times = _timer(run, ns.num_iters_warmup, ns.num_iters)
        avg = sum(times) / len(times)
        results[name] = {"avg_latency_s": avg, "per_token_latency_ms": 1000 * avg / ns.output_len,
                         "percentiles_s": percentiles(times)}
        print(f"[{name}] Avg latency: {avg:.3f} s  ({results[name]['per_token_latency_ms']:.2f} ms per output token,"
              f" batch {ns.batch_size}, {ns.input_len} in / {ns.output_len} out)")
        for k, v in results[name]["percentiles_s"].items():
            print(f"    {k} latency: {v:.3f} s")
    record = {"bench": "latency", "model": model, "args": args_record(ns), "results": results,
              "machine": machine_info()}
    if ns.compare:
        ratio = results["pagedserve"]["avg_latency_s"] / results["hf"]["avg_latency_s"]
        record["ratio_latency_pagedserve_over_hf"] = ratio
        print(f"pagedserve / hf latency: {ratio:.2f}x (below 1 is faster)")
    write_json(ns.output_json, record)
    return 0
