"""Build a model from a Hugging Face directory: class from config.json, weights from
*.safetensors, no random initialisation (parameters are created on the meta device)."""

from __future__ import annotations

import glob
import os
from typing import Any, Iterator

import torch
from torch import nn

from pagedserve.model.registry import resolve_model_class


def iterate_safetensors(model_dir: str, dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"model directory {model_dir!r} has no *.safetensors weight files "
                         "(pytorch_model.bin checkpoints are not supported; convert them with safetensors).")
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    yield name, (t.to(dtype) if t.is_floating_point() else t).to(device)
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"could not read weight file {path}: {e}") from e


def load_model(model_dir: str, hf_config: Any, dtype: torch.dtype, device: torch.device, max_positions: int) -> nn.Module:
    cls = resolve_model_class(hf_config)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(hf_config, max_positions)
    finally:
        torch.set_default_dtype(old_dtype)
    model.to_empty(device=device)
    model.tie_weights()
    for m in model.modules():
        if hasattr(m, "rebuild_buffers"):
            m.rebuild_buffers(device)
    model.load_weights(iterate_safetensors(model_dir, dtype, device))
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"weight {name} holds NaN or infinite values")
    return model.eval().requires_grad_(False)
