"""Draft heads saved by Red Hat's `speculators` library (checkpoints named like
"RedHatAI/Llama-3.1-8B-Instruct-speculator.eagle3"), read as vLLM reads them. Their
config.json keeps the decoder layer's settings under `transformer_layer_config` and the
head's own at the top level (`speculators_model_type`, `draft_vocab_size`,
`norm_before_residual` (default True here), `eagle_aux_hidden_state_layer_ids`, ...), and
names its draft length in `speculators_config.proposal_methods`. So
`speculative_config={"model": HEAD_DIR}` alone picks the method and the number of drafts."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

# speculators_model_type -> vLLM's speculative method
SPECULATORS_METHODS = {"eagle3": "eagle3"}
# EAGLE-3 fields read from the top level, with their speculators defaults
_EAGLE3_FIELDS = {"draft_vocab_size": None, "target_hidden_size": None, "norm_before_residual": True,
                  "norm_before_fc": False, "fc_norm": False, "norm_output": False,
                  "eagle_aux_hidden_state_layer_ids": None}


def read_speculators(model_dir: str) -> Optional[dict]:
    """The raw config.json of a speculators-format directory; None for any other directory
    (or none: the loader says what is missing)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
    except ValueError as e:
        raise ValueError(f"speculative_config: {path} is not valid JSON: {e}") from None
    return raw if isinstance(raw, dict) and "speculators_model_type" in raw else None


def speculators_method(raw: dict) -> str:
    kind = raw.get("speculators_model_type")
    if kind not in SPECULATORS_METHODS:
        raise ValueError(f"speculative_config: speculators_model_type {kind!r} is not supported (supported: "
                         f"{', '.join(SPECULATORS_METHODS)}).")
    return SPECULATORS_METHODS[kind]


def speculative_tokens(raw: dict) -> Optional[int]:
    """The draft length the head was trained for: the default proposal method's (by its
    proposal_type), else the first's."""
    spec = raw.get("speculators_config")
    methods = spec.get("proposal_methods") if isinstance(spec, dict) else None
    if not isinstance(methods, list) or not methods:
        return None
    default = spec.get("default_proposal_method")
    chosen = next((m for m in methods if isinstance(m, dict) and m.get("proposal_type") == default), methods[0])
    k = chosen.get("speculative_tokens") if isinstance(chosen, dict) else None
    return k if isinstance(k, int) and not isinstance(k, bool) else None


def flat_config(raw: dict) -> Any:
    """A LlamaConfig of the head: the layer's settings with the head's fields over them."""
    from transformers import LlamaConfig

    speculators_method(raw)
    layer = raw.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise ValueError("speculative_config: a speculators config needs a transformer_layer_config object.")
    model_type = layer.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"speculative_config: speculators heads with {model_type!r} layers are not supported "
                         "(llama layers only).")
    d = {k: v for k, v in layer.items() if k not in ("model_type", "architectures")}
    for name, default in _EAGLE3_FIELDS.items():
        value = raw.get(name, default)
        if value is not None:
            d[name] = value
    d["architectures"] = ["Eagle3LlamaForCausalLM"]
    return LlamaConfig(**d)


def draft_config(model_dir: str) -> Any:
    """The head's config: flattened from the speculators format, or the directory's own."""
    from pagedserve.model.hf_config import load_hf_config

    raw = read_speculators(model_dir)
    return flat_config(raw) if raw is not None else load_hf_config(model_dir)
