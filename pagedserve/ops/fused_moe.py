"""Triton kernels for a mixture-of-experts layer with no host sync, so that MoE models can run
under CUDA graphs: the routed (token, expert) pairs are sorted by expert on the device, each
expert's group padded to a whole BLOCK_M, and one grouped-GEMM launch runs every block
against its expert's weights (the design vLLM and SGLang use).

    align:    topk_ids [T, k] -> sorted_ids (pair indices t*k + j grouped by expert, padding
              = T*k), block_experts (each BLOCK_M block's expert), num_padded (a 1-element
              device tensor: blocks at or past it exit at once)
    w13 GEMM: x[pair // k] @ w13[e]^T (+ b13[e])    -> [T*k, 2I] in the model dtype
    gated activation: ops/activation.py             -> [T*k, I]
    w2 GEMM:  act[pair] @ w2[e]^T (+ b2[e]), rounded to the model dtype, times the routing
              weight                                -> [T*k, H] in float32
    sum over k in float32, one rounding to the model dtype.

It rounds where FusedMoE's PyTorch path rounds, which is its twin (tests/test_fused_moe.py)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pagedserve.ops import triton_interpreting

# BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages
MoEConfig = tuple[int, int, int, int, int, int]


def default_config(num_pairs: int, num_experts: int) -> MoEConfig:
    """Few pairs per expert (decode): short blocks, so little of each is padding. Many
    (prefill): blocks that keep the tensor cores busy, grouped so neighbouring programs
    share weight tiles in L2."""
    if num_pairs <= 2 * num_experts:
        return 16, 64, 64, 1, 4, 4
    if num_pairs <= 16 * num_experts:
        return 32, 64, 64, 4, 4, 4
    return 64, 128, 64, 8, 8, 3


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the T*k routed pairs by expert, each group padded to a multiple of block_m.

    Sizes depend on T, k, E and block_m only (no host sync, capturable in a CUDA graph): at
    most min(E, T*k) experts are hit, each adding under block_m rows of padding."""
    t, k = topk_ids.shape
    n = t * k
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    first_unpadded = torch.cumsum(counts, 0) - counts
    dest = (ends - padded)[expert_of] + torch.arange(n, device=dev) - first_unpadded[expert_of]
    max_blocks = (n + min(num_experts, n) * (block_m - 1)) // block_m + 1
    sorted_ids = torch.full((max_blocks * block_m,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    starts = torch.arange(max_blocks, device=dev) * block_m
    block_experts = torch.searchsorted(ends, starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, block_experts, ends[-1:].to(torch.int32)


@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, c_ptr, weight_ptr, sorted_ptr, experts_ptr, num_padded_ptr, s_ptr,
                     N, K, num_pairs, num_blocks_m, stride_am, stride_we, stride_wn, stride_cm, stride_se, stride_sn,
                     TOP_K: tl.constexpr, A_PER_TOKEN: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                     UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, HAS_SCALE: tl.constexpr, SCALE_BK: tl.constexpr,
                     z_ptr=None, stride_ze=0, stride_zn=0, INT_BITS: tl.constexpr = 0,
                     b_ptr=None, stride_be=0, HAS_BIAS: tl.constexpr = False, FP4: tl.constexpr = False):
    """C[pair, :] = A[row(pair), :] @ W[expert]^T for the pairs of one BLOCK_M block, one
    BLOCK_N slice of N. row(pair) is the token (pair // k, A_PER_TOKEN) or the pair itself.
    W is [E, N, K] with K contiguous. HAS_SCALE: W is FP8 with float32 scales [E, N, KB] per
    row and SCALE_BK-wide K block, each tile dequantized to A's dtype (ops/fp8_linear.py).
    INT_BITS (4 or 8): W is [E, N, K * INT_BITS / 32] int32 words packed along K, with float32
    scales and int16 zeros [E, N, KG] per row and SCALE_BK-wide group: w = (q - z) * s
    (GPTQ / AWQ / compressed-tensors experts, ops/int_linear.py). FP4 (with INT_BITS 4): each
    4-bit code is an e2m1 float (sign, 2 exponent bits, 1 mantissa bit), the scales uint8
    exponents, and w = fp4(q) * 2^(s - 127), no zeros (MXFP4: GPT-OSS's experts, a scale per
    32 columns). HAS_BIAS: a bias [E, N] per expert joins the float32 accumulator."""
    pid = tl.program_id(0)
    num_blocks_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks sweep the N slices together (weight tiles reused in L2).
    per_group = GROUP_M * num_blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + offs_m)
    valid = pairs < num_pairs
    expert = tl.load(experts_ptr + pid_m).to(tl.int64)
    rows = (pairs // TOP_K) if A_PER_TOKEN else pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    if INT_BITS:
        PACK: tl.constexpr = 32 // INT_BITS if INT_BITS else 1
        w_ptrs = w_ptr + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + (offs_k // PACK)[:, None]
        shifts = ((offs_k % PACK) * INT_BITS)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        if INT_BITS:
            words = tl.load(w_ptrs + k0 // PACK, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0)
            q = (words >> shifts) & ((1 << INT_BITS) - 1)
            n_ok = offs_n < N
            scale = tl.load(s_ptr + expert * stride_se + offs_n.to(tl.int64) * stride_sn + k0 // SCALE_BK,
                            mask=n_ok, other=0.0)
            if FP4:  # e2m1: |v| = m / 2 (exponent 0), else (2 + m) * 2^(e - 1) / 2; scale 2^(s - 127)
                scale = tl.math.exp2(scale.to(tl.float32) - 127.0)
                e = (q >> 1) & 3
                m = q & 1
                mag = tl.where(e == 0, m, (2 + m) << tl.maximum(e - 1, 0)).to(tl.float32) * 0.5
                v = tl.where((q & 8) != 0, -mag, mag)
                w = (v * scale[None, :]).to(a_ptr.dtype.element_ty)
            else:
                zero = tl.load(z_ptr + expert * stride_ze + offs_n.to(tl.int64) * stride_zn + k0 // SCALE_BK,
                               mask=n_ok, other=0).to(tl.int32)
                w = ((q - zero[None, :]).to(tl.float32) * scale[None, :]).to(a_ptr.dtype.element_ty)
        else:
            w = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        if HAS_SCALE and not INT_BITS:
            scale = tl.load(s_ptr + expert * stride_se + offs_n.to(tl.int64) * stride_sn + k0 // SCALE_BK,
                            mask=offs_n < N, other=0.0)
            w = (w.to(tl.float32) * scale[None, :]).to(a_ptr.dtype.element_ty)
        if UPCAST:  # the interpreter has no 16-bit dot (see paged_attention._dot); fp32 stays exact
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        if not INT_BITS:
            w_ptrs += BLOCK_K
    dtype = a_ptr.dtype.element_ty
    if HAS_BIAS:
        bias = tl.load(b_ptr + expert * stride_be + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if MUL_WEIGHT:  # the expert's output in the model dtype (as F.linear gives it), then weighted
        rw = tl.load(weight_ptr + pairs, mask=valid, other=0.0)
        acc = acc.to(dtype).to(tl.float32) * rw[:, None]
    c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def _moe_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, aligned: tuple, top_k: int,
              a_per_token: bool, weights: Optional[torch.Tensor], config: MoEConfig,
              scale: Optional[torch.Tensor] = None, scale_bk: int = 0, zero: Optional[torch.Tensor] = None,
              int_bits: int = 0, bias: Optional[torch.Tensor] = None, fp4: bool = False) -> None:
    sorted_ids, block_experts, num_padded = aligned
    block_m, block_n, block_k, group_m, warps, stages = config
    e, n, k = w.shape
    k *= 32 // int_bits if int_bits else 1  # packed integer weights: K values in K * bits / 32 words
    if scale is not None and scale_bk < k:  # a K tile must lie in one scale block (or group)
        while scale_bk % block_k:
            block_k //= 2
        assert block_k >= 16, f"a scale block of {scale_bk} columns is too narrow for tl.dot"
    assert a.stride(-1) == 1 and w.stride(-1) == 1 and out.stride(-1) == 1
    assert bias is None or (bias.shape == (e, n) and bias.stride(-1) == 1)
    num_blocks_m = sorted_ids.numel() // block_m
    grid = (num_blocks_m * triton.cdiv(n, block_n),)
    _moe_gemm_kernel[grid](
        a, w, out, weights if weights is not None else out, sorted_ids, block_experts, num_padded,
        scale if scale is not None else out,
        n, k, out.shape[0], num_blocks_m, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        scale.stride(0) if scale is not None else 0, scale.stride(1) if scale is not None else 0,
        TOP_K=top_k, A_PER_TOKEN=a_per_token, MUL_WEIGHT=weights is not None,
        UPCAST=a.dtype == torch.float32 or triton_interpreting(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, HAS_SCALE=scale is not None,
        SCALE_BK=max(scale_bk, 1), z_ptr=zero if zero is not None else out,
        stride_ze=zero.stride(0) if zero is not None else 0, stride_zn=zero.stride(1) if zero is not None else 0,
        INT_BITS=int_bits, b_ptr=bias if bias is not None else out, stride_be=bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, FP4=fp4, num_warps=warps, num_stages=stages)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: Optional[MoEConfig] = None,
              scales: Optional[tuple[torch.Tensor, torch.Tensor, int, int]] = None,
              zeros: Optional[tuple[torch.Tensor, torch.Tensor]] = None, int_bits: int = 0,
              biases: Optional[tuple[torch.Tensor, torch.Tensor]] = None, activation: str = "silu",
              act_params: tuple[float, float] = (0.0, 0.0), fp4: bool = False) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows, then up); w2 [E, H, I]; topk_* [T, k].
    Returns [T, H] in x's dtype: each token's routing-weighted sum of its experts.
    scales: FP8 experts' (w13 scales [E, 2I, KB], w2 scales [E, H, KB'], their K blocks).
    int_bits: integer experts, w13 / w2 packed along K ([E, 2I, H * bits / 32], ...), with
    scales (per group, the groups' widths as the K blocks) and zeros ([E, 2I, HG], [E, H, IG]);
    fp4 (int_bits 4): the codes are e2m1 floats and the scales uint8 exponents, no zeros
    (MXFP4). biases: (b13 [E, 2I], b2 [E, H]). activation: "silu" (SiLU(gate) * up), "swigluoai" (GPT-OSS's clamped SwiGLU,
    act_params = (alpha, limit)) or "gelu_pytorch_tanh" / "gelu_new" (GeGLU)."""
    from pagedserve.ops.activation import GELU_TANH_NAMES, gelu_tanh_and_mul, silu_and_mul, swigluoai_and_mul

    t, k = topk_ids.shape
    e, two_i, h = w13.shape
    h *= 32 // int_bits if int_bits else 1
    if t == 0:
        return x.new_zeros(0, h)
    config = config or default_config(t * k, e)
    aligned = moe_align(topk_ids, e, config[0])
    gate_up = torch.empty(t * k, two_i, dtype=x.dtype, device=x.device)
    s13, s2, bk13, bk2 = scales if scales is not None else (None, None, 0, 0)
    z13, z2 = zeros if zeros is not None else (None, None)
    b13, b2 = biases if biases is not None else (None, None)
    _moe_gemm(x.contiguous(), w13, gate_up, aligned, k, True, None, config, s13, bk13, z13, int_bits, b13, fp4)
    if activation == "silu":
        act = silu_and_mul(gate_up)
    elif activation == "swigluoai":
        act = swigluoai_and_mul(gate_up, *act_params)
    elif activation in GELU_TANH_NAMES:
        act = gelu_tanh_and_mul(gate_up)
    else:
        raise ValueError(f"fused_moe has no activation {activation!r}")
    out = torch.empty(t * k, h, dtype=torch.float32, device=x.device)
    _moe_gemm(act, w2, out, aligned, k, False, topk_weights.reshape(-1).float().contiguous(), config, s2, bk2,
              z2, int_bits, b2, fp4)
    return out.view(t, k, h).sum(dim=1).to(x.dtype)
