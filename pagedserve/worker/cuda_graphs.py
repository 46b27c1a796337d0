"""CUDA graphs for decode-only steps: one captured forward pass per batch-size bucket, replayed
with the step's inputs copied into static buffers. A decode step of 22 layers launches some
300 small kernels; a replay launches them all at once.

A batch of n decode requests runs in the smallest bucket >= n; rows n..bucket-1 are padding:
token 0 at position 0, slot -1 (the KV write skips it), seq_len 0 (attention sees no key and
gives 0). Rows are independent through the model, so padding cannot disturb real rows.

Graphs of a query length q > 1 serve steps whose every request has at most q tokens: the
target's speculative verification (its last token and up to k drafts, q = 1 + k) and the
draft model's catch-up after a step whose drafts all stood (q = 2). Each request gets q rows
(`pad_uniform`): its tokens, then padding tokens after them (slot -1, its last position), and
its seq_len grows by the padding, so each real token still sees exactly the keys up to its
own position (causal: query i of a q-row chunk sees keys [0, seq_len - q + i]). The padding
tokens see keys nobody wrote at this step (finite values of other blocks) and are never read.

Tests: bucket selection, padding and buffer filling on CPU, where the replay path runs
eagerly on the same buffers (`capture=False`); capture and replay proper in the `-m gpu`
tests (passed on an H100)."""

from __future__ import annotations

import bisect
import logging
import time
from typing import Callable, Optional

import numpy as np
import torch

from pagedserve.attention.backend import AttentionMetadata, StateRows

logger = logging.getLogger("pagedserve")

MAX_CAPTURE_SIZE = 512


def graph_sizes(max_num_seqs: int, asked: Optional[list[int]] = None) -> list[int]:
    """The buckets to capture: capture_sizes(max_num_seqs), or vLLM's cuda_graph_sizes (one
    value N: the same shape up to N; several: those), none above max_num_seqs."""
    if not asked:
        return capture_sizes(max_num_seqs)
    if len(asked) == 1:
        return capture_sizes(min(asked[0], max_num_seqs))
    return sorted({s for s in asked if s <= max_num_seqs}) or [1]


def capture_sizes(max_num_seqs: int, limit: int = MAX_CAPTURE_SIZE) -> list[int]:
    """1, 2, 4, 8, then every 8 (vLLM's buckets), up to max_num_seqs, which is always one."""
    cap = min(max_num_seqs, limit)
    sizes = [s for s in (1, 2, 4) if s < cap] + list(range(8, cap, 8))
    return sizes + [cap]


