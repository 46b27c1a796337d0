"""Host <-> device copies that never make the host wait for the GPU's queued work.

With async scheduling step N+1 is prepared while step N still runs. A plain `torch.tensor(
data, device="cuda")` or `.to("cuda")` from pageable memory synchronizes the stream (PyTorch's
memcpy_and_sync), so the host would stall until step N finished; a blocking `.tolist()` of a
result would wait for every step queued after it. Host data therefore goes through pinned
memory with non-blocking copies (PyTorch keeps a pinned block alive until its copy is done),
and results come back into pinned memory behind an event. On CPU these are plain tensors."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import torch


def to_device(data: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A list / numpy array on the device, queued without synchronizing the stream."""
    if device.type != "cuda":
        return torch.as_tensor(data, dtype=dtype)
    if isinstance(data, np.ndarray):
        host = torch.from_numpy(data).to(dtype).pin_memory()
    else:
        host = torch.tensor(data, dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)


class DeviceToHost:
    """Non-blocking copies of a step's results into pinned host memory, and an event behind
    them: waiting on it waits for that step only. On CPU tensors are passed through."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.event: Optional[torch.cuda.Event] = None

    def __call__(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None or not self.cuda:
            return t
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)

    def dataclass(self, obj: Any) -> Any:
        """A copy of a dataclass of tensors (None fields stay None)."""
        if obj is None:
            return None
        return type(obj)(*(self(getattr(obj, f.name)) for f in dataclasses.fields(obj)))

    def record(self) -> None:
        if self.cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
