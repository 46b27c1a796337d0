"""FP8 (e4m3) weight checkpoints: transformers' fine-grained format (`quant_method: "fp8"`,
a `weight_scale_inv` per [bn, bk] tile: Qwen3-*-FP8, DeepSeek-V3) and compressed-tensors'
float-quantized one (a `weight_scale` per output row or per tensor: RedHatAI *-FP8-dynamic).

Every scale layout is turned into one: per output row and per K block, [N, ceil(K / bk)]
float32 (bk = K when the scale is per row or per tensor), which shards along rows exactly as
the weight does, so fused q/k/v and gate/up projections load their FP8 shards as they load
plain ones.

Two ways to run them:
- Fp8Linear (the Triton backend): the weights stay in FP8, half the bytes of bf16, and
  ops/fp8_linear.py dequantizes each tile inside the GEMM. Activations stay in the model
  dtype (weight-only FP8, "W8A16"): compressed-tensors' FP8-dynamic checkpoints are meant to
  quantize activations too, so their outputs differ from an FP8 x FP8 engine's by that
  rounding;
  Mixture-of-experts layers keep their experts in FP8 too, dequantized per tile by the fused
  MoE kernel (ops/fused_moe.py);
- elsewhere (CPU, the PyTorch backend): dequantized to the model dtype at load, so the
  checkpoint runs, without the memory saving."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")


@dataclass(frozen=True)
class Fp8Format:
    block: Optional[tuple[int, int]]  # (bn, bk) tiles, or None: a scale per row or per tensor


def quantization_config(hf_config: Any) -> Optional[dict[str, Any]]:
    """config.json's quantization_config as a dict (transformers may have made it an object)."""
    q = getattr(hf_config, "quantization_config", None)
    return q if q is None or isinstance(q, dict) else q.to_dict()


def fp8_format(hf_config: Any) -> Optional[Fp8Format]:
    """The checkpoint's FP8 format from config.json's quantization_config; None without one.
    Any other quantization is a ValueError naming it (its weights would load as garbage)."""
    q = quantization_config(hf_config)
    if q is None:
        return None
    method = q.get("quant_method")
    if method == "fp8":
        block = q.get("weight_block_size")
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"quantization_config.fmt {fmt!r} is not supported (FP8 e4m3 only).")
        return Fp8Format(tuple(int(b) for b in block) if block else None)
    if method == "compressed-tensors":
        groups = list((q.get("config_groups") or {}).values())
        weights = [g.get("weights") or {} for g in groups]
        if weights and all(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights):
            strategies = {w.get("strategy") for w in weights}
            if strategies <= {"tensor", "channel"}:
                return Fp8Format(None)
            if strategies == {"block"} and len({tuple(w.get("block_structure") or ()) for w in weights}) == 1:
                return Fp8Format(tuple(int(b) for b in weights[0]["block_structure"]))
        raise ValueError("quantization_config: only compressed-tensors' FP8 weights (8-bit float, per tensor, "
                         "channel or block) are supported.")
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported; supported: 'fp8', "
                     "compressed-tensors' FP8, 'gptq', 'awq' and 'mxfp4' (GPT-OSS).")


