"""Triton kernel: RMSNorm of each row, optionally after adding the residual stream
(vLLM's fused_add_rms_norm): one read and one write per tensor instead of the seven kernels
and float32 intermediates of the PyTorch form. Rounds where Hugging Face's form rounds (the
sum and the normalised row in the model dtype, then the weight product): on an H100 the
sum was bit-identical and the output within one unit in the last place (reduction order).
Twin: reference.rms_norm_ref."""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from pagedserve.ops.pdl import pdl_launch, pdl_start


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # no kernel writes weights
    pdl_start(PDL)  # ops/pdl.py
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(dtype)  # the residual stream stays in the model dtype
        tl.store(res_out_ptr + row * stride_ro + cols, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    y = (x * tl.math.rsqrt(var + eps)).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (y * w).to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """x, residual: [T, H] with unit stride in H. Without residual: norm(x) * weight. With
    it: (norm(x + residual) * weight, x + residual). Outputs are new tensors."""
    t, h = x.shape
    assert x.stride(-1) == 1 and weight.shape == (h,)
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    if t:
        block = triton.next_power_of_2(h)
        r = residual if residual is not None else x
        assert r.stride(-1) == 1
        _rms_norm_kernel[(t,)](
            x, r, weight, out, res_out, x.stride(0), r.stride(0), out.stride(0), res_out.stride(0), h, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
            **pdl_launch(x.device),
        )
    return (out, res_out) if residual is not None else out
