"""N-gram speculative decoding ("prompt lookup", vLLM's method "ngram"): the draft for a
request is what followed the most recent earlier occurrence of its last n tokens (n from
prompt_lookup_max down to prompt_lookup_min) in its own prompt and output. Free to propose
(no draft model), and right whenever the output copies from the prompt or repeats itself.

The search runs in C: each request's tokens are kept as 4-byte little-endian words in a
bytearray, and `bytearray.rfind` looks for the n-gram's bytes (a hit must be word-aligned)."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

from pagedserve.engine.request import Request


@dataclass
class SpeculativeConfig:
    """vLLM's speculative_config for method "ngram"."""

    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1

    @classmethod
    def from_dict(cls, d: Any) -> "SpeculativeConfig":
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(d).__name__}.")
        d = dict(d)
        method = d.pop("method", "ngram")
        if method != "ngram":
            raise ValueError(f"speculative_config: only method 'ngram' is available, got {method!r}.")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {sorted(unknown)}.")
        if "num_speculative_tokens" not in d:
            raise ValueError("speculative_config needs num_speculative_tokens.")
        cfg = cls(**d)
        k, lo, hi = cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (k, lo, hi)) or not (
                1 <= k <= 32 and 1 <= lo <= hi <= 32):
            raise ValueError("speculative_config: need 1 <= num_speculative_tokens <= 32 and "
                             f"1 <= prompt_lookup_min <= prompt_lookup_max <= 32, got {k}, {lo}, {hi}.")
        return cfg


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
