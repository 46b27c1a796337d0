"""POST /v1/responses (OpenAI's Responses API) on the chat machinery: the input items become
chat messages, the request a chat request (so rendering, sampling, reasoning and tool
parsing are chat's own), and the chat reply becomes output items: `reasoning`, `message`,
`function_call`. Streamed, chat's deltas become the Responses events (`response.created`,
`response.output_text.delta`, ..., `response.completed`).

Responses are kept in memory (the last `store_size`, unless `store: false`), for
GET /v1/responses/{id} and for `previous_response_id`, which continues a stored
conversation. With `background: true` the generation runs on its own (responses_background.py):
POST answers at once (status "queued"), GET polls it or, with `stream=true&starting_after=N`,
streams its events from anywhere, POST /v1/responses/{id}/cancel stops it. User messages may
hold `input_image` parts (image URLs, for a vision-language model). Not served: built-in tools
(web search, file search, code interpreter), file inputs and images by file_id."""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional, Union

from pydantic import ValidationError

from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest
from pagedserve.entrypoints.openai.protocol_responses import (INCLUDABLE, ResponsesRequest, response_object,
                                                             usage_object)
from pagedserve.entrypoints.openai.responses_background import BackgroundRun
from pagedserve.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedserve.entrypoints.openai.serving_engine import OpenAIError
from pagedserve.errors import ParamError

# A chat request's field -> the Responses field it came from (for error messages).
_CHAT_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
                "response_format": "text", "chat_template_kwargs": "reasoning"}
_TEXT_PARTS = ("input_text", "output_text", "text", "reasoning_text", "summary_text")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text(content: Any, where: str) -> str:
    """An item's content (a string or a list of text parts) as plain text."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ParamError("input", f"{where}: content must be a string or a list of parts.")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ParamError("input", f"{where}: content parts of type {kind!r} are not supported (text only).")
        parts.append(part["text"])
    return "".join(parts)


def _content(content: Any, where: str) -> Union[str, list[dict]]:
    """A message's content: plain text, or chat parts where it holds `input_image` parts
    (an image URL: a data: or http(s) URL, as chat's image_url parts take)."""
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "input_image"
                                                for p in content):
        return _text(content, where)
    parts: list[dict] = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise ParamError("input", f"{where}: an input_image needs image_url (file_id is not supported).")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            parts.append({"type": "text", "text": _text([part], where)})
    return parts


