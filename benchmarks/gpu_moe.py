"""The fused MoE kernels (pagedserve/ops/fused_moe.py) against FusedMoE's PyTorch path (one
matmul pair per expert hit, group sizes read on the host) on one layer of two real shapes,
over batch sizes from decode to prefill. The fused path is timed replayed from a CUDA graph,
which also shows that it captures (the PyTorch path cannot: it syncs with the host).

    python benchmarks/gpu_moe.py            # GPU; prints JSON
    python benchmarks/gpu_moe.py --dry-run  # CPU, Triton's interpreter, tiny shapes

weight_gbps: bytes of the experts a batch routes to, read once, over the fused time (compare
with gpu_check's device_rates.copy_gbps: at decode sizes the layer is that read). fp8_ms: the
same layer with its experts in FP8 (128x128 block scales), dequantized per tile in the kernel;
int4_ms: with its experts as packed 4-bit integers (groups of 128, GPTQ / AWQ's layout after
loading), unpacked per tile (random words: the time does not depend on the values);
mxfp4_ms: with its experts in MXFP4 (GPT-OSS's checkpoints: e2m1 codes, a power-of-two scale
per 32), decoded per tile."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_timing import bench_chain_ms, bench_ms, kernel_bench_main  # noqa: E402

# name -> (experts, top k, hidden, expert intermediate)
SHAPES = {"mixtral_8x7b": (8, 2, 4096, 14336), "qwen3_30b_a3b": (128, 8, 2048, 768),
          "gpt_oss_20b": (32, 4, 2880, 2880)}
DRY_SHAPES = {"tiny": (8, 2, 64, 96)}
TOKENS = (1, 8, 64, 512, 4096)
DRY_TOKENS = (1, 8)


def _fp8_experts(moe, block: tuple[int, int]) -> tuple:
    """The layer's experts in FP8 with block scales, as fused_moe takes them."""
    from pagedserve.model.fp8_quantize import quantize_block
    from pagedserve.model.layers.fp8 import Fp8Format, row_scales

    packed = []
    for w in (moe.w13.detach(), moe.w2.detach()):
        qs, ss = [], []
        for we in w:
            q, s = quantize_block(we, *block)
            rows, bk = row_scales(s, tuple(we.shape), Fp8Format(block), "expert")
            qs.append(q)
            ss.append(rows)
        packed.append((torch.stack(qs), torch.stack(ss), bk))
    (q13, s13, bk13), (q2, s2, bk2) = packed
    return q13, q2, (s13, s2, bk13, bk2)


def _int4_experts(e: int, h: int, i: int, group: int, device: str) -> tuple:
    def part(n: int, k: int) -> tuple:
        words = torch.randint(-2**31, 2**31 - 1, (e, n, k // 8), dtype=torch.int32, device=device)
        scales = torch.rand(e, n, k // group, device=device) * 0.01
        return words, scales, torch.full((e, n, k // group), 8, dtype=torch.int16, device=device)

    (w13, s13, z13), (w2, s2, z2) = part(2 * i, h), part(h, i)
    return w13, w2, dict(scales=(s13, s2, group, group), zeros=(z13, z2), int_bits=4)


def _mxfp4_experts(e: int, h: int, i: int, device: str) -> tuple:
    def part(n: int, k: int) -> tuple:
        words = torch.randint(-2**31, 2**31 - 1, (e, n, k // 8), dtype=torch.int32, device=device)
        return words, torch.randint(119, 123, (e, n, k // 32), dtype=torch.uint8, device=device)

    (w13, s13), (w2, s2) = part(2 * i, h), part(h, i)
    return w13, w2, dict(scales=(s13, s2, 32, 32), int_bits=4, fp4=True)


def moe_timings(device: str, dry: bool) -> dict[str, Any]:
    from pagedserve.model.layers.moe import FusedMoE, select_experts
    from pagedserve.ops.fused_moe import fused_moe

    dtype = torch.float32 if dry else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    res: dict[str, Any] = {}
    for name, (e, k, h, i) in (DRY_SHAPES if dry else SHAPES).items():
        with torch.device(device):  # not built on the host first: a Mixtral layer is 2.8 GB in bf16
            moe = FusedMoE(e, h, i, "silu").to(dtype)
        with torch.no_grad():
            moe.w13.normal_(0, 0.02, generator=g)
            moe.w2.normal_(0, 0.02, generator=g)
        expert_bytes = (moe.w13[0].numel() + moe.w2[0].numel()) * moe.w13.element_size()
        q13, q2, scales = _fp8_experts(moe, (32, 32) if dry else (128, 128))
        i13, i2, int_args = _int4_experts(e, h, i, 32 if dry else 128, device)
        m13, m2, mx_args = _mxfp4_experts(e, h, i, device)
        for t in (DRY_TOKENS if dry else TOKENS):
            x = torch.randn(t, h, device=device, generator=g).to(dtype)
            weights, ids = select_experts(torch.randn(t, e, device=device, generator=g), k, True)
            moe.use_triton = False
            torch_ms = bench_ms(lambda: moe(x, weights, ids), device, rep=50)
            moe.use_triton = True
            fused_ms = bench_chain_ms([lambda: moe(x, weights, ids)], device)
            routed = int(torch.unique(ids).numel())
            fp8_ms = bench_chain_ms([lambda: fused_moe(x, q13, q2, weights, ids, scales=scales)], device)
            int4_ms = bench_chain_ms([lambda: fused_moe(x, i13, i2, weights, ids, **int_args)], device)
            mxfp4_ms = bench_chain_ms([lambda: fused_moe(x, m13, m2, weights, ids, **mx_args)], device)
            res[f"{name}_t{t}"] = {"fused_ms": round(fused_ms, 4), "torch_ms": round(torch_ms, 4),
                                   "speedup": round(torch_ms / fused_ms, 2), "experts_routed": routed,
                                   "weight_gbps": round(routed * expert_bytes / fused_ms / 1e6, 1),
                                   "fp8_ms": round(fp8_ms, 4), "fp8_speedup": round(fused_ms / fp8_ms, 2),
                                   "int4_ms": round(int4_ms, 4), "int4_speedup": round(fused_ms / int4_ms, 2),
                                   "mxfp4_ms": round(mxfp4_ms, 4), "mxfp4_speedup": round(fused_ms / mxfp4_ms, 2)}
            print(name, t, res[f"{name}_t{t}"], flush=True)
        del moe
    return res


if __name__ == "__main__":
    kernel_bench_main(moe_timings, __doc__)
