"""POST /v1/completions: one engine request per prompt, n samples each; a full response or
server-sent events."""

from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncGenerator, AsyncIterator, Optional, Union

from pagedserve.beam_search import beam_search_many
from pagedserve.engine.async_engine import Reservation
from pagedserve.engine.engine import PromptType
from pagedserve.engine.prompt_embeds import decode_base64_embeds
from pagedserve.entrypoints.openai.protocol import (CompletionChoice, CompletionLogProbs, CompletionRequest,
                                                    CompletionResponse, UsageInfo, random_id)
from pagedserve.entrypoints.openai.serving_engine import (SSE_DONE, OpenAIServing, clamp_logprob,
                                                          merge_async_iterators, prompt_logprobs_json, sse,
                                                          sse_error, token_text, top_by_rank, usage_info)
from pagedserve.outputs import Logprob, PromptLogprobs, RequestOutput
from pagedserve.sampling_params import SamplingParams


@dataclass
class _Choice:
    """One choice (prompt i, sample j) as it accumulates."""

    text: str = ""
    num_tokens: int = 0
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    started: bool = False  # the echo (prompt text) has been sent
    text_len: int = 0  # characters sent so far, for text_offset
    token_ids: list[int] = field(default_factory=list)  # the reply's, for return_token_ids
    sent: bool = False  # a chunk of it has been streamed (the first carries the prompt's ids)


@dataclass
class _PromptState:
    prompt_text: str
    prompt_ids: list[int]
    choices: list[_Choice] = field(default_factory=list)
    prompt_logprobs: Optional[PromptLogprobs] = None  # arrives with the request's first output
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    embeds: bool = False  # given as prompt_embeds: its ids are placeholders, not reported


def _embeds_prompts(req: CompletionRequest) -> list[PromptType]:
    """vLLM's prompt_embeds: each a base64 torch.save()d tensor; they come before `prompt`'s."""
    if not req.prompt_embeds:
        return []
    items = [req.prompt_embeds] if isinstance(req.prompt_embeds, str) else req.prompt_embeds
    return [{"prompt_embeds": decode_base64_embeds(s)} for s in items]


