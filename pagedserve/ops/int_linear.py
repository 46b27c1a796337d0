"""Triton kernel: y = x[:, perm] @ W^T (+ b) with W held as 4- or 8-bit unsigned integers
packed in int32 words along K ([N, K * bits / 32]), a float32 scale and an int16 zero point per
output row and group of G input columns: w = (q - z) * s (GPTQ and AWQ checkpoints,
layers/int_quant.py). Each weight tile is unpacked and dequantized in registers (rounded to the
activations' dtype, as the twin rounds) and fed to the tensor cores with the bf16 activations:
the weights cross memory at bits / 8 bytes each, which is what a decode step is made of.
perm (GPTQ's act order) reads x's columns in group order; the weights are stored in it.

Twin: int_linear_ref (dequantize, then torch.nn.functional.linear)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pagedserve.ops import triton_interpreting
from pagedserve.ops.weight_gemm import GemmConfig, as_rows, default_config, grouped_tile


@triton.jit
def _int_linear_kernel(x_ptr, w_ptr, s_ptr, z_ptr, p_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                       stride_zn, stride_ym, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr,
                       HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn  # [1, BLOCK_N]
    shifts = ((offs_k % PACK) * BITS)[:, None]
    s_rows = s_ptr + offs_n.to(tl.int64) * stride_sn
    z_rows = z_ptr + offs_n.to(tl.int64) * stride_zn
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        if HAS_PERM:
            cols = tl.load(p_ptr + kk, mask=k_ok, other=0)
        else:
            cols = kk
        x = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # each word is read by its PACK rows of the tile (the same cache line), then shifted
        words = tl.load(w_cols + (kk // PACK)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        q = (words >> shifts) & ((1 << BITS) - 1)
        scale = tl.load(s_rows + k0 // GROUP, mask=n_ok, other=0.0)
        zero = tl.load(z_rows + k0 // GROUP, mask=n_ok, other=0).to(tl.int32)
        wd = ((q - zero[None, :]).to(tl.float32) * scale[None, :]).to(dtype)
        if UPCAST:  # fp32 activations, or the interpreter (no 16-bit dot): exact products in fp32
            acc = tl.dot(x.to(tl.float32), wd.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, wd, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])


def int_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group: int, perm: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               config: Optional[GemmConfig] = None) -> torch.Tensor:
    """x [..., K] (bf16 / fp16 / fp32); weight [N, K * bits / 32] int32; scales [N, KG] float32;
    zeros [N, KG] int16; perm [K] int32 or None."""
    shape = x.shape
    x2 = as_rows(x)
    m, k = x2.shape
    n = weight.shape[0]
    assert weight.shape[1] * (32 // bits) == k and weight.stride(-1) == 1 and scales.shape == zeros.shape
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        bm, bn, bk, group_m, warps, stages = config or default_config(m, group)
        assert group % bk == 0, "BLOCK_K must divide the quantization group"
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _int_linear_kernel[grid](
            x2, weight, scales, zeros, perm if perm is not None else weight, bias if bias is not None else y, y,
            m, n, k, x2.stride(0), weight.stride(0), scales.stride(0), zeros.stride(0), y.stride(0),
            BITS=bits, GROUP=group, HAS_PERM=perm is not None, HAS_BIAS=bias is not None,
            UPCAST=x.dtype == torch.float32 or triton_interpreting(),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages)
    return y.view(*shape[:-1], n)


def dequantize_packed(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Our packed layout -> [N, K] in `dtype` (columns in stored, i.e. act, order)."""
    from pagedserve.model.layers.int_quant import IntWeight, unpack

    return IntWeight(unpack(weight, bits, 1), zeros, scales, None, group).dequantize(dtype)


def int_linear_ref(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group: int, perm: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if perm is not None:
        x = x[..., perm.long()]
    return torch.nn.functional.linear(x, dequantize_packed(weight, scales, zeros, bits, group, x.dtype), bias)
