"""Embeddings: the pooled hidden state of each pooling request, built across its prefill
chunks (last token, mean of all tokens, or first token), then through the model's
sentence-transformers Dense layers if it has them, truncated to the requested dimensions and
L2-normalized, on the device. The hidden states are the model's final-norm
output, transformers' last_hidden_state."""

from __future__ import annotations

from typing import Optional

import torch

from pagedserve.model.pooler import PoolerConfig


class PoolingStates:
    def __init__(self, config: PoolerConfig, dense: Optional[torch.nn.Module] = None) -> None:
        self.config = config
        self.dense = dense  # float32 (model/st_dense.py)
        self.partial: dict[str, torch.Tensor] = {}  # request id -> running sum (MEAN) or first row (CLS)

    def add_chunk(self, request_id: str, hidden: torch.Tensor, start: int) -> None:
        """The rows of one scheduled chunk, whose first token is prompt position `start` (0: the
        request starts, or starts over after a preemption)."""
        kind = self.config.pooling_type
        if start == 0:
            self.partial.pop(request_id, None)
        if kind == "MEAN":
            s = hidden.float().sum(0)
            prev = self.partial.get(request_id)
            self.partial[request_id] = s if prev is None else prev + s
        elif kind == "CLS" and start == 0:
            self.partial[request_id] = hidden[0].float()

    def finish(self, request_id: str, hidden: torch.Tensor, num_tokens: int, dimensions: Optional[int],
               normalize: Optional[bool]) -> torch.Tensor:
        """The request's vector, after its last chunk (already given to add_chunk)."""
        kind = self.config.pooling_type
        if kind == "LAST":
            vec = hidden[-1].float()
        else:
            vec = self.partial.pop(request_id)
            if kind == "MEAN":
                vec = vec / num_tokens
        if self.dense is not None:
            vec = self.dense(vec)
        if dimensions is not None:
            vec = vec[:dimensions]
        if self.config.normalize if normalize is None else normalize:
            vec = torch.nn.functional.normalize(vec, dim=-1)
        return vec

    def drop(self, request_id: str) -> None:
        self.partial.pop(request_id, None)