def bucket_for(sizes: list[int], n: int) -> Optional[int]:
    """The smallest captured size that holds n rows; None when n exceeds them all."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def pad_uniform(q: int, qsl: list[int], input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                seq_lens: list[int]) -> tuple[np.ndarray, ...]:
    """A step's flat rows (request i: rows qsl[i]..qsl[i+1], 1 to q of them) laid out q per
    request: (input ids, positions, slots, seq_lens, dst), dst[t] the padded row of flat row t.
    A request's padding rows follow its tokens: token 0 at its last position, slot -1; its
    seq_len grows by the padding, so its real rows keep their causal bounds."""
    qsl_a = np.asarray(qsl, dtype=np.int64)
    lens = np.diff(qsl_a)
    n = len(lens)
    assert n and lens.min() >= 1 and lens.max() <= q
    dst = np.repeat(np.arange(n, dtype=np.int64) * q - qsl_a[:-1], lens) + np.arange(qsl_a[-1])
    ids = np.zeros(n * q, dtype=np.int64)
    ids[dst] = input_ids
    pos = np.repeat(np.asarray(positions)[qsl_a[1:] - 1], q)
    pos[dst] = positions
    out_slots = np.full(n * q, -1, dtype=np.int64)
    out_slots[dst] = slots
    return ids, pos, out_slots, (np.asarray(seq_lens, dtype=np.int64) + q - lens).astype(np.int32), dst


def _header_bytes(tokens: int, reqs: int) -> int:
    return 24 * _padded(tokens) + 4 * _padded(reqs)


def _padded(rows: int) -> int:
    return -(-rows // 16) * 16  # every field starts 128-byte aligned (kernels specialise on alignment)


def _row_fields(header: torch.Tensor, tokens: int, reqs: int) -> tuple[torch.Tensor, ...]:
    """Views into a byte buffer of (input ids, positions, slots) int64, `tokens` each, and
    seq_lens int32, `reqs` of them, one after the other: the four go up in one copy."""
    b = _padded(tokens)
    return (header[: 8 * tokens].view(torch.int64), header[8 * b: 8 * b + 8 * tokens].view(torch.int64),
            header[16 * b: 16 * b + 8 * tokens].view(torch.int64),
            header[24 * b: 24 * b + 4 * reqs].view(torch.int32))


class _Staging:
    """Pinned host copies of the per-step buffers, and the event after their last copy out."""

    def __init__(self, max_batch: int, q: int, table_width: int, pin: bool) -> None:
        self.header = torch.zeros(_header_bytes(max_batch * q, max_batch), dtype=torch.uint8, pin_memory=pin)
        self.ids, self.pos, self.slots, self.lens = _row_fields(self.header, max_batch * q, max_batch)
        self.bt = torch.zeros((max_batch, table_width), dtype=torch.int32, pin_memory=pin)
        # (linear-attention models) each request's state row, and 1 where it continues a state
        self.state_rows = torch.zeros(max_batch, dtype=torch.int64, pin_memory=pin)
        self.state_init = torch.zeros(max_batch, dtype=torch.float32, pin_memory=pin)
        self.copied: Optional[torch.cuda.Event] = None


class DecodeBuffers:
    """The static device tensors every captured graph reads. `fill` copies a step's inputs in
    (through pinned host staging: one copy for the four per-row tensors, which are views of
    one byte buffer, and one for the block tables) and pads the rest of the bucket.

    Two staging sets take turns: with async scheduling step N + 1 is filled while step N's
    copies may still be queued behind step N - 1 on the device; a set is rewritten only after
    the event recorded behind its previous copies (two steps back, long done).

    query_len q: q query rows per request (see the module's docstring); the block tables are
    wide enough for the padded seq_lens, whose extra columns hold earlier steps' block ids
    (or 0): only padding rows read through them."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int, block_size: int, max_model_len: int,
                 device: torch.device, query_len: int = 1, scratch_state_row: Optional[int] = None) -> None:
        self.max_batch, self.block_size, self.max_model_len, self.device = max_batch, block_size, max_model_len, device
        self.query_len = q = query_len
        self._cuda = device.type == "cuda"

        def zeros(shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=device)

        width = max(max_blocks_per_seq, -(-(max_model_len + q - 1) // block_size))
        self._header = zeros(_header_bytes(max_batch * q, max_batch), torch.uint8)
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens = _row_fields(self._header, max_batch * q,
                                                                                       max_batch)
        self.block_tables = zeros((max_batch, width), torch.int32)
        self._staging = [_Staging(max_batch, q, width, self._cuda) for _ in range(2)]
        self._turn = 0
        # q query tokens per request: query_start_loc is always 0, q, 2q, ...
        self.query_start_loc = torch.arange(0, (max_batch + 1) * q, q, dtype=torch.int32, device=device)
        # Linear-attention models: each request's state row and whether it continues it;
        # padding requests read and write `scratch_state_row`, a row no request owns.
        self.scratch_state_row = scratch_state_row
        self.state_rows = zeros(max_batch, torch.int64) if scratch_state_row is not None else None
        self.state_init = zeros(max_batch, torch.float32) if scratch_state_row is not None else None
        self.fill_padding(max_batch)

    def fill(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, seq_lens: np.ndarray,
             block_rows: np.ndarray, bucket: int, states: Optional[tuple[list[int], list[bool]]] = None) -> None:
        """Requests [0, n) from the step (n = len(seq_lens); their n * q token rows, laid out
        by pad_uniform where q > 1; block_rows: [n, <= max_blocks_per_seq]; states: their
        state rows and continue flags, for a linear-attention model), requests [n, bucket)
        padding."""
        n, q = len(seq_lens), self.query_len
        assert n <= bucket <= self.max_batch and len(input_ids) == n * q
        st = self._staging[self._turn]
        self._turn ^= 1
        if st.copied is not None and not st.copied.query():  # done long ago, as a rule
            st.copied.synchronize()
        for host, data, pad, per in ((st.ids, input_ids, 0, q), (st.pos, positions, 0, q), (st.slots, slots, -1, q),
                                     (st.lens, seq_lens, 0, 1)):
            h = host.numpy()
            h[: n * per] = data
            h[n * per: bucket * per] = pad
        st.bt.numpy()[:n, : block_rows.shape[1]] = block_rows  # padding requests' tables are never read
        self._header.copy_(st.header, non_blocking=self._cuda)  # (rows past the bucket: unread)
        if n:
            self.block_tables[:n].copy_(st.bt[:n], non_blocking=self._cuda)
        if self.state_rows is not None:
            rows, init = states if states is not None else ([], [])
            assert len(rows) == n, "a linear-attention model's step needs every request's state row"
            st.state_rows.numpy()[:n], st.state_init.numpy()[:n] = rows, init
            st.state_rows.numpy()[n:bucket], st.state_init.numpy()[n:bucket] = self.scratch_state_row, 0.0
            self.state_rows[:bucket].copy_(st.state_rows[:bucket], non_blocking=self._cuda)
            self.state_init[:bucket].copy_(st.state_init[:bucket], non_blocking=self._cuda)
        if self._cuda:
            st.copied = torch.cuda.Event()
            st.copied.record()

    def fill_padding(self, bucket: int) -> None:
        """Every row padding (used while capturing: the warm-up passes write no KV)."""
        empty = np.zeros(0, dtype=np.int64)
        self.fill(empty, empty, empty, empty, np.zeros((0, 0), dtype=np.int32), bucket)

    def metadata(self, bucket: int) -> AttentionMetadata:
        """Views of the static buffers for one bucket. The host-side fields cannot follow a
        replay, so they are left empty: only backends with `supports_cuda_graphs`, which read
        the device tensors alone, may run on this."""
        q = self.query_len
        states = None
        if self.state_rows is not None:  # (no host copies: the layers mask by state_init on the device)
            # q > 1: every request runs as a verification (its padding tokens too: the runner
            # steps each state back to after its last accepted token).
            states = StateRows(self.state_rows[:bucket], self.state_init[:bucket], [], [], verify=bucket if q > 1 else 0)
        return AttentionMetadata(
            num_tokens=bucket * q, num_actual_tokens=bucket * q, num_reqs=bucket, num_decodes=bucket if q == 1 else 0,
            slot_mapping=self.slot_mapping[: bucket * q], block_tables=self.block_tables[:bucket],
            seq_lens=self.seq_lens[:bucket], query_start_loc=self.query_start_loc[: bucket + 1],
            max_query_len=q, max_seq_len=self.max_model_len + q - 1, seq_lens_cpu=[], query_start_loc_cpu=[],
            block_size=self.block_size, states=states,
        )


ModelFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
# (rows of input_ids, their tokens) on the device; rows None: the first len(tokens) rows.
TokenPatch = tuple[Optional[torch.Tensor], torch.Tensor]


def apply_patch(input_ids: torch.Tensor, patch: TokenPatch) -> None:
    """Write a patch's tokens over input_ids (on the device, without waiting for them)."""
    rows, tokens = patch
    if rows is None:
        input_ids[: len(tokens)].copy_(tokens)
    else:
        input_ids.index_copy_(0, rows, tokens)


class DecodeGraphRunner:
    """Captures `model(input_ids, positions, meta) -> hidden` once per bucket and replays it.
    capture=False runs the same static-buffer path eagerly (tests on machines without CUDA).
    Buckets count requests, of buffers.query_len query rows each."""

    def __init__(self, model: ModelFn, buffers: DecodeBuffers, sizes: list[int], capture: bool = True) -> None:
        self.model, self.buffers, self.sizes, self.use_graphs = model, buffers, sorted(sizes), capture
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    @property
    def query_len(self) -> int:
        return self.buffers.query_len

    def bucket(self, n: int) -> Optional[int]:
        return bucket_for(self.sizes, n)

    def _forward(self, bucket: int) -> torch.Tensor:
        b = self.buffers
        rows = bucket * b.query_len
        return self.model(b.input_ids[:rows], b.positions[:rows], b.metadata(bucket))

    @torch.inference_mode()
    def capture(self, pool: Optional[tuple] = None) -> None:
        """Largest bucket first, all sharing one memory pool (a smaller graph's activations fit
        in what the larger one reserved; `pool`: one shared with other runners, whose graphs
        never run at the same time). Must run after the KV cache is allocated and bound: the
        graphs hold its addresses."""
        if not self.use_graphs:
            return
        start = time.perf_counter()
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self.buffers.fill_padding(size)
            for _ in range(2):  # outside the capture: Triton compiles, cuBLAS picks its kernels
                self._forward(size)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(size)
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs of %d-token rows (batch sizes %d..%d) in %.1f s", len(self.sizes),
                    self.query_len, self.sizes[0], self.sizes[-1], time.perf_counter() - start)

    def run(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, seq_lens: np.ndarray,
            block_rows: np.ndarray, patch: Optional[TokenPatch] = None,
            states: Optional[tuple[list[int], list[bool]]] = None) -> torch.Tensor:
        """Hidden states [n * q, hidden] of a step of n <= max_size requests (one token each
        where q = 1; else laid out by pad_uniform). The result is a view into the graph's
        output, valid until the next run. `patch`: (rows, tokens) device tensors written over
        input_ids (tokens a previous step is still sampling). `states`: the requests' state rows
        and continue flags (linear-attention models)."""
        n = len(seq_lens)
        bucket = self.bucket(n)
        assert bucket is not None, f"{n} rows exceed the largest captured batch {self.max_size}"
        self.buffers.fill(input_ids, positions, slots, seq_lens, block_rows, bucket, states)
        if patch is not None:
            apply_patch(self.buffers.input_ids, patch)
        rows = n * self.query_len
        if not self.use_graphs:
            return self._forward(bucket)[:rows]
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:rows]

    def run_varlen(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, seq_lens: list[int],
                   qsl: list[int], block_rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """A step of requests of 1 to q tokens each (flat rows by query_start_loc `qsl`):
        the hidden states of the padded layout, and the padded row of each flat row."""
        ids, pos, sl, lens, dst = pad_uniform(self.query_len, qsl, input_ids, positions, slots, seq_lens)
        return self.run(ids, pos, sl, lens, block_rows), dst
