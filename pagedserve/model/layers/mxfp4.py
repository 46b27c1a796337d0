"""MXFP4 expert weights (`"quant_method": "mxfp4"`: openai/gpt-oss-20b and -120b ship their
experts so; everything else in bf16). Each weight row holds groups of 32 e2m1 codes (4-bit
floats: sign, 2 exponent bits, 1 mantissa bit), two to a byte, low nibble first, and one
uint8 exponent per group: w = fp4(code) * 2^(exponent - 127). Checkpoint tensors, rows = output
features: `<proj>_blocks` [E, N, K/32, 16] uint8 and `<proj>_scales` [E, N, K/32] uint8.

On the Triton backend the experts stay in MXFP4 (4.25 bits a weight, against bf16's 16):
the codes viewed as int32 words are exactly the 4-bit packed layout of layers/int_quant.py
(element i of a row at bits 4 * (i % 8) of word i // 8), so the fused MoE kernel reads them
with its integer path, decoding e2m1 instead of subtracting a zero (ops/fused_moe.py FP4).
Elsewhere they are dequantized as they load."""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHOD = "mxfp4"
GROUP = 32  # codes per scale
# e2m1 codes 0..15 (transformers' and the OCP MX spec's order)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Mxfp4Format:
    """A checkpoint whose MoE experts are MXFP4 (the model class must take them)."""


def _check(blocks: torch.Tensor, scales: torch.Tensor, name: str) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"{name}: MXFP4 blocks and scales must be uint8, got {blocks.dtype} / {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP // 2:
        raise ValueError(f"{name}: MXFP4 blocks {tuple(blocks.shape)} do not fit scales {tuple(scales.shape)} "
                         f"(blocks must be [..., groups, {GROUP // 2}])")


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, name: str = "mxfp4") -> torch.Tensor:
    """[..., N, G, 16] codes and [..., N, G] exponents -> [..., N, G * 32] in dtype."""
    _check(blocks, scales, name)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # low nibble first
    values = lut[codes].flatten(-2) * torch.exp2(scales.float() - 127)[..., None]
    return values.flatten(-2).to(dtype)


def packed(blocks: torch.Tensor, scales: torch.Tensor, name: str = "mxfp4") -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout: (codes as int32 [..., N, K / 8], the uint8 exponents [..., N, G]
    as they are: 4.25 bits a weight in all)."""
    _check(blocks, scales, name)
    words = blocks.contiguous().flatten(-2).view(torch.int32)  # 4 bytes = 8 codes a word
    return words, scales.contiguous()


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [..., N, K] -> (blocks [..., N, K/32, 16], scales [..., N, K/32]): each group's
    exponent the smallest that fits its largest magnitude under 6, each value rounded to the
    nearest code. For tests and benchmarks (checkpoints come quantized)."""
    *lead, n, k = w.shape
    g = w.float().reshape(*lead, n, k // GROUP, GROUP)
    amax = g.abs().amax(-1).clamp(min=2.0**-126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = g / torch.exp2(exp)[..., None]
    lut = torch.tensor(FP4_VALUES[:8])
    codes = (scaled.abs()[..., None] - lut).abs().argmin(-1) + 8 * (scaled < 0).long()
    codes = codes.to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)