def input_messages(items: Union[str, list[dict]]) -> list[dict]:
    """Responses input items -> chat messages. A reasoning item and the function calls that
    follow it join one assistant message (reasoning_content, tool_calls), as chat has them."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    turn: Optional[dict] = None  # the assistant message still open to calls and reasoning
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ParamError("input", f"input[{i}] must be an object.")
        kind = item.get("type", "message")
        where = f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ParamError("input", f"{where}: role must be user, system, developer or assistant, got {role!r}.")
            text = _content(item.get("content"), where) if role == "user" else _text(item.get("content"), where)
            if role == "assistant" and turn is not None and turn.get("content") is None:
                turn["content"] = text
            else:
                messages.append({"role": role, "content": text})
            turn = messages[-1] if role == "assistant" else None
        elif kind == "reasoning":
            text = _text(item.get("content") or item.get("summary") or [], where)
            turn = {"role": "assistant", "content": None, "reasoning_content": text}
            messages.append(turn)
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise ParamError("input", f"{where}: a function_call needs name and call_id.")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}
            if turn is None:
                turn = {"role": "assistant", "content": None}
                messages.append(turn)
            turn.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise ParamError("input", f"{where}: a function_call_output needs call_id.")
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": output if isinstance(output, str) else _text(output, where)})
            turn = None
        else:
            raise ParamError("input", f"{where}: input items of type {kind!r} are not supported.")
    return messages


def chat_request(req: ResponsesRequest, messages: list[dict], stream: bool) -> ChatCompletionRequest:
    """The chat request that serves `req` over `messages` (instructions first)."""
    if req.instructions:
        messages = [{"role": "system", "content": req.instructions}, *messages]
    body: dict[str, Any] = dict(
        model=req.model, messages=messages, max_completion_tokens=req.max_output_tokens, temperature=req.temperature,
        top_p=req.top_p, seed=req.seed, top_k=req.top_k, stop=req.stop, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, stream=stream, user=req.user,
        structured_outputs=req.structured_outputs, priority=req.priority, logprobs=req.logprobs,
        top_logprobs=req.top_logprobs if req.logprobs else None,
        stream_options={"include_usage": True} if stream else None)
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type", "strict"}, exclude_none=True)}
                         for t in req.tools]
        choice = req.tool_choice
        body["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                      "function": {"name": choice.name}}
        body["parallel_tool_calls"] = req.parallel_tool_calls
    elif not isinstance(req.tool_choice, str):
        raise ParamError("tool_choice", f"tool_choice names {req.tool_choice.name!r}, but no tools are given.")
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise ParamError("text", "text.format of type json_schema needs a schema.")
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_}}
    if req.reasoning and req.reasoning.get("effort"):
        body["chat_template_kwargs"] = {"reasoning_effort": req.reasoning["effort"]}  # GPT-OSS's template reads it
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        field = _CHAT_PARAMS.get(str(err["loc"][0]), str(err["loc"][0])) if err.get("loc") else "input"
        raise ParamError(field, f"{field}: {err.get('msg')}") from None


class OpenAIServingResponses:
    """/v1/responses, served by the chat endpoint's machinery."""

    def __init__(self, chat: OpenAIServingChat, store_size: int = 1024, kept_runs: int = 64) -> None:
        self.chat = chat
        self.store_size = store_size
        # response id -> (the response, the conversation it ends: chat messages; None until it ends)
        self.store: OrderedDict[str, tuple[dict, Optional[list[dict]]]] = OrderedDict()
        # Background runs, oldest first: running ones, and the last `kept_runs` finished ones
        # (their events, for streams resumed later; a run's events can be megabytes).
        self.runs: OrderedDict[str, BackgroundRun] = OrderedDict()
        self.kept_runs = kept_runs

    def _stored(self, response_id: str, param: str) -> tuple[dict, Optional[list[dict]]]:
        """A stored (response, conversation); a 404 naming `param` when there is none."""
        if response_id not in self.store:
            raise OpenAIError(404, f"Response with id '{response_id}' not found.", "NotFoundError", param)
        return self.store[response_id]

    def get(self, response_id: str) -> dict:
        return self._stored(response_id, "response_id")[0]

    def follow(self, response_id: str, starting_after: Optional[int]) -> AsyncIterator[str]:
        """GET ?stream=true: a background response's events after `starting_after`, then live."""
        self._stored(response_id, "response_id")
        if response_id not in self.runs:
            raise ParamError("stream", f"Response '{response_id}' was not made in the background, or its events "
                             "are no longer kept: only a recent background response can be streamed again.")
        return self.runs[response_id].follow(-1 if starting_after is None else starting_after)

    async def cancel(self, response_id: str) -> dict:
        """POST /v1/responses/{id}/cancel: the response, cancelled if it was still running (a
        finished one is returned as it is: cancelling is idempotent, as OpenAI's)."""
        response = self.get(response_id)
        if response_id in self.runs:
            return await self.runs[response_id].cancel()
        if not response["background"]:
            raise ParamError("response_id", f"Response '{response_id}' was not made in the background: only a "
                             "background response can be cancelled.")
        return response

    async def delete(self, response_id: str) -> dict:
        self._stored(response_id, "response_id")
        run = self.runs.pop(response_id, None)
        if run is not None:  # still generating: stopped first, nothing runs unseen
            await run.cancel()
        self.store.pop(response_id, None)
        return {"id": response_id, "object": "response", "deleted": True}

    def _keep(self, response: dict, conversation: Optional[list[dict]]) -> None:
        self.store[response["id"]] = (response, conversation)
        while len(self.store) > self.store_size:
            gone, _ = self.store.popitem(last=False)
            run = self.runs.pop(gone, None)
            if run is not None:  # pushed out of the store: nobody could see or cancel it any more
                run.task.cancel()

    def _snapshot(self, response: dict) -> None:
        """A background run's progress: its stored response, while it is stored."""
        if response["id"] in self.store:
            self.store[response["id"]] = (response, self.store[response["id"]][1])

    def _background(self, req: ResponsesRequest, response_id: str, model: str,
                    events: AsyncIterator[str]) -> Union[dict, AsyncIterator[str]]:
        queued = response_object(req, response_id, model, [], "queued", None)
        self._keep(queued, None)
        run = BackgroundRun(events, self._snapshot, queued)
        self.runs[response_id] = run
        finished = [rid for rid, r in self.runs.items() if r.done]
        for rid in finished[:max(0, len(finished) - self.kept_runs)]:
            del self.runs[rid]
        return run.follow() if req.stream else queued

    async def create(self, req: ResponsesRequest) -> Union[dict, AsyncIterator[str]]:
        try:
            refused = req.refused()
            if refused == "include":
                raise ParamError("include", f"include: only {', '.join(INCLUDABLE)} is served, got {req.include}.")
            if refused is not None:
                raise ParamError(refused, f"{refused} is not supported on /v1/responses.")
            if req.background and not req.store:
                raise ParamError("background", "background responses are stored: background needs store=true.")
            history: list[dict] = []
            if req.previous_response_id is not None:
                previous, history = self._stored(req.previous_response_id, "previous_response_id")
                if history is None:
                    raise ParamError("previous_response_id", f"Response '{req.previous_response_id}' is "
                                     f"{previous['status']}: only a finished response can be continued.")
            messages = [*history, *input_messages(req.input)]
            # Chat's reply is always streamed: the events are the one place output items are
            # made (whole, a response is the last event's; in the background, what the run keeps).
            chunks = await self.chat.create(chat_request(req, messages, stream=True))
        except ParamError as e:
            raise ParamError(_CHAT_PARAMS.get(e.param, e.param), str(e)) from None
        response_id = _id("resp")
        model = self.chat.model_name(req.model)
        events = self._stream(req, response_id, model, messages, chunks)
        if req.background:
            return self._background(req, response_id, model, events)
        return events if req.stream else await _last_response(events)

    async def _tokens(self, text: Optional[str]) -> int:
        """How many tokens `text` is (reasoning's count), encoded off the event loop."""
        if not text:
            return 0
        return len(await self.chat.llm.run_tokenizer(self.chat.llm.tokenizer.encode, text, add_special_tokens=False))

    async def _stream(self, req: ResponsesRequest, response_id: str, model: str, messages: list[dict],
                      chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        created = int(time.time())
        events = _Events(req, response_id, model, created)
        finish, usage, error = None, None, None
        async with aclosing(chunks) as stream:
            # Start chat's stream before the first event: closed unstarted (the client gone),
            # it would never release its place in the queue.
            first = await anext(stream, "data: [DONE]")
            yield events.emit("response.created", response=events.response("in_progress"))
            yield events.emit("response.in_progress", response=events.response("in_progress"))
            sse: Optional[str] = first
            while sse is not None:
                data = sse.removeprefix("data: ").strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    events.token_logprobs(delta, (choice.get("logprobs") or {}).get("content"))
                    for text in events.reasoning(delta.get("reasoning_content")):
                        yield text
                    for text in events.content(delta.get("content")):
                        yield text
                    for call in delta.get("tool_calls") or ():
                        for text in events.call(call):
                            yield text
                    finish = choice.get("finish_reason") or finish
                sse = await anext(stream, None)
        for text in events.close():
            yield text
        if error is not None:
            yield events.emit("error", code=str(error.get("code")), message=error.get("message"),
                              param=error.get("param"))
            yield events.emit("response.failed", response=events.response(
                "failed", error={"code": str(error.get("code")), "message": error.get("message")}))
            return
        cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        u = usage_object((usage or {}).get("prompt_tokens", 0), (usage or {}).get("completion_tokens", 0), cached,
                         await self._tokens(events.reasoning_text))
        incomplete = "max_output_tokens" if finish == "length" else None
        response = events.response("incomplete" if incomplete else "completed", usage=u, incomplete=incomplete)
        if req.store:
            self._keep(response, messages + [_assistant(events.reasoning_text or None, events.content_text or None,
                                                        response["output"])])
        yield events.emit("response.incomplete" if incomplete else "response.completed", response=response)


async def _last_response(events: AsyncIterator[str]) -> dict:
    """A whole response: the one the last event carries. A failure is the HTTP error it was."""
    event, error = None, None
    async with aclosing(events) as stream:
        async for sse in stream:
            event = json.loads(sse.split("data: ", 1)[1])
            error = event if event["type"] == "error" else error
    if error is not None:
        code = int(error["code"]) if str(error["code"]).isdigit() else 500
        raise OpenAIError(code, error["message"], "BadRequestError" if code < 500 else "InternalServerError",
                          error.get("param"))
    return event["response"]


def _reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _message_item(item_id: str, text: Optional[str], status: str, logprobs: Optional[list[dict]] = None) -> dict:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [],
                                        "logprobs": logprobs or []}]
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _assistant(reasoning: Optional[str], content: Optional[str], output: list[dict]) -> dict:
    """A reply as the chat message that continues its conversation."""
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        msg["reasoning_content"] = reasoning
    calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in output if i["type"] == "function_call"]
    if calls:
        msg["tool_calls"] = calls
    return msg


