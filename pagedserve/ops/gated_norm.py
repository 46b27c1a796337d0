"""Triton kernel: the gated RMSNorm that ends a state layer (Gated DeltaNet's per-head norm
times SiLU(z); Mamba-2's group norm of y * SiLU(z), or Falcon-H1's norm then gate), in one
pass from the layer's float32 output instead of some ten elementwise kernels. Computes in
float32 with one rounding at the end (the PyTorch forms round once or twice on the way).
Twins: GatedRMSNorm and GroupGatedRMSNorm's PyTorch forward (model/layers/)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_rms_norm_kernel(
    x_ptr, z_ptr, w_ptr, out_ptr, stride_x, stride_z, stride_o, stride_wg, eps,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    d = tl.arange(0, BLOCK)
    mask = d < GROUP
    cols = grp * GROUP + d
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(dtype).to(tl.float32)  # the layer's dtype
    z = tl.load(z_ptr + t * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
    gate = z / (1.0 + tl.exp(-z))
    if not NORM_BEFORE_GATE:
        x = x * gate
    y = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / GROUP + eps)
    y = y * tl.load(w_ptr + grp * stride_wg + d, mask=mask, other=0.0).to(tl.float32)
    if NORM_BEFORE_GATE:
        y = y * gate
    tl.store(out_ptr + t * stride_o + cols, y.to(dtype), mask=mask)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group: int, eps: float,
                   norm_before_gate: bool) -> torch.Tensor:
    """x [T, C] (any float dtype, rounded to z's first), z [T, C] (unit stride in C), weight
    [C] or [group] (one weight shared by every group). RMS statistics over each `group`
    columns. Returns [T, C] in z's dtype."""
    t, c = x.shape
    assert z.shape == (t, c) and c % group == 0 and weight.numel() in (c, group)
    assert x.stride(1) == z.stride(1) == weight.stride(0) == 1
    out = torch.empty((t, c), dtype=z.dtype, device=z.device)
    if t:
        block = triton.next_power_of_2(group)
        _gated_rms_norm_kernel[(t, c // group)](
            x, z, weight, out, x.stride(0), z.stride(0), out.stride(0), group if weight.numel() == c else 0, eps,
            GROUP=group, BLOCK=block, NORM_BEFORE_GATE=norm_before_gate, num_warps=max(1, min(8, block // 256)),
        )
    return out
