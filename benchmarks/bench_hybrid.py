"""Hybrid models on CPU: pagedserve against transformers' static-batch generate() on the same
requests, in one process, for a ~30M-parameter Qwen3.5-shaped model (Gated DeltaNet layers,
one full-attention layer in four), a Granite-4.0-H-shaped one (Mamba-2 layers, one attention
layer in four, experts) and a Jamba-shaped one (Mamba-1 layers, one attention layer in four,
experts in every second layer), all random, float32.

    python benchmarks/bench_hybrid.py [--num-prompts 64] [--output-json out.json]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from pagedserve.bench.throughput import add_args, main as throughput
from pagedserve.entrypoints.cli import add_engine_args

SHAPE = dict(hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
             vocab_size=32000, max_position_embeddings=4096, tokenizer_vocab=2048, seed=0)
LAYERS = ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 2
MODELS = {
    "qwen3_5": ("Qwen3_5ForCausalLM", dict(layer_types=LAYERS, linear_num_key_heads=4, linear_num_value_heads=8,
                                           linear_key_head_dim=64, linear_value_head_dim=64)),
    "granite_4_h": ("GraniteMoeHybridForCausalLM", dict(
        layer_types=["mamba", "mamba", "mamba", "attention"] * 2, mamba_n_heads=16, mamba_d_head=64,
        mamba_n_groups=1, mamba_d_state=64, num_local_experts=8, num_experts_per_tok=2, intermediate_size=512,
        shared_intermediate_size=1024, position_embedding_type="nope")),
    "jamba": ("JambaForCausalLM", dict(
        attn_layer_period=4, attn_layer_offset=3, expert_layer_period=2, expert_layer_offset=1, num_experts=8,
        num_experts_per_tok=2, intermediate_size=512, mamba_d_state=16, mamba_expand=2, mamba_dt_rank=32)),
}


def build(name: str) -> str:
    from pagedserve.model.random_model import build_random_model

    path = os.path.join(tempfile.gettempdir(), f"pagedserve-bench-{name}-30m")
    if not os.path.isfile(os.path.join(path, "config.json")):
        arch, extra = MODELS[name]
        build_random_model(path, arch, **{**SHAPE, **extra})
    return path


def _namespace(argv: list[str]) -> argparse.Namespace:
    q = argparse.ArgumentParser()
    add_args(q)
    add_engine_args(q)
    return q.parse_args(argv)


def prefix_caching(name: str, num: int, json_dir: str | None) -> None:
    """Requests sharing a 384-token prefix (+64 own, 32 out): the engine with prefix caching
    (states saved at prompt boundaries) against the same engine without it."""
    from pagedserve.bench.common import machine_info, write_json
    from pagedserve.bench.throughput import _requests, run_pagedserve

    model = build(name)
    argv = [model, "--no-progress", "--dataset", "prefix", "--prefix-len", "384", "--input-len", "64",
            "--output-len", "32", "--num-prompts", str(num)]
    on, off = _namespace(argv), _namespace(argv + ["--no-enable-prefix-caching"])
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model, local_files_only=True)
    special = tuple(t for t in (cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id) if isinstance(t, int))
    reqs = _requests(on, cfg.vocab_size, special)
    seconds = {"on": run_pagedserve(model, on, reqs), "off": run_pagedserve(model, off, reqs)}
    out = sum(r.output_len for r in reqs)
    print(f"== {name}, shared 384-token prefix: prefix caching on {out / seconds['on']:.1f} output tok/s, "
          f"off {out / seconds['off']:.1f}: {seconds['off'] / seconds['on']:.2f}x", flush=True)
    if json_dir:
        write_json(os.path.join(json_dir, f"hybrid_{name}_prefix.json"),
                   {"bench": "hybrid prefix caching", "model": model, "requests": num, "seconds": seconds,
                    "speedup": seconds["off"] / seconds["on"], "machine": machine_info()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--num", type=int, default=64, help="requests per model")
    p.add_argument("--json-dir", default=None, help="write <model>.json there")
    ns = p.parse_args()
    prefix_caching(ns.models[0], ns.num, ns.json_dir)
    for name in ns.models:
        argv = [build(name), "--compare", "--no-progress", "--num-prompts", str(ns.num), "--input-len-min", "64",
                "--input-len-max", "512", "--output-len-min", "16", "--output-len-max", "128"]
        if ns.json_dir:
            argv += ["--output-json", os.path.join(ns.json_dir, f"hybrid_{name}.json")]
        print(f"== {name} ==", flush=True)
        throughput(_namespace(argv))


if __name__ == "__main__":
    main()
