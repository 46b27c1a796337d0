"""Triton kernel: the index of each row's largest logit, for greedy decoding of a few rows.
torch.argmax hands a single 32K-vocabulary row to one block that walks it mostly serially:
about 10 us per batch-1 token on an H100 (gpu_check's step profile), for 64 KB read. Here
one program of 16 warps takes the row in 16K-wide chunks and reduces across all its
threads. Ties go to the lowest index, as torch.argmax; a NaN is never picked (torch would
pick it; a NaN logit means a broken model either way). Twin: torch.argmax."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.ops.pdl import pdl_launch, pdl_start

MAX_ROWS = 8  # more rows: torch's reduction gives each its own block and is not serial
_BLOCK = 16384


@triton.jit
def _argmax_kernel(x_ptr, idx_ptr, V, stride_x, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)  # ops/pdl.py: the logits come from the kernel before
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    best_v = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        v = tl.load(x_ptr + row * stride_x + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
        take = v > best_v  # strictly: on a tie each lane keeps its earlier (lower) index
        best_v = tl.where(take, v, best_v)
        best_i = tl.where(take, start + offs, best_i)
    top = tl.max(best_v, axis=0)
    idx = tl.min(tl.where(best_v == top, best_i, V), axis=0)  # the lowest index holding the max
    tl.store(idx_ptr + row, tl.minimum(idx, V - 1).to(tl.int64))  # (V only if the row was all NaN)


def argmax_rows(x: torch.Tensor, block: int = _BLOCK) -> torch.Tensor:
    """x: [M, V] with unit stride in V -> [M] int64, each row's argmax."""
    m, v = x.shape
    assert x.stride(-1) == 1 and v > 0
    out = torch.empty(m, dtype=torch.int64, device=x.device)
    if m:
        block = min(block, triton.next_power_of_2(v))
        _argmax_kernel[(m,)](x, out, v, x.stride(0), BLOCK=block, num_warps=16 if block >= 8192 else 4,
                             **pdl_launch(x.device))
    return out
