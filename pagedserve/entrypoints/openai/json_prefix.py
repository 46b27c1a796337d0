"""The text OpenAI's tool-call arguments will have, known early: for a JSON object that is
still being generated, the prefix of `json.dumps(json.loads(object), ensure_ascii=False)`
(what the whole-output parsers send) that the text so far settles. Members are added as
they complete; a string member's characters as they come (escapes decoded once whole). The
work per update is about the new text, so a long argument streams in linear time."""

from __future__ import annotations

import json
import re
from typing import Optional

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_HEX = set("0123456789abcdefABCDEF")


def dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def skip_space(t: str, i: int) -> int:
    while i < len(t) and t[i] in " \t\r\n":
        i += 1
    return i


def value_end(t: str, i: int) -> Optional[int]:
    """Where the JSON value starting at t[i] ends, once it has (else None)."""
    c = t[i]
    if c == '"':
        m = _STRING.match(t, i)
        return m.end() if m else None
    if c in "{[":
        depth, j = 0, i
        while j < len(t):
            ch = t[j]
            if ch == '"':
                m = _STRING.match(t, j)
                if m is None:
                    return None
                j = m.end()
                continue
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(t) and t[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(t) else None  # (a number at the end may go on)


def escape_boundary(t: str, a: int, b: int) -> int:
    """The last index in [a, b] that is not inside an escape of the JSON string text t[a:b]
    (a \\uD800-\\uDBFF escape waits for the low surrogate after it)."""
    safe, i = a, a
    while i < b:
        if t[i] != "\\":
            i += 1
            safe = i
            continue
        if i + 1 >= b:
            break
        if t[i + 1] != "u":
            i += 2
            safe = i
            continue
        if i + 6 > b or not set(t[i + 2:i + 6]) <= _HEX:
            break
        if t[i + 2] in "dD" and t[i + 3] in "89abAB":  # a high surrogate: its pair must follow
            if i + 12 > b:
                break
            i += 12
        else:
            i += 6
        safe = i
    return safe


def closing_quote(t: str, i: int) -> Optional[int]:
    """The index of the quote that closes a JSON string whose text from i on is t[i:] (i not
    inside an escape), or None."""
    while True:
        q = t.find('"', i)
        if q < 0:
            return None
        k = q
        while k > i and t[k - 1] == "\\":
            k -= 1
        if (q - k) % 2 == 0:
            return q
        i = q + 1


class JsonObjectPrefix:
    """One JSON object's normalized text as its raw text grows (append-only, starting at
    `start` of the text given to update). `text` is the settled prefix; `end` is set once the
    object is complete. A member that will not parse stops it there (the whole-output parser
    decides what the output was)."""

    def __init__(self, start: int) -> None:
        self.settled = ""  # "{" and the complete members
        self.text = ""  # settled + the string member in progress, if any
        self.pos: Optional[int] = None  # raw index after "{" or the last complete member
        self.start = start
        self.first = True
        self.end: Optional[int] = None
        self.stuck = False
        self._open: Optional[tuple[str, int, int, str]] = None  # (member head, quote index, decoded up to, text)

    def update(self, t: str) -> str:
        if self.end is not None or self.stuck:
            return self.text
        if self.pos is None:
            i = skip_space(t, self.start)
            if i >= len(t):
                return self.text
            if t[i] != "{":
                self.stuck = True
                return self.text
            self.settled = self.text = "{"
            self.pos = i + 1
        while True:
            j = skip_space(t, self.pos)
            if j < len(t) and t[j] == "," and not self.first:
                j = skip_space(t, j + 1)
            if j >= len(t):
                return self.text
            if t[j] == "}" and self._open is None:
                self.settled += "}"
                self.text, self.end = self.settled, j + 1
                return self.text
            if t[j] != '"':
                self.stuck = True
                return self.text
            key_end = value_end(t, j)
            if key_end is None:
                return self.text
            k = skip_space(t, key_end)
            if k >= len(t):
                return self.text
            if t[k] != ":":
                self.stuck = True
                return self.text
            v = skip_space(t, k + 1)
            if v >= len(t):
                return self.text
            try:
                head = ("" if self.first else ", ") + dumps(json.loads(t[j:key_end])) + ": "
            except ValueError:
                self.stuck = True
                return self.text
            if self._open is not None and self._open[1] == v:  # a string value already open
                end = self._string_part(t, head, v)
            else:
                end = value_end(t, v)
                if end is None and t[v] == '"':
                    end = self._string_part(t, head, v)
            if end is None:
                return self.text
            try:
                value = json.loads(t[v:end])
            except ValueError:
                self.stuck = True
                return self.text
            self._open = None
            self.settled += head + dumps(value)
            self.text = self.settled
            self.first, self.pos = False, end

    def _string_part(self, t: str, head: str, quote: int) -> Optional[int]:
        """A string value being written: its characters so far, encoded as dumps would; where
        it ends once its closing quote has come (only the new text is read each time)."""
        if self._open is None or self._open[1] != quote:
            self._open = (head, quote, quote + 1, head + '"')
        head, _, done, text = self._open
        close = closing_quote(t, done)
        if close is not None:
            return close + 1
        safe = escape_boundary(t, done, len(t))
        if safe > done:
            try:
                piece = json.loads('"' + t[done:safe] + '"')
            except ValueError:
                self.stuck = True
                return None
            text += dumps(piece)[1:-1]
            self._open = (head, quote, safe, text)
        self.text = self.settled + text
        return None
