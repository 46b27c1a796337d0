"""Per-request sampling state kept on the device between steps (seeded generators, token
counts for penalties, allowed-token masks), and the builder of a step's SamplingBatch.
Token counts are updated incrementally, so a step costs O(new tokens), not O(history)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pagedserve.engine.grammar import fill_bitmasks, new_bitmask
from pagedserve.engine.request import Request
from pagedserve.worker.device_io import to_device
from pagedserve.worker.sampler import SampleGroup, SamplingBatch


@dataclass
class _State:
    generator: Optional[torch.Generator] = None
    output_counts: Optional[torch.Tensor] = None  # [V] float32
    penalty_sub: Optional[torch.Tensor] = None  # [V]: frequency * count + presence * (count > 0)
    seen_mask: Optional[torch.Tensor] = None  # [V] bool: prompt or output token
    num_counted: int = 0  # output tokens already in the tensors above
    allowed_mask: Optional[torch.Tensor] = None  # [V] bool


class SamplingStates:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.states: dict[str, _State] = {}
        self._zeros = torch.zeros(vocab_size, device=device)
        self._false = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self._true = torch.ones(vocab_size, dtype=torch.bool, device=device)

    def drop(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def _state(self, req: Request) -> _State:
        st = self.states.get(req.request_id)
        if st is None:
            st = self.states[req.request_id] = _State()
        return st

    def _penalty_rows(self, req: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen mask, subtractive penalty) of a request, updated at its new tokens only."""
        st = self._state(req)
        p = req.sampling_params
        if st.output_counts is None:
            st.output_counts = torch.zeros(self.vocab_size, device=self.device)
            st.penalty_sub = torch.zeros(self.vocab_size, device=self.device)
            st.seen_mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            if not req.prompt_is_embeds:  # (an embeddings prompt's ids are placeholders, as in transformers)
                st.seen_mask.index_fill_(0, to_device(req.prompt_token_ids, torch.long, self.device), True)
        new = req.output_token_ids[st.num_counted:]
        if new:
            ids = to_device(new, torch.long, self.device)
            st.output_counts.index_put_((ids,), torch.ones(len(new), device=self.device), accumulate=True)
            counts = st.output_counts[ids]
            st.penalty_sub[ids] = p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
            st.seen_mask.index_fill_(0, ids, True)
            st.num_counted += len(new)
        return st.seen_mask, st.penalty_sub

    def _with_drafts(self, req: Request, rows: tuple[torch.Tensor, torch.Tensor],
                     drafts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A request's (seen mask, subtractive penalty) as if `drafts` were output already."""
        p, st = req.sampling_params, self._state(req)
        ids = to_device(drafts, torch.long, self.device)
        counts = st.output_counts.clone()
        counts.index_put_((ids,), torch.ones(len(drafts), device=self.device), accumulate=True)
        sub = rows[1].clone()
        sub[ids] = p.frequency_penalty * counts[ids] + p.presence_penalty * (counts[ids] > 0).float()
        return rows[0].clone().index_fill_(0, ids, True), sub

    def _groups(self, params: list, greedy: list[bool], b: SamplingBatch) -> list[SampleGroup]:
        """The random rows split by sampling path (top-k candidates or the whole vocabulary),
        decided here on the host."""
        rand = [i for i, g in enumerate(greedy) if not g]

        def group(rows: list[int], whole: bool, top_k: bool) -> SampleGroup:
            idx = None if whole else to_device(rows, torch.long, self.device)
            kmax = max(params[i].top_k for i in rows) if top_k else 0
            return SampleGroup(idx, kmax, b.top_p is not None and any(params[i].top_p < 1.0 for i in rows))

        if b.top_k is None:
            return [group(rand, b.all_random, False)]
        with_k = [i for i in rand if params[i].top_k > 0]
        without = [i for i in rand if params[i].top_k <= 0]
        return [group(r, False, k) for r, k in ((with_k, True), (without, False)) if r]

    def build(self, reqs: list[Request], extra: Optional[list[list[int]]] = None) -> SamplingBatch:
        """The batch's per-row tensors. extra[row]: draft tokens that precede the row's
        position (speculative decoding), counted as output tokens by its penalties, its
        min_tokens and its bad words, and taken by its grammar."""
        params = [r.sampling_params for r in reqs]
        dev = self.device
        greedy = [p.is_greedy for p in params]
        all_greedy = all(greedy)
        b = SamplingBatch(  # an all-greedy batch (argmax alone) needs no per-row tensors
            temperature=None if all_greedy else to_device(
                [1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32, dev),
            greedy=None if all_greedy else to_device(greedy, torch.bool, dev),
            all_greedy=all_greedy,
            all_random=not any(greedy),
        )
        if not b.all_greedy:
            if any(p.top_k > 0 for p in params):
                b.top_k = to_device([p.top_k for p in params], torch.long, dev)
            if any(p.top_p < 1.0 for p in params):
                b.top_p = to_device([p.top_p for p in params], torch.float32, dev)
            b.groups = self._groups(params, greedy, b)
            if any(p.min_p > 0.0 for p in params):
                b.min_p = to_device([p.min_p for p in params], torch.float32, dev)
            for row, (r, p) in enumerate(zip(reqs, params)):
                if p.seed is not None and not p.is_greedy:
                    st = self._state(r)
                    if st.generator is None:
                        # Any 64-bit seed (n > 1 children add their index): fold into [0, 2^64).
                        st.generator = torch.Generator(device=dev).manual_seed(p.seed % 2**64)
                    b.generators[row] = st.generator

        if any(p.has_penalties for p in params):
            rows = [self._penalty_rows(r) if p.has_penalties else (self._false, self._zeros)
                    for r, p in zip(reqs, params)]
            if extra is not None:
                rows = [self._with_drafts(r, row, extra[i]) if extra[i] and r.sampling_params.has_penalties else row
                        for i, (r, row) in enumerate(zip(reqs, rows))]
            if any(p.repetition_penalty != 1.0 for p in params):
                b.seen_mask = torch.stack([s for s, _ in rows])
                b.repetition = to_device([p.repetition_penalty for p in params], torch.float32, dev)
            if any(p.frequency_penalty or p.presence_penalty for p in params):
                b.penalty_sub = torch.stack([a for _, a in rows])

        if any(p.allowed_token_ids is not None for p in params):
            rows = []
            for r, p in zip(reqs, params):
                if p.allowed_token_ids is None:
                    rows.append(self._true)
                    continue
                st = self._state(r)
                if st.allowed_mask is None:
                    st.allowed_mask = self._false.clone()
                    st.allowed_mask.index_fill_(0, to_device(p.allowed_token_ids, torch.long, dev), True)
                rows.append(st.allowed_mask)
            b.allowed_mask = torch.stack(rows)

        grammar_rows = [(row, r.grammar) for row, r in enumerate(reqs) if r.grammar is not None and r.grammar.active]
        if grammar_rows:  # the tokens each grammar allows next, as bits; other rows allow all
            words = new_bitmask(len(reqs), self.vocab_size)
            fill_bitmasks([(row, g) for row, g in grammar_rows if not (extra and extra[row])], words)
            for row, g in grammar_rows:
                if extra and extra[row]:  # a speculative row: the grammar after the drafts before it
                    g.fill_bitmask_after(extra[row], words, row)
            b.grammar_bitmask = to_device(words.numpy(), torch.int32, dev)

        ban_rows, ban_cols = [], []
        bias_rows, bias_cols, bias_vals = [], [], []
        for row, r in enumerate(reqs):
            if not r.has_logit_rules:
                continue
            p = r.sampling_params
            drafts = extra[row] if extra is not None else []
            # Output tokens before the one sampled now: those landed, plus any an earlier
            # step still in flight is sampling (async scheduling), plus the row's drafts.
            if r.num_output_tokens + max(r.num_inflight - 1, 0) + len(drafts) < p.min_tokens:  # no stop yet
                stops = set(p.stop_token_ids) | p._eos_token_ids
                ban_rows += [row] * len(stops)
                ban_cols += sorted(stops)
            if p._bad_words_token_ids:
                out = r.output_token_ids + drafts if drafts else r.output_token_ids
                for seq in p._bad_words_token_ids:
                    k = len(seq) - 1
                    if k == 0 or (len(out) >= k and out[-k:] == seq[:-1]):
                        ban_rows.append(row)
                        ban_cols.append(seq[-1])
            if p.logit_bias:
                bias_rows += [row] * len(p.logit_bias)
                bias_cols += list(p.logit_bias)
                bias_vals += list(p.logit_bias.values())
        if ban_rows:
            b.banned = (to_device(ban_rows, torch.long, dev), to_device(ban_cols, torch.long, dev))
        if bias_rows:
            b.bias = (to_device(bias_rows, torch.long, dev), to_device(bias_cols, torch.long, dev),
                      to_device(bias_vals, torch.float32, dev))

        ks = [p.logprobs for p in params if p.logprobs is not None]
        b.num_logprobs = max(ks) if ks else None
        return b
