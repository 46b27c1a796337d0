"""Programmatic dependent launch (PDL, Hopper and later): PAGEDSERVE_PDL=1, or a GPU model's
tuned file (ops/tuned.py) with "pdl": true.

A decode step at batch 1 is some 300 kernels of a few microseconds each, and each one's
launch and ramp-up normally waits for the previous one to drain. With PDL a kernel launched
with `launch_pdl` may start while the one before it finishes: it calls `gdc_launch_dependents`
at its start (the next kernel may be scheduled once every program of this one has started),
loads what no earlier kernel writes (weights), then `gdc_wait`s for the kernel before it to
complete and flush before it reads activations or writes anything. Since every such kernel
waits before it completes, waiting for the previous kernel waits for all earlier ones too.

Kernels take a `PDL: tl.constexpr` flag. With it False (the default, CPU, Triton's
interpreter, GPUs before Hopper, or a Triton without these calls) they compile exactly as
before."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pagedserve.ops import triton_interpreting, tuned

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: PDL stays off and the kernels never reach these
    gdc_launch_dependents = gdc_wait = None


# PAGEDSERVE_PDL=1 / 0, read once; unset (UNSET), the GPU model's tuned file (ops/tuned.py)
# decides, and without one PDL is off.
REQUESTED = tuned.from_env("PAGEDSERVE_PDL", lambda v: v == "1")
_OFF = {"PDL": False}
_ON = {"PDL": True, "launch_pdl": True}


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (asked for, by PAGEDSERVE_PDL or the tuned
    file, on a GPU that has it)."""
    if gdc_wait is None or device.type != "cuda" or triton_interpreting():
        return False
    if not tuned.resolve(REQUESTED, "pdl", device, False):
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch(device: torch.device) -> dict:
    """The PDL constexpr, plus launch_pdl=True when enabled, for a kernel launch (read-only)."""
    return _ON if pdl_enabled(device) else _OFF


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """For a kernel that reads nothing before the kernel before it is done: let the next
    kernel be scheduled, then wait."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
