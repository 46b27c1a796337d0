"""Beam search, vLLM's `LLM.beam_search` (same parameters, results and scoring), built on the
engine: each round asks for one more token with the top 2 x beam_width logprobs for every
live beam, and keeps the beam_width best continuations per prompt. Beams share their prompt
and earlier tokens, so the prefix cache serves everything but the newest token.

A beam's score is its cumulative logprob / length ** length_penalty, where the length counts
the prompt (as vLLM counts it) and not a final EOS."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

from pagedserve.errors import ParamError
from pagedserve.outputs import Logprob
from pagedserve.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
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


def beam_search(llm: "LLM", prompts: Sequence, params: BeamSearchParams) -> list[BeamSearchOutput]:
    engine = llm.llm_engine
    k = 2 * params.beam_width
    if k > engine.config.max_logprobs:
        raise ParamError("beam_width", f"beam_width {params.beam_width} needs {k} logprobs per token, more than "
                         f"max_logprobs={engine.config.max_logprobs}.")
    eos = set() if params.ignore_eos else set(engine.eos_token_ids)
    max_len = engine.config.max_model_len
    step = SamplingParams(temperature=params.temperature, max_tokens=1, logprobs=k, ignore_eos=True,
                          detokenize=False)

    def score(b: BeamSearchSequence) -> float:
        return beam_score(b.tokens, b.cum_logprob, eos, params.length_penalty)

    starts = [engine.process_prompt(p)[1] for p in prompts]
    live = [[BeamSearchSequence(tokens=list(ids))] for ids in starts]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        batch = [(i, b) for i, beams in enumerate(live) for b in beams]
        if not batch:
            break
        outs = llm.generate([{"prompt_token_ids": b.tokens} for _, b in batch], step, use_tqdm=False)
        grown: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, beam), out in zip(batch, outs):
            candidates = out.outputs[0].logprobs[0]
            for token, lp in candidates.items():
                new = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [candidates],
                                         beam.cum_logprob + lp.logprob)
                if token in eos:
                    new.finish_reason = "stop"
                    done[i].append(new)
                else:
                    grown[i].append(new)
        for i, beams in enumerate(grown):
            beams = sorted(beams, key=score, reverse=True)[:params.beam_width]
            full = [b for b in beams if len(b.tokens) >= max_len]  # the context is full: no next round
            for b in full:
                b.finish_reason = "length"
            done[i] += full
            live[i] = [b for b in beams if len(b.tokens) < max_len]
    tok = engine.tokenizer
    results = []
    for i, prompt_ids in enumerate(starts):
        for b in live[i]:
            b.finish_reason = "length"
        best = sorted(done[i] + live[i], key=score, reverse=True)[:params.beam_width]
        for b in best:
            gen = b.tokens[len(prompt_ids):]
            if b.finish_reason == "stop":
                gen = gen[:-1]
            b.text = tok.decode(gen, skip_special_tokens=True)
        results.append(BeamSearchOutput(best))
    return results
