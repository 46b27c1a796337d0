"""Tool calls written as JSON objects, streamed as vLLM streams them: Hermes'
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (content until the first
one) and Llama 3's `{"name": ..., "parameters": {...}}` outputs. Per call, a first delta names
the function once its name is complete; the arguments' JSON text follows as it is generated.

The arguments sent are the model's own text of the "arguments" (or "parameters") value, so
the pieces add up to what the whole-output parsers give (they use the same scanner). A string
value (JSON inside a JSON string) is sent whole, decoded, once complete; so is a number or
literal. A call is only sent once its name is complete; a call whose JSON turns out malformed
has been sent as far as it went (streaming cannot take it back), where the whole output would
have been content."""

from __future__ import annotations

import json
from typing import Optional

from pagedserve.reasoning import partial_tail

HERMES_START = "<tool_call>"
_ARG_KEYS = ("arguments", "parameters")


class CallScanner:
    """One call's JSON text as it grows: its name once complete, and its arguments value's
    span. Reads each character once."""

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0
        self.depth = 0
        self.in_string = self.escape = False
        self.string_start = 0
        self.expect_key = True  # at depth 1: the next string is a key
        self.key: Optional[str] = None
        self.name: Optional[str] = None
        self.args_start: Optional[int] = None  # where the arguments value starts
        self.args_end: Optional[int] = None  # where it ends (exclusive), once it has
        self.args_kind = ""  # its first character: '{', '[', '"', or that of a number / literal
        self.done = False  # the object closed

    def feed(self, text: str) -> None:
        self.text += text
        t = self.text
        while self.pos < len(t) and not self.done:
            c = t[self.pos]
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                    self._string_closed(self.string_start, self.pos + 1)
            elif self.depth == 1 and self.args_start is not None and self.args_end is None \
                    and self.args_kind not in "{[\"" and c in ",}" + " \t\r\n":
                self.args_end = self.pos  # a number or literal ends
                continue  # (the character is read again as itself)
            elif c == '"':
                self.in_string, self.string_start = True, self.pos
                self._value_starts(c)
            elif c in "{[":
                self._value_starts(c)
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1 and self.args_start is not None and self.args_end is None \
                        and self.args_kind in "{[":
                    self.args_end = self.pos + 1
                if self.depth == 0:
                    self.done = True
            elif self.depth == 1 and c == ":":
                self.expect_key = False
            elif self.depth == 1 and c == ",":
                self.expect_key, self.key = True, None
            elif not c.isspace():
                self._value_starts(c)
            self.pos += 1

    def _value_starts(self, c: str) -> None:
        if self.depth == 1 and not self.expect_key and self.key in _ARG_KEYS and self.args_start is None:
            self.args_start, self.args_kind = self.pos, c

    def _string_closed(self, start: int, end: int) -> None:
        if self.depth != 1:
            return
        try:
            value = json.loads(self.text[start:end])
        except ValueError:
            return
        if self.expect_key:
            self.key = value
        elif self.key == "name" and self.name is None:
            self.name = str(value)
        elif self.args_start == start:
            self.args_end = end

    def arguments(self) -> Optional[str]:
        """The arguments as sent: the value's text ({...} or [...]), a string value decoded, a
        number or literal as written; None until complete."""
        if self.args_end is None:
            return "{}" if self.done and self.args_start is None else None
        raw = self.text[self.args_start:self.args_end]
        if self.args_kind == '"':
            return json.loads(raw)
        return raw


