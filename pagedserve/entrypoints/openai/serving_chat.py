"""POST /v1/chat/completions: messages rendered with the chat template, n samples; a full
response or chunks (role first, content deltas, finish_reason, optional usage, [DONE])."""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import AsyncGenerator, AsyncIterator, Optional, Union

from pagedserve.beam_search import beam_search_many
from pagedserve.engine.async_engine import Reservation
from pagedserve.entrypoints.openai.chat_output import ChoiceStream, whole_message
from pagedserve.entrypoints.openai.protocol import (ChatCompletionChoice, ChatCompletionLogProb,
                                                    ChatCompletionLogProbs, ChatCompletionLogProbsContent,
                                                    ChatCompletionRequest, ChatCompletionResponse,
                                                    ChatCompletionStreamChoice, ChatCompletionStreamResponse,
                                                    DeltaMessage, UsageInfo, random_id)
from pagedserve.entrypoints.openai.serving_engine import (SSE_DONE, OpenAIServing, clamp_logprob,
                                                          merge_async_iterators, prompt_logprobs_json, sse,
                                                          sse_error, token_text, top_by_rank, usage_info)
from pagedserve.entrypoints.openai.tool_calls import KEEPS_SPECIAL_TOKENS
from pagedserve.reasoning import REASONING_KEEPS_SPECIAL_TOKENS
from pagedserve.errors import ParamError
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams


