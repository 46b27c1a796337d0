"""Token mixers that keep a fixed-size state per request instead of KV blocks (Gated DeltaNet,
Mamba-2): the state tensors, one row a request (AttentionMetadata.states: the request's
block-table row, plus a scratch row for CUDA-graph padding), and the loop that runs a step's
decode rows together and its prefill chunks one by one, each from the state its request left
(or from zeros, for a request starting at position 0, whatever its row held before)."""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.ops.state_reference import verify_ref, verify_slot

# One token for each decode row, states updated in place (ops/state_reference.py):
# (inputs of the rows..., cache, rows, init or None) -> outputs
DecodeFn = Callable[..., torch.Tensor]
# A step's prefill chunks at once: ([each request's inputs], states [R, ...], [first positions],
# [positions to keep the state before]) -> ([outputs], new states [R, ...], [[kept states]])
ChunksFn = Callable[[list, torch.Tensor, list[int], list[list[int]]],
                    tuple[list[torch.Tensor], torch.Tensor, list[list[torch.Tensor]]]]


def stacked_blocks(xs: list[torch.Tensor], chunk: int, fronts: list[int]) -> torch.Tensor:
    """Several sequences' to_blocks, stacked [R, H, n, chunk, ...] (n: the most blocks any has;
    the others end in zero blocks, which leave a state as it is)."""
    blocks = [to_blocks(x, chunk, f) for x, f in zip(xs, fronts)]
    n = max(b.shape[1] for b in blocks)
    if all(b.shape[1] == n for b in blocks):
        return torch.stack(blocks)
    out = blocks[0].new_zeros(len(blocks), blocks[0].shape[0], n, *blocks[0].shape[2:])
    for i, b in enumerate(blocks):
        out[i, :, : b.shape[1]] = b
    return out


def kept_blocks(ats: list[int], keeps: list[list[int]], fronts: list[int], chunk: int) -> dict[int, list]:
    """block index -> [(request, i)]: after that block, request's keep[i] state is at hand."""
    after: dict[int, list] = {}
    for r, (at, keep, front) in enumerate(zip(ats, keeps, fronts)):
        for i, p in enumerate(keep):
            after.setdefault((p - at + front) // chunk - 1, []).append((r, i))
    return after


def unblock(out: torch.Tensor, lengths: list[int], fronts: list[int]) -> list[torch.Tensor]:
    """[R, H, n, chunk, D] -> each request's [L, H, D], its padding dropped."""
    r, h, n, c, d = out.shape
    flat = out.reshape(r, h, n * c, d)
    return [flat[i, :, f:f + length].transpose(0, 1) for i, (length, f) in enumerate(zip(lengths, fronts))]


def to_blocks(x: torch.Tensor, chunk: int, front: int) -> torch.Tensor:
    """[L, H, ...] -> [H, n, chunk, ...], with `front` zero rows before (so that blocks end at
    absolute positions that are multiples of chunk) and zeros after. Zero rows leave a
    recurrence's state as it is wherever their decay input is 0 (exp(0) = 1) and their input
    is 0."""
    x = x.transpose(0, 1)
    back = (-(front + x.shape[1])) % chunk
    if front or back:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (front, back))
    return x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:])


def conv_chunk(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               silu: bool = True, at: int = 0, keep: Sequence[int] = ()) -> tuple[torch.Tensor, ...]:
    """Depthwise causal convolution (then SiLU) over one request's chunk: x [L, C] from position
    `at`, state [C, K-1] (the inputs before the chunk), weight [C, K]. Returns (out [L, C], new
    state, [the state before each position in `keep`])."""
    seq = torch.cat([state.to(x.dtype), x.t()], dim=-1)
    out = F.conv1d(seq.unsqueeze(0), weight.unsqueeze(1), bias, groups=seq.shape[0])[0]
    k1 = state.shape[1]
    return (F.silu(out) if silu else out).t(), seq[:, seq.shape[1] - k1:], [seq[:, p - at: p - at + k1] for p in keep]


def conv_chunks(seqs: list, states: torch.Tensor, ats: list[int], keeps: list[list[int]], **conv) -> tuple:
    """conv_chunk over several requests (ChunksFn)."""
    outs, finals, kept = [], [], []
    for (x,), state, at, keep in zip(seqs, states, ats, keeps):
        o, f, k = conv_chunk(x, state, at=at, keep=keep, **conv)
        outs.append(o)
        finals.append(f)
        kept.append(k)
    return outs, torch.stack(finals), kept


