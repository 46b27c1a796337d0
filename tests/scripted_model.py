"""A Llama whose greedy next token is a fixed function of the current token, to make a tiny
model write given text (a parser's markers, a tool call) end to end through the engine.

Its attention and MLP write nothing (o_proj and down_proj are zero), so the last hidden
state is the normalised embedding of the current token; lm_head holds, for each step a -> b
of a script, token a's embedding in token b's row: b outscores every other token by about
sqrt(hidden) standard deviations. A token may lead to only one successor across scripts."""

from __future__ import annotations

import json
import os
from typing import Sequence

HIDDEN = 256


def build_scripted_model(path: str, tokenizer_dir: str, scripts: Sequence[Sequence[int]],
                         eos_token_ids: Sequence[int] = (), lead: float = 10.0) -> str:
    """A model directory at `path` (float32, `tokenizer_dir`'s tokenizer) that, greedily, after
    each token of a script writes the script's next token. `eos_token_ids`: the model's stop
    tokens (config and generation config), besides the tokenizer's EOS. `lead`: how far the
    scripted successor's logit stands out (about lead * sqrt(hidden); other logits have a
    standard deviation of about 0.16), small enough for a penalty to overturn at 0.05."""
    import torch
    from safetensors.torch import load_file, save_file

    from pagedserve.model.random_model import build_random_model

    successor: dict[int, int] = {}
    for script in scripts:
        for a, b in zip(script, script[1:]):
            if successor.setdefault(a, b) != b:
                raise ValueError(f"token {a} leads to both {successor[a]} and {b}: this model sees one token")
    build_random_model(path, tokenizer_dir=tokenizer_dir, hidden_size=HIDDEN, intermediate_size=64, num_layers=1,
                       num_heads=4, num_kv_heads=4)
    weights_file = os.path.join(path, "model.safetensors")
    weights = load_file(weights_file)
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(weights["model.embed_tokens.weight"].shape, generator=g)
    head = torch.randn(embed.shape, generator=g) * 0.01
    for a, b in successor.items():
        head[b] += lead * embed[a] / embed[a].norm()
    weights["model.embed_tokens.weight"], weights["lm_head.weight"] = embed, head
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])
    save_file(weights, weights_file, metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        file = os.path.join(path, name)
        if os.path.exists(file):
            with open(file) as f:
                cfg = json.load(f)
            base = cfg.get("eos_token_id")
            base = base if isinstance(base, list) else [base] if base is not None else []
            cfg["eos_token_id"] = [*base, *(t for t in eos_token_ids if t not in base)]
            with open(file, "w") as f:
                json.dump(cfg, f, indent=2)
    return path
