"""Tool calls streamed as they are generated, for the formats that are not JSON call objects
in Hermes / Llama 3 style (json_call_stream.py has those): mistral, granite, phi4_mini_json,
qwen3_coder, glm45, deepseek_v3 / v31 and kimi_k2.

Content streams until the calls start (the gate: a marker, or an output that opens with the
calls). From there each call goes out as vLLM streams it: its name (and id) once complete,
then its arguments as a growing prefix of the exact text the whole-output parser gives
(json_prefix.py for JSON arguments; XML-style parameters as each completes, string ones
character by character). `finish` runs the whole-output parser on the full text and sends
whatever is left, so the pieces of each call add up to that parser's call. A call the
format turns out not to hold has been sent as far as it went; the rest is dropped (the
same rule as json_call_stream.py's)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from pagedserve.entrypoints.openai.json_call_stream import CallScanner
from pagedserve.entrypoints.openai.json_prefix import JsonObjectPrefix, dumps, skip_space
from pagedserve.reasoning import partial_tail

logger = logging.getLogger("pagedserve")


@dataclass
class Call:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    # The model's own call id where its format has one (Kimi K2's "functions.NAME:0", which its
    # chat template writes back in later turns); else the server makes a random one.
    id: Optional[str] = None


class MarkerStream:
    """For outputs of content then calls after a marker: streams the content until the marker
    starts, then holds the rest; `finish` parses the whole text. Text that could still become
    the marker is held back."""

    def __init__(self, marker: Union[str, tuple[str, ...]], parse: Callable[[str], tuple[str, list[Call]]]) -> None:
        self.markers = (marker,) if isinstance(marker, str) else marker  # any of them opens the calls
        self.parse = parse
        self.text = ""
        self.sent = 0  # characters of content already streamed
        self.in_calls = False

    def floor(self) -> Optional[int]:
        """Where a marker may start (None: nowhere yet, all is content); a subclass may skip text."""
        return 0

    def feed(self, delta: str) -> str:
        """The content to stream now."""
        self.text += delta
        return "" if self.in_calls else self.scan()

    def scan(self) -> str:
        floor = self.floor()
        if floor is None:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        found = [i for i in (self.text.find(m, max(self.sent, floor)) for m in self.markers) if i >= 0]
        if found:
            self.in_calls = True
            end = min(found)
        else:
            held = max(partial_tail(self.text, m) for m in self.markers)
            end = len(self.text) - min(held, len(self.text) - self.sent)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[Call]]:
        """(content not yet streamed, calls)."""
        content, calls = self.parse(self.text)
        if calls:
            return content[self.sent:], calls
        return self.text[self.sent:], []


@dataclass
class CallState:
    name: Optional[str] = None
    args: str = ""  # a prefix of the call's final arguments text
    id: Optional[str] = None
    end: Optional[int] = None  # where the call's text ends in the section, once complete


class CallFinder:
    """The calls of a growing calls section: finished ones kept, the last one updated."""

    def __init__(self) -> None:
        self.done: list[CallState] = []
        self.at = 0
        self.cur: Any = None

    def update(self, body: str) -> list[CallState]:
        while True:
            if self.cur is None:
                start = self.next_call(body, self.at)
                if start is None:
                    return self.done
                self.cur = self.new_call(start)
            state = self.cur.update(body)
            if state.end is None:
                return self.done + [state]
            self.done.append(state)
            self.at, self.cur = state.end, None

    def next_call(self, body: str, at: int) -> Optional[int]:
        raise NotImplementedError

    def new_call(self, start: int) -> Any:
        raise NotImplementedError


class SectionStream:
    """feed(delta) -> content to stream now; take_call_pieces() -> (index, name or None,
    arguments text, id) pieces since the last take; finish() -> (content left, [])."""

    streams_calls = True

    def __init__(self, gate: Any, finder: CallFinder, parse: Callable[[str], tuple[str, list]]) -> None:
        self.gate, self.finder, self.parse = gate, finder, parse
        self.sent: list[tuple[str, str]] = []  # per call: (name, arguments sent)
        self.pieces: list[tuple[int, Optional[str], str, Optional[str]]] = []

    def _body(self) -> Optional[str]:
        g = self.gate
        if hasattr(g, "in_calls"):  # MarkerStream: from its marker on (`sent` stops there)
            return g.text[g.sent:] if g.in_calls else None
        return g.text if g.calls else None  # OpeningStream: the whole output

    def feed(self, delta: str) -> str:
        content = self.gate.feed(delta)
        body = self._body()
        if body is not None:
            for i, state in enumerate(self.finder.update(body)):
                self._emit(i, state.name, state.args, state.id)
        return content

    def _emit(self, index: int, name: Optional[str], args: str, call_id: Optional[str]) -> None:
        if name is None:
            return
        if index == len(self.sent):
            self.sent.append((name, ""))
            self.pieces.append((index, name, "", call_id))
        elif index > len(self.sent) or self.sent[index][0] != name:
            logger.warning("tool call %d streamed as %r is %r in the whole output", index, name,
                           self.sent[index][0] if index < len(self.sent) else None)
            return
        sent = self.sent[index][1]
        if len(args) > len(sent) and args.startswith(sent):
            self.pieces.append((index, None, args[len(sent):], None))
            self.sent[index] = (name, args)
        elif not args.startswith(sent):
            logger.warning("tool call %d's streamed arguments are not a prefix of its arguments", index)

    def take_call_pieces(self) -> list[tuple[int, Optional[str], str, Optional[str]]]:
        pieces, self.pieces = self.pieces, []
        return pieces

    def finish(self) -> tuple[str, list]:
        rest, calls = self.gate.finish()
        if not calls:
            return ("", []) if self.sent else (rest, [])
        for i, c in enumerate(calls):
            self._emit(i, c.name, c.arguments, c.id)
        return rest, []


# ---- JSON call objects: mistral's list, granite, phi4_mini_json ---------------------------
class JsonObjectCall:
    """A {"name": ..., "arguments": {...}} object at `start` (arguments as _call gives them)."""

    def __init__(self, start: int) -> None:
        self.start, self.scanner, self.args = start, CallScanner(), None
        self.state = CallState()

    def update(self, body: str) -> CallState:
        s, st = self.scanner, self.state
        s.feed(body[self.start + len(s.text):])
        st.name = s.name
        if s.args_start is not None and s.args_kind == "{":
            self.args = self.args or JsonObjectPrefix(s.args_start)
            st.args = self.args.update(s.text)
        if s.done:
            st.end = self.start + s.pos
            if s.args_start is None:
                st.args = "{}"
            elif s.args_kind != "{" and s.args_end is not None:
                value = json.loads(s.text[s.args_start:s.args_end])
                st.args = value if isinstance(value, str) else dumps(value)
        return st


class JsonListFinder(CallFinder):
    """Call objects in a JSON list, after one of `tags` (or none)."""

    def __init__(self, tags: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.tags = tags

    def next_call(self, body: str, at: int) -> Optional[int]:
        i = skip_space(body, at)
        if at == 0:
            for tag in self.tags:
                if body.startswith(tag, i):
                    i = skip_space(body, i + len(tag))
                    break
        while i < len(body) and body[i] in " \t\r\n[,":
            i += 1
        return i if i < len(body) and body[i] == "{" else None

    def new_call(self, start: int) -> JsonObjectCall:
        return JsonObjectCall(start)


MISTRAL_TAG = "[TOOL_CALLS]"


class MistralNamedCall:
    """`name[ARGS]{...}` (or `name[CALL_ID]id[ARGS]{...}`), newer Mistral tokenizers' form."""

    def __init__(self, start: int) -> None:
        self.start, self.args = start, None
        self.state = CallState()

    def update(self, body: str) -> CallState:
        st = self.state
        if self.args is None:
            sep = body.find("[ARGS]", self.start)
            if sep < 0:
                return st
            name = body[self.start:sep].split("[CALL_ID]")[0].strip()
            if not name:
                return st
            st.name, self.args = name, JsonObjectPrefix(sep + len("[ARGS]"))
        st.args = self.args.update(body)
        if self.args.end is not None:
            st.end = self.args.end
        return st


