"""Batched sampling for one step, as tensor ops on the device (no per-row loops over the
vocabulary). vLLM's order: grammar (structured outputs) -> allowed tokens -> bad words /
min_tokens bans -> logit bias -> custom logits processors -> penalties -> greedy argmax |
temperature -> argmax-invariant custom processors -> min-p -> top-k -> top-p -> seeded draw.
Logprobs are of the model's raw distribution (vLLM's default "raw_logprobs"), or as vLLM's
logprobs_mode asks: "raw_logits", or "processed_logprobs" / "processed_logits" of the
distribution each row is drawn from (after every step above; greedy rows: before the choice).

Speed: rows with a top-k work on their k candidates only (one topk instead of a sort of
the vocabulary); min-p is a logit threshold (p_i < min_p * p_max  <=>  l_i < l_max +
log(min_p)); each row draws one uniform and picks by inverse CDF, so a seeded row costs one
random number per step and its tokens do not depend on the rest of the batch."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from pagedserve.config import LOGPROBS_MODES
from pagedserve.engine.grammar import unpack_bitmask

_NEG_INF = float("-inf")


@dataclass
class SampleGroup:
    """Random rows that take one sampling path, with what the path needs known on the host
    (reading it back from the device would stall the step)."""

    rows: Optional[torch.Tensor]  # [G] row indices on the device; None = every row of the batch
    top_k_max: int  # > 0: every row has a top-k (candidate path), this the largest; 0: none has
    top_p: bool  # the full-vocabulary path applies top-p (some row has top_p < 1)


@dataclass
class SamplingBatch:
    temperature: Optional[torch.Tensor]  # [S] float32, 1.0 on greedy rows; None when all are greedy
    greedy: Optional[torch.Tensor]  # [S] bool; None when all are greedy
    all_greedy: bool
    all_random: bool
    top_k: Optional[torch.Tensor] = None  # [S] int64, 0 = off; None when no row uses it
    top_p: Optional[torch.Tensor] = None  # [S] float32, 1.0 = off
    min_p: Optional[torch.Tensor] = None  # [S] float32, 0.0 = off
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> seeded generator
    grammar_bitmask: Optional[torch.Tensor] = None  # [S, ceil(V / 32)] int32: bit set = allowed
    allowed_mask: Optional[torch.Tensor] = None  # [S, V] bool
    banned: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (rows, token ids) set to -inf
    bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # (rows, token ids, values)
    # Penalties (None when no row uses them).
    seen_mask: Optional[torch.Tensor] = None  # [S, V] bool: token in prompt or output
    repetition: Optional[torch.Tensor] = None  # [S]; None when every row has 1.0
    penalty_sub: Optional[torch.Tensor] = None  # [S, V]: frequency * count + presence * (count > 0)
    num_logprobs: Optional[int] = None  # the largest top-k asked for by any row; None = no logprobs
    groups: list[SampleGroup] = field(default_factory=list)  # the random rows, by path
    custom: Any = None  # worker/custom_logits.py CustomLogits: the user's logits processors


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [S] int64
    # With logprobs: raw logprob and rank of each sampled token, and the top-k ids/logprobs.
    sampled_logprobs: Optional[torch.Tensor] = None  # [S]
    sampled_ranks: Optional[torch.Tensor] = None  # [S]
    topk_ids: Optional[torch.Tensor] = None  # [S, K]
    topk_logprobs: Optional[torch.Tensor] = None  # [S, K]
    # With keep_reported: the full [S, V] logprobs (or logits) the above are read from, to
    # report other tokens than the sampled ones (speculative rows); never copied to the host.
    reported: Optional[torch.Tensor] = None


def _min_p_threshold(logits: torch.Tensor, top: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens with p < min_p * p_max, as logits: l < l_max + log(min_p)."""
    cut = top + torch.log(min_p.clamp(min=1e-30)).unsqueeze(1)
    return logits.masked_fill(logits < cut, _NEG_INF)


