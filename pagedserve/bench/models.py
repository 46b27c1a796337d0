"""The benchmark model: a ~30M-parameter Llama-shaped random model, built once and cached."""

from __future__ import annotations

import os
import tempfile

BENCH_MODEL_SHAPE = dict(hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=8,
                         vocab_size=32000, max_position_embeddings=2048, tokenizer_vocab=2048)


def bench_model_dir(path: str | None = None) -> str:
    """Path of the benchmark model, building it there (default: a temp-dir cache) if absent."""
    from pagedserve.model.random_model import build_random_model

    path = path or os.path.join(tempfile.gettempdir(), "pagedserve-bench-llama-30m")
    if not os.path.isfile(os.path.join(path, "config.json")):
        build_random_model(path, "LlamaForCausalLM", seed=0, **BENCH_MODEL_SHAPE)
    return path
