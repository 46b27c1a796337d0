"""A chat choice's generated text -> the assistant message: reasoning (a reasoning parser's
`<think>` block) apart, then tool calls (under the request's tool_choice) apart from the
content. Whole (`whole_message`) or streamed (`ChoiceStream`), split the same way. GPT-OSS's
tool calls (the `openai` parser) are harmony messages: its splitter takes them out."""

from __future__ import annotations

from typing import Optional

from pagedserve.entrypoints.openai.protocol import (AssistantMessage, ChatCompletionRequest, DeltaFunctionCall,
                                                    DeltaMessage, DeltaToolCall, FunctionCall, ToolCall)
from pagedserve.entrypoints.openai.tool_calls import (HARMONY_TOOL_PARSER, Call, RequiredStream, parse_required,
                                                      parser_for, random_tool_call_id)
from pagedserve.harmony import HarmonySplitter
from pagedserve.reasoning import ReasoningSplitter


def _harmony_calls(req: ChatCompletionRequest, tool_parser: Optional[str]) -> bool:
    """Whether GPT-OSS's splitter reads this request's tool calls (tool_choice "auto")."""
    return tool_parser == HARMONY_TOOL_PARSER and req.tool_mode == "auto"


def _tool_calls(req: ChatCompletionRequest, text: str, finish: Optional[str],
                tool_parser: Optional[str]) -> tuple[Optional[str], list[Call], Optional[str]]:
    """(content, calls, finish_reason) of a whole choice's content under the request's
    tool_choice (auto: read by `tool_parser`)."""
    mode = req.tool_mode
    if mode == "named":
        return "", [Call(req.tool_choice.function.name, text)], finish
    if mode == "required":
        calls = parse_required(text)
        if calls is None:  # cut short: the text as it is
            return text, [], finish
        return "", calls, "tool_calls" if finish == "stop" else finish
    if mode == "auto" and tool_parser is not None:
        content, calls = parser_for(tool_parser, req.tools)[0](text)
        if calls:
            return content or None, calls, "tool_calls" if finish == "stop" else finish
    return text, [], finish


def whole_message(req: ChatCompletionRequest, text: str, finish: Optional[str], reasoning_parser: Optional[str],
                  tool_parser: Optional[str]) -> tuple[AssistantMessage, Optional[str]]:
    """(message, finish_reason) of a whole choice."""
    reasoning = None
    if _harmony_calls(req, tool_parser):
        harmony = HarmonySplitter(tool_calls=True)
        (r1, c1), (r2, c2) = harmony.feed(text), harmony.finish()
        reasoning, content = (r1 + r2) if harmony.saw_reasoning else None, c1 + c2
        calls: list[Call] = []
        for index, name, arguments in harmony.take_call_pieces():
            if name is not None:
                calls.append(Call(name, ""))
            calls[index].arguments += arguments
        if calls and finish == "stop":
            finish = "tool_calls"
        if calls and not content:
            content = None
    else:
        if reasoning_parser is not None:
            reasoning, text = ReasoningSplitter.split(reasoning_parser, text)
            text = text or ""
        content, calls, finish = _tool_calls(req, text, finish, tool_parser)
    if reasoning is not None and content == "" and not calls:
        content = None  # only thinking (cut short)
    return AssistantMessage(content=content, reasoning_content=reasoning, tool_calls=[
        ToolCall(id=c.id or random_tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in calls]), finish


def _delta_calls(calls: list[Call]) -> list[DeltaToolCall]:
    return [DeltaToolCall(index=i, id=c.id or random_tool_call_id(), type="function",
                          function=DeltaFunctionCall(name=c.name, arguments=c.arguments)) for i, c in enumerate(calls)]


class _ToolStream:
    """A streamed choice's content under tool_choice: a named function's arguments stream as
    they come; "required" and "auto" calls go out in pieces as they are generated ("auto"
    streams content until a tool call starts)."""

    def __init__(self, req: ChatCompletionRequest, tool_parser: Optional[str]) -> None:
        self.req, self.mode, self.tool_parser = req, req.tool_mode, tool_parser
        self.started = False
        self.parser = None
        if self.mode == "auto" and tool_parser is not None:
            self.parser = parser_for(tool_parser, req.tools)[1]()
        elif self.mode == "required":
            self.parser = RequiredStream()
        self.called = False  # a call's first piece has gone out

    def delta(self, text: str, finish: Optional[str]) -> tuple[DeltaMessage, Optional[str]]:
        if self.parser is None and self.mode in ("none", "auto"):
            return DeltaMessage(content=text), finish
        if self.mode == "named":
            if not self.started and text:
                self.started = True
                return DeltaMessage(tool_calls=[DeltaToolCall(
                    index=0, id=random_tool_call_id(), type="function",
                    function=DeltaFunctionCall(name=self.req.tool_choice.function.name, arguments=text))]), finish
            return DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))]
                                if text else None), finish
        content = self.parser.feed(text)
        if getattr(self.parser, "streams_calls", False):  # calls go out in pieces (json_call_stream.py)
            rest = self.parser.finish()[0] if finish is not None else ""
            calls = piece_deltas(self.parser.take_call_pieces())
            self.called = self.called or bool(calls)
            return (DeltaMessage(content=(content + rest) or None, tool_calls=calls or None),
                    "tool_calls" if self.called and finish == "stop" else finish)
        if finish is None:
            return DeltaMessage(content=content or None), None
        rest, calls = self.parser.finish()
        return (DeltaMessage(content=(content + rest) or None, tool_calls=_delta_calls(calls) or None),
                "tool_calls" if calls and finish == "stop" else finish)


