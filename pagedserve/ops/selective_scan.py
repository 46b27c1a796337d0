"""Triton kernel: Mamba-1's selective scan over a step's prefill chunks. The recurrence has a
decay per channel and state entry, so it has no matrix form; on the GPU the PyTorch form
(layers/mamba1.py selective_scan) would launch a few kernels per token. Here one program walks
the tokens of one request for a block of channels, its state tile [BC, N] in registers, and
stores the states asked for (prefix caching) as it passes them. Twin: selective_scan."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _selective_scan_kernel(
    x_ptr, dt_ptr, b_ptr, c_ptr, a_ptr, d_ptr, s0_ptr, y_ptr, final_ptr, starts_ptr, keep_ptr, kept_ptr, channels,
    N: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, KMAX: tl.constexpr, HAS_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    dn = tl.arange(0, BN)
    mc, mn = ch < channels, dn < N
    m2 = mc[:, None] & mn[None, :]
    tile = ch[:, None] * N + dn[None, :]  # offsets in a [C, N] state
    a = tl.load(a_ptr + tile, mask=m2, other=0.0)
    s = tl.load(s0_ptr + r * channels * N + tile, mask=m2, other=0.0)
    d = tl.zeros([BC], tl.float32)
    if HAS_D:
        d = tl.load(d_ptr + ch, mask=mc, other=0.0).to(tl.float32)
    start = tl.load(starts_ptr + r).to(tl.int64)
    end = tl.load(starts_ptr + r + 1).to(tl.int64)
    for t in range(start, end):
        x = tl.load(x_ptr + t * channels + ch, mask=mc, other=0.0)
        dt = tl.load(dt_ptr + t * channels + ch, mask=mc, other=0.0)
        bv = tl.load(b_ptr + t * N + dn, mask=mn, other=0.0)
        cv = tl.load(c_ptr + t * N + dn, mask=mn, other=0.0)
        s = s * tl.exp(dt[:, None] * a) + (dt * x)[:, None] * bv[None, :]
        tl.store(y_ptr + t * channels + ch, tl.sum(s * cv[None, :], axis=1) + d * x, mask=mc)
        for k in tl.static_range(KMAX):  # the state after this many tokens is kept
            if tl.load(keep_ptr + r * KMAX + k) == t - start + 1:
                tl.store(kept_ptr + (r * KMAX + k) * channels * N + tile, s, mask=m2)
    tl.store(final_ptr + r * channels * N + tile, s, mask=m2)


def selective_scan_triton(seqs: list[tuple[torch.Tensor, ...]], states: torch.Tensor, ats: list[int],
                          keeps: list[list[int]], a: torch.Tensor,
                          d: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], torch.Tensor, list]:
    """layers/mamba1.selective_scan's contract (ChunksFn), float32: each (x, dt [L, C], b, c
    [L, N]) from position ats[r], from states [R, C, N]; a [C, N]; d [C]."""
    lengths = [len(s[0]) for s in seqs]
    x, dt, b, c = (torch.cat([s[i] for s in seqs]).float().contiguous() for i in range(4))
    r, channels, n = states.shape
    dev = x.device
    starts = torch.tensor([0] + lengths, device=dev).cumsum(0)
    kmax = max(len(k) for k in keeps)
    keep = torch.full((r, max(kmax, 1)), -1, dtype=torch.int64)
    for i, (at, ks) in enumerate(zip(ats, keeps)):
        keep[i, :len(ks)] = torch.tensor([p - at for p in ks], dtype=torch.int64)
    kept_out = torch.empty((r, max(kmax, 1), channels, n), dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    final = torch.empty((r, channels, n), dtype=torch.float32, device=dev)
    if x.shape[0]:
        bn = triton.next_power_of_2(n)
        bc = min(triton.next_power_of_2(channels), max(16, 2048 // bn))
        _selective_scan_kernel[(r, triton.cdiv(channels, bc))](
            x, dt, b, c, a.float().contiguous(), d if d is not None else x, states.float().contiguous(), y, final,
            starts, keep.to(dev), kept_out, channels, N=n, BC=bc, BN=bn, KMAX=kmax, HAS_D=d is not None, num_warps=4,
        )
    else:
        final.copy_(states)
    # (a state kept after 0 tokens is the one the chunk started from)
    kept = [[states[i] if p == at else kept_out[i, k] for k, p in enumerate(ks)]
            for i, (at, ks) in enumerate(zip(ats, keeps))]
    return list(y.split(lengths)), final, kept
