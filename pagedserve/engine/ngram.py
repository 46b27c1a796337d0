"""N-gram speculative decoding ("prompt lookup", vLLM's method "ngram"): the draft for a
request is what followed the most recent earlier occurrence of its last n tokens (n from
prompt_lookup_max down to prompt_lookup_min) in its own prompt and output. Free to propose
(no draft model), and right whenever the output copies from the prompt or repeats itself.

The search runs in C: each request's tokens are kept as 4-byte little-endian words in a
bytearray, and `bytearray.rfind` looks for the n-gram's bytes (a hit must be word-aligned)."""

from __future__ import annotations

from array import array

from pagedserve.engine.request import Request
from pagedserve.engine.spec_config import SpeculativeConfig

__all__ = ["NgramProposer", "SpeculativeConfig"]


class NgramProposer:
    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.cfg = cfg
        self._bufs: dict[str, tuple[bytearray, int]] = {}  # request id -> (token words, tokens in it)

    def forget(self, request_id: str) -> None:
        self._bufs.pop(request_id, None)

    def _words(self, req: Request) -> bytearray:
        buf, n = self._bufs.get(req.request_id, (None, 0))
        toks = req.all_token_ids
        if buf is None:
            buf = bytearray()
        if n < len(toks):
            buf += array("i", toks[n:]).tobytes()
        self._bufs[req.request_id] = (buf, len(toks))
        return buf

    def propose(self, req: Request, max_tokens: int) -> list[int]:
        """Up to min(num_speculative_tokens, max_tokens) draft tokens to follow req's tokens
        (none when no n-gram of its tail occurred before)."""
        k = min(self.cfg.num_speculative_tokens, max_tokens)
        toks = req.all_token_ids
        total = len(toks)
        if k <= 0 or total < self.cfg.prompt_lookup_min + 1:
            return []
        buf = self._words(req)
        for n in range(min(self.cfg.prompt_lookup_max, total - 1), self.cfg.prompt_lookup_min - 1, -1):
            pattern = bytes(buf[4 * (total - n):])
            end = 4 * (total - 1)  # an occurrence ending before the last token: not the tail itself
            while end >= 4 * n:
                pos = buf.rfind(pattern, 0, end)
                if pos < 0:
                    break
                if pos % 4 == 0:
                    first = pos // 4 + n
                    return toks[first:first + k]
                end = pos + 4 * n - 1  # a misaligned hit: look further left
        return []