class ChoiceStream:
    """One streamed choice: each piece of generated text -> (delta message, finish_reason)."""

    def __init__(self, req: ChatCompletionRequest, reasoning_parser: Optional[str], tool_parser: Optional[str]) -> None:
        self.harmony: Optional[HarmonySplitter] = None
        if _harmony_calls(req, tool_parser):  # the splitter hands out the calls; content passes through
            self.harmony = HarmonySplitter(tool_calls=True)
            self.reasoning: Optional[ReasoningSplitter] = self.harmony
            tool_parser = None
        else:
            self.reasoning = ReasoningSplitter(reasoning_parser) if reasoning_parser is not None else None
        self.tools = _ToolStream(req, tool_parser)
        self.called = False

    def delta(self, text: str, finish: Optional[str]) -> tuple[DeltaMessage, Optional[str]]:
        reasoning = ""
        if self.reasoning is not None:
            reasoning, text = self.reasoning.feed(text)
            if finish is not None:
                r, c = self.reasoning.finish()
                reasoning, text = reasoning + r, text + c
        delta, finish = self.tools.delta(text, finish)
        if self.harmony is not None:
            calls = self._harmony_deltas()
            if calls:
                delta.tool_calls, self.called = calls, True
            if self.called and finish == "stop":
                finish = "tool_calls"
        if reasoning:
            delta.reasoning_content = reasoning
            delta.content = delta.content or None
        return delta, finish

    def _harmony_deltas(self) -> list[DeltaToolCall]:
        return piece_deltas(self.harmony.take_call_pieces())


def piece_deltas(pieces: list[tuple]) -> list[DeltaToolCall]:
    """Call pieces (index, name or None, arguments text[, id]) as deltas: a call's first names its
    function (with an id), the rest carry its arguments, one delta per call."""
    deltas: list[DeltaToolCall] = []
    for index, name, arguments, *call_id in pieces:  # (a 4th item: the model's own call id)
        if name is not None:
            deltas.append(DeltaToolCall(index=index, id=(call_id and call_id[0]) or random_tool_call_id(),
                                        type="function", function=DeltaFunctionCall(name=name, arguments=arguments)))
        elif deltas and deltas[-1].index == index:
            deltas[-1].function.arguments = (deltas[-1].function.arguments or "") + arguments
        else:
            deltas.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=arguments)))
    return deltas
