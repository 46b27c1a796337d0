"""Applying a step's adapters: max_loras slots of stacked factors per adaptable layer, on the
device, and one adapter slot per token row, so the same kernels serve every step and a CUDA
graph replays them with whatever adapters the slots hold then.

Per layer, slot s holds shard f's (q, k, v of a fused qkv projection; else one shard)
factors at ranks [(s * F + f) * R, ... + R) of a [S * F * R, in] stack A and of the columns
of a [out, S * F * R] stack B (R = max_lora_rank; an adapter of a smaller rank is padded with
zeros, scaling folded into B). A forward hook adds ((x @ A.T) * mask) @ B.T to the output,
mask[t, c] = 1 where row t's slot owns rank c: two small matrix products a layer, whatever the
number of adapters in the batch, and no per-step host mapping beyond the rows' slots (a
device tensor graphs read in place). Rows without an adapter (slot -1) get nothing."""

from __future__ import annotations

import weakref
from typing import Optional

import numpy as np
import torch
from torch import nn

from pagedserve.lora.adapter import LINEAR_TYPES, LoRAAdapter
from pagedserve.worker.device_io import to_device


class _Stack:
    """One layer's slots (see the module docstring)."""

    def __init__(self, module: nn.Module, slots: int, rank: int, dtype: torch.dtype, device: torch.device) -> None:
        shards = getattr(module, "shard_offsets", None)
        self.offsets = [off for off, _ in shards.values()] if shards else [0]
        self.rank, self.per_slot = rank, len(self.offsets) * rank
        cols = slots * self.per_slot
        self.a = torch.zeros((cols, module.in_features), dtype=dtype, device=device)
        self.b = torch.zeros((module.out_features, cols), dtype=dtype, device=device)
        self.col_slot = torch.arange(cols, device=device) // self.per_slot

    def clear(self, slot: int) -> None:
        cols = slice(slot * self.per_slot, (slot + 1) * self.per_slot)
        self.a[cols].zero_()
        self.b[:, cols].zero_()

    def put(self, slot: int, offset: int, size: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Factors from host memory (pinned on CUDA: queued copies, behind any step still
        running on the old ones)."""
        at = slot * self.per_slot + self.offsets.index(offset) * self.rank
        r = a.shape[0]
        self.a[at:at + r].copy_(a, non_blocking=True)
        self.b[offset:offset + size, at:at + r].copy_(b, non_blocking=True)


class LoRASlots:
    """The slots, the adapters they hold, and the rows' slots of the step being run."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, max_rows: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.device = device
        # The adapter in each slot, weakly: one the manager drops (lora/manager.py) frees its
        # slot and its memory; its factors stay in the slot until another is loaded there.
        self._held: list[Optional[weakref.ref]] = [None] * max_loras
        self._last_use = [0] * max_loras
        self._clock = 0
        # Each row's slot (-1: none). Steps write their first rows; graphs read it in place.
        self.row_slots = torch.full((max_rows,), -1, dtype=torch.long, device=device)
        # Eager steps without an adapter row skip the products; graphs are captured with them.
        self.active = False
        self.stacks: dict[str, _Stack] = {}
        for name, module in model.named_modules():
            if isinstance(module, LINEAR_TYPES) and not name.endswith("lm_head"):
                self.stacks[name] = stack = _Stack(module, max_loras, max_rank, dtype, device)
                module.register_forward_hook(_hook(stack, self))

    @property
    def held(self) -> list[Optional[LoRAAdapter]]:
        return [None if r is None else r() for r in self._held]

    def num_bytes(self) -> int:
        return sum(s.a.numel() * s.a.element_size() + s.b.numel() * s.b.element_size() for s in self.stacks.values())

    def slot_of(self, adapters: list[Optional[LoRAAdapter]]) -> list[int]:
        """Each request's slot (-1: no adapter), loading adapters not held into slots no other
        adapter of this step holds (empty ones first, then the least recently used). The
        scheduler admits at most max_loras adapters a step, so one is always free. A slot's
        new factors are copied on the device's stream: a step still running reads the old."""
        self._clock += 1
        step = {id(a) for a in adapters if a is not None}
        held = self.held
        out = []
        for adapter in adapters:
            if adapter is None:
                out.append(-1)
                continue
            slot = next((s for s, a in enumerate(held) if a is adapter), None)
            if slot is None:
                free = [s for s, a in enumerate(held) if a is None or id(a) not in step]
                assert free, "more adapters in a step than max_loras"
                slot = min(free, key=lambda s: (held[s] is not None, self._last_use[s]))
                self._load(slot, adapter)
                held[slot] = adapter
            self._last_use[slot] = self._clock
            out.append(slot)
        return out

    def _load(self, slot: int, adapter: LoRAAdapter) -> None:
        for stack in self.stacks.values():
            stack.clear(slot)
        for name, factors in adapter.modules.items():
            for f in factors:
                self.stacks[name].put(slot, f.offset, f.size, f.a, f.b)
        self._held[slot] = weakref.ref(adapter)

    def set_rows(self, slots: np.ndarray) -> None:
        """The step's rows' slots, in the layout its forward pass takes (written even when
        none has an adapter: a graph replay reads them whatever they are)."""
        self.active = bool((slots >= 0).any())
        self.row_slots[: len(slots)].copy_(to_device(slots, torch.long, self.device))


def _hook(stack: _Stack, slots: LoRASlots):
    def add_lora(module: nn.Module, inputs: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        if not slots.active:
            return None
        x = inputs[0]
        mask = (slots.row_slots[: x.shape[0], None] == stack.col_slot[None, :]).to(x.dtype)
        output += ((x @ stack.a.t()) * mask) @ stack.b.t()
        return output

    return add_lora
