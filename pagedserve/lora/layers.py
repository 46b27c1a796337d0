"""Applying a step's adapters: a forward hook on each adaptable linear layer adds, for each
run of rows that shares an adapter, scaling * (x @ A.T) @ B.T to that adapter's columns.

The rows of a step are its requests' tokens, each request's contiguous, so the step's adapter
map is a short list of (adapter, first row, end row) runs (LoRAState, set by the model runner
before each forward pass); rows without an adapter are left as the base model computes them."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pagedserve.lora.adapter import LoRAAdapter


class LoRAState:
    def __init__(self) -> None:
        self.runs: list[tuple[LoRAAdapter, int, int]] = []


def _hook(name: str, state: LoRAState):
    def add_lora(module: nn.Module, inputs: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        if not state.runs:
            return None
        x = inputs[0]
        for adapter, start, end in state.runs:
            factors = adapter.modules.get(name)
            if not factors:
                continue
            xs = x[start:end]
            for f in factors:
                output[start:end, f.offset : f.offset + f.size] += (xs @ f.a.t()) @ f.b.t() * adapter.scaling
        return output

    return add_lora


def install_lora_hooks(model: nn.Module, state: LoRAState) -> int:
    """A hook on every linear layer but the LM head; returns how many."""
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            module.register_forward_hook(_hook(name, state))
            n += 1
    return n
