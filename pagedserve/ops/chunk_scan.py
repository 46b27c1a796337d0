"""Triton kernels: the block-to-block part of the chunked prefill scans of Gated DeltaNet and
Mamba-2 (layers/gated_delta.py gated_delta_chunks, layers/mamba2.py ssd_chunks). Everything
within a block is computed beforehand for all blocks at once; what remains is a recurrence
over the blocks of each sequence, a few small matrix products per block, which the PyTorch
form runs as a host loop of batched products (some 6 kernel launches a block). Here one
program carries one (sequence, head, slice of value columns) state tile through all its
blocks in registers, and stores the states asked for (prefix caching) as it passes them.
Products are exact float32 (no TF32). Twins: gated_delta.gdn_blocks, mamba2.ssd_blocks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# block index -> [(request, i)]: after that block, request's i-th kept state (state_mixer.kept_blocks)
After = dict[int, list[tuple[int, int]]]


def _buffers(after: After, r: int, h: int, n: int, rows: int, cols: int, device: torch.device) -> tuple:
    """A kernel's slot table ([R, n] int32: where the state after each (request, block) is
    stored, -1: nowhere), (request, i) -> that slot, and its kept and final state outputs
    [slots, H, rows, cols] and [R, H, rows, cols]."""
    table = torch.full((r, n), -1, dtype=torch.int32)
    which: dict[tuple[int, int], int] = {}
    slots = 0
    for b, pairs in after.items():
        for req, i in pairs:
            if table[req, b] < 0:
                table[req, b] = slots
                slots += 1
            which[(req, i)] = int(table[req, b])
    kept_out = torch.empty((max(slots, 1), h, rows, cols), dtype=torch.float32, device=device)
    return table.to(device), which, kept_out, torch.empty((r, h, rows, cols), dtype=torch.float32, device=device)


def _kept(states: torch.Tensor, kept_out: torch.Tensor, which: dict[tuple[int, int], int],
          counts: list[int]) -> list[list[torch.Tensor]]:
    """Each request's kept states (those after no block: the state it started from)."""
    return [[kept_out[which[(r, i)]] if (r, i) in which else states[r] for i in range(k)]
            for r, k in enumerate(counts)]