class MistralFinder(CallFinder):
    """After each [TOOL_CALLS]: a JSON list (or object) of calls, or name[ARGS]{...}."""

    def next_call(self, body: str, at: int) -> Optional[int]:
        i = at
        while i < len(body):
            if body.startswith(MISTRAL_TAG, i):
                i += len(MISTRAL_TAG)
            elif MISTRAL_TAG.startswith(body[i:]):
                return None  # (maybe a tag, not yet whole)
            elif body[i] in " \t\r\n[,]":
                i += 1
            else:
                return i
        return None

    def new_call(self, start: int) -> Any:
        return JsonObjectCall(start) if self._body[start] == "{" else MistralNamedCall(start)

    def update(self, body: str) -> list[CallState]:
        self._body = body
        return super().update(body)


# ---- DeepSeek V3 / V3.1, Kimi K2: marked calls with JSON arguments ------------------------
class MarkedCall:
    """A call whose head (`head` regex, matched at `start`) names it and is followed by its
    JSON arguments; complete once `whole` matches there."""

    def __init__(self, start: int, head: re.Pattern, whole: re.Pattern, name: Callable[[re.Match], str]) -> None:
        self.start, self.head_re, self.whole, self.name = start, head, whole, name
        self.args: Optional[JsonObjectPrefix] = None
        self.state = CallState()

    def update(self, body: str) -> CallState:
        st = self.state
        if self.args is None:
            m = self.head_re.match(body, self.start)
            if m is None:
                return st
            st.name, st.id = self.name(m), m.groupdict().get("id")
            self.args = JsonObjectPrefix(m.end())
        st.args = self.args.update(body)
        m = self.whole.match(body, self.start)
        if m is not None:
            try:
                value = json.loads(m["args"])
            except ValueError:
                value = None
            if isinstance(value, dict):
                st.args = dumps(value)
            st.end = m.end()
        return st


