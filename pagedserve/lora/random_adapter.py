"""Random PEFT LoRA adapters for a model directory (tests, benchmarks), and the reference they
must match: the same model with each adapter merged into its weights (W + scaling * B @ A),
as peft's merge_and_unload would write it."""

from __future__ import annotations

import json
import math
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(base_dir: str, out_dir: str, seed: int, rank: int = 8, alpha: float = 16.0,
                 targets=ALL_TARGETS, layers=None, rslora: bool = False, std: float = 0.3,
                 exclude: str = "") -> tuple[str, str]:
    """Write a PEFT adapter for the model in base_dir, and the merged model beside it.
    Returns (adapter dir, merged model dir)."""
    (weights_path,) = [os.path.join(base_dir, f) for f in os.listdir(base_dir) if f.endswith(".safetensors")]
    base = load_file(weights_path)
    g = torch.Generator().manual_seed(seed)
    scaling = alpha / (math.sqrt(rank) if rslora else rank)
    factors, merged = {}, dict(base)
    for name, w in base.items():
        parts = name.split(".")
        if len(parts) < 3 or parts[-2] not in targets or parts[-1] != "weight":
            continue
        if (layers is not None and int(parts[2]) not in layers) or (exclude and exclude in name):
            continue
        module = name[: -len(".weight")]
        a = torch.randn(rank, w.shape[1], generator=g) * std
        b = torch.randn(w.shape[0], rank, generator=g) * std
        factors[f"base_model.model.{module}.lora_A.weight"] = a.to(w.dtype)
        factors[f"base_model.model.{module}.lora_B.weight"] = b.to(w.dtype)
        merged[name] = (w.double() + scaling * (b.double() @ a.double())).to(w.dtype)
    adapter_dir, merged_dir = os.path.join(out_dir, "adapter"), os.path.join(out_dir, "merged")
    os.makedirs(adapter_dir, exist_ok=True)
    with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
                   "bias": "none", "use_rslora": rslora, "base_model_name_or_path": base_dir}, f)
    save_file(factors, os.path.join(adapter_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(base_dir, merged_dir)
    save_file(merged, os.path.join(merged_dir, os.path.basename(weights_path)), metadata={"format": "pt"})
    return adapter_dir, merged_dir