@triton.jit
def _gdn_blocks_kernel(
    u_ptr, w_ptr, q_ptr, sc_ptr, kt_ptr, ed_ptr, s_ptr, out_ptr, final_ptr, slot_ptr, kept_ptr, n_blocks, heads,
    DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
):
    rh = tl.program_id(0).to(tl.int64)  # request * heads + head
    dk = tl.arange(0, DK)
    dv = tl.program_id(1) * BV + tl.arange(0, BV)
    ci = tl.arange(0, C)
    mv = dv < DV
    state = dk[:, None] * DV + dv[None, :]
    s = tl.load(s_ptr + rh * DK * DV + state, mask=mv[None, :], other=0.0)
    for b in range(n_blocks):
        blk = rh * n_blocks + b
        w = tl.load(w_ptr + blk * C * DK + ci[:, None] * DK + dk[None, :])
        u = tl.load(u_ptr + blk * C * DV + ci[:, None] * DV + dv[None, :], mask=mv[None, :], other=0.0)
        u = u - tl.dot(w, s, input_precision="ieee")
        q = tl.load(q_ptr + blk * C * DK + ci[:, None] * DK + dk[None, :])
        sc = tl.load(sc_ptr + blk * C * C + ci[:, None] * C + ci[None, :])
        o = tl.dot(q, s, input_precision="ieee") + tl.dot(sc, u, input_precision="ieee")
        tl.store(out_ptr + blk * C * DV + ci[:, None] * DV + dv[None, :], o, mask=mv[None, :])
        kt = tl.load(kt_ptr + blk * DK * C + dk[:, None] * C + ci[None, :])
        s = tl.load(ed_ptr + blk) * s + tl.dot(kt, u, input_precision="ieee")
        slot = tl.load(slot_ptr + (rh // heads) * n_blocks + b).to(tl.int64)  # (per request)
        if slot >= 0:
            tl.store(kept_ptr + (slot * heads + rh % heads) * DK * DV + state, s, mask=mv[None, :])
    tl.store(final_ptr + rh * DK * DV + state, s, mask=mv[None, :])


def gdn_blocks_triton(u_free: torch.Tensor, w: torch.Tensor, q_decayed: torch.Tensor, scores: torch.Tensor,
                      k_to_end: torch.Tensor, end_decay: torch.Tensor, states: torch.Tensor, after: After,
                      counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
    """gated_delta.gdn_blocks' contract: u_free [R, H, n, C, Dv], w and q_decayed [R, H, n, C,
    Dk], scores [R, H, n, C, C], k_to_end [R, H, n, Dk, C], end_decay [R, H, n, 1, 1], states
    [R, H, Dk, Dv] (float32; Dk and C powers of two, at least 16). Returns (out [R, H, n, C,
    Dv], final states, each request's kept states)."""
    r, h, n, c, dv = u_free.shape
    dk = w.shape[-1]
    table, which, kept_out, final = _buffers(after, r, h, n, dk, dv, states.device)
    out = torch.empty_like(u_free, memory_format=torch.contiguous_format)
    bv = min(triton.next_power_of_2(dv), 32)
    _gdn_blocks_kernel[(r * h, triton.cdiv(dv, bv))](
        u_free.contiguous(), w.contiguous(), q_decayed.contiguous(), scores.contiguous(), k_to_end.contiguous(),
        end_decay.contiguous(), states.float().contiguous(), out, final, table, kept_out, n, h,
        DK=dk, DV=dv, C=c, BV=bv, num_warps=8,
    )
    return out, final, _kept(states, kept_out, which, counts)


@triton.jit
def _ssd_blocks_kernel(
    intra_ptr, cd_ptr, bt_ptr, xdt_ptr, ed_ptr, s_ptr, out_ptr, final_ptr, slot_ptr, kept_ptr, n_blocks, heads,
    N: tl.constexpr, P: tl.constexpr, C: tl.constexpr, BP: tl.constexpr,
):
    rh = tl.program_id(0).to(tl.int64)
    dn = tl.arange(0, N)
    dp = tl.program_id(1) * BP + tl.arange(0, BP)
    ci = tl.arange(0, C)
    mp = dp < P
    state = dn[:, None] * P + dp[None, :]
    s = tl.load(s_ptr + rh * N * P + state, mask=mp[None, :], other=0.0)
    for b in range(n_blocks):
        blk = rh * n_blocks + b
        rows = blk * C * P + ci[:, None] * P + dp[None, :]  # a [C, BP] tile of [.., C, P]
        cd = tl.load(cd_ptr + blk * C * N + ci[:, None] * N + dn[None, :])
        o = tl.load(intra_ptr + rows, mask=mp[None, :], other=0.0) + tl.dot(cd, s, input_precision="ieee")
        tl.store(out_ptr + rows, o, mask=mp[None, :])
        bt = tl.load(bt_ptr + blk * N * C + dn[:, None] * C + ci[None, :])
        xdt = tl.load(xdt_ptr + rows, mask=mp[None, :], other=0.0)
        s = tl.load(ed_ptr + blk) * s + tl.dot(bt, xdt, input_precision="ieee")
        slot = tl.load(slot_ptr + (rh // heads) * n_blocks + b).to(tl.int64)  # (per request)
        if slot >= 0:
            tl.store(kept_ptr + (slot * heads + rh % heads) * N * P + state, s, mask=mp[None, :])
    tl.store(final_ptr + rh * N * P + state, s, mask=mp[None, :])


def ssd_blocks_triton(intra: torch.Tensor, c_decayed: torch.Tensor, b_to_end: torch.Tensor, xdt: torch.Tensor,
                      end_decay: torch.Tensor, states: torch.Tensor, after: After,
                      counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
    """mamba2.ssd_blocks' contract: intra and xdt [R, H, n, C, P], c_decayed [R, H, n, C, N],
    b_to_end [R, H, n, N, C], end_decay [R, H, n, 1, 1], states [R, H, N, P] (float32; N and C
    powers of two, at least 16). Returns (out [R, H, n, C, P], final states, kept states)."""
    r, h, n, c, p = intra.shape
    d_state = c_decayed.shape[-1]
    table, which, kept_out, final = _buffers(after, r, h, n, d_state, p, states.device)
    out = torch.empty_like(intra, memory_format=torch.contiguous_format)
    bp = min(triton.next_power_of_2(p), 32)
    _ssd_blocks_kernel[(r * h, triton.cdiv(p, bp))](
        intra.contiguous(), c_decayed.contiguous(), b_to_end.contiguous(), xdt.contiguous(), end_decay.contiguous(),
        states.float().contiguous(), out, final, table, kept_out, n, h, N=d_state, P=p, C=c, BP=bp, num_warps=8,
    )
    return out, final, _kept(states, kept_out, which, counts)
