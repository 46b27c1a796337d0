"""Applying a step's adapters: a forward hook on each adaptable linear layer adds, for the rows
of each adapter, scaling * (x @ A.T) @ B.T to that adapter's columns.

The step's adapter map (LoRAState, set by the model runner before each forward pass) holds one
entry per adapter: its rows as a slice where they are contiguous, else as an index tensor
(gathered, then added back with index_add_), so the cost grows with the number of adapters in
the batch, not of requests. Rows without an adapter are left as the base model computes them."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from pagedserve.lora.adapter import LINEAR_TYPES, LoRAAdapter


class LoRAState:
    def __init__(self) -> None:
        self.runs: list[tuple[LoRAAdapter, Union[slice, torch.Tensor]]] = []


def _hook(name: str, state: LoRAState):
    def add_lora(module: nn.Module, inputs: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        if not state.runs:
            return None
        x = inputs[0]
        for adapter, rows in state.runs:
            factors = adapter.modules.get(name)
            if not factors:
                continue
            contiguous = isinstance(rows, slice)
            xs = x[rows] if contiguous else x.index_select(0, rows)
            for f in factors:
                delta = (xs @ f.a.t()) @ f.b.t() * adapter.scaling
                if contiguous:
                    output[rows, f.offset : f.offset + f.size] += delta
                else:
                    output[:, f.offset : f.offset + f.size].index_add_(0, rows, delta)
        return output

    return add_lora


def install_lora_hooks(model: nn.Module, state: LoRAState) -> int:
    """A hook on every linear layer but the LM head (quantized ones too: the adapter's product is
    added to the output, whatever the base weight's format); returns how many."""
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, LINEAR_TYPES) and not name.endswith("lm_head"):
            module.register_forward_hook(_hook(name, state))
            n += 1
    return n
