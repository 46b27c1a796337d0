"""SamplingParams: how to pick tokens and when to stop, with vLLM's names, defaults and
validation (a ValueError naming the field)."""

from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pagedserve.errors import ParamError
from pagedserve.structured_outputs import GuidedDecodingParams, StructuredOutputsParams

__all__ = ["SamplingParams", "RequestOutputKind", "StructuredOutputsParams", "GuidedDecodingParams",
           "BeamSearchParams"]

_GREEDY_EPS = 1e-5
_MAX_LOGIT_BIAS = 100.0
_INT64 = 2**63  # seeds and top_k become int64 tensors: anything wider would crash a step


class RequestOutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every output carries everything so far
    DELTA = 1  # every output carries only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


def _short_repr(value: Any, limit: int = 200) -> str:
    """Error messages echo the offending value, but never a huge one (a 10^4-entry list)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16  # None: up to the model's context length
    min_tokens: int = 0
    logprobs: Optional[int] = None  # top-k logprobs per generated token (plus the sampled one)
    prompt_logprobs: Optional[int] = None
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    truncate_prompt_tokens: Optional[int] = None  # keep only the last k prompt tokens (-1: max_model_len)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Output constrained to a JSON schema, regex, choice or grammar (engine/grammar.py).
    structured_outputs: Optional[StructuredOutputsParams] = None
    guided_decoding: Optional[GuidedDecodingParams] = None  # vLLM's older name for the same
    # vLLM's extra_args: arguments for custom logits processors (pagedserve/logits_processor.py)
    # and other extensions; nothing built in reads them. The server fills them from vllm_xargs.
    extra_args: Optional[dict[str, Any]] = None

    # Filled in by the engine: EOS ids of the model unless ignore_eos (kept apart from the
    # user's stop_token_ids because an EOS stop reports stop_reason None, like vLLM), and
    # bad_words as token-id sequences.
    _eos_token_ids: frozenset = field(default=frozenset(), repr=False)
    _bad_words_token_ids: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if self.logit_bias is not None:
            self.logit_bias = dict(self.logit_bias)
        if self.top_k == -1:
            self.top_k = 0
        if self.guided_decoding is not None:
            if self.structured_outputs is not None and self.structured_outputs is not self.guided_decoding:
                raise ParamError("structured_outputs", "give structured_outputs or guided_decoding, not both.")
            self.structured_outputs = self.guided_decoding
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
            self.guided_decoding = self.structured_outputs
        self._verify()
        if self.is_greedy:
            # Greedy is exact argmax: truncation knobs have nothing left to do.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _verify(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ParamError(name, f"{name} {msg}, got {_short_repr(getattr(self, name))}.")

        check(_is_int(self.n) and self.n >= 1, "n", "must be at least 1")
        check(self.extra_args is None or (isinstance(self.extra_args, dict)
                                          and all(isinstance(k, str) for k in self.extra_args)),
              "extra_args", "must be a dict with string keys")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            check(_is_num(v) and -2.0 <= v <= 2.0, name, "must be in [-2, 2]")
        check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0.0, "repetition_penalty",
              "must be greater than zero")
        check(_is_num(self.temperature) and 0.0 <= self.temperature < float("inf"), "temperature",
              "must be a finite non-negative number")
        check(_is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(_is_int(self.top_k) and 0 <= self.top_k < _INT64, "top_k", "must be -1 (disable), or at least 1")
        check(_is_num(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        check(self.seed is None or (_is_int(self.seed) and -_INT64 <= self.seed < _INT64), "seed",
              "must be a 64-bit integer")
        check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
              "must be at least 1")
        check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be greater than or equal to 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ParamError("min_tokens", "min_tokens must be less than or equal to "
                             f"max_tokens={self.max_tokens}, got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            check(v is None or (_is_int(v) and v >= 0), name, "must be a non-negative integer")
        check(self.truncate_prompt_tokens is None or (_is_int(self.truncate_prompt_tokens)
                                                      and (self.truncate_prompt_tokens >= 1
                                                           or self.truncate_prompt_tokens == -1)),
              "truncate_prompt_tokens", "must be at least 1, or -1 (the model's maximum length)")
        check(all(isinstance(s, str) for s in self.stop), "stop", "must be strings")
        check(all(self.stop), "stop", "cannot contain an empty string")
        check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "must be non-negative integers")
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise ParamError("logit_bias", "logit_bias must map token ids to numbers, "
                                 f"got {_short_repr(self.logit_bias)}.") from None
            check(all(k >= 0 for k in self.logit_bias), "logit_bias", "keys must be non-negative token ids")
            check(all(math.isfinite(v) for v in self.logit_bias.values()), "logit_bias", "values must be finite")
            # OpenAI's range; values beyond it are clamped, not rejected.
            self.logit_bias = {k: max(-_MAX_LOGIT_BIAS, min(_MAX_LOGIT_BIAS, v)) for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
            check(len(self.allowed_token_ids) > 0, "allowed_token_ids", "must not be empty")
            check(all(_is_int(t) and t >= 0 for t in self.allowed_token_ids), "allowed_token_ids",
                  "must be non-negative token ids")
        if self.bad_words is not None:
            self.bad_words = list(self.bad_words)
            check(all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words",
                  "must be non-empty strings")
        if self.stop and not self.detokenize:
            raise ParamError("stop", "stop strings are only supported when detokenize is True.")
        if self.is_greedy and self.n > 1:
            raise ParamError("n", f"n must be 1 when using greedy sampling (temperature=0), got {self.n}.")
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            raise ParamError("output_kind",
                             f"output_kind must be a RequestOutputKind, got {self.output_kind!r}.") from None

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def needs_output_history(self) -> bool:
        """Whether sampling reads the request's previous output tokens on the host (penalties,
        multi-token bad words, a grammar's state): async scheduling waits for them before the
        next step."""
        return (self.has_penalties or self.structured_outputs is not None
                or any(len(s) > 1 for s in self._bad_words_token_ids or ()))

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)


@dataclass
class BeamSearchParams:
    """LLM.beam_search's parameters (pagedserve/beam_search.py), vLLM's names."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # > 0: each beam's sampled token joins its top-k candidates (vLLM)
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # accepted for vLLM compatibility (no stop strings here)

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ParamError(name, f"{name} must be an integer of at least 1, got {v!r}.")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ParamError("temperature", f"temperature must be >= 0, got {self.temperature!r}.")
        if not isinstance(self.length_penalty, (int, float)):
            raise ParamError("length_penalty", f"length_penalty must be a number, got {self.length_penalty!r}.")
