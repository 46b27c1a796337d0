"""vLLM's PoolingParams: what an embedding request asks for."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

from pagedserve.errors import ParamError


@dataclass
class PoolingParams:
    """dimensions: keep the first k values (Matryoshka embeddings), before normalizing;
    normalize: L2-normalize the vector (None: the model's pooler config, default yes);
    truncate_prompt_tokens: keep only the last k prompt tokens (-1: max_model_len); task: "embed" or "classify"
    (set by LLM.embed / LLM.classify; None: whatever the model does)."""

    dimensions: Optional[int] = None
    normalize: Optional[bool] = None
    truncate_prompt_tokens: Optional[int] = None
    task: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("dimensions", "truncate_prompt_tokens"):
            v = getattr(self, name)
            if name == "truncate_prompt_tokens" and v == -1 and not isinstance(v, bool):
                continue  # vLLM's: the model's maximum length
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ParamError(name, f"{name} must be a positive integer, got {v!r}.")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ParamError("normalize", f"normalize must be true or false, got {self.normalize!r}.")
        if self.task not in (None, "embed", "classify"):
            raise ParamError("task", f"task must be 'embed' or 'classify', got {self.task!r}.")

    def clone(self) -> "PoolingParams":
        return copy.copy(self)
