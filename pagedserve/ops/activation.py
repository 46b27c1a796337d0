"""Triton kernels for the gated activations over a fused gate_up projection [T, 2I] (gate
half, then up half), one pass instead of a split, an activation and a product:
- SiLU(gate) * up (Llama, Mixtral...): rounds at the steps the PyTorch form rounds (the
  activation, then the product, in the model dtype); tests hold it to a unit of the
  tensor's scale. Twin: reference.silu_and_mul_ref.
- GPT-OSS's clamped SwiGLU ("swigluoai", as vLLM names it): gate clamped above at `limit`,
  up to [-limit, limit], then (up + 1) * gate * sigmoid(alpha * gate), in float32 with one
  rounding. Twin: reference.swigluoai_and_mul_ref.
- GELU(gate, tanh approximation) * up (Gemma's GeGLU: "gelu_pytorch_tanh", "gelu_new"),
  rounded as SiLU's. Twin: reference.gelu_tanh_and_mul_ref."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.ops.pdl import pdl_launch, pdl_start

_BLOCK = 1024
SILU, SWIGLUOAI, GELU_TANH = 0, 1, 2  # the kernel's ACT
GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_new")  # transformers' names of the tanh-approximated GELU


# One kernel for both (named for the common one: profiles and launch counts say so).
@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, alpha, limit, BLOCK: tl.constexpr,
                         ACT: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)  # ops/pdl.py
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == 1:  # SWIGLUOAI
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        out = (u + 1.0) * (g / (1.0 + tl.exp(-alpha * g)))
    elif ACT == 2:  # GELU_TANH: 0.5 g (1 + tanh(z)), tanh(z) = 1 - 2 / (1 + exp(2z))
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        out = (0.5 * g * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * z)))).to(dtype).to(tl.float32) * u
    else:
        out = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * u
    tl.store(out_ptr + t * stride_o + cols, out.to(dtype), mask=mask)


def _gated_act(x: torch.Tensor, act: int, alpha: float = 0.0, limit: float = 0.0) -> torch.Tensor:
    t, two_i = x.shape
    assert two_i % 2 == 0 and x.stride(-1) == 1
    n = two_i // 2
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t:
        block = min(_BLOCK, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(t, triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, float(alpha),
                                                      float(limit), BLOCK=block, ACT=act, num_warps=4,
                                                      **pdl_launch(x.device))
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate then up) -> [T, I]."""
    return _gated_act(x, SILU)


def swigluoai_and_mul(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """x: [T, 2I] (gate then up) -> [T, I], GPT-OSS's clamped SwiGLU."""
    return _gated_act(x, SWIGLUOAI, alpha, limit)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate then up) -> [T, I], GELU (tanh approximation) of the gate times up."""
    return _gated_act(x, GELU_TANH)