class _Events:
    """A streamed response's events: each output item opens when its first delta comes and
    closes when another kind of delta (or the end) comes."""

    def __init__(self, req: ResponsesRequest, response_id: str, model: str, created: int) -> None:
        self.req, self.response_id, self.model, self.created = req, response_id, model, created
        self.sequence = 0
        self.output: list[dict] = []  # closed items
        self.open: Optional[dict] = None
        self.reasoning_text = self.content_text = ""
        self.calls: dict[int, dict] = {}  # chat's tool-call index -> its item
        # Logprobs of tokens not yet in a text delta (chat may send them ahead of their text).
        self.pending: list[dict] = []

    def emit(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    def response(self, status: str, usage: Optional[dict] = None, incomplete: Optional[str] = None,
                 error: Optional[dict] = None) -> dict:
        return response_object(self.req, self.response_id, self.model, list(self.output), status, usage, incomplete,
                               self.created, error)

    def _start(self, item: dict) -> list[str]:
        out = self.close()
        self.open = item
        out.append(self.emit("response.output_item.added", output_index=len(self.output), item=item))
        if item["type"] == "message":
            out.append(self.emit("response.content_part.added", item_id=item["id"], output_index=len(self.output),
                                 content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        return out

    def token_logprobs(self, delta: dict, logprobs: Optional[list[dict]]) -> None:
        """A chunk's token logprobs: the message text's, kept until its text comes; those of
        reasoning or a tool call are not the text's, and go."""
        if delta.get("reasoning_content") or delta.get("tool_calls"):
            self.pending = []
        elif logprobs:
            self.pending.extend(logprobs)

    def _take_logprobs(self, item: dict) -> list[dict]:
        taken, self.pending = self.pending, []
        item.setdefault("logprobs", []).extend(taken)
        return taken

    def reasoning(self, text: Optional[str]) -> list[str]:
        if not text:
            return []
        out = [] if self.open is not None and self.open["type"] == "reasoning" else self._start(
            {"type": "reasoning", "id": _id("rs"), "summary": [], "content": []})
        self.open.setdefault("text", "")
        self.open["text"] += text
        self.reasoning_text += text
        out.append(self.emit("response.reasoning_text.delta", item_id=self.open["id"], output_index=len(self.output),
                             content_index=0, delta=text))
        return out

    def content(self, text: Optional[str]) -> list[str]:
        if not text:
            return []
        out = [] if self.open is not None and self.open["type"] == "message" else self._start(
            _message_item(_id("msg"), None, "in_progress"))
        self.open.setdefault("text", "")
        self.open["text"] += text
        self.content_text += text
        out.append(self.emit("response.output_text.delta", item_id=self.open["id"], output_index=len(self.output),
                             content_index=0, delta=text, logprobs=self._take_logprobs(self.open)))
        return out

    def call(self, delta: dict) -> list[str]:
        fn = delta.get("function") or {}
        out = []
        if delta.get("id") is not None or delta["index"] not in self.calls:
            item = _call_item(_id("fc"), delta.get("id") or _id("call"), fn.get("name") or "", "", "in_progress")
            self.calls[delta["index"]] = item
            out = self._start(item)
        item = self.calls[delta["index"]]
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            out.append(self.emit("response.function_call_arguments.delta", item_id=item["id"],
                                 output_index=len(self.output), delta=fn["arguments"]))
        return out

    def close(self) -> list[str]:
        """Close the open item: its done events, then it joins the output."""
        item, self.open = self.open, None
        if item is None:
            return []
        index, out = len(self.output), []
        if item["type"] == "reasoning":
            text = item.pop("text")
            item = _reasoning_item(item["id"], text)
            out.append(self.emit("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                 content_index=0, text=text))
        elif item["type"] == "message":
            text = item.pop("text")
            self._take_logprobs(item)  # the tokens after the text's last delta (its end of sequence, ...)
            item = _message_item(item["id"], text, "completed", item["logprobs"])
            out.append(self.emit("response.output_text.done", item_id=item["id"], output_index=index,
                                 content_index=0, text=text, logprobs=item["content"][0]["logprobs"]))
            out.append(self.emit("response.content_part.done", item_id=item["id"], output_index=index,
                                 content_index=0, part=item["content"][0]))
        else:
            item["status"] = "completed"
            out.append(self.emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                 name=item["name"], arguments=item["arguments"]))
        self.output.append(item)
        out.append(self.emit("response.output_item.done", output_index=index, item=item))
        return out
