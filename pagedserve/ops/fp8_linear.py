"""Triton kernel: y = x @ W^T (+ b) with W held in FP8 e4m3 and float32 scales per output row
and K block ([N, KB], bk columns a block; layers/fp8.py). Each weight tile is dequantized in
registers (times its rows' scales, rounded to the activations' dtype, as the twin rounds) and
fed to the tensor cores with the bf16 activations: the weights cross memory at one byte each,
half of bf16's, which is what a decode step (weight reads) is made of.

Twin: fp8_linear_ref (dequantize, then torch.nn.functional.linear)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pagedserve.ops import triton_interpreting
from pagedserve.ops.weight_gemm import GemmConfig, as_rows, default_config, grouped_tile


@triton.jit
def _fp8_linear_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                       SCALE_BK: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    s_rows = s_ptr + offs_n.to(tl.int64) * stride_sn
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        scale = tl.load(s_rows + k0 // SCALE_BK, mask=n_ok, other=0.0)
        wd = (w.to(tl.float32) * scale[None, :]).to(dtype)
        if UPCAST:  # fp32 activations, or the interpreter (no 16-bit dot): exact products in fp32
            acc = tl.dot(x.to(tl.float32), wd.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, wd, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, block_k: int,
               bias: Optional[torch.Tensor] = None, config: Optional[GemmConfig] = None) -> torch.Tensor:
    """x [..., K] (bf16 / fp16 / fp32); weight [N, K] e4m3; scales [N, ceil(K / block_k)]."""
    shape = x.shape
    x2 = as_rows(x)
    m, k = x2.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(-1) == 1 and scales.shape[0] == n
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        cfg = config or default_config(m, block_k)
        bm, bn, bk, group, warps, stages = cfg
        assert block_k % bk == 0 or block_k >= k, "BLOCK_K must divide the scale's K block"
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _fp8_linear_kernel[grid](
            x2, weight, scales, bias if bias is not None else y, y, m, n, k, x2.stride(0), weight.stride(0),
            scales.stride(0), y.stride(0), SCALE_BK=block_k, HAS_BIAS=bias is not None,
            UPCAST=x.dtype == torch.float32 or triton_interpreting(),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=warps, num_stages=stages)
    return y.view(*shape[:-1], n)


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, block_k: int,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    from pagedserve.model.layers.fp8 import dequantize

    return torch.nn.functional.linear(x, dequantize(weight, scales, block_k, x.dtype), bias)