def row_scales(scale: torch.Tensor, shape: tuple[int, int], fmt: Fp8Format, name: str) -> tuple[torch.Tensor, int]:
    """A checkpoint scale -> ([N, KB] float32 per row and K block, bk)."""
    n, k = shape
    scale = scale.float()
    if fmt.block is not None:
        bn, bk = fmt.block
        want = (-(-n // bn), -(-k // bk))
        if tuple(scale.shape) != want:
            raise ValueError(f"{name}: scale shape {tuple(scale.shape)} does not fit a [{n}, {k}] weight in "
                             f"{bn}x{bk} blocks (expected {want}).")
        return scale.repeat_interleave(bn, dim=0)[:n].contiguous(), bk
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(n, 1).contiguous(), k
    if scale.numel() == n:
        return scale.reshape(n, 1).contiguous(), k
    raise ValueError(f"{name}: scale shape {tuple(scale.shape)} is neither per tensor nor per row of {n}.")


def dequantize(weight: torch.Tensor, scales: torch.Tensor, bk: int, dtype: torch.dtype) -> torch.Tensor:
    """FP8 [N, K] times its [N, KB] scales (in float32), rounded once to `dtype`."""
    expanded = scales.repeat_interleave(bk, dim=1)[:, : weight.shape[1]]
    return (weight.float() * expanded).to(dtype)


def fp8_weights(weights: Iterable[tuple[str, torch.Tensor]], fmt: Fp8Format, dtype: torch.dtype,
                keep: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with each FP8 weight met with its scale: for a module `keep`
    accepts, the FP8 weight and its [N, KB] scales (as `<module>.weight_scale`); otherwise the
    weight dequantized to `dtype`. Other tensors pass through, cast to `dtype`."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in weights:
        suffix = next((s for s in SCALE_SUFFIXES if name.endswith(s)), None)
        if suffix is None and not (t.dtype == FP8 and name.endswith(".weight")):
            if name.endswith(".input_scale"):  # static activation scales: unused (weights-only FP8)
                continue
            yield name, (t.to(dtype) if t.is_floating_point() else t)
            continue
        stem = name[: -len(suffix)] if suffix else name[: -len(".weight")]
        parts = pending.setdefault(stem, {})
        parts["scale" if suffix else "weight"] = t
        if len(parts) < 2:
            continue
        del pending[stem]
        w = parts["weight"]
        scales, bk = row_scales(parts["scale"], tuple(w.shape), fmt, stem)
        if keep(stem):
            yield stem + ".weight", w
            yield stem + ".weight_scale", scales
        else:
            yield stem + ".weight", dequantize(w, scales, bk, dtype)
    if pending:
        stem, parts = next(iter(pending.items()))
        missing = "scale" if "weight" in parts else "FP8 weight"
        raise ValueError(f"checkpoint: {stem} has no {missing} to go with its "
                         f"{'weight' if missing == 'scale' else 'scale'}.")


class Fp8Linear(nn.Module):
    """y = x @ (W_fp8 * scales)^T (+ b), the weight kept in FP8 (see the module docstring)."""

    def __init__(self, linear: nn.Linear, block_k: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=FP8,
                                               device=linear.weight.device), requires_grad=False)
        kb = -(-self.in_features // block_k) if block_k else 1
        self.weight_scale = nn.Parameter(torch.empty(self.out_features, kb, dtype=torch.float32,
                                                     device=linear.weight.device), requires_grad=False)
        self.bias = linear.bias
        self.block_k = block_k or self.in_features
        if hasattr(linear, "shard_offsets"):
            self.shard_offsets = linear.shard_offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pagedserve.ops.fp8_linear import fp8_linear

        return fp8_linear(x, self.weight, self.weight_scale, self.block_k, self.bias)


def scaled_weight_names(names: Iterable[str]) -> list[str]:
    """The module names whose weights have a scale beside them (the FP8 ones)."""
    return [n[: -len(s)] for n in names for s in SCALE_SUFFIXES if n.endswith(s)]


def quantized_modules(stems: Iterable[str], model: nn.Module) -> dict[str, str]:
    """Checkpoint module names with FP8 weights -> our nn.Linear module they load into (through
    the model's renamed and fused names); experts and anything not an nn.Linear are left out."""
    out = {}
    for stem in stems:
        name = stem + "."
        for piece, ours in getattr(model, "renamed", []):
            name = name.replace(piece, ours)
        for piece, ours, _ in getattr(model, "stacked_params", []):
            if piece in name:
                name = name.replace(piece, ours)
                break
        name = name[:-1]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if type(module) is nn.Linear:
            out[stem] = name
    return out


def quantized_experts(stems: Iterable[str], model: nn.Module) -> dict[str, str]:
    """Checkpoint expert names with quantized weights -> the FusedMoE (layers/moe.py) they load into,
    where its experts run on the fused kernel (its activations)."""
    from pagedserve.model.layers.moe import KERNEL_ACTIVATIONS, FusedMoE

    out = {}
    for stem in stems:
        name = stem + ".weight"
        for piece, ours in getattr(model, "renamed", []):
            name = name.replace(piece, ours)
        match = FusedMoE.match(name)
        if match is None:
            continue
        owner = match[0].rsplit(".", 1)[0]
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if isinstance(module, FusedMoE) and module.activation in KERNEL_ACTIVATIONS:
            out[stem] = owner
    return out


def install_fp8_linears(model: nn.Module, targets: Iterable[str], fmt: Fp8Format) -> None:
    """Replace each named nn.Linear (on the meta device, before loading) with an Fp8Linear, and
    put each named FusedMoE's experts in FP8."""
    from pagedserve.model.layers.moe import FusedMoE

    block_k = fmt.block[1] if fmt.block else 0
    for name in sorted(set(targets)):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        module = getattr(owner, leaf)
        if isinstance(module, FusedMoE):
            module.to_fp8(block_k)
        else:
            setattr(owner, leaf, Fp8Linear(module, block_k))