class MarkedFinder(CallFinder):
    def __init__(self, begin: str, head: re.Pattern, whole: re.Pattern, name: Callable[[re.Match], str]) -> None:
        super().__init__()
        self.begin, self.head, self.whole, self.name = begin, head, whole, name

    def next_call(self, body: str, at: int) -> Optional[int]:
        i = body.find(self.begin, at)
        return None if i < 0 else i

    def new_call(self, start: int) -> MarkedCall:
        return MarkedCall(start, self.head, self.whole, self.name)


# ---- Qwen3-Coder and GLM-4.5: XML-style parameters, typed by the tool's schema ------------
class _TypedMembers:
    """The arguments object built member by member as parameters complete; a string
    parameter's value streamed as it comes (only the schema can say it stays a string)."""

    def __init__(self) -> None:
        self.settled = "{"
        self.count = 0
        self.partial: Optional[tuple[int, int, str]] = None  # (value start, raw consumed, its text so far)

    def add(self, key: str, value: Any) -> None:
        self.settled += ("" if not self.count else ", ") + dumps(key) + ": " + dumps(value)
        self.count += 1
        self.partial = None

    def open_string(self, key: str, start: int, raw: str) -> str:
        """The arguments so far with the string value of `key` (raw text from `start`) open."""
        if self.partial is None or self.partial[0] != start:
            self.partial = (start, 0, ("" if not self.count else ", ") + dumps(key) + ': "')
        _, used, text = self.partial
        if len(raw) > used:
            text += dumps(raw[used:])[1:-1]
            self.partial = (start, len(raw), text)
        return self.settled + text


