"""ALiBi's per-head slopes (attention with linear biases: each score gains slope * (key position
- query position) instead of a position embedding). Computed in float32 as transformers does,
so that the slopes match its to the bit."""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> list[float]:
    with torch.device("cpu"):  # (also while a model is being built on the meta device)
        return _alibi_slopes(num_heads)


def mpt_alibi_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> list[float]:
    with torch.device("cpu"):
        return _mpt_alibi_slopes(num_heads, alibi_bias_max)


def _alibi_slopes(num_heads: int) -> list[float]:
    """The paper's slopes (BLOOM, Falcon-RW): a geometric series from 2^(-8/n) over the nearest
    power of two n below num_heads, the remaining heads taking every other slope of the
    series for 2n (transformers' bloom `_get_alibi_slopes`)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes.tolist()


def _mpt_alibi_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> list[float]:
    """MPT's slopes: 1 / 2^(k * bias_max / n) for k = 1..n over the power of two n at or above
    num_heads; when that is more than num_heads, the odd-indexed ones first, then the even,
    cut to num_heads (transformers' `build_mpt_alibi_tensor`)."""
    n = 2 ** math.ceil(math.log2(num_heads))
    base = torch.arange(1, n + 1, dtype=torch.int64).float() * (alibi_bias_max / n)
    slopes = 1.0 / torch.pow(2, base)
    if n != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes.tolist()
