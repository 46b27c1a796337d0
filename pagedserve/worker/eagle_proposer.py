"""Speculative decoding with an EAGLE head (model/eagle.py; vLLM's methods "eagle" and
"eagle3") or the target's own multi-token-prediction layer (model/mtp.py; "mtp"): the head
drafts from the target's hidden states as well as its tokens.

The head's KV at position p is computed from (token p + 1, the target's feature at p), so it
can only be written once the target has computed p and the token after p is known. Each
target step hands its rows' features to the proposer (`keep_features`, on the device, nothing
read back); they wait per request until the head catches up over them: when the request next
drafts, or, for a request not drafting (a prompt in chunks, a batch above
disable_by_batch_size), once CATCH_UP_ROWS of them are waiting (`behind`), so they never pile
up. Draft 1 comes from the catch-up's last row (position n - 2 of a request of n tokens, the
last token's feature being not yet computed); draft j + 1 from a pass over (draft j, the
head's own output feature) at position n - 2 + j.

Only positions computed from the target's features count as caught up: the drafts' own
positions are computed again from the verified features at the next catch-up. Positions a
request took from the prefix cache have no features here: their head KV is what the request
that computed them wrote (the same tokens and features, where it caught up). Drafts are
chosen as the draft model's are (argmax, or drawn under the request's sampling parameters and
verified by rejection sampling), so the output is exactly the target's either way; the head
only decides how many drafts stand."""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from pagedserve.engine.request import Request
from pagedserve.model.eagle import load_eagle
from pagedserve.model.mtp import MTP_METHODS, load_mtp
from pagedserve.model.speculators import draft_config
from pagedserve.worker.cuda_graphs import DecodeGraphRunner, pad_uniform
from pagedserve.worker.device_io import to_device
from pagedserve.worker.draft_model import DraftModelProposer, pass_layout, pass_metadata
from pagedserve.worker.sampler import Sampler
from pagedserve.worker.sampling_state import SamplingStates

CATCH_UP_ROWS = 64  # features a request not drafting may have waiting before the head takes them


