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
    # For requests asking: their new token's, or (speculative decoding) a list, one per token
    # emitted (the confirmed drafts, then the sampled token).
    logprobs: dict[str, "PositionLogprobs | list[PositionLogprobs]"] = field(default_factory=dict)
    # request id -> logprobs of the prompt tokens computed this step, in order (targets 1..)
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    pooled: dict[str, list[float]] = field(default_factory=dict)  # request id -> its embedding (pooling runner)
