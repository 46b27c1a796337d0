"""How an embedding model turns hidden states into one vector: which token(s) to pool and
whether to normalize, from the user's pooler_config, else the model directory's
sentence-transformers files (modules.json, 1_Pooling/config.json), else last token and
normalized (vLLM's default for decoder embedding models); and the sentence-transformers Dense
layers after the pooling (EmbeddingGemma's 2_Dense, 3_Dense), applied before normalizing."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

POOLING_TYPES = ("LAST", "MEAN", "CLS")

# sentence-transformers' 1_Pooling/config.json switches -> our pooling types
_ST_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS"}


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: str = "LAST"
    normalize: bool = True
    dense: tuple[str, ...] = ()  # the Dense modules' directories, in order (model/st_dense.py)


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"could not read {path}: {e}") from None


def _sentence_transformers(model_dir: str) -> dict:
    """What the model's sentence-transformers modules say, if it has them."""
    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(modules_path):
        return {}
    out: dict = {}
    modules = _read_json(modules_path)
    types = [m.get("type", "") for m in modules if isinstance(m, dict)]
    out["normalize"] = any(t.endswith("Normalize") for t in types)
    out["dense"] = tuple(os.path.join(model_dir, m.get("path", "")) for m in modules
                         if isinstance(m, dict) and m.get("type", "").endswith("models.Dense"))
    for m in modules:
        if isinstance(m, dict) and m.get("type", "").endswith("Pooling"):
            cfg_path = os.path.join(model_dir, m.get("path", ""), "config.json")
            if os.path.isfile(cfg_path):
                cfg = _read_json(cfg_path)
                modes = [t for key, t in _ST_MODES.items() if cfg.get(key)]
                if modes:
                    out["pooling_type"] = modes[0]
    return out


def resolve_pooler_config(model_dir: str, override: Optional[dict], task: str = "embed",
                          default_type: str = "LAST") -> PoolerConfig:
    """A classifier pools the token its head reads (the last for decoder classifiers, the
    first for BERT-family ones: default_type), not normalized: the head reads the raw hidden
    state. Encoder embedding models without sentence-transformers files pool the first token
    (CLS), as vLLM does."""
    settings = _sentence_transformers(model_dir) if task == "embed" else {"normalize": False}
    for key, value in (override or {}).items():
        if key not in ("pooling_type", "normalize"):
            raise ValueError(f"pooler_config: unknown key {key!r} (known: pooling_type, normalize).")
        settings[key] = value
    pooling_type = str(settings.get("pooling_type", default_type)).upper()
    if pooling_type not in POOLING_TYPES:
        raise ValueError(f"pooler_config: pooling_type must be one of {', '.join(POOLING_TYPES)}, got {pooling_type!r}.")
    normalize = settings.get("normalize", True)
    if not isinstance(normalize, bool):
        raise ValueError(f"pooler_config: normalize must be true or false, got {normalize!r}.")
    return PoolerConfig(pooling_type, normalize, settings.get("dense", ()))