def _prompts(prompt: Union[str, list, None]) -> list[PromptType]:
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], list):
        return [{"prompt_token_ids": ids} for ids in prompt]
    if prompt and isinstance(prompt[0], str):
        return list(prompt)
    return [{"prompt_token_ids": prompt}]


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, req: CompletionRequest) -> Union[CompletionResponse, AsyncIterator[str]]:
        model = self.model_name(req.model)
        self.check_generates(model, req.priority)
        self.limits.check_sampling(req)
        req.check_prompts_given()
        if req.use_beam_search:
            return await self._beam_search(req, model)
        params = req.to_sampling_params(self.llm.engine.config.default_sampling)
        request_id = random_id("cmpl")
        arrival = time.monotonic()
        text = None if req.prompt_embeds and req.prompt in ("", [], [""]) else req.prompt  # (vLLM's clients send "")
        raw = _embeds_prompts(req) + _prompts(text)
        self.check_prompts(raw, "prompt", params.truncate_prompt_tokens is not None)
        # Places in the queue now (503 before tokenizing, and before any stream starts).
        reservation = self.llm.reserve(len(raw))
        try:
            if not req.add_special_tokens:  # text prompts tokenized without BOS and the like
                raw = [p if not isinstance(p, str) else {"prompt": p, "prompt_token_ids": await self.llm.run_tokenizer(
                    self.llm.engine.encode, p, "prompt", add_special_tokens=False)} for p in raw]
            # Tokenize and validate every prompt before any starts: a bad one fails the whole call.
            prompts = [await self.llm.preprocess(p, params) for p in raw]
            states = []
            for i, p in enumerate(prompts):
                self.log_request(f"{request_id}-{i}", p["prompt"], p["prompt_token_ids"], params)
                text = p["prompt"]
                if text is None and req.echo:  # token-id prompts echo their decoded text
                    text = await self.llm.run_tokenizer(self.llm.tokenizer.decode, p["prompt_token_ids"])
                states.append(_PromptState(text or "", p["prompt_token_ids"], [_Choice() for _ in range(params.n)],
                                           embeds="mm_features" in p and p["mm_features"][0].precomputed))
        except BaseException:
            reservation.release()
            raise
        lora = self.loras.get(model)
        gens = [self.llm.generate(p, params, f"{request_id}-{i}", arrival_time=arrival, cache_salt=req.cache_salt,
                                  reservation=reservation, lora_request=lora, priority=req.priority)
                for i, p in enumerate(prompts)]
        if req.stream:
            return self._stream(req, model, request_id, states, gens, reservation)
        try:
            async with aclosing(merge_async_iterators(*gens)) as merged:
                async for i, out in merged:
                    for _ in self._fold(req, states[i], out):
                        pass
        finally:
            reservation.release()
        ids = req.return_token_ids
        choices = [CompletionChoice(index=i * params.n + j, text=c.text, logprobs=c.logprobs,
                                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                    prompt_logprobs=prompt_logprobs_json(st.prompt_logprobs),
                                    prompt_token_ids=st.prompt_ids if ids and not st.embeds else None,
                                    token_ids=c.token_ids if ids else None)
                   for i, st in enumerate(states) for j, c in enumerate(st.choices)]
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=self._usage(states))

    async def _beam_search(self, req: CompletionRequest, model: str) -> CompletionResponse:
        """use_beam_search: the n best beams of each prompt (pagedserve/beam_search.py), each a
        choice, best first; not streamed."""
        bparams = req.beam_search_params(req.max_tokens if req.max_tokens is not None else 16)
        raw = _prompts(req.prompt)
        self.check_prompts(raw, "prompt", req.truncate_prompt_tokens is not None)
        check = SamplingParams(max_tokens=bparams.max_tokens, truncate_prompt_tokens=req.truncate_prompt_tokens)
        prompts = [await self.llm.preprocess(p, check) for p in raw]  # every prompt checked before any runs
        request_id = random_id("cmpl")
        results = await beam_search_many(self.llm, [p["prompt_token_ids"] for p in prompts], bparams, request_id,
                                         req.priority)
        choices, generated = [], 0
        for i, (p, res) in enumerate(zip(prompts, results)):
            for j, beam in enumerate(res.sequences):
                choices.append(CompletionChoice(index=i * req.n + j, text=beam.text, finish_reason=beam.finish_reason))
                generated += len(beam.tokens) - len(p["prompt_token_ids"])
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        return CompletionResponse(id=request_id, model=model, choices=choices,
                                  usage=usage_info(prompt_tokens, generated, None))

    def _fold(self, req: CompletionRequest, st: _PromptState, out: RequestOutput):
        """Add one delta output to its prompt's choices; yields (sample index, the delta
        as a choice) for what should be streamed."""
        tok = self.llm.tokenizer
        if out.prompt_logprobs is not None:
            st.prompt_logprobs = out.prompt_logprobs
        st.num_cached_tokens = max(st.num_cached_tokens, out.num_cached_tokens)
        for c in out.outputs:
            ch = st.choices[c.index]
            text, ids, steps = c.text, list(c.token_ids), list(c.logprobs or [])
            if not ch.started:
                ch.started = True
                if req.echo:  # the prompt goes first, with its logprobs when asked for
                    text = st.prompt_text + text
                    ids = st.prompt_ids + ids
                    if req.logprobs is not None:
                        steps = list(st.prompt_logprobs or [None] * len(st.prompt_ids)) + steps
            delta_lp = None
            if req.logprobs is not None:
                delta_lp = _logprobs(tok, ids, steps, req.logprobs, ch.text_len, self.tokens_as_ids(req))
                if ch.logprobs is None:
                    ch.logprobs = CompletionLogProbs()
                for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
                    getattr(ch.logprobs, name).extend(getattr(delta_lp, name))
            ch.text += text
            ch.text_len += len(text)
            ch.num_tokens += len(c.token_ids)
            ch.token_ids += c.token_ids
            ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
            if text or ids or c.finish_reason is not None:
                want, first = req.return_token_ids, not ch.sent
                ch.sent = True
                yield c.index, CompletionChoice(index=c.index, text=text, logprobs=delta_lp,
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                                prompt_token_ids=st.prompt_ids if want and first and not st.embeds
                                                else None,
                                                token_ids=list(c.token_ids) if want else None)

    async def _stream(self, req: CompletionRequest, model: str, request_id: str, states: list[_PromptState],
                      gens: list[AsyncGenerator[RequestOutput, None]], reservation: Reservation) -> AsyncIterator[str]:
        n = len(states[0].choices)
        created = int(time.time())
        final_usage, running_usage = req.usage_wanted(self.force_include_usage)
        try:
            async with aclosing(merge_async_iterators(*gens)) as merged:
                async for i, out in merged:
                    for j, choice in self._fold(req, states[i], out):
                        choice.index = i * n + j
                        yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[choice],
                                                     usage=self._usage(states) if running_usage else None))
            if final_usage:
                yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[],
                                             usage=self._usage(states)))
        except Exception as e:  # headers are gone: report in-band, then end the stream properly
            yield sse_error(e)
        finally:
            reservation.release()
        yield SSE_DONE

    def _usage(self, states: list[_PromptState]) -> UsageInfo:
        prompt = sum(len(st.prompt_ids) for st in states)
        completion = sum(c.num_tokens for st in states for c in st.choices)
        return usage_info(prompt, completion, sum(st.num_cached_tokens for st in states)
                          if self.report_cached_tokens else None)


def _logprobs(tok, ids: list[int], steps: list[Optional[dict[int, Logprob]]], k: int,
              offset: int, as_ids: bool = False) -> CompletionLogProbs:
    """OpenAI's legacy shape: per token its text, logprob, text offset, and a dict of the k
    most likely tokens plus the chosen one (None where there is nothing, e.g. the first
    prompt token). With `as_ids` tokens are "token_id:N"; offsets stay the text's."""
    out = CompletionLogProbs()
    for tid, step in zip(ids, steps):
        lp = step.get(tid) if step else None
        text = token_text(tok, tid, lp)
        out.tokens.append(token_text(tok, tid, lp, as_ids))
        out.text_offset.append(offset)
        offset += len(text)
        out.token_logprobs.append(clamp_logprob(lp.logprob) if lp is not None else None)
        if step is None:
            out.top_logprobs.append(None)
            continue
        top = top_by_rank(step, k)
        if lp is not None and all(t != tid for t, _ in top):
            top.append((tid, lp))
        out.top_logprobs.append({token_text(tok, t, p, as_ids): clamp_logprob(p.logprob) for t, p in top})
    return out
