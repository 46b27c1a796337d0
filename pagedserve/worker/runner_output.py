"""What one model step returns to the engine (plain Python lists, off the device)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PositionLogprobs:
    """Logprobs at one position: the chosen (sampled or prompt) token first, then the top-k."""

    token_id: int
    logprob: float
    rank: int
    topk_ids: list[int]
    topk_logprobs: list[float]


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request id -> its new token
    # Speculative decoding: request id -> the draft tokens confirmed (they precede `sampled`).
    accepted: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, PositionLogprobs] = field(default_factory=dict)  # for requests asking
    # request id -> logprobs of the prompt tokens computed this step, in order (targets 1..)
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    pooled: dict[str, list[float]] = field(default_factory=dict)  # request id -> its embedding (pooling runner)
