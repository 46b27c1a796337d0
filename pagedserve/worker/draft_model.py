"""Speculative decoding with a draft model (vLLM's method "draft_model"): a smaller model with
the target's vocabulary drafts k tokens greedily, and the target checks them in one step.

The draft keeps its own KV cache, of the same number of blocks, read through the target's
block tables: a request's draft KV lives in the same block ids as its target KV, so no
second allocator is needed. The draft catches up lazily: when a request next needs drafts,
the draft computes its tokens since the last position it holds (at first, the whole prompt,
in chunks of at most max_num_batched_tokens), then drafts one token a pass. Positions that
held rejected drafts are computed again at the next catch-up.

Its KV is trusted only for positions this request's own draft wrote since it last got its
blocks (a preempted request starts over): a prefix-cache hit or a forked sibling reuses the
target's blocks, not the draft's, and its catch-up writes the draft's entries again (the
same tokens at the same positions, so another request's entries there are unchanged).

A greedy request's drafts are the draft's argmax. A sampled request's are drawn from the
draft's distribution under the request's own temperature, top-k, top-p and min-p (its seeded
generator, if any, draws them), and that distribution goes to the verifier
(worker/spec_verify.py): accepted with probability min(1, q/r), the tokens keep exactly the
target's distribution."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.config import has_state_layers_in
from pagedserve.engine.request import Request
from pagedserve.model.hf_config import load_hf_config
from pagedserve.model.kv_scales import use_kv_scales
from pagedserve.model.loader import load_model
from pagedserve.model.registry import is_encoder_only
from pagedserve.worker import kv_sizing
from pagedserve.worker.cuda_graphs import DecodeGraphRunner
from pagedserve.worker.device_io import to_device
from pagedserve.worker.sampler import Sampler, inverse_cdf
from pagedserve.worker.sampling_state import SamplingStates

logger = logging.getLogger("pagedserve")


def pass_layout(rows: list[tuple[list[int], int, int]], block_size: int) -> tuple[list, list, list, list, np.ndarray]:
    """A draft pass over rows of (block ids, first position, tokens), in that order:
    (positions, slots (arrays a row), seq_lens, query_start_loc, block table)."""
    bs = block_size
    pos, slots, seq_lens, qsl = [], [], [], [0]
    for blocks, start, n in rows:
        p = np.arange(start, start + n)
        pos.append(p)
        slots.append(np.asarray(blocks, dtype=np.int64)[p // bs] * bs + p % bs)
        seq_lens.append(start + n)
        qsl.append(qsl[-1] + n)
    width = -(-max(seq_lens) // bs)
    table = np.zeros((len(rows), width), dtype=np.int32)
    for r, (blocks, _, _) in enumerate(rows):
        table[r, :min(len(blocks), width)] = blocks[:width]
    return pos, slots, seq_lens, qsl, table


def pass_metadata(slots: list, seq_lens: list[int], qsl: list[int], table: np.ndarray, block_size: int,
                  device: torch.device) -> AttentionMetadata:
    """An eager draft pass's attention metadata (rows of one token first)."""
    lens = np.diff(qsl).tolist()
    return AttentionMetadata(
        num_tokens=qsl[-1], num_actual_tokens=qsl[-1], num_reqs=len(seq_lens), num_decodes=lens.count(1),
        slot_mapping=to_device(np.concatenate(slots), torch.int64, device),
        block_tables=to_device(table, torch.int32, device), seq_lens=to_device(seq_lens, torch.int32, device),
        query_start_loc=to_device(qsl, torch.int32, device),
        max_query_len=max(lens), max_seq_len=max(seq_lens),
        seq_lens_cpu=seq_lens, query_start_loc_cpu=qsl, block_size=block_size,
    )


