"""Structured outputs with xgrammar (vLLM's default backend): constraints compile once per
distinct spec against the tokenizer's vocabulary (xgrammar caches them), and each request
gets a matcher that says, at every step, which tokens keep its output inside the grammar
(a bitmask over the model's vocabulary, applied to the logits before sampling), and takes
each sampled token.

xgrammar is imported at first use: an engine that never sees a constrained request does
not need it installed."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch

from pagedserve.errors import ParamError
from pagedserve.structured_outputs import FIELD, StructuredOutputsParams

CACHE_BYTES = 256 << 20  # xgrammar's cache of compiled grammars
# xgrammar's errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes "Check failed: ... is false: ".
_NOISE = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s+(Check failed:.*? is false:\s*)?")


def bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one tokenizer and model vocabulary. Thread-safe
    (the server compiles in its grammar thread to check a request, the engine again, from
    xgrammar's cache, when it adds it)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _xgr(self) -> Any:
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar as xgr
                except ImportError:
                    raise ParamError(FIELD, "structured outputs need the xgrammar package "
                                     "(pip install xgrammar).") from None
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)
                # A bounded cache: the server compiles each request's grammar to check it, and
                # the engine takes it from here when it adds the request.
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_limit_bytes=CACHE_BYTES)
            return self._compiler

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The CompiledGrammar of a constraint; a ParamError naming the request field it came
        from if it is not valid (a bad schema, regex or grammar)."""
        c = self._xgr()
        kind = params.kind
        try:
            if kind == "json":
                return c.compile_json_schema(params.json, any_whitespace=not params.disable_any_whitespace)
            if kind == "json_object":  # an object, as OpenAI's json_object promises (not any JSON value)
                return c.compile_json_schema('{"type": "object"}', any_whitespace=not params.disable_any_whitespace)
            if kind == "regex":
                return c.compile_regex(params.regex)
            if kind == "choice":  # EBNF string literals take JSON's escapes
                return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in params.choice))
            if kind == "structural_tag":
                return _compile_structural_tag(c, params.structural_tag)
            return c.compile_grammar(params.grammar)
        except ParamError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError / ValueError with a parser message
            msg = _NOISE.sub("", str(e).strip()).strip()
            raise ParamError(params.source, f"{params.source}: invalid {kind}: {msg}") from None

    def matcher(self, compiled: Any, think: Union["ThinkGate", "HarmonyGate", None] = None) -> "GrammarState":
        """A fresh matcher for one request on a grammar from `compile`; `think`: how the grammar
        waits for the model's reasoning (None: it applies from the first token)."""
        import xgrammar as xgr

        # Without a stop token the matcher ends itself when the grammar is complete.
        return GrammarState(xgr.GrammarMatcher(compiled, terminate_without_stop_token=not self.stop_token_ids),
                            think)


@dataclass(frozen=True)
class ThinkGate:
    """The single-token `<think>` / `</think>` of a reasoning model. start None: the request is
    reasoning from its first token (deepseek_r1), and the grammar waits for `end`. start set
    (qwen3): the first token decides; `start` there opens reasoning, anything else is the
    grammar's."""

    end: int
    start: Optional[int] = None


@dataclass(frozen=True)
class HarmonyGate:
    """GPT-OSS's harmony messages (openai_gptoss): the grammar waits for the body of a `final`
    message, and opens at the `<|message|>` of a header `<|channel|>final...`. Markers are
    single special tokens; `final` the ids of the channel name."""

    channel: int
    message: int
    ends: frozenset[int]  # <|end|>, <|return|>, <|call|>: a message's body is over
    final: tuple[int, ...]

    def walk(self, tokens: list[int]) -> "HarmonyWalker":
        walker = HarmonyWalker(self)
        for t in tokens:
            walker.accept(t)
        return walker


class HarmonyWalker:
    """One sequence's place in harmony's markers: whether it is inside a final message's body."""

    def __init__(self, gate: HarmonyGate) -> None:
        self.gate = gate
        self.header: Optional[list[int]] = None  # the tokens after <|channel|>, up to <|message|>
        self.open = False

    def accept(self, token: int) -> bool:
        """Take one token; whether the final message's body has begun."""
        g = self.gate
        if token == g.channel:
            self.header = []
        elif token == g.message:
            self.open = self.header is not None and tuple(self.header[:len(g.final)]) == g.final
            self.header = None
        elif token in g.ends:
            self.open, self.header = False, None
        elif self.header is not None and len(self.header) < len(g.final):
            self.header.append(token)
        return self.open