class OpenAIServingChat(OpenAIServing):
    def __init__(self, *args, tool_parser: Optional[str] = None, reasoning_parser: Optional[str] = None,
                 response_role: str = "assistant", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.response_role = response_role  # vLLM's --response-role
        self.tool_parser = tool_parser  # --tool-call-parser with --enable-auto-tool-choice, else None
        self.reasoning_parser = reasoning_parser  # one of reasoning.REASONING_PARSERS, else None

    def role(self, req: ChatCompletionRequest) -> str:
        """vLLM's: --response-role after a generation prompt; a continued final message's own
        role otherwise."""
        if req.add_generation_prompt or not req.messages:
            return self.response_role
        last = req.messages[-1]
        return str(last.get("role") if isinstance(last, dict) else getattr(last, "role", self.response_role))

    async def create(self, req: ChatCompletionRequest) -> Union[ChatCompletionResponse, AsyncIterator[str]]:
        model = self.model_name(req.model)
        self.check_generates(model, req.priority)
        if req.use_beam_search:
            return await self._beam_search(req, model)
        try:
            self.limits.check_sampling(req)
            params = req.to_sampling_params(self.llm.engine.config.default_sampling)
            if req.tool_mode == "auto" and self.tool_parser is None:
                raise ParamError("tool_choice", '"auto" tool choice requires --enable-auto-tool-choice and '
                                 "--tool-call-parser to be set.")
            if req.tool_mode == "auto" and self.tool_parser in KEEPS_SPECIAL_TOKENS:
                params.skip_special_tokens = False  # its marker is a special token (as vLLM does)
            if self.reasoning_parser in REASONING_KEEPS_SPECIAL_TOKENS:
                params.skip_special_tokens = False  # harmony's markers (the splitter removes them)
        except ParamError as e:
            raise self._chat_param(e, req) from None
        arrival = time.monotonic()
        # A place in the queue now (503 before rendering, and before any stream starts).
        reservation = self.llm.reserve()
        try:
            text, ids, images = await self.render_chat(req, add_special_tokens=req.add_special_tokens,
                                                       truncating=params.truncate_prompt_tokens is not None)
            prompt = await self.llm.preprocess({"prompt_token_ids": ids, "prompt": text,
                                                **({"multi_modal_data": {"image": images}} if images else {})}, params)
        except ParamError as e:
            reservation.release()
            raise self._chat_param(e, req) from None
        except BaseException:
            reservation.release()
            raise
        request_id = random_id("chatcmpl")
        self.log_request(request_id, prompt["prompt"], prompt["prompt_token_ids"], params)
        gen = self.llm.generate(prompt, params, request_id, arrival_time=arrival, cache_salt=req.cache_salt,
                                reservation=reservation, lora_request=self.loras.get(model), priority=req.priority)
        prompt_ids = list(prompt["prompt_token_ids"])
        if req.stream:
            return self._stream(req, model, request_id, gen, params.n, prompt_ids, reservation)
        try:
            return await self._full(req, model, request_id, gen, params.n, prompt_ids)
        finally:
            reservation.release()

    async def _beam_search(self, req: ChatCompletionRequest, model: str) -> ChatCompletionResponse:
        """use_beam_search: the n best beams of the conversation's reply, best first, each a
        choice (pagedserve/beam_search.py); not streamed."""
        try:
            self.limits.check_sampling(req)
            text, ids, images = await self.render_chat(req, truncating=req.truncate_prompt_tokens is not None)
            if images:
                raise ParamError("use_beam_search", "beam search takes no images.")
            bparams = req.chat_beam_search_params(max(1, self.max_model_len - len(ids)))
            check = SamplingParams(max_tokens=bparams.max_tokens, truncate_prompt_tokens=req.truncate_prompt_tokens)
            prompt = await self.llm.preprocess({"prompt_token_ids": ids, "prompt": text}, check)
        except ParamError as e:
            raise self._chat_param(e, req) from None
        request_id = random_id("chatcmpl")
        (result,) = await beam_search_many(self.llm, [prompt["prompt_token_ids"]], bparams, request_id,
                                           req.priority)
        num_prompt = len(prompt["prompt_token_ids"])
        choices = []
        for i, beam in enumerate(result.sequences):
            message, finish = whole_message(req, beam.text, beam.finish_reason, self.reasoning_parser, None)
            message.role = self.role(req)
            choices.append(ChatCompletionChoice(index=i, message=message, finish_reason=finish))
        generated = sum(len(b.tokens) - num_prompt for b in result.sequences)
        return ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                      usage=usage_info(num_prompt, generated, None))

    async def _full(self, req: ChatCompletionRequest, model: str, request_id: str,
                    gen: AsyncGenerator[RequestOutput, None], n: int, prompt_ids: list[int]) -> ChatCompletionResponse:
        texts, token_ids = [""] * n, [[] for _ in range(n)]
        logprobs: list[Optional[list[ChatCompletionLogProbsContent]]] = [None] * n
        finals: list[Optional[CompletionOutput]] = [None] * n
        prompt_logprobs = None
        cached = 0
        async with aclosing(merge_async_iterators(gen)) as outputs:
            async for _, out in outputs:
                cached = max(cached, out.num_cached_tokens)
                if out.prompt_logprobs is not None:
                    prompt_logprobs = out.prompt_logprobs
                for c in out.outputs:
                    texts[c.index] += c.text
                    token_ids[c.index] += c.token_ids
                    if req.logprobs:
                        logprobs[c.index] = (logprobs[c.index] or []) + self._logprobs(c, req.top_logprobs or 0,
                                                                                      self.tokens_as_ids(req))
                    finals[c.index] = c
        choices = []
        for i in range(n):
            message, finish = whole_message(req, texts[i], finals[i].finish_reason if finals[i] else None,
                                            self.reasoning_parser, self.tool_parser)
            message.role = self.role(req)
            if req.echoed:
                message.content = req.echoed + (message.content or "")
            choices.append(ChatCompletionChoice(
                index=i, message=message,
                logprobs=ChatCompletionLogProbs(content=logprobs[i]) if req.logprobs else None,
                finish_reason=finish, stop_reason=finals[i].stop_reason if finals[i] else None,
                token_ids=token_ids[i] if req.return_token_ids else None))
        completion = sum(map(len, token_ids))
        return ChatCompletionResponse(
            id=request_id, model=model, choices=choices, prompt_logprobs=prompt_logprobs_json(prompt_logprobs),
            usage=usage_info(len(prompt_ids), completion, cached if self.report_cached_tokens else None),
            prompt_token_ids=prompt_ids if req.return_token_ids else None)

    @staticmethod
    def _chat_param(e: ParamError, req: ChatCompletionRequest) -> ParamError:
        """The engine names the prompt and max_tokens; a chat request calls them otherwise."""
        names = {"prompt": "messages", "multi_modal_data": "messages", "logprobs": "top_logprobs",
                 "max_tokens": "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"}
        if e.param in names:
            return ParamError(names[e.param], str(e))
        return e

    def _logprobs(self, c: CompletionOutput, k: int, as_ids: bool = False) -> list[ChatCompletionLogProbsContent]:
        tok = self.llm.tokenizer
        out = []
        for tid, step in zip(c.token_ids, c.logprobs or []):
            lp = step[tid]
            text = token_text(tok, tid, lp, as_ids)
            top = [ChatCompletionLogProb(token=(t := token_text(tok, i, p, as_ids)), logprob=clamp_logprob(p.logprob),
                                         bytes=list(t.encode("utf-8", errors="replace")))
                   for i, p in top_by_rank(step, k)]
            out.append(ChatCompletionLogProbsContent(token=text, logprob=clamp_logprob(lp.logprob),
                                                     bytes=list(text.encode("utf-8", errors="replace")),
                                                     top_logprobs=top))
        return out

    async def _stream(self, req: ChatCompletionRequest, model: str, request_id: str,
                      gen: AsyncGenerator[RequestOutput, None], n: int, prompt_ids: list[int],
                      reservation: Reservation) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatCompletionStreamChoice], usage: Optional[UsageInfo] = None,
                  prompt_token_ids: Optional[list[int]] = None) -> str:
            return sse(ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=choices,
                                                    usage=usage, prompt_token_ids=prompt_token_ids))

        completion = cached = 0
        streams = [ChoiceStream(req, self.reasoning_parser, self.tool_parser) for _ in range(n)]
        final_usage, running_usage = req.usage_wanted(self.force_include_usage)

        def usage_so_far() -> Optional[UsageInfo]:
            return usage_info(len(prompt_ids), completion, cached if self.report_cached_tokens else None) \
                if running_usage else None

        try:
            for i in range(n):  # the role comes first, before any content
                yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role=self.role(req), content=""))],
                            usage_so_far(), prompt_token_ids=prompt_ids if req.return_token_ids and i == 0 else None)
            if req.echoed:  # the continued message's text, then the continuation
                for i in range(n):
                    yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(content=req.echoed))],
                                usage_so_far())
            out: RequestOutput
            async with aclosing(merge_async_iterators(gen)) as outputs:
                async for _, out in outputs:
                    cached = max(cached, out.num_cached_tokens)
                    for c in out.outputs:
                        completion += len(c.token_ids)
                        delta, finish = streams[c.index].delta(c.text, c.finish_reason)
                        if not (delta.content or delta.tool_calls or delta.reasoning_content) and finish is None \
                                and not ((req.logprobs or req.return_token_ids) and c.token_ids):
                            continue  # nothing to say yet (text held back for a possible stop string)
                        lps = ChatCompletionLogProbs(content=self._logprobs(
                            c, req.top_logprobs or 0, self.tokens_as_ids(req))) if req.logprobs else None
                        yield chunk([ChatCompletionStreamChoice(
                            index=c.index, delta=delta, logprobs=lps, finish_reason=finish, stop_reason=c.stop_reason,
                            token_ids=list(c.token_ids) if req.return_token_ids else None)], usage_so_far())
            if final_usage:
                yield chunk([], usage_info(len(prompt_ids), completion, cached if self.report_cached_tokens else None))
        except Exception as e:  # headers are gone: report in-band, then end the stream properly
            yield sse_error(e)
        finally:
            reservation.release()
        yield SSE_DONE