class StateMixer(nn.Module):
    """Subclasses give state_shapes() and, with a convolution state, a `conv1d` (nn.Conv1d,
    depthwise) whose last K-1 inputs are that state; either state is optional (LFM2's short
    convolutions have no recurrence, MiniMax's lightning attention no convolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_state: Optional[torch.Tensor] = None  # [rows, channels, K-1]
        self.ssm_state: Optional[torch.Tensor] = None  # [rows, *the recurrence's state]
        self.snapshots: list[torch.Tensor] = []  # saved states, [slots, ...] like each of the two
        # Speculative decoding: after the prefix cache's slots, k slots a state row for the
        # states after the tokens of a verification (verify_slots).
        self.verify_base = self.verify_k = 0
        self.use_triton = False  # set by the model runner with the Triton backend: decode kernels

    def state_shapes(self) -> tuple[Optional[tuple[int, ...]], Optional[tuple[int, ...]]]:
        """One request's (convolution state, recurrent state) shapes; None where the layer has
        none (LFM2: no recurrence; MiniMax's lightning attention: no convolution)."""
        raise NotImplementedError

    def allocate_state(self, rows: int, device: torch.device, conv_dtype: torch.dtype,
                       ssm_dtype: torch.dtype) -> None:
        conv, ssm = self.state_shapes()
        if conv is not None:
            self.conv_state = torch.zeros((rows, *conv), dtype=conv_dtype, device=device)
        if ssm is not None:
            self.ssm_state = torch.zeros((rows, *ssm), dtype=ssm_dtype, device=device)

    def _live(self) -> list[torch.Tensor]:
        """The running requests' states: the convolution's, and the recurrence's if any."""
        return [t for t in (self.conv_state, self.ssm_state) if t is not None]

    def state_tensors(self) -> list[torch.Tensor]:
        return self._live() + self.snapshots

    def allocate_snapshots(self, slots: int, verify_rows: int = 0, verify_k: int = 0) -> None:
        """Room, in each live state tensor's form, for `slots` saved states (prefix caching,
        engine/state_cache.py), then for the states of `verify_rows` state rows after each of
        the first verify_k tokens of a verification (speculative decoding: verify_slots)."""
        self.verify_base, self.verify_k = slots, verify_k
        total = slots + verify_rows * verify_k
        self.snapshots = [torch.zeros((total, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in self._live()]

    def verify_slots(self, rows: torch.Tensor, j: int) -> torch.Tensor:
        """The snapshot slots holding the states of state rows `rows` after token j (< verify_k)
        of their last verification."""
        return verify_slot(self.verify_base, self.verify_k, rows, j)

    def copy_snapshots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for snap in self.snapshots:
            snap.index_copy_(0, dst, snap.index_select(0, src))

    def save_states(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        for snap, live in zip(self.snapshots, self._live()):
            snap.index_copy_(0, slots, live.index_select(0, rows))

    def load_states(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        for snap, live in zip(self.snapshots, self._live()):
            live.index_copy_(0, rows, snap.index_select(0, slots))

    def convolve(self, x: torch.Tensor, meta: AttentionMetadata, silu: bool = True) -> torch.Tensor:
        """The causal convolution (and SiLU) of the step's rows x [T, channels]."""
        conv = self.conv1d
        w, b = conv.weight.squeeze(1), conv.bias
        return self.over_rows(self.conv_state, meta, (x,), torch.empty_like(x),
                              partial(self.kernel_or_ref("conv_decode"), weight=w, bias=b, silu=silu),
                              partial(conv_chunks, weight=w, bias=b, silu=silu), x.dtype, self._snapshot(0))

    def kernel_or_ref(self, name: str) -> DecodeFn:
        """A decode function of ops/state_decode.py on the Triton path, else its PyTorch twin
        (name + "_ref", ops/state_reference.py)."""
        if self.use_triton:
            from pagedserve.ops import state_decode

            return getattr(state_decode, name)
        from pagedserve.ops import state_reference

        return getattr(state_reference, name + "_ref")

    def _snapshot(self, i: int) -> Optional[torch.Tensor]:
        """The saved states of the convolution (0) or the recurrence (1), if any are kept."""
        if self.conv_state is None:  # (the recurrence's come first then)
            i -= 1
        return self.snapshots[i] if 0 <= i < len(self.snapshots) else None

    def over_rows(self, cache: torch.Tensor, meta: AttentionMetadata, inputs: tuple[torch.Tensor, ...],
                  out: torch.Tensor, decode: DecodeFn, chunks: ChunksFn, dtype: torch.dtype,
                  snapshots: Optional[torch.Tensor] = None,
                  prep: Optional[Callable[..., tuple[torch.Tensor, ...]]] = None) -> torch.Tensor:
        """Fill `out` [T, ...]: the decode rows by `decode` (DecodeFn, in place on their rows
        of `cache`), the verification rows by `decode` a token at a time (_verify_rows), then
        the prefill chunks together by `chunks` (ChunksFn, on prep(*inputs) where given; the
        states before their `keep` positions go to their `snapshots` slots: StateRows.keep),
        from states read in `dtype` and written back to `cache`. Without states (a profiling
        pass) every request starts from zeros and nothing is kept."""
        states = meta.states
        nd = meta.num_decodes if states is not None else 0
        nv = states.verify if states is not None else 0
        if nd:  # one-token prompts start from zeros: init
            init = None if states.first_all_continue(nd) else states.init[:nd]
            out[:nd] = decode(*(x[:nd] for x in inputs), cache, states.rows[:nd], init)
        if nv:
            self._verify_rows(cache, meta, inputs, out, decode, snapshots, nd, nv)
        if meta.num_reqs > nd + nv and prep is not None:
            inputs = prep(*inputs)
        qsl = meta.query_start_loc_cpu
        for reqs in padding_groups([qsl[r + 1] - qsl[r] for r in range(nd + nv, meta.num_reqs)], nd + nv):
            StateMixer._prefill_group(cache, meta, inputs, out, chunks, dtype, snapshots, reqs)
        return out

    def _verify_rows(self, cache: torch.Tensor, meta: AttentionMetadata, inputs: tuple[torch.Tensor, ...],
                     out: torch.Tensor, decode: DecodeFn, snapshots: Optional[torch.Tensor], nd: int,
                     nv: int) -> None:
        """Requests nd..nd+nv verify drafts: each runs its tokens through `decode` in order, and
        the state after each token but the last is kept in the request's verification slot for
        that position (verify_slots). Where every request has as many tokens (always so in a
        graph's metadata, which has no host copies: max_query_len each, one after the other),
        all run in one call of the decode kernel's multi-token form (ops/state_decode.py), or
        of its twin; otherwise a position at a time, longest requests first, so that those
        still running at position j are the first ones."""
        assert snapshots is not None and self.verify_k, "verification needs allocate_snapshots(verify_k=...)"
        states, qsl = meta.states, meta.query_start_loc_cpu
        if qsl:
            first, lens = qsl[nd], [qsl[r + 1] - qsl[r] for r in range(nd, nd + nv)]
        else:
            first, lens = 0, [meta.max_query_len] * nv
        q, rows = lens[0], states.rows[nd:nd + nv]
        fresh = not (len(states.init_cpu) >= nd + nv and all(states.init_cpu[nd:nd + nv]))
        init = states.init[nd:nd + nv] if fresh else None
        if lens[-1] == q:
            span = slice(first, first + nv * q)
            xs, keep = tuple(x[span] for x in inputs), (snapshots, self.verify_base, self.verify_k)
            out[span] = (decode(*xs, cache, rows, init, tokens=q, keep=keep) if self.use_triton
                         else verify_ref(decode, xs, cache, rows, init, q, keep))
            return
        for j in range(q):
            m = sum(n > j for n in lens)
            at = torch.tensor([qsl[nd + i] + j for i in range(m)], dtype=torch.long, device=out.device)
            out[at] = decode(*(x[at] for x in inputs), cache, rows[:m], init if j == 0 else None)
            if j < q - 1:
                snapshots.index_copy_(0, self.verify_slots(rows[:m], j), cache.index_select(0, rows[:m]))

    @staticmethod
    def _prefill_group(cache: torch.Tensor, meta: AttentionMetadata, inputs: tuple[torch.Tensor, ...],
                       out: torch.Tensor, chunks: ChunksFn, dtype: torch.dtype, snapshots: Optional[torch.Tensor],
                       reqs: list[int]) -> None:
        states, qsl = meta.states, meta.query_start_loc_cpu
        prev = torch.zeros((len(reqs), *cache.shape[1:]), dtype=dtype, device=out.device)
        if states is not None:
            for i, r in enumerate(reqs):
                if states.init_cpu[r]:
                    prev[i] = cache[states.rows_cpu[r]]
        keeps = [states.keep.get(r, []) if states is not None and snapshots is not None else [] for r in reqs]
        ats = [meta.seq_lens_cpu[r] - (qsl[r + 1] - qsl[r]) if keep else 0 for r, keep in zip(reqs, keeps)]
        outs, new, kept = chunks([tuple(x[qsl[r]:qsl[r + 1]] for x in inputs) for r in reqs], prev, ats,
                                 [[p for p, _ in keep] for keep in keeps])
        for r, o in zip(reqs, outs):
            out[qsl[r]:qsl[r + 1]] = o
        for keep, states_kept in zip(keeps, kept):
            for (_, slot), state in zip(keep, states_kept):
                snapshots[slot] = state.to(snapshots.dtype)
        if states is not None:
            for i, r in enumerate(reqs):
                cache[states.rows_cpu[r]] = new[i].to(cache.dtype)


def padding_groups(lengths: list[int], first: int = 0) -> list[list[int]]:
    """Requests (numbered from `first`) grouped to run together, shortest first: a group grows
    while its rows padded to its longest stay within twice its real rows (one long prompt
    beside many short ones must not multiply the work)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    total = 0
    for i in order:
        n = lengths[i]
        if groups and (len(groups[-1]) + 1) * n <= 2 * (total + n):
            groups[-1].append(first + i)
            total += n
        else:
            groups.append([first + i])
            total = n
    return groups


class HybridLayers:
    """attention_layers / state_layers of a model whose decoder layers (self.model.layers) hold
    attention (`self_attn`), a state mixer under `state_attr`, or both. Mixed in before the
    model's base class."""

    state_attr = "linear_attn"

    def attention_layers(self) -> list[nn.Module]:
        return [layer.self_attn.attn for layer in self.model.layers if hasattr(layer, "self_attn")]

    def state_layers(self) -> list[StateMixer]:
        return [getattr(layer, self.state_attr) for layer in self.model.layers if hasattr(layer, self.state_attr)]
