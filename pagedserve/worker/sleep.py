"""Sleep mode (vLLM's enable_sleep_mode): hand the device memory of the weights and of the KV
cache back while the engine idles (an RL trainer's turn on the GPU), and take it again.

Storages are resized in place rather than tensors replaced, so every tensor and view that
shares one (tied embeddings, fused shards, a kernel's view of a weight) sees the memory again
on wake-up without being found and re-pointed. Only raw addresses captured in CUDA graphs go
stale; the runner captures its graphs again once everything is awake."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

SLEEP_TAGS = ("weights", "kv_cache")


def unique_storages(tensors: Iterable[torch.Tensor]) -> list[torch.UntypedStorage]:
    """Each distinct (non-empty) storage behind `tensors`, once."""
    seen: dict[int, torch.UntypedStorage] = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.nbytes() and s.data_ptr() not in seen:
            seen[s.data_ptr()] = s
    return list(seen.values())


class SleepingStorages:
    """Storages whose memory is given back: `offload` keeps a host copy of their bytes to
    restore, `discard` keeps nothing (their contents are undefined after wake-up)."""

    def __init__(self, storages: list[torch.UntypedStorage], offload: bool) -> None:
        self.storages = storages
        self.sizes = [s.nbytes() for s in storages]
        self.backups: Optional[list[torch.Tensor]] = None
        if offload:
            pin = storages[0].device.type == "cuda" if storages else False
            self.backups = []
            for s in storages:
                host = torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=pin)
                host.untyped_storage().copy_(s)
                self.backups.append(host)
        for s in storages:
            s.resize_(0)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def restore(self, zero: bool = False) -> None:
        """Take the memory again; the offloaded bytes come back, else zeros if `zero`."""
        for i, (s, size) in enumerate(zip(self.storages, self.sizes)):
            s.resize_(size)
            if self.backups is not None:
                s.copy_(self.backups[i].untyped_storage())
            elif zero:
                torch.empty(0, dtype=torch.uint8, device=s.device).set_(s).zero_()
        self.backups = None


def release_cached_memory(device: torch.device) -> None:
    """Give the caching allocator's now-unused blocks back to the driver (other processes, a
    trainer's own allocator, see the memory only then)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
