"""Batched sampling over the rows of one step: greedy, temperature, top-k, top-p, and
per-request seeded generators, all as tensor ops on the device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [S] float32, 1.0 on greedy rows
    greedy: torch.Tensor  # [S] bool
    all_greedy: bool
    all_random: bool
    top_k: Optional[torch.Tensor] = None  # [S] int64, 0 = off; None when no row uses it
    top_p: Optional[torch.Tensor] = None  # [S] float32, 1.0 = off; None when no row uses it
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> seeded generator


def apply_top_k_top_p(logits: torch.Tensor, k: Optional[torch.Tensor], p: Optional[torch.Tensor]) -> torch.Tensor:
    """Mask (to -inf) the logits outside each row's top-k and nucleus top-p; one sort."""
    if k is None and p is None:
        return logits
    vocab = logits.shape[-1]
    sorted_logits, idx = logits.sort(dim=-1, descending=False)
    if k is not None:
        kk = torch.where(k > 0, k, vocab).clamp(max=vocab)
        kth = sorted_logits.gather(1, (vocab - kk).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mask = probs.cumsum(dim=-1) <= 1 - p.unsqueeze(1)
        mask[:, -1] = False  # the most likely token always survives
        sorted_logits.masked_fill_(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Sample each row of probs via argmax(probs / Exp(1) noise) (the exponential race, as
    vLLM does); rows with their own generator draw their noise from it alone, so a seeded
    request samples the same tokens whatever else shares the batch."""
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for row, gen in generators.items():
        q[row].exponential_(generator=gen)
    return probs.div_(q).argmax(dim=-1)


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits.float()
        if batch.all_greedy:
            return logits.argmax(dim=-1)
        greedy_tokens = None if batch.all_random else logits.argmax(dim=-1)
        logits = logits / batch.temperature.unsqueeze(1)
        logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        tokens = random_sample(logits.softmax(dim=-1), batch.generators)
        if greedy_tokens is not None:
            tokens = torch.where(batch.greedy, greedy_tokens, tokens)
        return tokens
