"""Loading a model directory's tokenizer (transformers' fast tokenizer), offline."""

from __future__ import annotations

from typing import Any

from pagedserve.config import set_offline_env


def load_tokenizer(path: str) -> Any:
    set_offline_env()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from {path!r}: {e}") from e
