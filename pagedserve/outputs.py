"""Result objects returned to users, with vLLM's class and field names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass
class Logprob:
    """Log probability of one token, its rank in the distribution and its text."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# Per position: token id -> Logprob (the chosen token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with n > 1 has n of them)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[SampleLogprobs] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | None while running
    stop_reason: Union[int, str, None] = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Everything known about a request so far; `finished` tells whether it is done."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: Optional[list[int]]  # None: the prompt was given as embeddings
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: Optional[PromptLogprobs] = None
    num_cached_tokens: int = 0
    metrics: Optional["RequestMetrics"] = None
    lora_request: Optional[Any] = None  # the LoRARequest it ran with
    num_prompt_embeds: int = 0  # a prompt given as embeddings (engine/prompt_embeds.py): how many

    @property
    def num_prompt_tokens(self) -> int:
        """The prompt's positions, token ids or embeddings."""
        return len(self.prompt_token_ids) if self.prompt_token_ids is not None else self.num_prompt_embeds


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class PoolingOutput:
    """LLM.encode's output (vLLM's): the pooled result as a tensor."""

    data: Any  # torch.Tensor


@dataclass
class PoolingRequestOutput:
    """One prompt's result from a pooling model (vLLM's PoolingRequestOutput): `outputs` is an
    EmbeddingOutput or a ClassificationOutput."""

    request_id: str
    outputs: Any
    prompt_token_ids: list[int]
    finished: bool = True
    prompt: Optional[str] = None
    num_cached_tokens: int = 0


class EmbeddingRequestOutput(PoolingRequestOutput):
    """vLLM's LLM.embed result: `outputs.embedding`, the pooled vector of one prompt."""


@dataclass
class ClassificationOutput:
    probs: list[float]  # per label: softmax, or a sigmoid for one label / multi-label models

    @property
    def num_classes(self) -> int:
        return len(self.probs)


class ClassificationRequestOutput(PoolingRequestOutput):
    """vLLM's LLM.classify result: `outputs.probs`, one prompt's class probabilities."""


@dataclass
class ScoringOutput:
    score: float


@dataclass
class ScoringRequestOutput:
    """vLLM's LLM.score result: one pair's score."""

    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic) of one request's life, for latency metrics."""

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_preemptions: int = 0
    extra: dict = field(default_factory=dict)
