"""Per-layer FP8 KV-cache scales that FP8 checkpoints may carry (llm-compressor's
kv_cache_scheme, NVIDIA ModelOpt, AutoFP8): one float for a layer's keys and one for its
values, calibrated so that k / k_scale fits FP8. They are read out of the checkpoint's tensor
stream (no model has a parameter for them) and used only with kv_cache_dtype="fp8", as vLLM
does (layers/attention.py folds them outside the kernels); with any other cache they are
ignored. Names, as vLLM reads them:
  <attn>.k_scale, <attn>.v_scale (also <attn>.attn.k_scale), <attn>.kv_scale (both),
  <attn>.k_proj.output_scale, <attn>.v_proj.output_scale (also .k_proj.k_scale),
where <attn> is the layer's attention module (`...layers.N.self_attn`); query and
probability scales (q_scale, prob_scale, q_proj.output_scale) are dropped."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
from torch import nn

_KV = re.compile(r"^(?P<attn>.+)\.(?:(?:attn\.)?(?P<a>[kv]|kv)_scale|(?P<b>[kv])_proj\.(?:output_scale|[kv]_scale))$")
_DROPPED = re.compile(r"\.(?:(?:attn\.)?(?:q|prob)_scale|q_proj\.output_scale)$")


def split_kv_scales(weights: Iterable[tuple[str, torch.Tensor]],
                    found: dict[str, dict[str, float]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream without its KV scales, which go into found[attention module][k or v]."""
    for name, t in weights:
        m = _KV.match(name)
        if m is None:
            if not _DROPPED.search(name):
                yield name, t
            continue
        if t.numel() != 1:
            raise ValueError(f"checkpoint: {name} holds {t.numel()} KV-cache scales; one per layer is supported "
                             "(not per head).")
        value = float(t.float().reshape(()))
        if not value > 0:
            raise ValueError(f"checkpoint: {name} is {value}; a KV-cache scale must be positive.")
        for kv in ("k", "v") if (m["a"] or m["b"]) == "kv" else (m["a"] or m["b"],):
            found.setdefault(m["attn"], {})[kv] = value


def attach_kv_scales(model: nn.Module, found: dict[str, dict[str, float]]) -> None:
    """Hand each attention module's scales to its PagedAttention (as `checkpoint_kv_scales`,
    which use_kv_scales applies); a scale with no such layer is a ValueError."""
    from pagedserve.model.layers.attention import PagedAttention

    layers = {name.rsplit(".", 1)[0]: m for name, m in model.named_modules() if isinstance(m, PagedAttention)}
    for attn, scales in found.items():
        layer = layers.get(attn)
        if layer is None or layer.kv_shared:
            raise ValueError(f"checkpoint: KV-cache scales for {attn!r}, which is not an attention layer of "
                             f"{type(model).__name__} with its own key and value caches.")
        layer.checkpoint_kv_scales = (scales.get("k", 1.0), scales.get("v", 1.0))


def use_kv_scales(layers: Iterable[nn.Module], kv_dtype: torch.dtype) -> int:
    """With an FP8 cache, each layer takes its checkpoint's scales; returns how many did."""
    from pagedserve.attention.backend import FP8_KV

    n = 0
    for layer in layers:
        scales = getattr(layer, "checkpoint_kv_scales", None)
        if scales is not None and kv_dtype == FP8_KV:
            layer.k_scale, layer.v_scale = scales
            n += 1
    return n
