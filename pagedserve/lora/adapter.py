"""Reading a PEFT LoRA adapter directory into per-module low-rank factors of our model.

PEFT names a factor after the Hugging Face module it adapts
("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"); our model fuses some of
those modules (q/k/v into qkv_proj, gate/up into gate_up_proj), so each factor pair lands on
a column range of a fused module's output, found with the model's own stacked_params table."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pagedserve.model.layers.fp8 import Fp8Linear
from pagedserve.model.layers.int_quant import IntQuantLinear

# The layers an adapter may sit on: plain projections and quantized ones (layers/fp8.py,
# layers/int_quant.py).
LINEAR_TYPES = (nn.Linear, Fp8Linear, IntQuantLinear)

_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


@dataclass
class LoRAFactors:
    """delta(x)[:, offset:offset + size] = (x @ a.T) @ b.T, the adapter's scaling folded into b."""

    offset: int
    size: int
    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [size, r], times the adapter's scaling


@dataclass
class LoRAAdapter:
    adapter_id: int
    name: str
    rank: int
    scaling: float
    modules: dict[str, list[LoRAFactors]] = field(default_factory=dict)  # our module name -> factors

    def num_bytes(self) -> int:
        return sum(f.a.numel() * f.a.element_size() + f.b.numel() * f.b.element_size()
                   for fs in self.modules.values() for f in fs)


def _target(model: nn.Module, hf_module: str) -> tuple[str, int, int]:
    """HF module name -> (our module name, output offset, output size)."""
    name = hf_module + "."
    for hf_piece, piece in getattr(model, "renamed", []):
        name = name.replace(hf_piece, piece)
    for hf_piece, piece, shard in getattr(model, "stacked_params", []):
        if hf_piece in name:
            ours = name.replace(hf_piece, piece)[:-1]
            module = model.get_submodule(ours)
            offset, size = module.shard_offsets[shard]
            return ours, offset, size
    ours = name[:-1]
    module = model.get_submodule(ours)
    return ours, 0, module.out_features


def load_adapter(adapter_id: int, name: str, path: str, model: nn.Module, max_rank: int,
                 dtype: torch.dtype, pin: bool = False) -> LoRAAdapter:
    """Read and check an adapter against the model; a ValueError names what is wrong. Its
    factors stay in host memory (pinned with `pin`, for the copies into the device's slots,
    lora/layers.py)."""
    where = f"LoRA adapter {name!r} ({path})"
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{where}: no adapter_config.json (a local PEFT adapter directory is needed).")
    try:
        with open(cfg_path) as f:
            cfg: dict[str, Any] = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: could not read adapter_config.json: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA).")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: adapter_config.json needs a positive integer r, got {rank!r}.")
    if rank > max_rank:
        raise ValueError(f"{where}: rank {rank} is above max_lora_rank ({max_rank}); raise max_lora_rank.")
    for key, ok, what in (("bias", cfg.get("bias", "none") == "none", "trained biases"),
                          ("modules_to_save", not cfg.get("modules_to_save"), "fully trained modules"),
                          ("use_dora", not cfg.get("use_dora"), "DoRA"),
                          ("fan_in_fan_out", not cfg.get("fan_in_fan_out"), "fan_in_fan_out weights"),
                          ("rank_pattern", not cfg.get("rank_pattern") and not cfg.get("alpha_pattern"),
                           "per-module ranks")):
        if not ok:
            raise ValueError(f"{where}: {what} ({key} in adapter_config.json) are not supported.")
    scaling = float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)

    weights_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights_path):
        raise ValueError(f"{where}: no adapter_model.safetensors (.bin adapters are not supported; convert them).")
    from safetensors import safe_open

    factors: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as f:
            for key in f.keys():
                m = _NAME.match(key)
                if m is None:
                    raise ValueError(f"{where}: tensor {key!r} is not a LoRA factor (lora_A / lora_B).")
                factors.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key)
    except ValueError:
        raise
    except Exception as e:  # safetensors' own error types
        raise ValueError(f"{where}: could not read adapter_model.safetensors: {e}") from None

    adapter = LoRAAdapter(adapter_id, name, rank, scaling)
    for hf_module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: {hf_module} has lora_{'AB'.replace(''.join(ab), '')} missing.")
        try:
            ours, offset, size = _target(model, hf_module)
            module = model.get_submodule(ours)
        except (AttributeError, KeyError):
            module = None
        if not isinstance(module, LINEAR_TYPES) or ours.endswith("lm_head"):
            raise ValueError(f"{where}: module {hf_module!r} cannot take a LoRA adapter here (supported: the "
                             "attention and MLP projections).")
        a, b = ab["A"], ab["B"]
        if tuple(a.shape) != (rank, module.in_features) or tuple(b.shape) != (size, rank):
            raise ValueError(f"{where}: {hf_module} factors have shapes {tuple(a.shape)} and {tuple(b.shape)}; "
                             f"expected ({rank}, {module.in_features}) and ({size}, {rank}).")
        a, b = a.to(dtype), (b.float() * scaling).to(dtype)
        adapter.modules.setdefault(ours, []).append(
            LoRAFactors(offset, size, a.pin_memory() if pin else a, b.pin_memory() if pin else b))
    if not adapter.modules:
        raise ValueError(f"{where}: adapter_model.safetensors holds no LoRA factors.")
    return adapter
