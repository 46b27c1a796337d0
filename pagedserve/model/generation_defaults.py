"""The model creator's sampling defaults (vLLM's --generation-config): the temperature, top_p,
top_k, min_p, repetition_penalty and max_new_tokens a model's generation_config.json
recommends become the defaults of requests that leave them unset (Qwen2.5, for one, ships
temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05). `do_sample` is ignored, as in
vLLM: a request wanting greedy decoding says temperature 0."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

# generation_config.json's name -> SamplingParams'
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def sampling_defaults(model: str, source: str = "auto", override: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """SamplingParams keyword defaults. `source`: "auto" reads the model directory's
    generation_config.json, "vllm" reads none (SamplingParams' own defaults), any other value is
    a directory holding one. `override` (generation_config.json's names) goes over it."""
    if source == "vllm":
        found: dict[str, Any] = {}
    else:
        folder = model if source == "auto" else source
        if source != "auto" and not os.path.isdir(folder):
            raise ValueError(f"generation_config must be 'auto', 'vllm' or a directory, got {source!r}.")
        found = _read(os.path.join(folder, "generation_config.json"))
    for key in override or {}:
        if key not in SAMPLING_KEYS:
            raise ValueError(f"override_generation_config: {key!r} is not one of {', '.join(SAMPLING_KEYS)}.")
    found.update(override or {})
    return {SAMPLING_KEYS[k]: v for k, v in found.items() if k in SAMPLING_KEYS and v is not None}


def _read(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"generation_config: {path} is not readable JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"generation_config: {path} does not hold a JSON object.")
    return data
