"""Triton kernel: rotary position embedding (NeoX / Hugging Face rotate_half style) applied
in place to a step's queries and keys, one program per token for all its heads, reading
cos/sin from the model's float32 cache by position. In 16-bit dtypes it rounds at the steps
the PyTorch form rounds (cos/sin cast to the model dtype, each product, then the sum); on an
H100 the two still differed by up to a unit of the tensor's scale (fp16: 76% of elements
bit-identical), so tests hold it to that. Twin: reference.rotary_ref."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.ops.pdl import pdl_launch, pdl_start
from pagedserve.ops import triton_interpreting
from pagedserve.ops.reshape_and_cache import fp8_kv_value


@triton.jit
def _rotate_heads(base, stride_h, cos, sin, d, d_ok, num_heads, HEADS_P: tl.constexpr, HALF: tl.constexpr):
    """Rotate the heads at `base` in place; returns the rotated halves (in the dtype) and
    their mask, for a caller that stores them elsewhere too."""
    h = tl.arange(0, HEADS_P)[:, None]
    mask = (h < num_heads) & d_ok[None, :]
    ptr = base + h * stride_h + d[None, :]
    dtype = base.dtype.element_ty
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    # out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin, each product rounded to the dtype first
    a1 = (x1 * cos).to(dtype).to(tl.float32)
    b1 = (x2 * sin).to(dtype).to(tl.float32)
    a2 = (x2 * cos).to(dtype).to(tl.float32)
    b2 = (x1 * sin).to(dtype).to(tl.float32)
    o1 = (a1 - b1).to(dtype)
    o2 = (a2 + b2).to(dtype)
    tl.store(ptr, o1, mask=mask)
    tl.store(ptr + HALF, o2, mask=mask)
    return o1, o2, mask


@triton.jit
def _cos_sin(pos_ptr, cos_sin_ptr, t, stride_cs, d, d_ok, dtype, HALF: tl.constexpr):
    """cos and sin of token t's position, rounded to the model dtype as the PyTorch form does."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + d, mask=d_ok, other=0.0).to(dtype).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + d, mask=d_ok, other=0.0).to(dtype).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    NUM_Q: tl.constexpr, NUM_K: tl.constexpr, QH_P: tl.constexpr, KH_P: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF_P)
    d_ok = d < HALF
    cos, sin = _cos_sin(pos_ptr, cos_sin_ptr, t, stride_cs, d, d_ok, q_ptr.dtype.element_ty, HALF)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, cos, sin, d, d_ok, NUM_Q, QH_P, HALF)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, cos, sin, d, d_ok, NUM_K, KH_P, HALF)


@triton.jit
def _rotary_and_cache_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
    NUM_Q: tl.constexpr, NUM_K: tl.constexpr, QH_P: tl.constexpr, KH_P: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr, KV_FP8: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # One program per token: RoPE on its q and k heads (in place), then its rotated k and
    # its v into the paged cache at its slot (-1: padding, not written).
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF_P)
    d_ok = d < HALF
    # Positions are copied in before the step's first kernel; the table never changes.
    cos, sin = _cos_sin(pos_ptr, cos_sin_ptr, t, stride_cs, d, d_ok, q_ptr.dtype.element_ty, HALF)
    pdl_start(PDL)  # ops/pdl.py: q, k, v come from the kernel before
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, cos, sin, d, d_ok, NUM_Q, QH_P, HALF)
    k1, k2, mask = _rotate_heads(k_ptr + t * stride_kt, stride_kh, cos, sin, d, d_ok, NUM_K, KH_P, HALF)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, KH_P)[:, None]
        dd = d[None, :]
        if KV_FP8:
            k1 = fp8_kv_value(k1.to(tl.float32), INTERPRET)
            k2 = fp8_kv_value(k2.to(tl.float32), INTERPRET)
        kc = k_cache_ptr + (slot // BLOCK_SIZE) * stride_kc_b + (slot % BLOCK_SIZE) * stride_kc_s + h * stride_kc_h + dd
        tl.store(kc, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(kc + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
        vp = v_ptr + t * stride_vt + h * stride_vh + dd
        vc = v_cache_ptr + (slot // BLOCK_SIZE) * stride_vc_b + (slot % BLOCK_SIZE) * stride_vc_s + h * stride_vc_h + dd
        v1 = tl.load(vp, mask=mask)
        v2 = tl.load(vp + HALF, mask=mask)
        if KV_FP8:
            v1 = fp8_kv_value(v1.to(tl.float32), INTERPRET)
            v2 = fp8_kv_value(v2.to(tl.float32), INTERPRET)
        tl.store(vc, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(vc + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hk, D] (views into a fused qkv are fine: unit stride in D),
    rotated in place and returned. cos_sin: [max_positions, R] float32, cos in the first
    half of the last dim, sin in the second; R < D (partial rotary) rotates the leading R dims
    of each head and leaves the rest as they are."""
    t, hq, d = q.shape
    hk = k.shape[1]
    r = cos_sin.shape[1]
    assert r % 2 == 0 and r <= d and k.shape[2] == d and q.dtype == k.dtype
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin.stride(-1) == 1
    if t:
        half = r // 2
        _rotary_kernel[(t,)](
            q, k, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
            NUM_Q=hq, NUM_K=hk, QH_P=triton.next_power_of_2(hq), KH_P=triton.next_power_of_2(hk),
            HALF=half, HALF_P=triton.next_power_of_2(half), num_warps=4 if hq * d >= 2048 else 1,
        )
    return q, k


def rotary_embedding_and_cache(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               slot_mapping: torch.Tensor) -> None:
    """rotary_embedding and reshape_and_cache in one kernel (one launch per layer fewer, and
    k is not read back): q and k rotated in place, rotated k and v written to the caches
    [num_blocks, block_size, KVH, D] at slot_mapping[t] (-1 skipped)."""
    t, hq, d = q.shape
    hk = k.shape[1]
    assert d % 2 == 0 and k.shape[2] == d and v.shape == k.shape and cos_sin.shape[1] == d and q.dtype == k.dtype
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and cos_sin.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and k_cache.shape[2:] == (hk, d)
    if t:
        half = d // 2
        _rotary_and_cache_kernel[(t,)](
            q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2),
            NUM_Q=hq, NUM_K=hk, QH_P=triton.next_power_of_2(hq), KH_P=triton.next_power_of_2(hk),
            HALF=half, HALF_P=triton.next_power_of_2(half), BLOCK_SIZE=k_cache.shape[1],
            KV_FP8=k_cache.dtype == torch.float8_e4m3fn, INTERPRET=triton_interpreting(),
            num_warps=4 if hq * d >= 2048 else 1, **pdl_launch(q.device),
        )