@dataclass
class _Drafted:
    """What the draft's cache holds for a request: its tokens' KV up to `base` (exclusive),
    then the KV of `drafts[:-1]` (the last draft was never fed)."""

    base: int
    drafts: list[int]

    def valid(self, tokens: list[int]) -> int:
        """Positions whose KV is still right now that `tokens` are the request's tokens (never
        the last token: it is fed again, to draft what follows it)."""
        n = 0
        for d in self.drafts[:-1]:
            if self.base + n >= len(tokens) - 1 or tokens[self.base + n] != d:
                break
            n += 1
        return self.base + n


class DraftModelProposer:
    """Owned by the model runner (it holds tensors); the scheduler calls `propose_batch` with
    the block ids it allocated for each request's 1 + k positions."""

    batched = True  # the scheduler allocates the slots first, then asks for all drafts at once

    def __init__(self, config: Any, backend: Any, sampler: Sampler, sampling_states: SamplingStates) -> None:
        spec = self._settings(config, sampler, sampling_states)
        hf = load_hf_config(spec.model)
        if is_encoder_only(hf):
            raise ValueError(f"speculative_config: the draft model {spec.model!r} is an encoder; it must be a "
                             f"decoder (a causal LM).")
        if has_state_layers_in(hf):  # (its drafting passes cannot step a state back)
            raise ValueError(f"speculative_config: the draft model {spec.model!r} has linear-attention / state-space "
                             "layers; a draft model must be a transformer.")
        if int(hf.vocab_size) > config.vocab_size:
            raise ValueError(f"speculative_config: the draft model's vocabulary ({hf.vocab_size}) is larger than the "
                             f"target's ({config.vocab_size}); it must use the target's tokenizer.")
        self.vocab_size = int(hf.vocab_size)
        self.model = load_model(spec.model, hf, config.dtype, config.device, config.max_model_len,
                                quant_kernels=config.attention_backend == "triton", dummy=config.dummy_weights,
                                seed=config.seed)
        self.model.requires_grad_(False)
        self._wire(backend)
        self._held: dict[str, _Drafted] = {}

    def _settings(self, config: Any, sampler: Sampler, sampling_states: SamplingStates) -> Any:
        """What every proposer with a model of its own keeps; returns the speculative config."""
        spec = self.cfg = config.speculative_config
        self.device = config.device
        self.block_size = config.block_size
        self.kv_dtype = config.kv_dtype
        self.chunk = config.max_num_batched_tokens
        # Decode CUDA graphs for passes of one-token rows (most of them: after a step, the
        # catch-up is the new token alone unless every draft stood), set by the runner.
        self.graphs: Optional[DecodeGraphRunner] = None
        # Graphs of two-token rows: the catch-up after a step whose drafts all stood (the last
        # draft and the target's bonus token), beside one-token rows.
        self.pair_graphs: Optional[DecodeGraphRunner] = None
        self.sampler, self.sampling_states = sampler, sampling_states
        # Sampled requests' draft distributions [k, draft vocab], from proposal to verification.
        self._probs: dict[str, torch.Tensor] = {}
        return spec

    def _wire(self, backend: Any) -> None:
        """The model's attention layers on the target's backend (and its KV scales)."""
        self.layers = self.model.attention_layers()
        for layer in self.layers:
            layer.backend = backend
        use_kv_scales(self.layers, self.kv_dtype)
        if backend.name == "triton":  # its fused norm, RoPE and SiLU-and-mul kernels too
            for m in self.model.modules():
                if hasattr(m, "use_triton"):
                    m.use_triton = True
        self._parts = 1 if all(getattr(a, "kv_shared", False) for a in self.layers) else 2

    # ---- KV cache (sized with the target's: runner.kv_block_bytes counts both) ----------
    def kv_block_bytes(self) -> int:
        a = self.layers[0]
        return kv_sizing.block_bytes(len(self.layers), self.block_size, a.num_kv_heads, a.head_dim, self.kv_dtype,
                                     self._parts)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        a = self.layers[0]
        cache = torch.zeros((len(self.layers), self._parts, num_blocks, self.block_size, a.num_kv_heads, a.head_dim),
                            dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(self.layers):
            layer.k_cache, layer.v_cache = cache[i, 0], cache[i, -1]
        self._held.clear()

    def forget(self, request_id: str) -> None:
        """Finished or preempted: its blocks (and the draft KV in them) are gone."""
        self._held.pop(request_id, None)
        self._probs.pop(request_id, None)

    def take_probs(self, scheduled: list, vocab_size: int) -> torch.Tensor:
        """[sum of k, vocab_size] the distributions the drafts of these sampled requests (their
        ScheduledRequests, in order) were drawn from; one-hot rows where none was kept."""
        rows = []
        for sr in scheduled:
            p = self._probs.pop(sr.request.request_id, None)
            if p is None or p.shape[0] != len(sr.drafts):
                p = torch.nn.functional.one_hot(to_device(sr.drafts, torch.long, self.device), vocab_size).float()
            rows.append(torch.nn.functional.pad(p, (0, vocab_size - p.shape[1])))
        return torch.cat(rows)

    # ---- drafting ----------------------------------------------------------------------
    def propose_batch(self, items: list[tuple[Request, list[int], int]]) -> dict[str, list[int]]:
        """items: (request, its block ids, k) for decoding requests whose slots for 1 + k
        positions are allocated. Returns exactly k draft tokens per request (see _choose). The
        drafts stay on the device from pass to pass; one copy to the host at the end."""
        if not items:
            return {}
        dev = self.device
        reqs = [(r, blocks, k, r.all_token_ids) for r, blocks, k in items]
        kmax = max(k for _, _, k, _ in reqs)
        with torch.inference_mode():
            drafts = torch.zeros((len(reqs), kmax), dtype=torch.long, device=dev)
            probs: dict[int, torch.Tensor] = {}  # sampled requests' draft distributions, by index
            # Catch up: every request's tokens since what its draft KV holds, the last included,
            # at most `chunk` tokens a pass; a request's first draft follows its last token.
            todo = []
            for r, _, _, toks in reqs:
                held = self._held.get(r.request_id)
                todo.append([held.valid(toks) if held is not None else 0, len(toks)])
            while True:
                rows, ends, budget = [], [], self.chunk
                for i, (start, end) in enumerate(todo):
                    if start < end and budget > 0:
                        m = min(end - start, budget)
                        if start + m == end:
                            ends.append((len(rows), i))
                        rows.append((reqs[i][1], reqs[i][3][start:start + m], start))
                        budget -= m
                        todo[i][0] = start + m
                if not rows:
                    break
                logits = self._forward(rows)
                if ends:
                    idx = to_device([a for a, _ in ends], torch.long, dev)
                    chosen = [b for _, b in ends]
                    drafts[to_device(chosen, torch.long, dev), 0] = self._choose(logits[idx], reqs, chosen, 0,
                                                                                   probs)
            # Then one token a pass for the requests drafting further.
            for j in range(1, kmax):
                live = [i for i, (_, _, k, _) in enumerate(reqs) if k > j]
                sel = slice(None) if len(live) == len(reqs) else to_device(live, torch.long, dev)
                rows = [(reqs[i][1], 1, len(reqs[i][3]) + j - 1) for i in live]
                drafts[sel, j] = self._choose(self._forward(rows, drafts[sel, j - 1]), reqs, live, j, probs)
            host = drafts.tolist()
        out = {}
        for i, ((r, _, k, toks), d) in enumerate(zip(reqs, host)):
            self._held[r.request_id] = _Drafted(len(toks), d[:k])
            out[r.request_id] = d[:k]
            if i in probs:
                self._probs[r.request_id] = probs[i][:k]
        return out

    def _choose(self, logits: torch.Tensor, reqs: list, which: list[int], j: int,
                probs: dict[int, torch.Tensor]) -> torch.Tensor:
        """Draft j of the requests `which` (indices into reqs) from their logits rows: the
        argmax for greedy requests; for sampled ones a draw from the distribution their
        sampling parameters make of the draft's logits, kept in probs[i][j]."""
        chosen = [reqs[i][0] for i in which]
        if all(r.sampling_params.is_greedy for r in chosen):
            return logits.argmax(dim=-1)
        # The requests' own processing (bias, allowed tokens, penalties without the drafts: any
        # draft distribution keeps the output exact, a closer one only makes more drafts stand),
        # over the target's vocabulary.
        if logits.shape[1] < self.sampling_states.vocab_size:
            logits = torch.nn.functional.pad(logits.float(), (0, self.sampling_states.vocab_size - logits.shape[1]),
                                             value=float("-inf"))
        batch = self.sampling_states.build(chosen)
        dist = self.sampler.probabilities(logits, batch)  # greedy rows: one-hot at the argmax
        for row, i in enumerate(which):
            if not reqs[i][0].sampling_params.is_greedy:
                if i not in probs:
                    probs[i] = dist.new_zeros((reqs[i][2], dist.shape[1]))
                probs[i][j] = dist[row]
        return inverse_cdf(dist, self.sampler.uniforms(batch, len(chosen), dist.device))

    def _forward(self, rows: list[tuple[list[int], Any, int]], ids_t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One draft pass over rows of (block ids, tokens, first position), or of (block ids,
        1, position) with the tokens in `ids_t` on the device: each row's logits after its
        last token, in the rows' order. One-token rows go first in the pass,
        as the backends expect."""
        lens = [len(t) if ids_t is None else 1 for _, t, _ in rows]
        pair = self.pair_graphs
        if pair is not None and not (max(lens) == pair.query_len and len(rows) <= pair.max_size):
            pair = None
        # The pair graphs take rows in any order; the backends want one-token rows first.
        order = list(range(len(rows))) if pair else sorted(range(len(rows)), key=lambda i: lens[i] != 1)
        bs = self.block_size
        ids = [] if ids_t is not None else [t for i in order for t in rows[i][1]]
        pos, slots, seq_lens, qsl, table = pass_layout([(rows[i][0], rows[i][2], lens[i]) for i in order], bs)
        if ids_t is None and self.vocab_size < 1 + max(ids):  # target-only tokens (added specials)
            ids = [t if t < self.vocab_size else 0 for t in ids]  # the draft cannot read them
        if self.graphs is not None and max(lens) == 1 and len(rows) <= self.graphs.max_size:
            host_ids = np.zeros(len(rows), dtype=np.int64) if ids_t is not None else np.asarray(ids, dtype=np.int64)
            hidden = self.graphs.run(host_ids, np.concatenate(pos), np.concatenate(slots),
                                     np.asarray(seq_lens, dtype=np.int32), table,
                                     None if ids_t is None else (None, ids_t))
            return self.model.compute_logits(hidden)  # (one-token rows: the pass's order is the rows')
        dev = self.device
        if pair is not None:
            hidden, dst = pair.run_varlen(np.asarray(ids, dtype=np.int64), np.concatenate(pos), np.concatenate(slots),
                                          seq_lens, qsl, table)
            return self.model.compute_logits(hidden[to_device(dst[np.asarray(qsl[1:]) - 1], torch.long, dev)])
        meta = pass_metadata(slots, seq_lens, qsl, table, bs, dev)
        if ids_t is None:
            ids_t = to_device(ids, torch.int64, dev)
        hidden = self.model(ids_t, to_device(np.concatenate(pos), torch.int64, dev), meta)
        last = hidden[qsl[-1] - 1 : qsl[-1]] if len(order) == 1 else hidden[to_device(qsl[1:], torch.long, dev) - 1]
        logits = self.model.compute_logits(last)
        if order == sorted(order):
            return logits
        back = [0] * len(order)  # rows' order from the pass's
        for r, i in enumerate(order):
            back[i] = r
        return logits[to_device(back, torch.long, dev)]
