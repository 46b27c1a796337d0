"""POST /v1/chat/completions: messages rendered with the chat template, n samples; a full
response or chunks (role first, content deltas, finish_reason, optional usage, [DONE])."""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import AsyncGenerator, AsyncIterator, Optional, Union

from pagedserve.engine.async_engine import Reservation
from pagedserve.entrypoints.openai.protocol import (AssistantMessage, ChatCompletionChoice, ChatCompletionLogProb,
                                                    ChatCompletionLogProbs, ChatCompletionLogProbsContent,
                                                    ChatCompletionRequest, ChatCompletionResponse,
                                                    ChatCompletionStreamChoice, ChatCompletionStreamResponse,
                                                    DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall,
                                                    ToolCall, UsageInfo, random_id)
from pagedserve.entrypoints.openai.serving_engine import (SSE_DONE, OpenAIServing, clamp_logprob,
                                                          merge_async_iterators, prompt_logprobs_json, sse,
                                                          sse_error, token_text, top_by_rank, usage_info)
from pagedserve.entrypoints.openai.tool_calls import (Call, HermesStream, parse_hermes, parse_required,
                                                      random_tool_call_id)
from pagedserve.errors import ParamError
from pagedserve.outputs import CompletionOutput, RequestOutput


class OpenAIServingChat(OpenAIServing):
    def __init__(self, *args, tool_parser: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tool_parser = tool_parser  # "hermes" with --enable-auto-tool-choice, else None

    async def create(self, req: ChatCompletionRequest) -> Union[ChatCompletionResponse, AsyncIterator[str]]:
        model = self.model_name(req.model)
        try:
            self.limits.check_sampling(req)
            params = req.to_sampling_params()
            if req.tool_mode == "auto" and self.tool_parser is None:
                raise ParamError("tool_choice", '"auto" tool choice requires --enable-auto-tool-choice and '
                                 "--tool-call-parser to be set.")
        except ParamError as e:
            raise self._chat_param(e, req) from None
        arrival = time.monotonic()
        # A place in the queue now (503 before rendering, and before any stream starts).
        reservation = self.llm.reserve()
        try:
            text, ids = await self.render_chat(req, truncating=params.truncate_prompt_tokens is not None)
            prompt = await self.llm.preprocess({"prompt_token_ids": ids, "prompt": text}, params)
        except ParamError as e:
            reservation.release()
            raise self._chat_param(e, req) from None
        except BaseException:
            reservation.release()
            raise
        request_id = random_id("chatcmpl")
        self.log_request(request_id, prompt["prompt"], prompt["prompt_token_ids"], params)
        gen = self.llm.generate(prompt, params, request_id, arrival_time=arrival, cache_salt=req.cache_salt,
                                reservation=reservation)
        num_prompt = len(prompt["prompt_token_ids"])
        if req.stream:
            return self._stream(req, model, request_id, gen, params.n, num_prompt, reservation)
        try:
            return await self._full(req, model, request_id, gen, params.n, num_prompt)
        finally:
            reservation.release()

    async def _full(self, req: ChatCompletionRequest, model: str, request_id: str,
                    gen: AsyncGenerator[RequestOutput, None], n: int, num_prompt: int) -> ChatCompletionResponse:
        texts, num_tokens = [""] * n, [0] * n
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
                    num_tokens[c.index] += len(c.token_ids)
                    if req.logprobs:
                        logprobs[c.index] = (logprobs[c.index] or []) + self._logprobs(c, req.top_logprobs or 0)
                    finals[c.index] = c
        choices = []
        for i in range(n):
            finish = finals[i].finish_reason if finals[i] else None
            content, calls, finish = _tool_calls(req, texts[i], finish)
            choices.append(ChatCompletionChoice(
                index=i, message=AssistantMessage(content=content, tool_calls=[
                    ToolCall(id=random_tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                    for c in calls]),
                logprobs=ChatCompletionLogProbs(content=logprobs[i]) if req.logprobs else None,
                finish_reason=finish, stop_reason=finals[i].stop_reason if finals[i] else None))
        completion = sum(num_tokens)
        return ChatCompletionResponse(
            id=request_id, model=model, choices=choices, prompt_logprobs=prompt_logprobs_json(prompt_logprobs),
            usage=usage_info(num_prompt, completion, cached if self.report_cached_tokens else None))

    @staticmethod
    def _chat_param(e: ParamError, req: ChatCompletionRequest) -> ParamError:
        """The engine names the prompt and max_tokens; a chat request calls them otherwise."""
        names = {"prompt": "messages", "logprobs": "top_logprobs",
                 "max_tokens": "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"}
        if e.param in names:
            return ParamError(names[e.param], str(e))
        return e

    def _logprobs(self, c: CompletionOutput, k: int) -> list[ChatCompletionLogProbsContent]:
        tok = self.llm.tokenizer
        out = []
        for tid, step in zip(c.token_ids, c.logprobs or []):
            lp = step[tid]
            text = token_text(tok, tid, lp)
            top = [ChatCompletionLogProb(token=(t := token_text(tok, i, p)), logprob=clamp_logprob(p.logprob),
                                         bytes=list(t.encode("utf-8", errors="replace")))
                   for i, p in top_by_rank(step, k)]
            out.append(ChatCompletionLogProbsContent(token=text, logprob=clamp_logprob(lp.logprob),
                                                     bytes=list(text.encode("utf-8", errors="replace")),
                                                     top_logprobs=top))
        return out

    async def _stream(self, req: ChatCompletionRequest, model: str, request_id: str,
                      gen: AsyncGenerator[RequestOutput, None], n: int, num_prompt: int,
                      reservation: Reservation) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatCompletionStreamChoice], usage: Optional[UsageInfo] = None) -> str:
            return sse(ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=choices,
                                                    usage=usage))

        completion = cached = 0
        tools = [_ToolStream(req.tool_mode) for _ in range(n)]
        try:
            for i in range(n):  # the role comes first, before any content
                yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            out: RequestOutput
            async with aclosing(merge_async_iterators(gen)) as outputs:
                async for _, out in outputs:
                    cached = max(cached, out.num_cached_tokens)
                    for c in out.outputs:
                        completion += len(c.token_ids)
                        delta, finish = tools[c.index].delta(req, c.text, c.finish_reason)
                        if not (delta.content or delta.tool_calls) and finish is None \
                                and not (req.logprobs and c.token_ids):
                            continue  # nothing to say yet (text held back for a possible stop string)
                        lps = ChatCompletionLogProbs(content=self._logprobs(c, req.top_logprobs or 0)) \
                            if req.logprobs else None
                        yield chunk([ChatCompletionStreamChoice(index=c.index, delta=delta, logprobs=lps,
                                                                finish_reason=finish, stop_reason=c.stop_reason)])
            if req.stream_options is not None and req.stream_options.include_usage:
                yield chunk([], usage_info(num_prompt, completion, cached if self.report_cached_tokens else None))
        except Exception as e:  # headers are gone: report in-band, then end the stream properly
            yield sse_error(e)
        finally:
            reservation.release()
        yield SSE_DONE


