"""CUDA graphs for decode-only steps: one captured forward pass per batch-size bucket, replayed
with the step's inputs copied into static buffers. A decode step of 22 layers launches some
300 small kernels; a replay launches them all at once.

A batch of n decode requests runs in the smallest bucket >= n; rows n..bucket-1 are padding:
token 0 at position 0, slot -1 (the KV write skips it), seq_len 0 (attention sees no key and
gives 0). Rows are independent through the model, so padding cannot disturb real rows.

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

from pagedserve.attention.backend import AttentionMetadata

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


def _header_bytes(rows: int) -> int:
    return 28 * _padded(rows)


def _padded(rows: int) -> int:
    return -(-rows // 16) * 16  # every field starts 128-byte aligned (kernels specialise on alignment)


def _row_fields(header: torch.Tensor, rows: int) -> tuple[torch.Tensor, ...]:
    """Views into a byte buffer of (input ids, positions, slots) int64 and seq_lens int32,
    `rows` each, one after the other: the four go up to the device in one copy."""
    b = _padded(rows)
    return (header[: 8 * rows].view(torch.int64), header[8 * b: 8 * b + 8 * rows].view(torch.int64),
            header[16 * b: 16 * b + 8 * rows].view(torch.int64), header[24 * b: 24 * b + 4 * rows].view(torch.int32))


class _Staging:
    """Pinned host copies of the per-step buffers, and the event after their last copy out."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int, pin: bool) -> None:
        self.header = torch.zeros(_header_bytes(max_batch), dtype=torch.uint8, pin_memory=pin)
        self.ids, self.pos, self.slots, self.lens = _row_fields(self.header, max_batch)
        self.bt = torch.zeros((max_batch, max_blocks_per_seq), dtype=torch.int32, pin_memory=pin)
        self.copied: Optional[torch.cuda.Event] = None


class DecodeBuffers:
    """The static device tensors every captured graph reads. `fill` copies a step's inputs in
    (through pinned host staging: one copy for the four per-row tensors, which are views of
    one byte buffer, and one for the block tables) and pads the rest of the bucket.

    Two staging sets take turns: with async scheduling step N + 1 is filled while step N's
    copies may still be queued behind step N - 1 on the device; a set is rewritten only after
    the event recorded behind its previous copies (two steps back, long done)."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int, block_size: int, max_model_len: int,
                 device: torch.device) -> None:
        self.max_batch, self.block_size, self.max_model_len, self.device = max_batch, block_size, max_model_len, device
        self._cuda = device.type == "cuda"

        def zeros(shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=device)

        self._header = zeros(_header_bytes(max_batch), torch.uint8)
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens = _row_fields(self._header, max_batch)
        self.block_tables = zeros((max_batch, max_blocks_per_seq), torch.int32)
        self._staging = [_Staging(max_batch, max_blocks_per_seq, self._cuda) for _ in range(2)]
        self._turn = 0
        # One query token per row: query_start_loc is always 0..bucket.
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.fill_padding(max_batch)

    def fill(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, seq_lens: np.ndarray,
             block_rows: np.ndarray, bucket: int) -> None:
        """Rows [0, n) from the step (block_rows: [n, <= max_blocks_per_seq]), rows [n, bucket)
        padding."""
        n = len(input_ids)
        assert n <= bucket <= self.max_batch
        st = self._staging[self._turn]
        self._turn ^= 1
        if st.copied is not None and not st.copied.query():  # done long ago, as a rule
            st.copied.synchronize()
        for host, data, pad in ((st.ids, input_ids, 0), (st.pos, positions, 0), (st.slots, slots, -1),
                                (st.lens, seq_lens, 0)):
            h = host.numpy()
            h[:n] = data
            h[n:bucket] = pad
        st.bt.numpy()[:n, : block_rows.shape[1]] = block_rows  # padding rows' tables are never read
        self._header.copy_(st.header, non_blocking=self._cuda)  # (rows past the bucket: unread)
        if n:
            self.block_tables[:n].copy_(st.bt[:n], non_blocking=self._cuda)
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
        return AttentionMetadata(
            num_tokens=bucket, num_actual_tokens=bucket, num_reqs=bucket, num_decodes=bucket,
            slot_mapping=self.slot_mapping[:bucket], block_tables=self.block_tables[:bucket],
            seq_lens=self.seq_lens[:bucket], query_start_loc=self.query_start_loc[: bucket + 1],
            max_query_len=1, max_seq_len=self.max_model_len, seq_lens_cpu=[], query_start_loc_cpu=[],
            block_size=self.block_size,
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
    capture=False runs the same static-buffer path eagerly (tests on machines without CUDA)."""

    def __init__(self, model: ModelFn, buffers: DecodeBuffers, sizes: list[int], capture: bool = True) -> None:
        self.model, self.buffers, self.sizes, self.use_graphs = model, buffers, sorted(sizes), capture
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def bucket(self, n: int) -> Optional[int]:
        return bucket_for(self.sizes, n)

    def _forward(self, bucket: int) -> torch.Tensor:
        b = self.buffers
        return self.model(b.input_ids[:bucket], b.positions[:bucket], b.metadata(bucket))

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest bucket first, all sharing one memory pool (a smaller graph's activations fit
        in what the larger one reserved). Must run after the KV cache is allocated and bound:
        the graphs hold its addresses."""
        if not self.use_graphs:
            return
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
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
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s", len(self.sizes),
                    self.sizes[0], self.sizes[-1], time.perf_counter() - start)

    def run(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, seq_lens: np.ndarray,
            block_rows: np.ndarray, patch: Optional[TokenPatch] = None) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode-only step of n <= max_size requests. The result
        is a view into the graph's output, valid until the next run. `patch`: (rows, tokens)
        device tensors written over input_ids (tokens a previous step is still sampling)."""
        n = len(input_ids)
        bucket = self.bucket(n)
        assert bucket is not None, f"{n} rows exceed the largest captured batch {self.max_size}"
        self.buffers.fill(input_ids, positions, slots, seq_lens, block_rows, bucket)
        if patch is not None:
            apply_patch(self.buffers.input_ids, patch)
        if not self.use_graphs:
            return self._forward(bucket)[:n]
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:n]