def _stable(raw: str, closers: tuple[str, ...], trailing_newline: bool) -> str:
    """Raw value text that no closer can still claim (and, where the parser strips one, not
    a final newline)."""
    held = max(partial_tail(raw, c) for c in closers)
    raw = raw[:len(raw) - held]
    if trailing_newline and raw.endswith("\n"):
        raw = raw[:-1]
    return raw


def _earliest(body: str, at: int, marks: tuple[str, ...]) -> tuple[int, str]:
    found = [(i, m) for m in marks for i in (body.find(m, at),) if i >= 0]
    return min(found) if found else (-1, "")


class _TypedCall:
    """A call whose parameters are typed by the tool's schema (`typed(text, types)`)."""

    def __init__(self, start: int, typed: Callable, schema_types: Callable[[str], dict]) -> None:
        self.start, self.typed, self.schema_types = start, typed, schema_types
        self.state, self.members, self.pos = CallState(), _TypedMembers(), 0
        self.types: dict = {}


class Qwen3CoderCall(_TypedCall):
    """`<function=NAME>` then `<parameter=P>value</parameter>` ... `</function>`."""

    PARAM_END = ("</parameter>", "<parameter=", "</function>", "</tool_call>")

    def update(self, body: str) -> CallState:
        st = self.state
        if st.name is None:
            i = body.find("<function=", self.start)
            j = body.find(">", i) if i >= 0 else -1
            if j < 0 or "\n" in body[i:j]:
                return st
            st.name, self.pos = body[i + len("<function="):j].strip(), j + 1
            self.types = self.schema_types(st.name)
            st.args = "{"
        while True:
            i, mark = _earliest(body, self.pos, ("<parameter=", "</function>", "</tool_call>"))
            if i < 0:
                return st
            if mark != "<parameter=":
                st.args = self.members.settled + "}"
                st.end = i + len(mark)
                return st
            j = body.find(">", i)
            if j < 0 or "\n" in body[i:j]:
                return st
            key = body[i + len("<parameter="):j].strip()
            end, closer = _earliest(body, j + 1, self.PARAM_END)
            raw = body[j + 1:end if end >= 0 else len(body)]
            raw = raw[1:] if raw.startswith("\n") else raw  # (values sit on lines of their own)
            if end < 0:
                if "string" in self.types.get(key, ()) and raw:
                    st.args = self.members.open_string(key, j + 1, _stable(raw, self.PARAM_END, True))
                return st
            value = raw[:-1] if raw.endswith("\n") else raw
            self.members.add(key, self.typed(value, self.types.get(key, set())))
            st.args = self.members.settled
            self.pos = end + len(closer) if closer == "</parameter>" else end


class Glm45Call(_TypedCall):
    """`NAME` then `<arg_key>K</arg_key><arg_value>V</arg_value>` pairs, `</tool_call>`."""

    VALUE_END = ("</arg_value>", "</tool_call>")

    def update(self, body: str) -> CallState:
        st = self.state
        if st.name is None:
            i, _ = _earliest(body, self.start, ("<arg_key>", "</tool_call>"))
            name = body[self.start:i].strip() if i >= 0 else ""
            if not name or "\n" in name or "<" in name:
                return st
            st.name, self.pos, st.args = name, i, "{"
            self.types = self.schema_types(name)
        while True:
            i, mark = _earliest(body, self.pos, ("<arg_key>", "</tool_call>"))
            if i < 0:
                return st
            if mark == "</tool_call>":
                st.args = self.members.settled + "}"
                st.end = i + len(mark)
                return st
            k_end = body.find("</arg_key>", i)
            if k_end < 0:
                return st
            key = body[i + len("<arg_key>"):k_end].strip()
            v = skip_space(body, k_end + len("</arg_key>"))
            if not body.startswith("<arg_value>", v):
                return st
            v += len("<arg_value>")
            end, closer = _earliest(body, v, self.VALUE_END)
            if end < 0:
                raw = _stable(body[v:], self.VALUE_END, False)
                if "string" in self.types.get(key, ()) and raw:
                    st.args = self.members.open_string(key, v, raw)
                return st
            self.members.add(key, self.typed(body[v:end], self.types.get(key, set())))
            st.args = self.members.settled
            self.pos = end + len(closer) if closer == "</arg_value>" else end


