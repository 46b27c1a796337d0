"""The adapters a runner holds: loaded on first use, kept while any live request uses them,
and up to max_cpu_loras unused ones besides, least recently used dropped first."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from pagedserve.lora.adapter import LoRAAdapter, load_adapter
from pagedserve.lora.request import LoRARequest


class LoRAManager:
    def __init__(self, model: nn.Module, max_lora_rank: int, max_cpu_loras: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model, self.max_rank, self.max_cpu_loras = model, max_lora_rank, max_cpu_loras
        self.dtype, self.device = dtype, device
        self.adapters: "OrderedDict[int, LoRAAdapter]" = OrderedDict()  # least recently used first
        self.paths: dict[int, tuple[str, str]] = {}  # id -> (name, path) of each held adapter
        self.refs: dict[int, int] = {}  # id -> live requests using it
        self.owner: dict[str, int] = {}  # request id -> adapter id

    def load(self, lora: LoRARequest) -> LoRAAdapter:
        """The adapter, loaded if it is not held (a ValueError when it is bad); most recently
        used from now."""
        aid = lora.lora_int_id
        held = self.paths.get(aid)
        if held is not None and held != (lora.lora_name, lora.lora_path):
            raise ValueError(f"lora_int_id {aid} is already the adapter {held[0]!r} ({held[1]}); "
                             "each adapter needs an id of its own.")
        adapter = self.adapters.get(aid)
        if adapter is None:
            adapter = load_adapter(aid, lora.lora_name, lora.lora_path, self.model, self.max_rank, self.dtype,
                                   pin=self.device.type == "cuda")
            self.adapters[aid] = adapter
            self.paths[aid] = (lora.lora_name, lora.lora_path)
        self.adapters.move_to_end(aid)
        return adapter

    def acquire(self, request_id: str, lora: LoRARequest) -> LoRAAdapter:
        """The adapter for a new request, held until release(request_id)."""
        adapter = self.load(lora)
        aid = lora.lora_int_id
        self.refs[aid] = self.refs.get(aid, 0) + 1
        self.owner[request_id] = aid
        self._evict()
        return adapter

    def release(self, request_id: str) -> None:
        aid = self.owner.pop(request_id, None)
        if aid is None:
            return
        self.refs[aid] -= 1
        if self.refs[aid] == 0:
            del self.refs[aid]
            self._evict()

    def adapter_of(self, request_id: str) -> Optional[LoRAAdapter]:
        aid = self.owner.get(request_id)
        return None if aid is None else self.adapters[aid]

    def _evict(self) -> None:
        unused = [aid for aid in self.adapters if aid not in self.refs]
        for aid in unused[: max(0, len(unused) - self.max_cpu_loras)]:
            del self.adapters[aid]
            del self.paths[aid]
