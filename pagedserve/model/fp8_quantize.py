"""Write an FP8 copy of a checkpoint, in the two formats published FP8 models use, for tests
and benchmarks (a real checkpoint comes from its publisher or a tool such as llm-compressor):

- "block": transformers' fine-grained FP8 (Qwen3-*-FP8, DeepSeek-V3): e4m3 weights, one float32
  `weight_scale_inv` per [bn, bk] tile, quantization_config {"quant_method": "fp8",
  "weight_block_size": [bn, bk]};
- "channel" / "tensor": compressed-tensors' float-quantized format (RedHatAI *-FP8-dynamic):
  e4m3 weights with a `weight_scale` per output row ([N, 1]) or per tensor ([1]).

The linear layers of the decoder blocks (attention and MLP projections, experts) are quantized;
embeddings, norms, the LM head and routers stay as they are, as in published checkpoints."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

from typing import Iterable, Iterator

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
_QUANTIZED = re.compile(r"\.layers\.\d+\..*(proj|\.w[123])\.weight$")


def quantize_block(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (e4m3 [N, K], scale_inv [ceil(N/bn), ceil(K/bk)]) with w ~ q * scale_inv per tile."""
    n, k = w.shape
    nb, kb = -(-n // bn), -(-k // bk)
    padded = w.new_zeros(nb * bn, kb * bk, dtype=torch.float32)
    padded[:n, :k] = w.float()
    tiles = padded.view(nb, bn, kb, bk)
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nb * bn, kb * bk)[:n, :k].contiguous(), scale


def quantize_rows(w: torch.Tensor, per_tensor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (e4m3 [N, K], scale [N, 1] or [1])."""
    amax = w.float().abs().amax() if per_tensor else w.float().abs().amax(dim=1, keepdim=True)
    scale = (amax / FP8_MAX).clamp(min=1e-12).reshape(-1 if per_tensor else w.shape[0], *(() if per_tensor else (1,)))
    q = (w.float() / (scale if not per_tensor else scale.view(()))).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.float()


def quantize_checkpoint(src: str, dst: str, scheme: str = "block", block: tuple[int, int] = (128, 128)) -> str:
    """Copy the model directory `src` to `dst` with its decoder linear layers in FP8."""
    from safetensors.torch import load_file, save_file

    if scheme not in ("block", "channel", "tensor"):
        raise ValueError(f"scheme must be 'block', 'channel' or 'tensor', got {scheme!r}")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    for path in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        out = {}
        for name, t in load_file(path).items():
            if not _QUANTIZED.search(name) or t.dim() != 2:
                out[name] = t
                continue
            stem = name[: -len(".weight")]
            if scheme == "block":
                out[name], out[stem + ".weight_scale_inv"] = quantize_block(t, *block)
            else:
                out[name], out[stem + ".weight_scale"] = quantize_rows(t, scheme == "tensor")
        save_file(out, os.path.join(dst, os.path.basename(path)), metadata={"format": "pt"})
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if scheme == "block":
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(block)}
    else:
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                "strategy": "tensor" if scheme == "tensor" else "channel"},
                "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                                      "strategy": "token"}}}}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return dst


def online_fp8_names(names: Iterable[str]) -> list[str]:
    """A checkpoint's tensor names as online_fp8_weights will give them: a `.weight_scale`
    beside each weight it quantizes (so the FP8 loading path finds its layers)."""
    out = []
    for name in names:
        out.append(name)
        if _QUANTIZED.search(name):
            out.append(name[: -len(".weight")] + ".weight_scale")
    return out


def online_fp8_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """vLLM's quantization="fp8" on an unquantized checkpoint: each decoder linear weight (as
    quantize_checkpoint chooses them) as e4m3 with a float32 scale per output row, the layout
    of a compressed-tensors per-channel FP8 checkpoint; other tensors pass through."""
    for name, t in weights:
        if not _QUANTIZED.search(name) or t.dim() != 2:
            yield name, t
            continue
        q, scale = quantize_rows(t, per_tensor=False)
        yield name, q
        yield name[: -len(".weight")] + ".weight_scale", scale
