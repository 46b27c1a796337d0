"""Size rules of the Triton kernels, importable without triton."""

from __future__ import annotations


def blocks_fit(*dims: int) -> bool:
    """Whether ops/chunk_scan.py takes these sizes (tl.dot's operands: powers of two, at least 16)."""
    return all(d >= 16 and d & (d - 1) == 0 for d in dims)
