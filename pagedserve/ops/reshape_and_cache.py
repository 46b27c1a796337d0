"""Triton kernel: write a step's new K/V [T, KVH, D] into the paged caches
[num_blocks, block_size, KVH, D] by slot mapping; slot -1 (padding) is skipped.
Twin: reference.reshape_and_cache_ref."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.ops import triton_interpreting

# An FP8 e4m3 cache saturates K/V at its largest finite value instead of overflowing to NaN
# (attention/backend.py to_cache_dtype is the PyTorch side).
FP8_KV_MAX = tl.constexpr(448.0)


@triton.jit
def fp8_kv_value(x, INTERPRET: tl.constexpr):
    """x (float32) as an FP8 e4m3 cache holds it, still in float32: saturated at +-448; the
    store's cast then rounds to nearest even. Triton's interpreter casts float32 to FP8 wrongly
    near powers of two and below 2^-6 (it gets exact e4m3 values right), so there the rounding
    to the e4m3 grid is done here: 3 mantissa bits, subnormals on 2^-9 steps."""
    x = tl.clamp(x, -FP8_KV_MAX, FP8_KV_MAX)
    if INTERPRET:
        quantum = tl.exp2(tl.floor(tl.log2(tl.maximum(tl.abs(x), 0.015625))) - 3.0)
        x = ((x / quantum + 12582912.0) - 12582912.0) * quantum  # 1.5 * 2^23: float32 rounds to an integer, to even
    return x


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_key_t, stride_key_h, stride_val_t, stride_val_h,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, KVH_P: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, KV_FP8: tl.constexpr, INTERPRET: tl.constexpr,
):
    # One program per token: all its kv heads in one [KVH_P, HEAD_DIM_P] tile.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, KVH_P)[:, None]
    d = tl.arange(0, HEAD_DIM_P)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(key_ptr + t * stride_key_t + h * stride_key_h + d, mask=mask)
    v = tl.load(value_ptr + t * stride_val_t + h * stride_val_h + d, mask=mask)
    if KV_FP8:
        k = fp8_kv_value(k.to(tl.float32), INTERPRET)
        v = fp8_kv_value(v.to(tl.float32), INTERPRET)
    tl.store(k_cache_ptr + block * stride_kc_b + offset * stride_kc_s + h * stride_kc_h + d,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + block * stride_vc_b + offset * stride_vc_s + h * stride_vc_h + d,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """key/value: [T, KVH, D] with unit stride in D (views into a fused qkv are fine);
    slot_mapping: [>= T] integer, slot = block * block_size + offset, -1 = skip."""
    t, kvh, d = key.shape
    if t == 0:
        return
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "head_dim must be contiguous"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and k_cache.shape[2:] == (kvh, d)
    _reshape_and_cache_kernel[(t,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=kvh, HEAD_DIM=d, KVH_P=triton.next_power_of_2(kvh), HEAD_DIM_P=triton.next_power_of_2(d),
        BLOCK_SIZE=k_cache.shape[1], KV_FP8=k_cache.dtype == torch.float8_e4m3fn, INTERPRET=triton_interpreting(),
        num_warps=1 if kvh * d <= 512 else 4,
    )