class BlockFinder(CallFinder):
    """Calls in `<tool_call>` blocks (Qwen3-Coder, GLM-4.5)."""

    def __init__(self, make: Callable[[int], Any]) -> None:
        super().__init__()
        self.make = make

    def next_call(self, body: str, at: int) -> Optional[int]:
        i = body.find("<tool_call>", at)
        return None if i < 0 else i + len("<tool_call>")

    def new_call(self, start: int) -> Any:
        return self.make(start)


# ---- pythonic: [f(a=1, b="x"), g()] -------------------------------------------------------
class PythonicCall:
    """`name(kw=literal, ...)`: the name at "(", each keyword argument as it completes (read
    with ast, never evaluated), "}" at ")". Strings and brackets are tracked a character at a
    time, so a long call costs linear time."""

    def __init__(self, start: int, literal: Callable[[str], tuple[str, Any]]) -> None:
        self.start, self.pos, self.literal = start, start, literal
        self.depth, self.quote, self.arg_start = 0, "", 0
        self.state, self.members, self.bad = CallState(), _TypedMembers(), False

    def update(self, body: str) -> CallState:
        st, t = self.state, body
        while self.pos < len(t) and st.end is None and not self.bad:
            c = t[self.pos]
            if self.quote:
                if c == "\\":
                    if self.pos + 1 >= len(t):
                        break
                    self.pos += 2
                elif t.startswith(self.quote, self.pos):
                    self.pos, self.quote = self.pos + len(self.quote), ""
                elif len(self.quote) == 3 and self.quote.startswith(t[self.pos:]):
                    break  # (maybe the closing triple, not yet whole)
                else:
                    self.pos += 1
                continue
            if c in "\"'":
                if self.pos + 3 > len(t) and t[self.pos:] == c * len(t[self.pos:]):
                    break  # one, two or three quotes: not yet known
                self.quote = c * 3 if t.startswith(c * 3, self.pos) else c
                self.pos += len(self.quote)
                continue
            if c == "(" and self.depth == 0:
                name = t[self.start:self.pos].strip()
                if not name.isidentifier():
                    self.bad = True
                    break
                st.name, st.args, self.arg_start = name, "{", self.pos + 1
            if c in "([{":
                self.depth += 1
            elif c in ")]}":
                self.depth -= 1
            if self.depth == 0 and c == ")" or self.depth == 1 and c == ",":
                self._argument(t[self.arg_start:self.pos])
                self.arg_start = self.pos + 1
                if c == ")" and not self.bad:
                    st.args, st.end = self.members.settled + "}", self.pos + 1
            self.pos += 1
        return st

    def _argument(self, text: str) -> None:
        if not text.strip():
            return
        try:
            key, value = self.literal(text)
        except (ValueError, TypeError, SyntaxError, RecursionError):
            self.bad = True
            return
        self.members.add(key, value)
        self.state.args = self.members.settled


class PythonicFinder(CallFinder):
    """Calls in a Python list, optionally inside <|python_start|> ... <|python_end|>."""

    def __init__(self, tag: str, literal: Callable[[str], tuple[str, Any]]) -> None:
        super().__init__()
        self.tag, self.literal = tag, literal

    def next_call(self, body: str, at: int) -> Optional[int]:
        i = skip_space(body, at)
        if at == 0 and body.startswith(self.tag, i):
            i += len(self.tag)
        while i < len(body) and body[i] in " \t\r\n[,":
            i += 1
        return i if i < len(body) and (body[i].isalpha() or body[i] == "_") else None

    def new_call(self, start: int) -> PythonicCall:
        return PythonicCall(start, self.literal)