class EagleProposer(DraftModelProposer):
    """Owned by the model runner, beside the target model it reads."""

    def __init__(self, config: Any, backend: Any, sampler: Sampler, sampling_states: SamplingStates,
                 target: torch.nn.Module) -> None:
        spec = self._settings(config, sampler, sampling_states)
        if spec.method in MTP_METHODS:  # the target checkpoint's own multi-token-prediction layer
            self.model = load_mtp(config.model, target.config, target, config.dtype, config.device,
                                  config.max_model_len, dummy=config.dummy_weights, seed=config.seed)
        else:
            self.model = load_eagle(spec.model, draft_config(spec.model), spec.method, target, config.dtype,
                                    config.device, config.max_model_len, dummy=config.dummy_weights,
                                    seed=config.seed)
        self.vocab_size = self.model.vocab_size
        self.target_hidden = int(target.config.hidden_size)
        self.max_rows = config.max_num_seqs
        self._wire(backend)
        self._held: dict[str, int] = {}  # positions below it: head KV from the target's features
        # Features waiting, per request: (first position, [rows, hidden]) segments in order.
        self._feats: dict[str, list[tuple[int, torch.Tensor]]] = {}
        # CUDA graphs (make_graphs): one-token passes (self.graphs), catch-up passes of up to
        # 1 + k tokens a request, and the static feature rows both read.
        self.catch_graphs: Optional[DecodeGraphRunner] = None
        self._feat_in: Optional[torch.Tensor] = None

    def allocate_kv_cache(self, num_blocks: int) -> None:
        super().allocate_kv_cache(num_blocks)
        self._feats.clear()

    def forget(self, request_id: str) -> None:
        super().forget(request_id)
        self._feats.pop(request_id, None)

    # ---- the target's features ---------------------------------------------------------
    def keep_features(self, order: list, qsl: list[int], hidden: torch.Tensor,
                      padded_rows: Optional[np.ndarray] = None) -> torch.Tensor:
        """After a target forward over the scheduled requests `order` (rows qsl[i]:qsl[i+1],
        or padded_rows[those] in a padded layout): keep each speculating request's features;
        returns the target's own hidden states (EAGLE-3's features are columns after them)."""
        h = self.target_hidden
        own = hidden[:, :h] if hidden.shape[1] > h else hidden
        keep = [i for i, s in enumerate(order) if s.request.speculates]
        if not keep:
            return own
        rows = np.concatenate([np.arange(qsl[i], qsl[i + 1]) for i in keep])
        if padded_rows is not None:
            rows = padded_rows[rows]
        # (a gather, so that graph replays' static outputs can be overwritten after it)
        picked = hidden[to_device(rows, torch.long, hidden.device)]
        feats = self.model.combine(picked[:, h:]) if self.model.version == 3 else picked
        at = 0
        for i in keep:
            s = order[i]
            n = qsl[i + 1] - qsl[i]
            self._add(s.request.request_id, s.start, feats[at:at + n])
            at += n
        return own

    def _add(self, rid: str, start: int, feats: torch.Tensor) -> None:
        segs = [(a, t[:max(0, start - a)]) for a, t in self._feats.get(rid, []) if a < start]
        segs.append((start, feats))
        self._feats[rid] = segs

    def _feature_end(self, rid: str) -> tuple[int, int]:
        segs = self._feats.get(rid)
        if not segs:
            return 0, 0
        return segs[0][0], segs[-1][0] + len(segs[-1][1])

    def _features(self, rid: str, a: int, b: int) -> torch.Tensor:
        """[b - a, hidden] the features of positions [a, b) (zeros where none is kept)."""
        parts, at = [], a
        for s, t in self._feats.get(rid, []):
            lo, hi = max(at, s), min(b, s + len(t))
            if lo >= hi:
                continue
            if lo > at:
                parts.append(t.new_zeros((lo - at, t.shape[1])))
            parts.append(t[lo - s:hi - s])
            at = hi
        if at < b:
            parts.append(torch.zeros((b - at, self.model.config.hidden_size), dtype=self._dtype(), device=self.device))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _dtype(self) -> torch.dtype:
        return self.model.layers[0].post_attention_layernorm.weight.dtype

    def _trim(self, rid: str, held: int) -> None:
        """Features below held - 1 are never read again (a catch-up starts at most one
        position below what it holds, to draft from the last)."""
        keep_from = held - 1
        segs = []
        for s, t in self._feats.get(rid, []):
            if s + len(t) <= keep_from:
                continue
            segs.append((s, t) if s >= keep_from else (keep_from, t[keep_from - s:]))
        self._feats[rid] = segs

    def behind(self, req: Request) -> bool:
        """Whether this request, not drafting this step, should catch up now."""
        _, end = self._feature_end(req.request_id)
        return end - self._held.get(req.request_id, 0) >= CATCH_UP_ROWS

    # ---- drafting ----------------------------------------------------------------------
    def propose_batch(self, items: list[tuple[Request, list[int], int]]) -> dict[str, list[int]]:
        """items: (request, its block ids, k): k drafts for a decoding request (its slots for
        1 + k positions allocated), or 0 to catch up only. Returns k drafts a request."""
        if not items:
            return {}
        dev = self.device
        reqs = [(r, blocks, k, r.all_token_ids) for r, blocks, k in items]
        kmax = max(k for _, _, k, _ in reqs)
        spans = []  # per request: catch-up positions [a, b)
        for r, _, k, toks in reqs:
            rid, n = r.request_id, len(toks)
            first, end = self._feature_end(rid)
            held = self._held.get(rid, 0)
            b = min(n - 1, end)
            a = max(held, first)
            if k:  # its first draft follows the last token: the span ends at position n - 2
                b = n - 1
                a = min(a, n - 2)
            spans.append([a, b])
        drafts = torch.zeros((len(reqs), max(kmax, 1)), dtype=torch.long, device=dev)
        feature = torch.zeros((len(reqs), self.model.config.hidden_size), dtype=self._dtype(), device=dev)
        probs: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            # Catch up, at most `chunk` tokens a pass; drafting requests' last rows give draft 1.
            todo = [list(sp) for sp in spans]
            while True:
                rows, ends, budget = [], [], self.chunk
                for i, (a, b) in enumerate(todo):
                    if a < b and budget > 0:
                        m = min(b - a, budget)
                        r, blocks, k, toks = reqs[i]
                        if a + m == b and k:
                            ends.append((len(rows), i))
                        rows.append((blocks, a, toks[a + 1:a + m + 1], self._features(r.request_id, a, a + m)))
                        budget -= m
                        todo[i][0] = a + m
                if not rows:
                    break
                logits_in, out = self._pass(rows)
                if ends:
                    idx = to_device([a for a, _ in ends], torch.long, dev)
                    chosen = [i for _, i in ends]
                    which = to_device(chosen, torch.long, dev)
                    feature[which] = out[idx]
                    drafts[which, 0] = self._choose(self.model.compute_logits(logits_in[idx]), reqs, chosen, 0, probs)
            for j in range(1, kmax):
                live = [i for i, (_, _, k, _) in enumerate(reqs) if k > j]
                sel = to_device(live, torch.long, dev)
                rows = [(reqs[i][1], len(reqs[i][3]) - 2 + j, None, feature[i:i + 1]) for i in live]
                logits_in, out = self._pass(rows, drafts[sel, j - 1], feature[sel])
                feature[sel] = out
                drafts[sel, j] = self._choose(self.model.compute_logits(logits_in), reqs, live, j, probs)
            host = drafts.tolist() if kmax else []
        result = {}
        for i, ((r, _, k, _), (_, b)) in enumerate(zip(reqs, spans)):
            rid = r.request_id
            held = max(self._held.get(rid, 0), min(b, self._feature_end(rid)[1]))  # (real features only)
            self._held[rid] = held
            self._trim(rid, held)
            result[rid] = host[i][:k] if k else []
            if i in probs:
                self._probs[rid] = probs[i][:k]
        return result

    # ---- CUDA graphs ----------------------------------------------------------------------
    def make_graphs(self, make: Callable[[Callable, int], Optional[DecodeGraphRunner]]) -> list[DecodeGraphRunner]:
        """Graph runners of the head's passes, made by `make(model_fn, query_len)` (the model
        runner's make_graph_runner): one-token passes (drafts 2..k) and catch-up passes of up
        to 1 + k tokens a request (after a verification step). Their features go through a
        static buffer the graphs read. Returns the runners to capture."""
        q = 1 + self.cfg.num_speculative_tokens
        rows = self.max_rows * q
        self._feat_in = torch.zeros((rows, self.model.config.hidden_size), dtype=self._dtype(), device=self.device)
        self.graphs = make(self._graph_forward, 1)
        self.catch_graphs = make(self._graph_forward, q)
        return [g for g in (self.catch_graphs, self.graphs) if g is not None]

    def _graph_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor:
        normed, out = self.model(input_ids, positions, meta, self._feat_in[:len(input_ids)])
        return torch.cat([normed, out], dim=-1)

    def _split(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.config.hidden_size
        return hidden[:, :h], hidden[:, h:]

    def _graph_pass(self, rows: list, ids_t: torch.Tensor, feats_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One-token rows (in order) through the graphs; tokens and features stay on the device."""
        pos, slots, seq_lens, _, table = pass_layout([(r[0], r[1], 1) for r in rows], self.block_size)
        n = len(rows)
        self._feat_in[:n].copy_(feats_t)
        hidden = self.graphs.run(np.zeros(n, dtype=np.int64), np.concatenate(pos), np.concatenate(slots),
                                 np.asarray(seq_lens, dtype=np.int32), table, (None, ids_t))
        return self._split(hidden)

    def _catch_graph_pass(self, rows: list, lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Catch-up rows of 1 to q tokens each through the graphs of q rows a request."""
        dev = self.device
        pos, slots, seq_lens, qsl, table = pass_layout([(r[0], r[1], n) for r, n in zip(rows, lens)],
                                                       self.block_size)
        ids = np.asarray([t for r in rows for t in r[2]], dtype=np.int64)
        ids, pos, slots, seq_lens, dst = pad_uniform(self.catch_graphs.query_len, qsl, ids, np.concatenate(pos),
                                                     np.concatenate(slots), seq_lens)
        feats = torch.cat([r[3] for r in rows]) if len(rows) > 1 else rows[0][3]
        self._feat_in.index_copy_(0, to_device(dst, torch.long, dev), feats)
        hidden = self.catch_graphs.run(ids, pos, slots, seq_lens, table)
        return self._split(hidden[to_device(dst[np.asarray(qsl[1:]) - 1], torch.long, dev)])

    def _pass(self, rows: list, ids_t: Optional[torch.Tensor] = None,
              feats_t: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One head pass over rows of (block ids, first position, tokens, features), or of
        one token each with the tokens in ids_t and the features in feats_t (in row order):
        each row's last (LM-head input, output feature), in the rows' order. Through the
        graphs where they hold the pass."""
        dev = self.device
        lens = [1 if ids_t is not None else len(t) for _, _, t, _ in rows]
        if ids_t is not None and self.graphs is not None and len(rows) <= self.graphs.max_size:
            return self._graph_pass(rows, ids_t, feats_t)
        catch = self.catch_graphs
        if ids_t is None and catch is not None and max(lens) <= catch.query_len and len(rows) <= catch.max_size:
            return self._catch_graph_pass(rows, lens)
        order = sorted(range(len(rows)), key=lambda i: lens[i] != 1)  # one-token rows first
        pos, slots, seq_lens, qsl, table = pass_layout([(rows[i][0], rows[i][1], lens[i]) for i in order],
                                                       self.block_size)
        meta = pass_metadata(slots, seq_lens, qsl, table, self.block_size, dev)
        if ids_t is None:
            ids_t = to_device([t for i in order for t in rows[i][2]], torch.int64, dev)
            feats_t = torch.cat([rows[i][3] for i in order]) if len(order) > 1 else rows[0][3]
        normed, out = self.model(ids_t, to_device(np.concatenate(pos), torch.int64, dev), meta, feats_t)
        last = to_device(qsl[1:], torch.long, dev) - 1
        normed, out = normed[last], out[last]
        if order == sorted(order):
            return normed, out
        back = [0] * len(order)
        for r, i in enumerate(order):
            back[i] = r
        back_t = to_device(back, torch.long, dev)
        return normed[back_t], out[back_t]
