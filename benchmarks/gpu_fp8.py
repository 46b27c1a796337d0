"""The FP8 weight-only GEMM (pagedserve/ops/fp8_linear.py) against cuBLAS in bf16 on the
issue model's layer shapes, from decode batch sizes to prefill: what keeping an FP8
checkpoint's weights in FP8 costs or saves per layer. Both are replayed from a CUDA graph.

    python benchmarks/gpu_fp8.py            # GPU; prints JSON
    python benchmarks/gpu_fp8.py --dry-run  # CPU, Triton's interpreter, tiny shapes

weight_gbps: the FP8 weight bytes (plus scales) over the kernel time, to compare with
gpu_check's device_rates.copy_gbps at batch 1, where a layer is its weight read."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_timing import bench_chain_ms, kernel_bench_main  # noqa: E402

# role -> (N, K) of the ~1.1B Llama of issue 6 (qkv fused, gate_up fused)
SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}
DRY_SHAPES = {"tiny": (96, 64)}
TOKENS = (1, 16, 256, 4096)
DRY_TOKENS = (1, 20)


def fp8_timings(device: str, dry: bool) -> dict[str, Any]:
    from pagedserve.model.fp8_quantize import quantize_block
    from pagedserve.model.layers.fp8 import Fp8Format, row_scales
    from pagedserve.ops.fp8_linear import fp8_linear

    dtype = torch.float32 if dry else torch.bfloat16
    block = (32, 32) if dry else (128, 128)
    res: dict[str, Any] = {}
    for role, (n, k) in (DRY_SHAPES if dry else SHAPES).items():
        w = torch.randn(n, k) * 0.02
        q, s = quantize_block(w, *block)
        scales, bk = row_scales(s, (n, k), Fp8Format(block), role)
        q, scales, w = q.to(device), scales.to(device), w.to(device, dtype)
        for m in (DRY_TOKENS if dry else TOKENS):
            x = torch.randn(m, k, device=device).to(dtype)
            fp8_ms = bench_chain_ms([lambda: fp8_linear(x, q, scales, bk)], device)
            dense_ms = bench_chain_ms([lambda: torch.nn.functional.linear(x, w)], device)
            nbytes = q.numel() + scales.numel() * 4
            res[f"{role}_m{m}"] = {"fp8_ms": round(fp8_ms, 4), "bf16_ms": round(dense_ms, 4),
                                   "speedup": round(dense_ms / fp8_ms, 2),
                                   "weight_gbps": round(nbytes / fp8_ms / 1e6, 1)}
            print(role, m, res[f"{role}_m{m}"], flush=True)
    return res


if __name__ == "__main__":
    kernel_bench_main(fp8_timings, __doc__)
