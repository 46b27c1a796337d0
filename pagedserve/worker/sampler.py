"""Batched sampling for one step, as tensor ops on the device (no per-row loops over the
vocabulary). vLLM's order: allowed tokens -> bad words / min_tokens bans -> logit bias ->
penalties -> greedy argmax | temperature -> min-p -> top-k/top-p -> seeded random draw.
Logprobs are of the model's raw distribution (vLLM's default "raw_logprobs")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [S] float32, 1.0 on greedy rows
    greedy: torch.Tensor  # [S] bool
    all_greedy: bool
    all_random: bool
    top_k: Optional[torch.Tensor] = None  # [S] int64, 0 = off; None when no row uses it
    top_p: Optional[torch.Tensor] = None  # [S] float32, 1.0 = off
    min_p: Optional[torch.Tensor] = None  # [S] float32, 0.0 = off
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> seeded generator
    allowed_mask: Optional[torch.Tensor] = None  # [S, V] bool
    banned: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (rows, token ids) set to -inf
    bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # (rows, token ids, values)
    # Penalties (None when no row uses any): per-row factors and token statistics.
    presence: Optional[torch.Tensor] = None  # [S]
    frequency: Optional[torch.Tensor] = None  # [S]
    repetition: Optional[torch.Tensor] = None  # [S]
    output_counts: Optional[torch.Tensor] = None  # [S, V] float32: each token's count in the output
    seen_mask: Optional[torch.Tensor] = None  # [S, V] bool: token in prompt or output
    num_logprobs: Optional[int] = None  # the largest top-k asked for by any row; None = no logprobs


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [S] int64
    # With logprobs: raw logprob and rank of each sampled token, and the top-k ids/logprobs.
    sampled_logprobs: Optional[torch.Tensor] = None  # [S]
    sampled_ranks: Optional[torch.Tensor] = None  # [S]
    topk_ids: Optional[torch.Tensor] = None  # [S, K]
    topk_logprobs: Optional[torch.Tensor] = None  # [S, K]


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    rep = b.repetition.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(b.seen_mask, penalised, logits)
    logits = logits - b.frequency.unsqueeze(1) * b.output_counts
    return logits - b.presence.unsqueeze(1) * (b.output_counts > 0).to(logits.dtype)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, _NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, k: Optional[torch.Tensor], p: Optional[torch.Tensor]) -> torch.Tensor:
    """Mask the logits outside each row's top-k and nucleus top-p, with one sort."""
    if k is None and p is None:
        return logits
    vocab = logits.shape[-1]
    sorted_logits, idx = logits.sort(dim=-1, descending=False)
    if k is not None:
        kk = torch.where(k > 0, k, vocab).clamp(max=vocab)
        kth = sorted_logits.gather(1, (vocab - kk).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, _NEG_INF)
    if p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mask = probs.cumsum(dim=-1) <= 1 - p.unsqueeze(1)
        mask[:, -1] = False  # the most likely token always survives
        sorted_logits.masked_fill_(mask, _NEG_INF)
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """argmax(probs / Exp(1) noise), the exponential race (as vLLM does). Rows with their own
    generator draw their noise from it alone, so a seeded request samples the same tokens
    whatever else shares the batch."""
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for row, gen in generators.items():
        q[row].exponential_(generator=gen)
    return probs.div_(q).argmax(dim=-1)


class Sampler:
    def __call__(self, logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if b.num_logprobs is not None else None
        tokens = self._sample(self.process_logits(logits, b), b)
        out = SamplerOutput(tokens)
        if raw_logprobs is not None:
            out.sampled_logprobs = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
            out.sampled_ranks = (raw_logprobs > out.sampled_logprobs.unsqueeze(1)).sum(dim=-1) + 1
            if b.num_logprobs > 0:
                out.topk_logprobs, out.topk_ids = raw_logprobs.topk(b.num_logprobs, dim=-1)
        return out

    @staticmethod
    def process_logits(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        """Everything before the greedy/random choice: allowed tokens, bans, bias, penalties."""
        if b.allowed_mask is not None:
            logits = logits.masked_fill(~b.allowed_mask, _NEG_INF)
        if b.banned is not None:
            logits = logits.index_put(b.banned, torch.tensor(_NEG_INF, device=logits.device))
        if b.bias is not None:
            rows, cols, vals = b.bias
            logits = logits.index_put((rows, cols), vals, accumulate=True)
        if b.output_counts is not None:
            logits = apply_penalties(logits, b)
        return logits

    @staticmethod
    def _sample(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        if b.all_greedy:
            return logits.argmax(dim=-1)
        greedy_tokens = None if b.all_random else logits.argmax(dim=-1)
        logits = logits / b.temperature.unsqueeze(1)
        if b.min_p is not None:
            logits = apply_min_p(logits, b.min_p)
        logits = apply_top_k_top_p(logits, b.top_k, b.top_p)
        tokens = random_sample(logits.softmax(dim=-1), b.generators)
        if greedy_tokens is not None:
            tokens = torch.where(b.greedy, greedy_tokens, tokens)
        return tokens
