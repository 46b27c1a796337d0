"""Reading a Hugging Face model directory's config without ever touching a hub."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from pagedserve.config import set_offline_env


def check_model_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(
            f"model {path!r} is not a local directory. pagedserve loads Hugging Face model "
            "directories (config.json, *.safetensors, tokenizer files) and never downloads."
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model directory {path!r} has no config.json.")


def load_hf_config(path: str) -> Any:
    set_offline_env()
    check_model_dir(path)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config
        raise ValueError(f"could not read {os.path.join(path, 'config.json')}: {e}") from e
    from pagedserve.model.registry import text_model_config

    return text_model_config(config)  # a vision-language model is served as its language model


def rope_parameters(hf_config: Any, layer_type: Optional[str] = None) -> dict:
    """RoPE settings as one dict, whether the config uses transformers 5's `rope_parameters`
    or the older `rope_theta` + `rope_scaling` pair. Where they are given per layer type
    (Gemma 3: "sliding_attention" / "full_attention"), those of `layer_type` (default: full)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        params = dict(params)
        if rope_is_per_layer_type(hf_config):
            params = dict(params[layer_type or "full_attention"])
    else:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    params.setdefault("rope_theta", 10000.0)
    return params


def config_section(hf_config: Any, name: str) -> Any:
    """A nested config section (MPT's and DBRX's attn_config, DBRX's ffn_config) as an object
    with attributes, whether the config holds it as a dict or a config class."""
    from types import SimpleNamespace

    section = getattr(hf_config, name, None) or {}
    return SimpleNamespace(**section) if isinstance(section, dict) else section


def rope_is_per_layer_type(hf_config: Any) -> bool:
    params = getattr(hf_config, "rope_parameters", None) or {}
    return "rope_theta" not in params and "full_attention" in params


def checked_layer_types(hf_config: Any, allowed: dict[str, str], model: str) -> list[str]:
    """config.layer_types, one per layer and each in `allowed` (type -> what it is, for the
    error), as transformers names them (Mamba-2 and Gated DeltaNet layers: "linear_attention")."""
    types = list(getattr(hf_config, "layer_types", None) or [])
    if len(types) != hf_config.num_hidden_layers:
        raise ValueError(f"{model}: config.json has {len(types)} layer_types for {hf_config.num_hidden_layers} "
                         "layers.")
    unknown = set(types) - set(allowed)
    if unknown:
        kinds = ", ".join(f"{t} ({what})" for t, what in allowed.items())
        raise ValueError(f"{model}: layer_types {sorted(unknown)} are not supported; supported: {kinds}.")
    return types


def layer_windows(hf_config: Any) -> list[int]:
    """Each decoder layer's sliding window (0: full attention; negative: chunked local
    attention in chunks of -window positions, Llama 4's "chunked_attention" layers), as
    transformers decides it: from `layer_types` where the config has them (Qwen2's
    max_window_layers, Gemma 2/3's alternation), else the config's sliding_window on every
    layer (Mistral, Mixtral)."""
    n = hf_config.num_hidden_layers
    window = int(getattr(hf_config, "sliding_window", None) or 0)
    if getattr(hf_config, "use_sliding_window", True) is False:
        window = 0
    types = getattr(hf_config, "layer_types", None)
    if types:
        if len(types) != n:
            raise ValueError(f"config.json has {len(types)} layer_types for {n} layers.")
        chunk = -int(getattr(hf_config, "attention_chunk_size", None) or 0)
        return [window if t == "sliding_attention" else chunk if t == "chunked_attention" else 0 for t in types]
    return [window] * n


def generation_eos_ids(path: str, hf_config: Any, tokenizer: Optional[Any]) -> set[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, as vLLM gathers them."""
    ids: set[int] = set()

    def add(v: Any) -> None:
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v if x is not None)

    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            add(json.load(f).get("eos_token_id"))
    add(getattr(hf_config, "eos_token_id", None))
    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    return ids
