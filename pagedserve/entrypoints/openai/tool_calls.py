"""Function calling for /v1/chat/completions, as vLLM does it.

- tool_choice naming a function: the output is held (structured outputs) to that function's
  parameters schema, and becomes the call's arguments.
- tool_choice "required": the output is held to a JSON array of one or more
  {"name": <a tool>, "parameters": <its schema>} objects, each one a call.
- tool_choice "auto" (with --enable-auto-tool-choice and --tool-call-parser hermes): the
  model decides, and the parser takes `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
  blocks out of its text (Hermes / Qwen2.5 style); what comes before them is the content.
- tool_choice "none": plain text (the tools still reach the chat template, as in vLLM)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

TOOL_PARSERS = ("hermes",)


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
            obj = json.loads(closed or open_)
            args = obj.get("arguments", obj.get("parameters", {}))
            calls.append(Call(str(obj["name"]), args if isinstance(args, str)
                              else json.dumps(args, ensure_ascii=False)))
    except (ValueError, TypeError, KeyError, AttributeError):
        return text, []
    return text[:start], calls


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
            end = len(self.text)
            for k in range(min(len(HERMES_START) - 1, len(self.text) - self.sent), 0, -1):
                if self.text.endswith(HERMES_START[:k]):
                    end -= k
                    break
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[Call]]:
        """(content not yet streamed, calls)."""
        content, calls = parse_hermes(self.text)
        if calls:
            return content[self.sent:], calls
        return self.text[self.sent:], []


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