class _PieceStream:
    """Calls read one JSON object at a time by CallScanner, each sent in pieces:
    `take_call_pieces` gives those since the last take ((index, name, "") first, then
    (index, None, text)); `finish` the content left and the calls not streamed (none).
    Subclasses say where the calls begin (`_opens`) and where each next one starts (`_next`)."""

    streams_calls = True

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0  # content characters sent
        self.in_calls = False
        self.index = -1
        self.scanner: Optional[CallScanner] = None  # the call being read; None between calls
        self.call_at = 0  # where its text starts
        self.search_from = 0  # where the next call may start
        self.args_sent = 0  # of the current call's arguments text
        self.named = False
        self.pieces: list[tuple[int, Optional[str], str]] = []

    def feed(self, delta: str) -> str:
        self.text += delta
        out = ""
        if not self.in_calls:
            out = self._opens()
            if not self.in_calls:
                return out
        while True:
            if self.scanner is None:
                nxt = self._next(self.search_from)
                if nxt is None:
                    return out
                self.index, self.scanner, self.call_at = self.index + 1, CallScanner(), nxt
                self.args_sent, self.named = 0, False
            s = self.scanner
            s.feed(self.text[self.call_at + len(s.text):])
            self._emit(final=s.done)
            if not s.done:
                return out
            self.search_from, self.scanner = self.call_at + s.pos, None

    def _opens(self) -> str:
        raise NotImplementedError

    def _next(self, at: int) -> Optional[int]:
        raise NotImplementedError

    def _emit(self, final: bool) -> None:
        s = self.scanner
        if s.name is None:
            return
        if not self.named:
            self.pieces.append((self.index, s.name, ""))
            self.named = True
        if s.args_start is None:
            if final:
                self.pieces.append((self.index, None, "{}"))
            return
        if s.args_kind in "{[":  # the value's text as it comes
            end = s.args_end if s.args_end is not None else len(s.text)
            piece = s.text[s.args_start + self.args_sent:end]
            if piece:
                self.pieces.append((self.index, None, piece))
                self.args_sent += len(piece)
        elif s.args_end is not None and not self.args_sent:  # a string, number or literal: whole
            self.pieces.append((self.index, None, s.arguments()))
            self.args_sent = 1

    def take_call_pieces(self) -> list[tuple[int, Optional[str], str]]:
        pieces, self.pieces = self.pieces, []
        return pieces

    def finish(self) -> tuple[str, list]:
        if not self.in_calls or (self.index <= 0 and not self.named):
            return self.text[self.sent:], []  # no call, or one never named: the text is content
        return "", []


class HermesStream(_PieceStream):
    """Content until the first <tool_call> (text that may be its start held back); each call
    follows a <tool_call>."""

    def _opens(self) -> str:
        found = self.text.find(HERMES_START, self.sent)
        if found < 0:
            end = len(self.text) - min(partial_tail(self.text, HERMES_START), len(self.text) - self.sent)
            out, self.sent = self.text[self.sent:end], max(self.sent, end)
            return out
        out, self.sent, self.in_calls, self.search_from = self.text[self.sent:found], found, True, found
        return out

    def _next(self, at: int) -> Optional[int]:
        found = self.text.find(HERMES_START, at)
        return None if found < 0 else found + len(HERMES_START)


class JsonCallsStream(_PieceStream):
    """Llama 3 JSON tool calling: an output that opens with `{` (or `<|python_tag|>`) is all
    calls, objects separated by `;` or blanks; any other output is content, streamed as it
    comes."""

    def __init__(self, openers: tuple[str, ...], tag: str) -> None:
        super().__init__()
        self.openers, self.tag = openers, tag
        self.content: Optional[bool] = None  # unknown until the first visible characters

    def _opens(self) -> str:
        if self.content:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        head = self.text.lstrip()
        if not head or any(o.startswith(head) for o in self.openers):
            return ""
        if not head.startswith(self.openers):
            self.content = True
            return self._opens()
        self.in_calls, self.search_from = True, len(self.text) - len(head)
        if head.startswith(self.tag):
            self.search_from += len(self.tag)
        return ""

    def _next(self, at: int) -> Optional[int]:
        while at < len(self.text) and self.text[at] in " \t\r\n;":
            at += 1
        if at < len(self.text) and self.text[at] == "{":
            return at
        return None  # not yet written (or not a call: the whole-output parser makes it content)
