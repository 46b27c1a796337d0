"""sentence-transformers' Dense modules (a directory each: config.json with in_features,
out_features, bias, activation_function; model.safetensors, or pytorch_model.bin, with
linear.weight / linear.bias): the projections some embedding models apply to the pooled vector
before normalizing it (EmbeddingGemma: 768 -> 3072 -> 768). Run in float32, as the pooled
vector is."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
from torch import nn

_ACTIVATIONS = {"torch.nn.modules.linear.Identity": nn.Identity, "torch.nn.modules.activation.Tanh": nn.Tanh,
                "torch.nn.modules.activation.ReLU": nn.ReLU, "torch.nn.modules.activation.GELU": nn.GELU,
                "torch.nn.modules.activation.Sigmoid": nn.Sigmoid}


def _dense(path: str) -> nn.Module:
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"could not read the sentence-transformers Dense module in {path}: {e}") from None
    act = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{path}/config.json: activation_function {act!r} is not supported "
                         f"(supported: {', '.join(sorted(_ACTIVATIONS))}).")
    linear = nn.Linear(int(cfg["in_features"]), int(cfg["out_features"]), bias=bool(cfg.get("bias", True)))
    weights = _weights(path)
    state = {k.removeprefix("linear."): v.float() for k, v in weights.items()}
    missing, unexpected = linear.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the Dense module in {path} does not fit its config.json: missing {missing}, "
                         f"unexpected {unexpected}.")
    return nn.Sequential(linear, _ACTIVATIONS[act]())


def _weights(path: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise ValueError(f"the Dense module in {path} has no model.safetensors or pytorch_model.bin.")


def load_dense_layers(paths: Sequence[str], device: torch.device) -> Optional[nn.Module]:
    """The Dense modules in order, as one float32 module on `device`; None where there are none."""
    if not paths:
        return None
    return nn.Sequential(*(_dense(p) for p in paths)).to(device).eval().requires_grad_(False)
