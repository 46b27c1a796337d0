"""Beam search, vLLM's `LLM.beam_search` (same parameters, results and scoring), built on the
engine: each round asks for one more token with the top 2 x beam_width logprobs for every
live beam, and keeps the beam_width best continuations per prompt. Beams share their prompt
and earlier tokens, so the prefix cache serves everything but the newest token.

A beam's score is its cumulative logprob / length ** length_penalty, where the length counts
the prompt (as vLLM counts it) and not a final EOS."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

from pagedserve.errors import ParamError
from pagedserve.outputs import Logprob
from pagedserve.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from pagedserve.engine.async_engine import AsyncLLM
    from pagedserve.entrypoints.llm import LLM


@dataclass
class BeamSearchSequence:
    """One beam: `tokens` holds the prompt and the generated tokens (as in vLLM); `text` the
    generated text only, without a final EOS."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: Optional[str] = None
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length"


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]


def beam_score(tokens: Sequence[int], cum_logprob: float, eos_token_ids: Iterable[int],
               length_penalty: float) -> float:
    length = len(tokens) - (1 if tokens and tokens[-1] in eos_token_ids else 0)
    return cum_logprob / (length ** length_penalty)


class BeamSearch:
    """The algorithm, apart from how a round runs: `pending()` lists the live beams, each of
    which needs one step (`step_params`: one token, the top 2 x beam_width logprobs) on its
    tokens; `advance()` takes those steps' outputs, in the same order."""

    def __init__(self, prompts: list[list[int]], params: BeamSearchParams, eos_token_ids: Iterable[int],
                 max_model_len: int, max_logprobs: int) -> None:
        k = 2 * params.beam_width
        if k > max_logprobs:
            raise ParamError("beam_width", f"beam_width {params.beam_width} needs {k} logprobs per token, more than "
                             f"max_logprobs={max_logprobs}.")
        self.params, self.max_len, self.prompts = params, max_model_len, prompts
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.step_params = SamplingParams(temperature=params.temperature, max_tokens=1, logprobs=k, ignore_eos=True,
                                          detokenize=False)
        self.live = [[BeamSearchSequence(tokens=list(ids))] for ids in prompts]
        self.done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        self.rounds = 0

    def score(self, b: BeamSearchSequence) -> float:
        return beam_score(b.tokens, b.cum_logprob, self.eos, self.params.length_penalty)

    def pending(self) -> list[tuple[int, BeamSearchSequence]]:
        """(prompt index, beam) of every live beam; none once max_tokens rounds have run."""
        if self.rounds >= self.params.max_tokens:
            return []
        return [(i, b) for i, beams in enumerate(self.live) for b in beams]

    def advance(self, batch: list[tuple[int, BeamSearchSequence]], candidates: list[dict[int, Logprob]]) -> None:
        """One round's results: each beam's top candidates for its next token."""
        self.rounds += 1
        grown: list[list[BeamSearchSequence]] = [[] for _ in self.prompts]
        for (i, beam), cands in zip(batch, candidates):
            for token, lp in cands.items():
                new = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [cands], beam.cum_logprob + lp.logprob)
                if token in self.eos:
                    new.finish_reason = "stop"
                    self.done[i].append(new)
                else:
                    grown[i].append(new)
        for i, beams in enumerate(grown):
            beams = sorted(beams, key=self.score, reverse=True)[:self.params.beam_width]
            full = [b for b in beams if len(b.tokens) >= self.max_len]  # the context is full: no next round
            for b in full:
                b.finish_reason = "length"
            self.done[i] += full
            self.live[i] = [b for b in beams if len(b.tokens) < self.max_len]

    def results(self, tokenizer) -> list[BeamSearchOutput]:
        """The beam_width best beams per prompt, best first, with their text."""
        out = []
        for i, prompt_ids in enumerate(self.prompts):
            for b in self.live[i]:
                b.finish_reason = "length"
            best = sorted(self.done[i] + self.live[i], key=self.score, reverse=True)[:self.params.beam_width]
            for b in best:
                gen = b.tokens[len(prompt_ids):]
                if b.finish_reason == "stop":
                    gen = gen[:-1]
                b.text = tokenizer.decode(gen, skip_special_tokens=True)
            out.append(BeamSearchOutput(best))
        return out


def _check_mode(config) -> None:
    """Beams are scored by summed logprobs: a logits mode reports no logprobs to sum."""
    if config.logprobs_mode.endswith("logits"):
        raise ParamError("use_beam_search", f"beam search needs logprobs: the engine reports "
                         f"{config.logprobs_mode} (logprobs_mode).")


def beam_search(llm: "LLM", prompts: Sequence, params: BeamSearchParams) -> list[BeamSearchOutput]:
    engine = llm.llm_engine
    _check_mode(engine.config)
    search = BeamSearch([engine.process_prompt(p)[1] for p in prompts], params, engine.eos_token_ids,
                        engine.config.max_model_len, engine.config.max_logprobs)
    while batch := search.pending():
        outs = llm.generate([{"prompt_token_ids": b.tokens} for _, b in batch], search.step_params, use_tqdm=False)
        search.advance(batch, [o.outputs[0].logprobs[0] for o in outs])
    return search.results(engine.tokenizer)


async def beam_search_many(async_llm: "AsyncLLM", prompts: list[list[int]], params: BeamSearchParams,
                           request_id: str, priority: int = 0) -> list[BeamSearchOutput]:
    """One search per prompt, concurrently; if one fails (or the caller goes away) the others
    are cancelled, and their requests aborted."""
    tasks = [asyncio.ensure_future(beam_search_async(async_llm, ids, params, f"{request_id}-{i}", priority))
             for i, ids in enumerate(prompts)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


async def beam_search_async(async_llm: "AsyncLLM", prompt_ids: list[int], params: BeamSearchParams,
                            request_id: str, priority: int = 0) -> BeamSearchOutput:
    """The same search for one prompt through the server's engine: each round's steps run
    concurrently, as ordinary requests (a client that goes away aborts them)."""
    engine = async_llm.engine
    _check_mode(engine.config)
    search = BeamSearch([prompt_ids], params, engine.eos_token_ids, engine.config.max_model_len,
                        engine.config.max_logprobs)

    async def step(tokens: list[int], rid: str) -> dict[int, Logprob]:
        found: dict[int, Logprob] = {}
        async for out in async_llm.generate({"prompt_token_ids": tokens}, search.step_params, rid,
                                            priority=priority):
            for c in out.outputs:
                if c.logprobs:
                    found = c.logprobs[-1]
        return found

    while batch := search.pending():
        tasks = [asyncio.ensure_future(step(b.tokens, f"{request_id}-{search.rounds}-{j}"))
                 for j, (_, b) in enumerate(batch)]
        try:
            candidates = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        search.advance(batch, candidates)
    return search.results(async_llm.tokenizer)[0]
