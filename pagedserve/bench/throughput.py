"""`pagedserve bench throughput`: offline throughput through the LLM API, against
transformers' static-batch generate() in the same process (--compare)."""

from __future__ import annotations

import argparse
import time

from pagedserve.bench.common import args_record, engine_kwargs, machine_info, resolve_model, write_json
from pagedserve.bench.datasets import BenchRequest, random_requests


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model dir (default: build the ~30M benchmark model)")
    p.add_argument("--backend", choices=["pagedserve", "hf"], default="pagedserve")
    p.add_argument("--compare", action="store_true", help="run pagedserve and hf in one invocation, print the ratio")
    p.add_argument("--dataset", choices=["random", "prefix"], default="random",
                   help="prefix: every prompt starts with the same --prefix-len tokens")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len * (1 +- ratio)")
    p.add_argument("--input-len-min", type=int, default=None)
    p.add_argument("--input-len-max", type=int, default=None)
    p.add_argument("--output-len-min", type=int, default=None)
    p.add_argument("--output-len-max", type=int, default=None)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--dataset-seed", type=int, default=0)
    p.add_argument("--hf-max-batch-size", type=int, default=64)
    p.add_argument("--output-json", default=None)
    p.add_argument("--no-progress", action="store_true")


def _requests(ns, vocab: int, special: tuple[int, ...]) -> list[BenchRequest]:
    return random_requests(ns.num_prompts, ns.input_len, ns.output_len, vocab, ns.range_ratio,
                           ns.prefix_len if ns.dataset == "prefix" else 0, ns.dataset_seed, ns.input_len_min,
                           ns.input_len_max, ns.output_len_min, ns.output_len_max, special)


def _figures(name: str, reqs: list[BenchRequest], elapsed: float) -> dict:
    prompt = sum(r.prompt_len for r in reqs)
    output = sum(r.output_len for r in reqs)
    fig = {"backend": name, "elapsed_s": elapsed, "requests_per_s": len(reqs) / elapsed,
           "total_tokens_per_s": (prompt + output) / elapsed, "output_tokens_per_s": output / elapsed,
           "num_requests": len(reqs), "prompt_tokens": prompt, "output_tokens": output}
    print(f"[{name}] Throughput: {fig['requests_per_s']:.2f} requests/s, {fig['total_tokens_per_s']:.2f} total "
          f"tokens/s, {fig['output_tokens_per_s']:.2f} output tokens/s ({elapsed:.1f} s)")
    return fig


def run_pagedserve(model: str, ns, reqs: list[BenchRequest]) -> float:
    from pagedserve import LLM, SamplingParams

    llm = LLM(model, **engine_kwargs(ns))
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
    llm.generate(prompts[:2], [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)] * 2, use_tqdm=False)
    llm.llm_engine.kv.reset_prefix_cache()
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=not ns.no_progress)
    elapsed = time.perf_counter() - t
    del llm
    return elapsed


def run_hf_backend(model: str, ns, reqs: list[BenchRequest]) -> float:
    from pagedserve.bench.hf_backend import hf_generate_batch, load_hf_model, run_hf

    hf, device, pad = load_hf_model(model, ns.dtype, ns.device)
    max_len = hf.config.max_position_embeddings
    hf_generate_batch(hf, reqs[:2], pad, device, max_new_tokens=4)  # warm-up
    elapsed = run_hf(hf, reqs, ns.hf_max_batch_size, max_len, pad, device, progress=not ns.no_progress)
    del hf
    return elapsed


def main(ns: argparse.Namespace) -> int:
    from transformers import AutoConfig

    model = resolve_model(ns.model)
    cfg = AutoConfig.from_pretrained(model, local_files_only=True)
    special = tuple(t for t in (cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id) if isinstance(t, int))
    reqs = _requests(ns, cfg.vocab_size, special)
    backends = ["pagedserve", "hf"] if ns.compare else [ns.backend]
    results = {}
    for name in backends:
        elapsed = run_pagedserve(model, ns, reqs) if name == "pagedserve" else run_hf_backend(model, ns, reqs)
        results[name] = _figures(name, reqs, elapsed)
    record = {"bench": "throughput", "model": model, "dataset": ns.dataset, "args": args_record(ns),
              "results": results, "machine": machine_info()}
    if ns.compare:
        ratio = results["pagedserve"]["output_tokens_per_s"] / results["hf"]["output_tokens_per_s"]
        record["ratio_output_tokens_per_s"] = ratio
        print(f"pagedserve / hf output tokens/s: {ratio:.2f}x")
    write_json(ns.output_json, record)
    return 0
