"""Reasoning parsers (`pagedserve serve --reasoning-parser qwen3|glm45|deepseek_r1|openai_gptoss`,
vLLM's names): a thinking model's `<think>...</think>` goes to the chat message's
`reasoning_content`, what follows to `content`. openai_gptoss reads GPT-OSS's harmony
messages instead (pagedserve/harmony.py).

- qwen3: the output is reasoning only if it starts with `<think>` (with enable_thinking off,
  Qwen3's template puts an empty think block in the prompt, and the output is all content);
  glm45 (GLM-4.5 / 4.6, whose template does the same) reads alike.
- deepseek_r1: the output is reasoning from its first token (the `<think>` may be in the
  prompt) up to `</think>`.

Either way an output cut short before `</think>` is all reasoning. Streamed and whole
answers split the same way.

The engine reads the parser too: a structured-output grammar (engine/grammar.py) applies
only once the reasoning has ended, as in vLLM."""

from __future__ import annotations

from typing import Optional

REASONING_PARSERS = ("qwen3", "glm45", "deepseek_r1", "openai_gptoss")
OPENS_WITH_THINK = ("qwen3", "glm45")  # reasoning only when the output opens with <think>
REASONING_KEEPS_SPECIAL_TOKENS = ("openai_gptoss",)  # its markers are special tokens: the text keeps them
START, END = "<think>", "</think>"


def partial_tail(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningSplitter:
    """One choice's text, fed as it is generated: `feed` returns the (reasoning, content) that
    can be sent now; `finish` the rest. `split` does a whole text at once."""

    def __new__(cls, *args: object, **kwargs: object):
        if cls is ReasoningSplitter and (args[0] if args else kwargs.get("parser")) == "openai_gptoss":
            from pagedserve.harmony import HarmonySplitter

            return super().__new__(HarmonySplitter)
        return super().__new__(cls)

    def __init__(self, parser: str) -> None:
        if parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r}; choose from {', '.join(REASONING_PARSERS)}.")
        self.parser = parser
        self.text = ""
        self.mode: Optional[str] = None if parser in OPENS_WITH_THINK else "reasoning"  # None: not known yet
        self.sent = 0  # characters of self.text already handed out (tags included)

    @classmethod
    def split(cls, parser: str, text: str) -> tuple[Optional[str], Optional[str]]:
        s = cls(parser)
        r1, c1 = s.feed(text)
        r2, c2 = s.finish()
        return (r1 + r2) if s.saw_reasoning else None, (c1 + c2) or None

    @property
    def saw_reasoning(self) -> bool:
        return self.mode in ("reasoning", "content_after")

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning = content = ""
        if self.mode is None:  # qwen3, glm45: does the output open with <think>?
            if self.text.startswith(START):
                self.mode, self.sent = "reasoning", len(START)
            elif final or not START.startswith(self.text):
                self.mode = "content"
            else:
                return "", ""  # too short to tell
        if self.mode == "reasoning":
            if self.sent == 0 and self.text.startswith(START):  # deepseek_r1 with the tag in its output
                self.sent = len(START)
            elif self.sent == 0 and not final and START.startswith(self.text):
                return "", ""
            end = self.text.find(END, self.sent)
            if end < 0:
                stop = len(self.text) if final else len(self.text) - partial_tail(self.text, END)
                reasoning, self.sent = self.text[self.sent:stop], max(self.sent, stop)
                return reasoning, ""
            reasoning = self.text[self.sent:end]
            self.mode, self.sent = "content_after", end + len(END)
        content, self.sent = self.text[self.sent:], len(self.text)
        return reasoning, content
