"""Incremental detokenization: O(new tokens) work per step, correct across multi-byte
characters split over tokens (tokenizers' DecodeStream, primed with the prompt's tail so a
first token's leading space survives, as in vLLM)."""

from __future__ import annotations

from typing import Any

_PRIME_TOKENS = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        self.output_ids: list[int] = []
        self.text = ""
        self._stream = None
        if self.backend is not None:
            self._stream = self._new_stream(prompt_token_ids[-_PRIME_TOKENS:])

    def _new_stream(self, prime: list[int]):
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        if prime:
            try:
                stream.step(self.backend, list(prime))
            except Exception:
                stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        return stream

    def add_tokens(self, token_ids: list[int]) -> str:
        """Append tokens; returns the text they completed (possibly empty)."""
        if len(token_ids) == 1:  # the per-step case
            return self._add(token_ids[0])
        return "".join([self._add(t) for t in token_ids])

    def _add(self, t: int) -> str:
        self.output_ids.append(t)
        if self._stream is not None:
            try:
                chunk = self._stream.step(self.backend, t)
            except Exception:
                chunk = self._recover()
        else:
            full = self._full_decode()
            chunk = full[len(self.text):] if not full.endswith("\ufffd") else None
        if chunk:
            self.text += chunk
            return chunk
        return ""

    def _recover(self) -> str:
        """The stream lost its footing (rare decoder corner cases): rebuild the text from
        scratch and start a fresh stream after it; returns the text not yet emitted."""
        chunk = self._full_decode()[len(self.text):]
        self._stream = self._new_stream(self.output_ids[-_PRIME_TOKENS:])
        return chunk

    def finish(self) -> str:
        """At the end of a request, flush bytes still pending in the stream (an incomplete
        multi-byte character decodes to U+FFFD, as tokenizer.decode does); returns them."""
        full = self._full_decode()
        if len(full) > len(self.text) and full.startswith(self.text):
            tail = full[len(self.text):]
            self.text = full
            return tail
        return ""

    def _full_decode(self) -> str:
        return self.tokenizer.decode(self.output_ids, skip_special_tokens=self.skip_special_tokens)
