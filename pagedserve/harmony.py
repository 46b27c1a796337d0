"""GPT-OSS's harmony output (`--reasoning-parser openai_gptoss`, vLLM's name): the model
writes messages `<|channel|>NAME<|message|>TEXT<|end|>`, each after the first opened by
`<|start|>assistant`, and its answer ends at `<|return|>` (an EOS token, so never in the
text). The `analysis` channel goes to `reasoning_content`; `final` and `commentary` (GPT-OSS's
preambles) to `content`. The markers are special tokens, so chat requests keep them in the
text (skip_special_tokens off) and this splitter removes them.

A message addressed to a function (`to=functions.NAME` in its header, before or after the
channel) is a tool call, its text the JSON arguments: with `tool_calls` on (the `openai`
tool-call parser, vLLM's name), the splitter hands it out as call pieces; off, its text is
content. Other recipients (GPT-OSS's built-in `browser.*`, `python`) stay content."""

from __future__ import annotations

import re
from typing import Optional

from pagedserve.reasoning import ReasoningSplitter, partial_tail

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")
MARKERS = (START, CHANNEL, MESSAGE, "<|constrain|>", *ENDS)
_RECIPIENT = re.compile(r"\bto=functions\.([^\s<]+)")


class HarmonySplitter(ReasoningSplitter):
    """One choice's harmony text, fed as generated (ReasoningSplitter's interface)."""

    def __init__(self, parser: str = "openai_gptoss", tool_calls: bool = False) -> None:
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of self.text consumed
        self.in_body = False  # inside a message's text (else in a header, up to <|message|>)
        self.channel = ""
        self.reasoned = False
        self.tool_calls = tool_calls
        self.function: Optional[str] = None  # the current message's function, when it is a call
        self.calls = 0  # calls begun
        self.pieces: list[tuple[int, Optional[str], str]] = []  # (call index, name at its start, arguments text)

    def take_call_pieces(self) -> list[tuple[int, Optional[str], str]]:
        """The tool-call pieces parsed since the last take: a call's first piece names its
        function; the arguments text follows as it comes."""
        pieces, self.pieces = self.pieces, []
        return pieces

    @property
    def saw_reasoning(self) -> bool:
        return self.reasoned

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning = content = ""
        while True:
            rest = self.text[self.sent:]
            if not self.in_body:
                at = rest.find(MESSAGE)
                if at < 0:
                    if final and rest and CHANNEL not in rest and START not in rest:
                        content += rest  # no harmony at all: the text is the answer
                        self.sent = len(self.text)
                    return reasoning, content
                header = rest[:at]
                # "<|channel|>final" or "assistant<|channel|>analysis to=..." -> the channel name
                after = header.split(CHANNEL, 1)[1] if CHANNEL in header else ""
                self.channel = after.split("<|", 1)[0].split(" ", 1)[0].strip()
                self.in_body, self.sent = True, self.sent + at + len(MESSAGE)
                to = _RECIPIENT.search(header)
                self.function = to.group(1) if to and self.tool_calls else None
                if self.function is not None:
                    self.pieces.append((self.calls, self.function, ""))
                    self.calls += 1
                continue
            ends = [(rest.find(m), m) for m in ENDS if m in rest]
            if ends:
                at, marker = min(ends)
                body, self.sent, self.in_body = rest[:at], self.sent + at + len(marker), False
            else:
                hold = 0 if final else max(partial_tail(rest, m) for m in MARKERS)
                body = rest[:len(rest) - hold]
                self.sent += len(body)
            if self.function is not None:
                if body:
                    self.pieces.append((self.calls - 1, None, body))
            elif self.channel == "analysis":
                self.reasoned = True
                reasoning += body
            else:
                content += body
            if not ends:
                return reasoning, content
