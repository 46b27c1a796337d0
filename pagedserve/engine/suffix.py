"""Suffix decoding (vLLM's speculative method "suffix"; Oliaro et al. 2024,
arxiv.org/abs/2411.04975): model-free drafts matched against the request's own prompt and
output and against the outputs of requests that finished before it, so that repetitive work
(agent loops, code edits, RL rollouts, the same question asked again) drafts long runs.

Each step a request's longest suffix (up to `suffix_decoding_max_tree_depth` tokens) that
occurred before is found, among occurrences located by its last two tokens. The draft follows
those occurrences: at each position the token most of them continue with, while the share of
occurrences that agree with the whole draft so far stays at least
`suffix_decoding_min_token_prob`, for at most `suffix_decoding_max_spec_factor` times the
match's length (and num_speculative_tokens) tokens: the number of drafts adapts to how much
is known. The finished requests kept are the last `suffix_decoding_max_cached_requests`.

This is pagedserve's own Python form of the method (vLLM calls Arctic Inference's C++ suffix
trees): a bigram index to candidate positions, at most CANDIDATES of them per bigram (the most
recent) in the request and as many in the finished outputs, so that a step's host work stays
bounded; it grows with the running requests (disable_by_batch_size caps that)."""

from __future__ import annotations

from array import array
from collections import Counter, OrderedDict, deque
from typing import Optional

from pagedserve.engine.ngram import NgramProposer
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.spec_config import SpeculativeConfig

CANDIDATES = 32  # occurrences of a bigram looked at, in the request and in the finished outputs (the latest)
_DONE = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)


class _Seq:
    """One token sequence with a bigram index: (a, b) -> positions of b (ascending)."""

    def __init__(self) -> None:
        self.toks = array("i")
        self.index: dict[tuple[int, int], list[int]] = {}

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.toks.append(t)
            n = len(self.toks)
            if n >= 2:
                self.index.setdefault((self.toks[n - 2], t), []).append(n - 1)


class SuffixProposer(NgramProposer):
    def __init__(self, cfg: SpeculativeConfig) -> None:
        super().__init__(cfg)
        self._local: dict[str, tuple[Request, _Seq]] = {}
        # Finished requests' outputs by arrival order, and the bigram index over them:
        # (a, b) -> [(serial, position of b)], the latest CANDIDATES.
        self._outputs: OrderedDict[int, array] = OrderedDict()
        self._index: dict[tuple[int, int], deque] = {}
        self._serial = 0

    # ---- the requests' lifecycles -------------------------------------------------------
    def forget(self, request_id: str) -> None:
        self._local.pop(request_id, None)

    def observe_finished(self, req: Request) -> None:
        """A request that ended (the scheduler calls this as it lets one go): its output joins
        the corpus if it ran to a stop or its length; an aborted one's does not."""
        if req.status in _DONE and self.cfg.suffix_decoding_max_cached_requests and len(req.output_token_ids) > 1:
            self._remember(req.output_token_ids)

    def _remember(self, tokens: list[int]) -> None:
        serial, self._serial = self._serial, self._serial + 1
        self._outputs[serial] = array("i", tokens)
        for i in range(1, len(tokens)):
            self._index.setdefault((tokens[i - 1], tokens[i]), deque(maxlen=CANDIDATES)).append((serial, i))
        while len(self._outputs) > self.cfg.suffix_decoding_max_cached_requests:
            self._outputs.popitem(last=False)  # (its index entries are skipped, then pushed out)

    def _seq(self, req: Request) -> _Seq:
        _, seq = self._local.get(req.request_id, (req, None))
        if seq is None:
            seq = _Seq()
        toks = req.all_token_ids
        if len(seq.toks) < len(toks):
            seq.extend(toks[len(seq.toks):])
        self._local[req.request_id] = (req, seq)
        return seq

    # ---- drafting -----------------------------------------------------------------------
    def propose(self, req: Request, max_tokens: int) -> list[int]:
        cfg = self.cfg
        k = min(cfg.num_speculative_tokens, max_tokens)
        seq = self._seq(req).toks
        n = len(seq)
        if k <= 0 or n < 2:
            return []
        key = (seq[n - 2], seq[n - 1])
        depth = min(cfg.suffix_decoding_max_tree_depth, n)
        # Occurrences as (sequence, index of the token after the matched tail): the request's
        # own (not its tail itself), then the finished outputs'.
        own = self._local[req.request_id][1].index.get(key, [])[-CANDIDATES - 1:]
        found: list[tuple[array, int]] = [(seq, p + 1) for p in own if p < n - 1]
        for serial, p in self._index.get(key, ()):
            out = self._outputs.get(serial)
            if out is not None and p + 1 < len(out):
                found.append((out, p + 1))
        best, matches = 0, []
        for toks, nxt in found:
            m = _match(seq, toks, nxt, depth)
            if m > best:
                best, matches = m, [(toks, nxt)]
            elif m == best:
                matches.append((toks, nxt))
        if not matches:
            return []
        return _follow(matches, min(k, max(1, int(cfg.suffix_decoding_max_spec_factor * best))),
                       cfg.suffix_decoding_min_token_prob)


def _match(seq: array, toks: array, nxt: int, depth: int) -> int:
    """How many of seq's last tokens (at most depth) end toks just before index nxt."""
    n, m = len(seq), 0
    while m < depth and m < nxt and toks[nxt - 1 - m] == seq[n - 1 - m]:
        m += 1
    return m


def _follow(matches: list[tuple[array, int]], limit: int, min_prob: float) -> list[int]:
    """The draft the occurrences agree on: each position's most common next token, while the
    occurrences that agree with the whole draft stay at least min_prob of them all."""
    draft: list[int] = []
    live, total = matches, len(matches)
    while len(draft) < limit:
        counts = Counter(toks[i] for toks, i in live if i < len(toks))
        if not counts:
            break
        tok, c = counts.most_common(1)[0]
        if c / total < min_prob:
            break
        draft.append(tok)
        live = [(toks, i + 1) for toks, i in live if i < len(toks) and toks[i] == tok]
    return draft


def make_proposer(cfg: SpeculativeConfig) -> Optional[NgramProposer]:
    """The model-free proposer for cfg's method (None for methods with a model)."""
    return {"ngram": NgramProposer, "suffix": SuffixProposer}.get(cfg.method, lambda _: None)(cfg)
