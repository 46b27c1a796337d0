"""Speculative decoding with a Gemma 4 assistant (model/gemma4_assistant.py): given as a draft
model (`{"model": ASSISTANT_DIR, "num_speculative_tokens": k}`), it drafts from the target's
hidden states as an EAGLE head does (the feature store of worker/eagle_proposer.py), but it has
no KV of its own, so there is nothing to catch up: each draft is one pass of one row a
request, at position n - 1 over the target's keys [0, n - 1)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from pagedserve.engine.request import Request
from pagedserve.model.gemma4_assistant import load_gemma4_assistant
from pagedserve.worker.cuda_graphs import DecodeGraphRunner
from pagedserve.worker.device_io import to_device
from pagedserve.worker.draft_model import pass_layout, pass_metadata
from pagedserve.worker.eagle_proposer import EagleProposer
from pagedserve.worker.sampler import Sampler
from pagedserve.worker.sampling_state import SamplingStates


class AssistantProposer(EagleProposer):
    def __init__(self, config: Any, backend: Any, sampler: Sampler, sampling_states: SamplingStates,
                 target: torch.nn.Module) -> None:
        spec = self._settings(config, sampler, sampling_states)
        self.model = load_gemma4_assistant(spec.model, target, config.dtype, config.device, config.max_model_len,
                                           dummy=config.dummy_weights, seed=config.seed)
        self.vocab_size = self.model.vocab_size
        self.target_hidden = int(target.config.hidden_size)
        self.max_rows = config.max_num_seqs
        self._wire(backend)
        self._held: dict[str, int] = {}
        self._feats: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self.catch_graphs: Optional[DecodeGraphRunner] = None
        self._feat_in: Optional[torch.Tensor] = None

    def kv_block_bytes(self) -> int:
        return 0

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._feats.clear()

    def _dtype(self) -> torch.dtype:
        return self.model.pre_projection.weight.dtype

    def behind(self, req: Request) -> bool:
        """Never: only the feature at position n - 2 of a request of n tokens is ever read (the
        row that sampled its last token); those before it are dropped here."""
        self._trim(req.request_id, len(req.all_token_ids) - 1)
        return False

    def _features(self, rid: str, a: int, b: int) -> torch.Tensor:
        parts = [t[a - s:b - s] for s, t in self._feats.get(rid, []) if s <= a and b <= s + len(t)]
        if parts:
            return parts[0]
        return torch.zeros((b - a, self.model.feature_size), dtype=self._dtype(), device=self.device)

    def propose_batch(self, items: list[tuple[Request, list[int], int]]) -> dict[str, list[int]]:
        """k drafts a request (k = 0: none, its features trimmed)."""
        result = {r.request_id: [] for r, _, k in items if not k}
        live = [(r, blocks, k, r.all_token_ids) for r, blocks, k in items if k]
        for r, _, _ in items:  # (rows past n - 2, rejected drafts', are overwritten when computed again)
            self._trim(r.request_id, len(r.all_token_ids) - 1)
        if not live:
            return result
        dev = self.device
        kmax = max(k for _, _, k, _ in live)
        drafts = torch.zeros((len(live), kmax), dtype=torch.long, device=dev)
        probs: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            feats = torch.cat([self._features(r.request_id, len(t) - 2, len(t) - 1) for r, _, _, t in live])
            ids = to_device([t[-1] for _, _, _, t in live], torch.long, dev)
            for j in range(kmax):
                which = [i for i, (_, _, k, _) in enumerate(live) if k > j]
                sel = to_device(which, torch.long, dev)
                rows = [(live[i][1], len(live[i][3])) for i in which]
                normed, out = self._draft_pass(rows, ids[sel] if j else ids, feats[sel] if j else feats)
                if j:
                    feats[sel] = out
                else:
                    feats = out
                drafts[sel, j] = self._choose(self.model.compute_logits(normed), live, which, j, probs)
                ids = drafts[:, j].clone()
            host = drafts.tolist()
        for i, (r, _, k, _) in enumerate(live):
            result[r.request_id] = host[i][:k]
            if i in probs:
                self._probs[r.request_id] = probs[i][:k]
        return result

    def _draft_pass(self, rows: list[tuple[list[int], int]], ids_t: torch.Tensor,
                    feats_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of (block ids, n): a query at position n - 1 over keys [0, n - 1) each (laid out
        as a one-token row at n - 2, whose sequence is n - 1 long, then moved one on for RoPE;
        its slot is never written: the assistant's layers write no KV)."""
        pos, slots, seq_lens, _, table = pass_layout([(b, n - 2, 1) for b, n in rows], self.block_size)
        positions = np.concatenate(pos) + 1
        if self.graphs is not None and len(rows) <= self.graphs.max_size:
            self._feat_in[:len(rows)].copy_(feats_t)
            hidden = self.graphs.run(np.zeros(len(rows), dtype=np.int64), positions, np.concatenate(slots),
                                     np.asarray(seq_lens, dtype=np.int32), table, (None, ids_t))
            return self._split(hidden)
        meta = pass_metadata(slots, seq_lens, list(range(len(rows) + 1)), table, self.block_size, self.device)
        return self.model(ids_t, to_device(positions, torch.int64, self.device), meta, feats_t)

    # ---- CUDA graphs: one-token passes only (nothing to catch up) --------------------------
    def make_graphs(self, make: Callable[[Callable, int], Optional[DecodeGraphRunner]]) -> list[DecodeGraphRunner]:
        self._feat_in = torch.zeros((self.max_rows, self.model.feature_size), dtype=self._dtype(), device=self.device)
        self.graphs = make(self._graph_forward, 1)
        return [g for g in (self.graphs,) if g is not None]

    def _split(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = int(self.model.config.hidden_size)
        return hidden[:, :h], hidden[:, h:]
