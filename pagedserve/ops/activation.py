"""Triton kernel: SiLU(gate) * up over a fused gate_up projection [T, 2I], one pass instead of
a split, an activation and a product. Rounds at the steps the PyTorch form rounds (the
activation, then the product, in the model dtype); tests hold it to a unit of the tensor's
scale. Twin: reference.silu_and_mul_ref."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.ops.pdl import pdl_launch, pdl_start

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)  # ops/pdl.py
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, (s * u).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate then up) -> [T, I]."""
    t, two_i = x.shape
    assert two_i % 2 == 0 and x.stride(-1) == 1
    n = two_i // 2
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t:
        block = min(_BLOCK, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(t, triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, BLOCK=block,
                                                         num_warps=4, **pdl_launch(x.device))
    return out