def _tool_calls(req: ChatCompletionRequest, text: str, finish: Optional[str]) -> tuple[Optional[str], list[Call],
                                                                                        Optional[str]]:
    """(content, calls, finish_reason) of a whole choice under the request's tool_choice."""
    mode = req.tool_mode
    if mode == "named":
        return "", [Call(req.tool_choice.function.name, text)], finish
    if mode == "required":
        calls = parse_required(text)
        if calls is None:  # cut short: the text as it is
            return text, [], finish
        return "", calls, "tool_calls" if finish == "stop" else finish
    if mode == "auto":
        content, calls = parse_hermes(text)
        if calls:
            return content or None, calls, "tool_calls" if finish == "stop" else finish
    return text, [], finish


def _delta_calls(calls: list[Call]) -> list[DeltaToolCall]:
    return [DeltaToolCall(index=i, id=random_tool_call_id(), type="function",
                          function=DeltaFunctionCall(name=c.name, arguments=c.arguments)) for i, c in enumerate(calls)]


class _ToolStream:
    """One streamed choice under tool_choice: a named function's arguments stream as they come;
    "required" calls go out whole at the end; "auto" streams content until a tool call starts."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.text = ""
        self.started = False
        self.hermes = HermesStream() if mode == "auto" else None

    def delta(self, req: ChatCompletionRequest, text: str, finish: Optional[str]) -> tuple[DeltaMessage,
                                                                                            Optional[str]]:
        if self.mode == "none":
            return DeltaMessage(content=text), finish
        if self.mode == "named":
            if not self.started:
                self.started = True
                return DeltaMessage(tool_calls=[DeltaToolCall(index=0, id=random_tool_call_id(), type="function",
                                                              function=DeltaFunctionCall(
                                                                  name=req.tool_choice.function.name,
                                                                  arguments=text))]), finish
            return DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))]
                                if text else None), finish
        if self.mode == "required":
            self.text += text
            if finish is None:
                return DeltaMessage(), None
            content, calls, finish = _tool_calls(req, self.text, finish)
            return DeltaMessage(content=content or None, tool_calls=_delta_calls(calls) or None), finish
        content = self.hermes.feed(text)
        if finish is None:
            return DeltaMessage(content=content or None), None
        rest, calls = self.hermes.finish()
        return (DeltaMessage(content=(content + rest) or None, tool_calls=_delta_calls(calls) or None),
                "tool_calls" if calls and finish == "stop" else finish)
