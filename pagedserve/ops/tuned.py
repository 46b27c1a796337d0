"""Kernel settings measured per GPU model, the defaults on that GPU (as vLLM ships its tuned
fused-MoE configs per device): pagedserve/ops/tuned/<device name>.json, written from what
benchmarks/gpu_check.py measured there (its `tuned_candidate.json`). Keys, each optional:

  gemv                PAGEDSERVE_GEMV's syntax: layer shapes on the Triton GEMV kernel
  pdl                 true: programmatic dependent launch (PAGEDSERVE_PDL)
  attn_decode_config  PAGEDSERVE_ATTN_DECODE_CONFIG's syntax ("TILE_N,num_warps,num_stages")
  attn_k_rows         PAGEDSERVE_ATTN_K_ROWS as a bool

The environment variable, where set (even empty), wins over the file. Other GPUs, and CPU,
have no file: every setting keeps its built-in default. Looked up once per device, after
CUDA is up (never at import: reading the device name would initialise CUDA)."""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

import torch

# The value of a setting whose environment variable is not set (then the tuned file decides).
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()
DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")
KEYS = ("gemv", "pdl", "attn_decode_config", "attn_k_rows")


def file_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3.json'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", device_name).strip("_") + ".json"


def load(path: str) -> dict[str, Any]:
    """A tuned file's settings, validated (a bad file is an error, not silently ignored)."""
    from pagedserve.ops.gemv import parse_shapes
    from pagedserve.ops.paged_attention import parse_decode_config

    with open(path) as f:
        data = json.load(f)
    unknown = set(data) - set(KEYS) - {"device", "measured"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} (known: {', '.join(KEYS)})")
    out: dict[str, Any] = {}
    if "gemv" in data:
        out["gemv"] = parse_shapes(data["gemv"])
    if "attn_decode_config" in data:
        out["attn_decode_config"] = parse_decode_config(data["attn_decode_config"])
    for key in ("pdl", "attn_k_rows"):
        if key in data:
            if not isinstance(data[key], bool):
                raise ValueError(f"{path}: {key} must be true or false, got {data[key]!r}")
            out[key] = data[key]
    return out


@functools.lru_cache(maxsize=None)
def _for_index(index: int) -> dict[str, Any]:
    path = os.path.join(DIR, file_name(torch.cuda.get_device_name(index)))
    return load(path) if os.path.isfile(path) else {}


def for_device(device: torch.device) -> dict[str, Any]:
    """The tuned settings of `device`'s GPU model ({} on CPU or without a file)."""
    if device.type != "cuda":
        return {}
    return _for_index(device.index if device.index is not None else torch.cuda.current_device())


def from_env(var: str, parse) -> Any:
    """parse(the variable's value) where it is set (an empty value too), else UNSET. Parsed at
    import, so a bad value fails at once."""
    return parse(os.environ[var]) if var in os.environ else UNSET


def resolve(override: Any, key: str, device: torch.device, default: Any) -> Any:
    """A setting: `override` (from the environment, or set by a test) unless UNSET, else the
    device's tuned value, else `default`."""
    if override is not UNSET:
        return override
    return for_device(device).get(key, default)