def _top_p_sorted(sorted_desc: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus on descending-sorted logits: keep the smallest prefix whose mass reaches p."""
    probs = sorted_desc.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    mask = before >= p.unsqueeze(1)
    mask[:, 0] = False
    return sorted_desc.masked_fill(mask, _NEG_INF)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of (unnormalised) probs with its uniform u in [0, 1)."""
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


@functools.lru_cache(maxsize=None)
def _triton_argmax():
    """(MAX_ROWS, argmax_rows) from ops/argmax.py, or None without Triton; looked up once,
    not per token."""
    from pagedserve.ops import triton_available

    if not triton_available():
        return None
    from pagedserve.ops.argmax import MAX_ROWS, argmax_rows

    return MAX_ROWS, argmax_rows


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (lowest index on ties). A few rows on a GPU go through the Triton
    kernel (ops/argmax.py): torch walks a single long row nearly serially."""
    if logits.is_cuda and logits.stride(-1) == 1:
        kernel = _triton_argmax()
        if kernel is not None and logits.shape[0] <= kernel[0]:
            return kernel[1](logits)
    return logits.argmax(dim=-1)


class Sampler:
    def __init__(self, logprobs_mode: str = "raw_logprobs") -> None:
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, got {logprobs_mode!r}.")
        self.logprobs_mode = logprobs_mode

    def __call__(self, logits: torch.Tensor, b: SamplingBatch, keep_reported: bool = False,
                 keep_input: bool = False) -> SamplerOutput:
        """keep_reported: SamplerOutput.reported kept (speculative rows report other tokens).
        keep_input: `logits` left as they are (processing works in place; float32 input is
        then copied first), for a caller that reads them again (speculative verification)."""
        if b.all_greedy and b.num_logprobs is None and not self.processes(b):
            # Plain greedy (most batch-1 decoding): argmax of the 16-bit logits is the
            # argmax of their exact float32 copy, so the copy is skipped (one kernel fewer).
            return SamplerOutput(greedy_tokens(logits))
        copy = keep_input and logits.dtype == torch.float32 and self.processes(b)
        logits = logits.clone() if copy else logits.float()
        want = b.num_logprobs is not None
        mode = self.logprobs_mode
        reported = None
        if want and mode.startswith("raw"):
            reported = logits.log_softmax(dim=-1) if mode == "raw_logprobs" else logits.clone()
        processed = self.process_logits(logits, b)
        processed, b = self._after_temperature(processed, b)
        tokens = self._sample(processed, b)
        if want and mode.startswith("processed"):
            final = self.final_logits(processed, b)
            reported = final.log_softmax(dim=-1) if mode == "processed_logprobs" else final
        out = SamplerOutput(tokens)
        if reported is not None:
            out.sampled_logprobs = reported.gather(1, tokens.unsqueeze(1)).squeeze(1)
            out.sampled_ranks = (reported > out.sampled_logprobs.unsqueeze(1)).sum(dim=-1, dtype=torch.int32) + 1
            if b.num_logprobs > 0:
                out.topk_logprobs, out.topk_ids = reported.topk(b.num_logprobs, dim=-1)
            if keep_reported:
                out.reported = reported
        return out

    def final_logits(self, processed: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        """[S, V] logits each row is drawn from: a random row's after temperature, min-p,
        top-k and top-p (-inf where cut); a greedy row's as processed."""
        out = processed.clone()
        for g in b.groups:
            vals, ids = self.candidates(processed, b, g)
            full = vals if ids is None else torch.full_like(processed[: vals.shape[0]], _NEG_INF).scatter_(1, ids, vals)
            if g.rows is None:
                out = torch.where(b.greedy.unsqueeze(1), out, full)
            else:
                out[g.rows] = full
        return out

    @staticmethod
    def processes(b: SamplingBatch) -> bool:
        """Whether process_logits changes anything for this batch."""
        return any(t is not None for t in (b.grammar_bitmask, b.allowed_mask, b.banned, b.bias, b.repetition,
                                           b.penalty_sub)) or (b.custom is not None and bool(b.custom.before))

    @staticmethod
    def _after_temperature(processed: torch.Tensor, b: SamplingBatch) -> tuple[torch.Tensor, SamplingBatch]:
        """Argmax-invariant custom processors run on the logits after temperature (vLLM's
        place for them), when some row samples; the temperature is then spent."""
        if b.custom is None or not b.custom.after or b.all_greedy:
            return processed, b
        processed = b.custom.apply_after(processed, b.temperature)
        return processed, dataclasses.replace(b, temperature=torch.ones_like(b.temperature))

    @staticmethod
    def process_logits(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        """Everything before the greedy/random choice: grammar, allowed tokens, bans, bias,
        penalties. Works in place on `logits` (the caller's fresh float32 tensor) where it can
        (the repetition penalty makes a new one); use the returned tensor."""
        if b.grammar_bitmask is not None:
            logits.masked_fill_(~unpack_bitmask(b.grammar_bitmask, logits.shape[1]), _NEG_INF)
        if b.allowed_mask is not None:
            logits.masked_fill_(~b.allowed_mask, _NEG_INF)
        if b.banned is not None:
            logits.index_put_(b.banned, logits.new_full((), _NEG_INF))  # made on the device: no copy
        if b.bias is not None:
            rows, cols, vals = b.bias
            logits.index_put_((rows, cols), vals, accumulate=True)
        if b.custom is not None and b.custom.before:  # the user's, before penalties as in vLLM
            logits = b.custom.apply_before(logits)
        if b.repetition is not None:  # seen tokens only, scaled by sign (no host read-back)
            rep = b.repetition.unsqueeze(1)
            logits = torch.where(b.seen_mask, torch.where(logits > 0, logits / rep, logits * rep), logits)
        if b.penalty_sub is not None:
            logits.sub_(b.penalty_sub)
        return logits

    @staticmethod
    def uniforms(b: SamplingBatch, n: int, device: torch.device) -> torch.Tensor:
        u = torch.rand(n, device=device)
        for row, gen in b.generators.items():
            u[row] = torch.rand((), generator=gen, device=device)
        return u

    @staticmethod
    def candidates(logits: torch.Tensor, b: SamplingBatch, g: SampleGroup):
        """Temperature, min-p, top-k and top-p applied to a group's rows: (candidate logits,
        their token ids or None for the whole vocabulary)."""
        rows = g.rows

        def pick(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None or rows is None else t[rows]

        temp = b.temperature if rows is None else b.temperature[rows]
        top_p = b.top_p if rows is None else pick(b.top_p)
        min_p = b.min_p if rows is None else pick(b.min_p)
        x = logits if rows is None else logits[rows]
        if g.top_k_max > 0:
            top_k = b.top_k if rows is None else b.top_k[rows]
            vals, ids = x.topk(min(g.top_k_max, x.shape[1]), dim=-1)  # sorted, descending
            vals = vals / temp.unsqueeze(1)
            vals = vals.masked_fill(torch.arange(vals.shape[1], device=x.device) >= top_k.unsqueeze(1), _NEG_INF)
            if min_p is not None:
                vals = _min_p_threshold(vals, vals[:, :1], min_p)
            if top_p is not None:
                vals = _top_p_sorted(vals, top_p)
            return vals, ids
        x = x / temp.unsqueeze(1)
        if min_p is not None:
            x = _min_p_threshold(x, x.amax(dim=-1, keepdim=True), min_p)
        if g.top_p:
            sorted_desc, ids = x.sort(dim=-1, descending=True)
            return _top_p_sorted(sorted_desc, top_p), ids
        return x, None

    def _sample(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        if b.all_greedy:
            return greedy_tokens(logits)
        tokens = logits.argmax(dim=-1) if not b.all_random else torch.empty(
            logits.shape[0], dtype=torch.long, device=logits.device)
        u = self.uniforms(b, logits.shape[0], logits.device)
        for g in b.groups:
            vals, ids = self.candidates(logits, b, g)
            idx = inverse_cdf(vals.softmax(dim=-1), u if g.rows is None else u[g.rows])
            picked = idx if ids is None else ids.gather(1, idx.unsqueeze(1)).squeeze(1)
            if g.rows is None:
                tokens = torch.where(b.greedy, tokens, picked)
            else:
                tokens[g.rows] = picked
        return tokens

    def probabilities(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        """The full [S, V] distribution each random row samples from (greedy rows: one-hot).
        Not on the hot path: for tests and debugging."""
        x = self.process_logits(logits.clone() if logits.dtype == torch.float32 else logits.float(), b)
        x, b = self._after_temperature(x, b)
        out = torch.nn.functional.one_hot(x.argmax(dim=-1), x.shape[1]).float()
        if not b.groups:  # every row greedy
            return out
        # (cut tokens are -inf in final_logits: the softmax gives them exactly 0)
        return torch.where(b.greedy.unsqueeze(1), out, self.final_logits(x, b).softmax(dim=-1))
