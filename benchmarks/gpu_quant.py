"""The weight-only quantized GEMMs against cuBLAS in bf16 on the issue model's layer shapes,
from decode batch sizes to prefill: what keeping a quantized checkpoint's weights quantized
costs or saves per layer. FP8 (pagedserve/ops/fp8_linear.py, 128x128 scale tiles) and GPTQ /
AWQ integers (pagedserve/ops/int_linear.py: 4 bits, groups of 128, without and with act
order; 8 bits). All are replayed from a CUDA graph.

    python benchmarks/gpu_quant.py            # GPU; prints JSON
    python benchmarks/gpu_quant.py --dry-run  # CPU, Triton's interpreter, tiny shapes

<kind>_gbps: the kernel's weight bytes (plus scales, zeros) over its time, to compare with
gpu_check's device_rates.copy_gbps at batch 1, where a layer is its weight read."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_timing import bench_chain_ms, kernel_bench_main  # noqa: E402

# role -> (N, K) of the ~1.1B Llama of issue 6 (qkv fused, gate_up fused)
SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}
DRY_SHAPES = {"tiny": (96, 64)}
TOKENS = (1, 16, 256, 4096)
DRY_TOKENS = (1, 20)


def _kernels(n: int, k: int, device: str, dtype: torch.dtype, dry: bool) -> dict[str, tuple[Callable, int]]:
    """kind -> (x -> y, weight bytes)."""
    from pagedserve.model.fp8_quantize import quantize_block
    from pagedserve.model.int_quantize import quantize_groups
    from pagedserve.model.layers.fp8 import Fp8Format, row_scales
    from pagedserve.model.layers.int_quant import act_order, pack_rows
    from pagedserve.ops.fp8_linear import fp8_linear
    from pagedserve.ops.int_linear import int_linear

    block = (32, 32) if dry else (128, 128)
    group = 32 if dry else 128
    w = torch.randn(n, k) * 0.02
    q8, s8 = quantize_block(w, *block)
    scales8, bk = row_scales(s8, (n, k), Fp8Format(block), "w")
    q8, scales8 = q8.to(device), scales8.to(device)
    out: dict[str, tuple[Callable, int]] = {
        "fp8": (lambda x: fp8_linear(x, q8, scales8, bk), q8.numel() + scales8.numel() * 4)}
    for kind, bits, shuffled in (("int4", 4, False), ("int4_act_order", 4, True), ("int8", 8, False)):
        g_idx = torch.arange(k) // group
        if shuffled:
            g_idx = g_idx[torch.randperm(k)]
        q, zeros, scales = quantize_groups(w, bits, group, True, g_idx)
        perm = act_order(g_idx, group, kind) if shuffled else None
        if perm is not None:
            q = q[:, perm.long()]
        packed, s, z = (pack_rows(q, bits).to(device), scales.float().to(device),
                        zeros.to(torch.int16).to(device))
        p = perm.to(device) if perm is not None else None
        out[kind] = ((lambda x, packed=packed, s=s, z=z, p=p, bits=bits: int_linear(x, packed, s, z, bits, group, p)),
                     packed.numel() * 4 + s.numel() * 4 + z.numel() * 2)
    dense = w.to(device, dtype)
    out["bf16"] = (lambda x: torch.nn.functional.linear(x, dense), dense.numel() * dense.element_size())
    return out


def quant_timings(device: str, dry: bool) -> dict[str, Any]:
    dtype = torch.float32 if dry else torch.bfloat16
    res: dict[str, Any] = {}
    for role, (n, k) in (DRY_SHAPES if dry else SHAPES).items():
        kernels = _kernels(n, k, device, dtype, dry)
        for m in (DRY_TOKENS if dry else TOKENS):
            x = torch.randn(m, k, device=device).to(dtype)
            row: dict[str, float] = {}
            for kind, (fn, nbytes) in kernels.items():
                ms = bench_chain_ms([lambda fn=fn: fn(x)], device)
                row[f"{kind}_ms"] = round(ms, 4)
                row[f"{kind}_gbps"] = round(nbytes / ms / 1e6, 1)
            for kind in kernels:
                if kind != "bf16":
                    row[f"{kind}_speedup"] = round(row["bf16_ms"] / row[f"{kind}_ms"], 2)
            res[f"{role}_m{m}"] = row
            print(role, m, row, flush=True)
    return res


if __name__ == "__main__":
    kernel_bench_main(quant_timings, __doc__)
