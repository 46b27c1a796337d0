"""config.json "architectures" name -> model class, imported lazily."""

from __future__ import annotations

import importlib
from typing import Any

_MODELS = {
    "LlamaForCausalLM": ("pagedserve.model.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("pagedserve.model.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("pagedserve.model.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("pagedserve.model.qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_class(hf_config: Any) -> type:
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in _MODELS:
            module, cls = _MODELS[arch]
            return getattr(importlib.import_module(module), cls)
    raise ValueError(
        f"model architecture {archs or '(none in config.json)'} is not supported; "
        f"supported architectures: {', '.join(supported_architectures())}."
    )
