"""What the weight-only quantized GEMMs (ops/fp8_linear.py, ops/int_linear.py) share: their
launch shapes and the grouped order of their output tiles."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages
GemmConfig = tuple[int, int, int, int, int, int]


def default_config(m: int, k_block: int) -> GemmConfig:
    """Decode sizes: short row blocks and long K tiles (a weight stream); prefill: square
    tiles for the tensor cores. BLOCK_K divides the scale's K block (or quantization group)
    so a tile has one scale per row. Not yet tuned on a GPU."""
    bk = 128
    while k_block % bk:
        bk //= 2
    bk = max(bk, 16)
    if m <= 16:
        return 16, 64, bk, 1, 4, 4
    if m <= 64:
        return 32, 64, bk, 4, 4, 4
    return 64, 128, min(bk, 64), 8, 8, 3


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as the [M, K] rows the kernels read (K contiguous)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program `pid` -> its (row block, column block), GROUP_M row blocks sweeping the
    column blocks together so that they share each weight tile in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size
