"""The server's limits on what one request may ask for, with their `serve` flags. Anything
beyond a limit is refused with a 400 naming the field (413 for the body), before any
tokenization or engine work, so hostile input costs bounded time and memory."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from pagedserve.errors import ParamError


def _flag(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerLimits:
    max_request_body_bytes: int = _flag(4 << 20, "largest request body accepted; larger ones get 413 (a declared "
                                        "Content-Length is refused before any byte is read)")
    max_n: int = _flag(128, "largest n (samples per prompt)")
    max_stop_strings: int = _flag(64, "most entries in each of stop, stop_token_ids and bad_words")
    max_stop_string_chars: int = _flag(1024, "longest stop string / bad word, in characters")
    max_logit_bias: int = _flag(1024, "most logit_bias entries")
    max_prompt_chars: Optional[int] = _flag(None, "longest text prompt (characters, after the chat template) "
                                            "tokenized at all; default: max_model_len x the longest token of the "
                                            "vocabulary, a length no prompt that fits the context can exceed "
                                            "(not applied with truncate_prompt_tokens)")
    max_waiting_requests: int = _flag(1024, "most requests waiting in the engine queue; beyond it new requests "
                                      "get 503 with Retry-After (a completion with several prompts needs one "
                                      "slot per prompt)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"--{f.name.replace('_', '-')} must be a positive integer, got {v!r}.")

    def resolve(self, tokenizer: Any, max_model_len: int) -> "ServerLimits":
        """Fill in max_prompt_chars from the vocabulary when it was not set."""
        if self.max_prompt_chars is not None:
            return self
        per_token = max_chars_per_token(tokenizer)
        return self if per_token is None else dataclasses.replace(self, max_prompt_chars=max_model_len * per_token)

    def check_sampling(self, req: Any) -> None:
        """The list and count limits of a completion or chat request (SamplingFields)."""
        if req.n > self.max_n:
            raise ParamError("n", f"n must be at most {self.max_n} (--max-n), got {req.n}.")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        for name, values in (("stop", stops), ("stop_token_ids", req.stop_token_ids or []),
                             ("bad_words", req.bad_words or [])):
            if len(values) > self.max_stop_strings:
                raise ParamError(name, f"{name} may have at most {self.max_stop_strings} entries "
                                 f"(--max-stop-strings), got {len(values)}.")
        for name, words in (("stop", stops), ("bad_words", req.bad_words or [])):
            longest = max((len(w) for w in words), default=0)
            if longest > self.max_stop_string_chars:
                raise ParamError(name, f"each entry of {name} may have at most {self.max_stop_string_chars} "
                                 f"characters (--max-stop-string-chars), got {longest}.")
        if req.logit_bias is not None and len(req.logit_bias) > self.max_logit_bias:
            raise ParamError("logit_bias", f"logit_bias may have at most {self.max_logit_bias} entries "
                             f"(--max-logit-bias), got {len(req.logit_bias)}.")

    def check_prompt_chars(self, text: str, param: str, truncating: bool) -> None:
        """Refuse a text prompt too long to fit the context before tokenizing it."""
        if self.max_prompt_chars is not None and not truncating and len(text) > self.max_prompt_chars:
            raise ParamError(param, f"{param} is {len(text)} characters long, more than the {self.max_prompt_chars} "
                             "this server tokenizes (--max-prompt-chars); it cannot fit the model's context.")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default,
                                help=f"{f.metadata['help']} (default: {f.default})")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "ServerLimits":
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})


def _parts(node: Any, key: str) -> list[dict]:
    """A normalizer / pre-tokenizer and, for a Sequence, its members, flattened."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [p for child in node.get(key, []) for p in _parts(child, key)]
    return [node]


def _keeps_length(normalizer: dict) -> bool:
    kind = normalizer.get("type")
    if kind == "Replace":  # Llama-2 style " " -> "\u2581": safe unless it replaces by something shorter
        pattern = normalizer.get("pattern", {})
        return "String" in pattern and len(normalizer.get("content", "")) >= len(pattern["String"])
    return kind in ("NFD", "NFKD", "Lowercase", "Prepend")  # never shorten text (NFC/NFKC compose)


def _keeps_chars(pre_tokenizer: dict) -> bool:
    kind = pre_tokenizer.get("type")
    if kind in ("Split", "Punctuation"):
        return pre_tokenizer.get("behavior") != "Removed"
    return kind in ("ByteLevel", "Metaspace", "Digits")  # Whitespace* drop characters


def max_chars_per_token(tokenizer: Any) -> Optional[int]:
    """The most characters of input text one token can stand for: the longest string in the
    vocabulary, when every step of the tokenizer keeps or lengthens the text (byte-level or
    byte-fallback BPE; Llama, Mistral, GPT-style). None when that cannot be shown: a slow
    tokenizer, NFC composition (Qwen), whitespace-dropping pre-tokenizers, fused unknowns."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # an exotic tokenizer: no bound rather than a wrong one
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
        return None
    if not all(_keeps_length(n) for n in _parts(spec.get("normalizer"), "normalizers")):
        return None
    if not all(_keeps_chars(p) for p in _parts(spec.get("pre_tokenizer"), "pretokenizers")):
        return None
    return max((len(t) for t in tokenizer.get_vocab()), default=1)
