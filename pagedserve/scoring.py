"""Scoring text pairs (vLLM's LLM.score, /score and /rerank): with a cross-encoder (a sequence
classifier with one label) each pair is one prompt, the tokenizer's pair encoding of the two
texts, and its score the classifier's sigmoid; with an embedding model the score is the cosine
similarity of the two texts' embeddings."""

from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np

from pagedserve.errors import ParamError


def pairs(data_1: Union[str, Sequence[str]], data_2: Union[str, Sequence[str]]) -> list[tuple[str, str]]:
    """One text against many (1:N), or pairwise (N:N), as vLLM pairs them."""
    first = [data_1] if isinstance(data_1, str) else list(data_1)
    second = [data_2] if isinstance(data_2, str) else list(data_2)
    if not first or not second:
        raise ParamError("text_1" if not first else "text_2", "there is nothing to score.")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise ParamError("text_1", f"text_1 has {len(first)} entries for {len(second)} in text_2: give one, or "
                         "as many.")
    return list(zip(first, second))


def pair_prompt(tokenizer: Any, text_1: str, text_2: str, token_types: bool = False) -> dict:
    """A cross-encoder's input for one pair: the tokenizer's own pair encoding, with its token
    types for a model that reads them (token_types: BERT's second segment is type 1)."""
    enc = tokenizer(text=text_1, text_pair=text_2)
    prompt = {"prompt_token_ids": list(enc["input_ids"])}
    types = enc.get("token_type_ids") if token_types else None
    if types is not None and any(types):
        prompt["token_type_ids"] = list(types)
    return prompt


def uses_token_types(config: Any) -> bool:
    """Whether the model has token-type embeddings that tell a pair's two texts apart."""
    return int(getattr(config.hf_config, "type_vocab_size", 0) or 0) > 1


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denom = np.linalg.norm(x) * np.linalg.norm(y)
    return float(x @ y / denom) if denom else 0.0


def check_scorer(config: Any) -> str:
    """"cross" for a one-label classifier, "embed" for an embedding model; else a ParamError."""
    task = config.pooling_task
    if task == "classify":
        if int(getattr(config.hf_config, "num_labels", 1)) != 1:
            raise ParamError("model", "scoring needs a cross-encoder: a sequence classifier with one label "
                             f"(this one has {config.hf_config.num_labels}).")
        return "cross"
    if task == "embed":
        return "embed"
    raise ParamError("model", "scoring needs a pooling model: a cross-encoder or an embedding model.")