class GrammarState:
    """One request's position in its grammar. The scheduler feeds it each token that lands;
    the sampler asks it for the next step's allowed tokens. While the model is reasoning
    (a reasoning parser is set and `</think>` has not come yet) the grammar waits: no mask,
    and tokens pass it by."""

    def __init__(self, matcher: Any, think: Union[ThinkGate, HarmonyGate, None] = None) -> None:
        self._matcher = matcher
        self._harmony = HarmonyWalker(think) if isinstance(think, HarmonyGate) else None
        if isinstance(think, HarmonyGate):
            think = None
        self._waiting = self._harmony is not None or (think is not None and think.start is None)  # for </think>
        self._open = think.start if think is not None else None  # first token still to decide
        self._end = think.end if think is not None else None

    @property
    def active(self) -> bool:
        """Whether the grammar masks the next token."""
        return not self._waiting

    def accept(self, token: int) -> bool:
        """Take a sampled token; False if the grammar does not allow it (the request must end)."""
        token = int(token)
        if self._open is not None:
            opened, self._open = token == self._open, None
            if opened:
                self._waiting = True
                return True
        if self._waiting and self._harmony is not None:
            self._waiting = not self._harmony.accept(token)  # the final message's body: the grammar's
            return True
        if self._waiting:
            self._waiting = token != self._end  # reasoning done: the grammar starts with the next token
            return True
        return bool(self._matcher.accept_token(token))

    @property
    def speculates(self) -> bool:
        """Whether drafts may run: the grammar masks every token from here on (no reasoning
        or opening to wait for), so a draft row's mask is the matcher's after the drafts
        before it."""
        return not self._waiting and self._open is None

    def valid_prefix(self, drafts: list[int]) -> int:
        """How many leading drafts the grammar takes (its state is left unchanged)."""
        n = 0
        for t in drafts:
            if self._matcher.is_terminated() or not self._matcher.accept_token(int(t)):
                break
            n += 1
        if n:
            self._matcher.rollback(n)
        return n

    def fill_bitmask_after(self, drafts: list[int], bitmask: torch.Tensor, row: int) -> None:
        """fill_bitmask as if `drafts` had been taken (the state is left unchanged). Past a
        draft the grammar refuses, the row is left allowing everything: that draft falls at
        its own row, and the rows after it are discarded."""
        n = self.valid_prefix(drafts)
        if n < len(drafts):
            bitmask[row] = -1
            return
        for t in drafts:
            self._matcher.accept_token(int(t))
        if not self._matcher.is_terminated():
            self._matcher.fill_next_token_bitmask(bitmask, row)
        self._matcher.rollback(len(drafts))

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token taken: nothing may follow."""
        return bool(self._matcher.is_terminated())

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 words, bit t % 32 of word
        t // 32 set for token t)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)
        self.allow_opening(bitmask, row)

    def allow_opening(self, bitmask: torch.Tensor, row: int) -> None:
        """At the first token of a qwen3-style request, `<think>` is allowed besides the grammar."""
        if self._open is not None:
            word, bit = divmod(self._open, 32)
            bitmask[row, word] |= (1 << bit) - (1 << 32 if bit == 31 else 0)  # int32 words


_BATCH: list = []  # one xgrammar BatchGrammarMatcher, made at first use


def fill_bitmasks(rows: list[tuple[int, GrammarState]], bitmask: torch.Tensor) -> None:
    """fill_bitmask for several requests at once: xgrammar spreads them over threads (a
    JSON grammar's mask takes tens of microseconds per row; a batch of 64 adds up)."""
    if len(rows) > 1:
        import xgrammar as xgr

        if hasattr(xgr, "BatchGrammarMatcher"):  # xgrammar >= 0.1.24
            if not _BATCH:
                _BATCH.append(xgr.BatchGrammarMatcher())
            _BATCH[0].batch_fill_next_token_bitmask([g._matcher for _, g in rows], bitmask,
                                                    [r for r, _ in rows])
            for row, g in rows:
                g.allow_opening(bitmask, row)
            return
    for row, g in rows:
        g.fill_bitmask(bitmask, row)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[S, words] int32 -> [S, vocab_size] bool (True: allowed), on bitmask's device."""
    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A host bitmask with every token allowed (rows without a grammar stay so)."""
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)


def _compile_structural_tag(compiler: Any, text: str) -> Any:
    """vLLM's structural tag: {"structures": [{"begin", "schema", "end"}], "triggers": [...]} (free
    text until a trigger, then one of the structures: begin, a JSON value of its schema, end),
    or xgrammar's own format ({"type": "structural_tag", "format": ...}) as it is."""
    import xgrammar as xgr

    try:
        tag = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(tag, dict):
        raise ValueError("a structural tag is a JSON object")
    if "structures" not in tag:
        return compiler.compile_structural_tag(text)
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not structures or not isinstance(triggers, list) or not triggers:
        raise ValueError("structures and triggers must be non-empty lists")
    items = []
    for s in structures:
        if not isinstance(s, dict) or not {"begin", "schema", "end"} <= set(s):
            raise ValueError("each structure needs begin, schema and end")
        schema = s["schema"] if isinstance(s["schema"], str) else json.dumps(s["schema"])
        items.append(xgr.StructuralTagItem(begin=s["begin"], schema=schema, end=s["end"]))
    return compiler.compile_structural_tag(items, triggers)
