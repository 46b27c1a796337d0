"""Function calling for /v1/chat/completions, as vLLM does it.

- tool_choice naming a function: the output is held (structured outputs) to that function's
  parameters schema, and becomes the call's arguments.
- tool_choice "required": the output is held to a JSON array of one or more
  {"name": <a tool>, "parameters": <its schema>} objects, each one a call.
- tool_choice "auto" (with --enable-auto-tool-choice and --tool-call-parser): the model
  decides, and the parser takes the calls out of its text:
  - hermes: `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks (Hermes, Qwen2.5);
    what comes before them is the content;
  - llama3_json: an output that is one or more `{"name": ..., "parameters": ...}` objects
    (separated by `;`, optionally after `<|python_tag|>`; Llama 3.1 / 3.2 JSON tool calling).
- tool_choice "none": plain text (the tools still reach the chat template, as in vLLM)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pagedserve.reasoning import partial_tail



def random_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class Call:
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def _parameters(fn: Any) -> dict:
    return fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}


def named_schema(tools: list, name: str) -> dict:
    """The JSON schema of the named tool's arguments."""
    return _parameters(next(t.function for t in tools if t.function.name == name))


def required_schema(tools: list, parallel: bool = True) -> dict:
    """A JSON array of one or more calls (exactly one without parallel calls), each
    {"name": a tool's name, "parameters": its schema}."""
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
        {"properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": _parameters(t.function)},
         "required": ["name", "parameters"]} for t in tools]}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parse_required(text: str) -> Optional[list[Call]]:
    """The calls of a "required" output; None if it is not a complete array of calls (cut
    short by max_tokens)."""
    try:
        items = json.loads(text)
        return [Call(i["name"], json.dumps(i["parameters"], ensure_ascii=False)) for i in items]
    except (ValueError, TypeError, KeyError):
        return None


_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)
HERMES_START = "<tool_call>"


def parse_hermes(text: str) -> tuple[str, list[Call]]:
    """(content, calls) of a Hermes-style output. Text that is not well-formed calls stays
    content, so nothing the model wrote is lost."""
    start = text.find(HERMES_START)
    if start < 0:
        return text, []
    calls = []
    try:
        for closed, open_ in _HERMES.findall(text[start:]):
            calls.append(_call(json.loads(closed or open_)))
    except (ValueError, TypeError, KeyError, AttributeError):
        return text, []
    return text[:start], calls


def _call(obj: dict) -> Call:
    args = obj.get("arguments", obj.get("parameters", {}))
    return Call(str(obj["name"]), args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


PYTHON_TAG = "<|python_tag|>"


def parse_llama3_json(text: str) -> tuple[str, list[Call]]:
    """(content, calls) of a Llama 3 JSON tool-calling output: the whole output is calls, or
    it is all content."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].lstrip()
    if not body.startswith("{"):
        return text, []
    decoder, calls, i = json.JSONDecoder(), [], 0
    try:
        while i < len(body):
            obj, i = decoder.raw_decode(body, i)
            calls.append(_call(obj))
            while i < len(body) and body[i] in " \t\n;":
                i += 1
    except (ValueError, TypeError, KeyError, AttributeError):
        return text, []
    return "", calls


class Llama3JsonStream:
    """Content streams as it comes unless the output opens with `{` or `<|python_tag|>`: then
    it is held for `finish` to parse (a call's arguments are sent whole)."""

    def __init__(self) -> None:
        self.text = ""
        self.calls: Optional[bool] = None  # unknown until the first visible characters

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.calls is None:
            head = self.text.lstrip()
            if not head or PYTHON_TAG.startswith(head):
                return ""
            self.calls = head.startswith("{") or head.startswith(PYTHON_TAG)
            return "" if self.calls else self.text
        return "" if self.calls else delta

    def finish(self) -> tuple[str, list[Call]]:
        """(content not yet streamed, calls)."""
        if self.calls is False:
            return "", []
        return parse_llama3_json(self.text)


class HermesStream:
    """Streams a choice's content until a `<tool_call>` starts, then holds the rest; `finish`
    parses the whole text. Text that could still become `<tool_call>` is held back."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0  # characters of content already streamed
        self.in_calls = False

    def feed(self, delta: str) -> str:
        """The content to stream now."""
        self.text += delta
        if self.in_calls:
            return ""
        start = self.text.find(HERMES_START, self.sent)
        if start >= 0:
            self.in_calls = True
            end = start
        else:
            end = len(self.text) - min(partial_tail(self.text, HERMES_START), len(self.text) - self.sent)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[Call]]:
        """(content not yet streamed, calls)."""
        content, calls = parse_hermes(self.text)
        if calls:
            return content[self.sent:], calls
        return self.text[self.sent:], []


# --tool-call-parser name -> (parse a whole output, a streaming parser class).
TOOL_PARSERS: dict[str, tuple[Callable[[str], tuple[str, list[Call]]], type]] = {
    "hermes": (parse_hermes, HermesStream),
    "llama3_json": (parse_llama3_json, Llama3JsonStream),
}


def arguments_for_template(messages: list[dict]) -> list[dict]:
    """Assistant tool calls carry their arguments as JSON text; chat templates (Qwen2.5,
    Hermes, Llama 3.1) expect a mapping, as vLLM hands them."""
    for m in messages:
        for call in m.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except ValueError:
                    pass  # left as the client sent it
    return messages
