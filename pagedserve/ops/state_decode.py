"""Triton kernels for the decode step of the state layers (Gated DeltaNet, Mamba-2, Mamba-1
and their short convolutions): one token for each of B requests, whose states sit in rows `rows` of a
layer's state tensor and are updated there in place, so that a step reads and writes each
state once (the PyTorch form gathers the rows, computes in several passes and scatters them
back). `init` [B] (None: all continue) zeroes the states of requests that start fresh. The
gates, the q/k normalisation and the softplus of the step size are computed inside, from
the layer's raw projections. Twins: state_reference.conv_decode_ref, gated_delta_decode_ref,
ssd_decode_ref, selective_decode_ref.

Speculative verification (`tokens` > 1): each request runs `tokens` tokens in one program
(inputs and outputs [B * tokens, ...], request i's token t in row i * tokens + t), its state
held in registers between them, and `keep` (state_reference.Keep) takes the state after each
token but the last into the layer's snapshot slots: one launch a layer instead of `tokens`
launches and as many copies. Twin: state_reference.verify_ref over the one-token twin."""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from pagedserve.ops.state_reference import L2_EPS, Keep


def _verify_args(n: int, rows: torch.Tensor, cache: torch.Tensor, tokens: int,
                 keep: Optional[Keep]) -> tuple[int, tuple]:
    """(requests, the kernels' keep arguments: snapshot tensor, its row stride, first slot,
    slots a row) for n input rows of `tokens` tokens a request."""
    b = n // tokens
    assert b * tokens == n and rows.shape[0] == b
    if keep is None:
        return b, (cache, 0, 0, 0)
    snap, first, k = keep
    assert snap.shape[1:] == cache.shape[1:] and snap.stride()[1:] == cache.stride()[1:] and snap.dtype == cache.dtype
    return b, (snap, snap.stride(0), first, k)


@triton.jit
def _softplus(x):
    # torch's softplus (threshold 20: the identity above it)
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _conv_decode_kernel(
    x_ptr, cache_ptr, rows_ptr, init_ptr, w_ptr, bias_ptr, out_ptr, keep_ptr,
    stride_x, stride_cr, stride_cc, stride_ck, stride_w, stride_o, stride_kr, channels, keep_first, keep_k, T,
    K: tl.constexpr, BLOCK: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    KEEP: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < channels
    row = tl.load(rows_ptr + i).to(tl.int64)
    state = cache_ptr + row * stride_cr + c * stride_cc
    fresh = False
    if HAS_INIT:
        fresh = tl.load(init_ptr + i) == 0
    for t in range(T):
        r = i * T + t
        x = tl.load(x_ptr + r * stride_x + c, mask=mask, other=0.0)
        acc = x.to(tl.float32) * tl.load(w_ptr + c * stride_w + (K - 1), mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
        for j in tl.static_range(K - 1):
            s = tl.load(state + j * stride_ck, mask=mask, other=0.0)
            if HAS_INIT:
                s = tl.where(fresh & (t == 0), tl.zeros_like(s), s)
            acc += s.to(tl.float32) * tl.load(w_ptr + c * stride_w + j, mask=mask, other=0.0).to(tl.float32)
            if j > 0:  # the window slides by one: input j moves to j - 1 (this thread read it just now)
                tl.store(state + (j - 1) * stride_ck, s, mask=mask)
        tl.store(state + (K - 2) * stride_ck, x.to(cache_ptr.dtype.element_ty), mask=mask)
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        tl.store(out_ptr + r * stride_o + c, acc.to(out_ptr.dtype.element_ty), mask=mask)
        if KEEP:
            if t < T - 1:  # the window after token t (this thread wrote it just now)
                kept = keep_ptr + (keep_first + row * keep_k + t) * stride_kr + c * stride_cc
                for j in tl.static_range(K - 1):
                    tl.store(kept + j * stride_ck, tl.load(state + j * stride_ck, mask=mask, other=0.0), mask=mask)


def conv_decode(x: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor, init: Optional[torch.Tensor],
                weight: torch.Tensor, bias: Optional[torch.Tensor] = None, silu: bool = True, tokens: int = 1,
                keep: Optional[Keep] = None) -> torch.Tensor:
    """x [B * tokens, C] (unit stride in C); cache [R, C, K-1]; weight [C, K]. Returns out
    [B * tokens, C] in x's dtype; the rows' convolution states slide by x."""
    n, c = x.shape
    k = weight.shape[1]
    assert x.stride(1) == 1 and weight.stride(1) == 1 and cache.shape[1:] == (c, k - 1) and k >= 2
    b, kept = _verify_args(n, rows, cache, tokens, keep)
    out = torch.empty((n, c), dtype=x.dtype, device=x.device)
    if b:
        block = min(triton.next_power_of_2(c), 1024)
        _conv_decode_kernel[(b, triton.cdiv(c, block))](
            x, cache, rows, init if init is not None else rows, weight, bias if bias is not None else weight, out,
            kept[0], x.stride(0), cache.stride(0), cache.stride(1), cache.stride(2), weight.stride(0), out.stride(0),
            kept[1], c, kept[2], kept[3], tokens, K=k, BLOCK=block, HAS_INIT=init is not None,
            HAS_BIAS=bias is not None, SILU=silu, KEEP=keep is not None, num_warps=4 if block >= 512 else 1,
        )
    return out


@triton.jit
def _gated_delta_decode_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, cache_ptr, rows_ptr, init_ptr, alog_ptr, dtb_ptr, out_ptr, keep_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ab, stride_bb,
    stride_cr, stride_ch, stride_ck, stride_ob, stride_oh, stride_kr, scale, keep_first, keep_k, T,
    REP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, EPS: tl.constexpr, KEEP: tl.constexpr,
):
    # One program per (request, value head, slice of BV value columns): the state tile
    # [Dk, BV] is read once, then for each token decayed, corrected by the delta rule and
    # read out, and written back once.
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dk = tl.arange(0, BK)
    dv = tl.program_id(2) * BV + tl.arange(0, BV)
    mk, mv = dk < DK, dv < DV
    kh = h // REP  # each key head serves REP consecutive value heads
    rate = tl.exp(tl.load(alog_ptr + h).to(tl.float32))
    dtb = tl.load(dtb_ptr + h).to(tl.float32)
    row = tl.load(rows_ptr + i).to(tl.int64)
    tile = cache_ptr + row * stride_cr + h * stride_ch + dk[:, None] * stride_ck + dv[None, :]
    m2 = mk[:, None] & mv[None, :]
    s = tl.load(tile, mask=m2, other=0.0).to(tl.float32)
    if HAS_INIT:
        s = tl.where(tl.load(init_ptr + i) != 0, s, 0.0)
    for t in range(T):
        r = i * T + t
        q = tl.load(q_ptr + r * stride_qb + kh * stride_qh + dk, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + r * stride_kb + kh * stride_kh + dk, mask=mk, other=0.0).to(tl.float32)
        q = q * tl.math.rsqrt(tl.sum(q * q, axis=0) + EPS) * scale
        k = k * tl.math.rsqrt(tl.sum(k * k, axis=0) + EPS)
        v = tl.load(v_ptr + r * stride_vb + h * stride_vh + dv, mask=mv, other=0.0).to(tl.float32)
        decay = tl.exp(-rate * _softplus(tl.load(a_ptr + r * stride_ab + h).to(tl.float32) + dtb))
        beta = 1.0 / (1.0 + tl.exp(-tl.load(b_ptr + r * stride_bb + h).to(tl.float32)))
        s = s * decay
        u = beta * (v - tl.sum(k[:, None] * s, axis=0))
        s = s + k[:, None] * u[None, :]
        tl.store(out_ptr + r * stride_ob + h * stride_oh + dv, tl.sum(q[:, None] * s, axis=0), mask=mv)
        if KEEP:
            if t < T - 1:
                kept = keep_ptr + (keep_first + row * keep_k + t) * stride_kr + h * stride_ch
                tl.store(kept + dk[:, None] * stride_ck + dv[None, :], s.to(keep_ptr.dtype.element_ty), mask=m2)
    tl.store(tile, s.to(cache_ptr.dtype.element_ty), mask=m2)


def gated_delta_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       cache: torch.Tensor, rows: torch.Tensor, init: Optional[torch.Tensor],
                       a_log: torch.Tensor, dt_bias: torch.Tensor, tokens: int = 1,
                       keep: Optional[Keep] = None) -> torch.Tensor:
    """q, k [B * tokens, Hk, Dk] and v [B * tokens, Hv, Dv] as the convolution left them (unit
    stride in the last dim); a, b [B * tokens, Hv] raw; cache [R, Hv, Dk, Dv]. Returns out
    [B * tokens, Hv, Dv] float32."""
    n, hk, dk = q.shape
    hv, dv = v.shape[1:]
    assert k.shape == q.shape and cache.shape[1:] == (hv, dk, dv) and hv % hk == 0
    assert q.stride(2) == k.stride(2) == v.stride(2) == a.stride(1) == b.stride(1) == cache.stride(3) == 1
    nb, kept = _verify_args(n, rows, cache, tokens, keep)
    out = torch.empty((n, hv, dv), dtype=torch.float32, device=v.device)
    if n:
        bk = triton.next_power_of_2(dk)
        bv = min(triton.next_power_of_2(dv), max(16, 4096 // bk))  # a [Dk, BV] tile in registers
        _gated_delta_decode_kernel[(nb, hv, triton.cdiv(dv, bv))](
            q, k, v, a, b, cache, rows, init if init is not None else rows, a_log, dt_bias, out, kept[0],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), a.stride(0), b.stride(0),
            cache.stride(0), cache.stride(1), cache.stride(2), out.stride(0), out.stride(1), kept[1], dk ** -0.5,
            kept[2], kept[3], tokens, REP=hv // hk, DK=dk, DV=dv, BK=bk, BV=bv, HAS_INIT=init is not None, EPS=L2_EPS,
            KEEP=keep is not None, num_warps=4,
        )
    return out


@triton.jit
def _ssd_decode_kernel(
    x_ptr, dt_ptr, b_ptr, c_ptr, cache_ptr, rows_ptr, init_ptr, alog_ptr, dtb_ptr, d_ptr, out_ptr, keep_ptr,
    stride_xb, stride_xh, stride_dtb, stride_bb, stride_bg, stride_cb, stride_cg,
    stride_cr, stride_ch, stride_cn, stride_ob, stride_oh, stride_kr, dt_lo, dt_hi, keep_first, keep_k, T,
    PER_GROUP: tl.constexpr, N: tl.constexpr, P: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
    HAS_INIT: tl.constexpr, CLAMP: tl.constexpr, HAS_D: tl.constexpr, SOFTPLUS: tl.constexpr, KEEP: tl.constexpr,
):
    # One program per (request, head, slice of BP head columns): the state tile [N, BP], read
    # once and written once however many tokens the request runs.
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dn = tl.arange(0, BN)
    dp = tl.program_id(2) * BP + tl.arange(0, BP)
    mn, mp = dn < N, dp < P
    g = h // PER_GROUP  # B and C are shared by the heads of a group
    rate = tl.exp(tl.load(alog_ptr + h).to(tl.float32))
    row = tl.load(rows_ptr + i).to(tl.int64)
    tile = cache_ptr + row * stride_cr + h * stride_ch + dn[:, None] * stride_cn + dp[None, :]
    m2 = mn[:, None] & mp[None, :]
    s = tl.load(tile, mask=m2, other=0.0).to(tl.float32)
    if HAS_INIT:
        s = tl.where(tl.load(init_ptr + i) != 0, s, 0.0)
    for t in range(T):
        r = i * T + t
        dt = tl.load(dt_ptr + r * stride_dtb + h).to(tl.float32)
        if SOFTPLUS:
            dt = _softplus(dt + tl.load(dtb_ptr + h).to(tl.float32))
        if CLAMP:
            dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
        x = tl.load(x_ptr + r * stride_xb + h * stride_xh + dp, mask=mp, other=0.0).to(tl.float32)
        bv = tl.load(b_ptr + r * stride_bb + g * stride_bg + dn, mask=mn, other=0.0).to(tl.float32)
        cv = tl.load(c_ptr + r * stride_cb + g * stride_cg + dn, mask=mn, other=0.0).to(tl.float32)
        s = s * tl.exp(-dt * rate) + bv[:, None] * (x * dt)[None, :]
        y = tl.sum(cv[:, None] * s, axis=0)
        if HAS_D:
            y += tl.load(d_ptr + h).to(tl.float32) * x
        tl.store(out_ptr + r * stride_ob + h * stride_oh + dp, y, mask=mp)
        if KEEP:
            if t < T - 1:
                kept = keep_ptr + (keep_first + row * keep_k + t) * stride_kr + h * stride_ch
                tl.store(kept + dn[:, None] * stride_cn + dp[None, :], s.to(keep_ptr.dtype.element_ty), mask=m2)
    tl.store(tile, s.to(cache_ptr.dtype.element_ty), mask=m2)


def ssd_decode(x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor, cache: torch.Tensor,
               rows: torch.Tensor, init: Optional[torch.Tensor], a_log: torch.Tensor, dt_bias: torch.Tensor,
               dt_limit: tuple[float, float], d: Optional[torch.Tensor] = None,
               dt_softplus: bool = True, tokens: int = 1, keep: Optional[Keep] = None) -> torch.Tensor:
    """x [B * tokens, H, P], dt [B * tokens, H] raw, b, c [B * tokens, G, N] (unit stride in the
    last dim); cache [R, H, N, P]; d [H]: the skip y += d x, if given; dt_softplus False: dt
    taken as it is. Returns y [B * tokens, H, P] float32."""
    n, h, p = x.shape
    groups, d_state = b.shape[1:]
    assert c.shape == b.shape and cache.shape[1:] == (h, d_state, p) and h % groups == 0
    assert x.stride(2) == dt.stride(1) == b.stride(2) == c.stride(2) == cache.stride(3) == 1
    nb, kept = _verify_args(n, rows, cache, tokens, keep)
    out = torch.empty((n, h, p), dtype=torch.float32, device=x.device)
    if n:
        bn = triton.next_power_of_2(d_state)
        bp = min(triton.next_power_of_2(p), max(16, 4096 // bn))
        clamp = tuple(dt_limit) != (0.0, math.inf)
        _ssd_decode_kernel[(nb, h, triton.cdiv(p, bp))](
            x, dt, b, c, cache, rows, init if init is not None else rows, a_log, dt_bias, d if d is not None else a_log,
            out, kept[0],
            x.stride(0), x.stride(1), dt.stride(0), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            cache.stride(0), cache.stride(1), cache.stride(2), out.stride(0), out.stride(1), kept[1],
            float(dt_limit[0]) if clamp else 0.0, float(dt_limit[1]) if clamp else 0.0, kept[2], kept[3], tokens,
            PER_GROUP=h // groups, N=d_state, P=p, BN=bn, BP=bp, HAS_INIT=init is not None, CLAMP=clamp,
            HAS_D=d is not None, SOFTPLUS=dt_softplus, KEEP=keep is not None, num_warps=4,
        )
    return out


@triton.jit
def _selective_decode_kernel(
    x_ptr, dt_ptr, b_ptr, c_ptr, cache_ptr, rows_ptr, init_ptr, alog_ptr, dtb_ptr, d_ptr, out_ptr, keep_ptr,
    stride_xb, stride_dtb, stride_bb, stride_cb, stride_cr, stride_cc, stride_ac, stride_ob, stride_kr, channels,
    keep_first, keep_k, T,
    N: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, HAS_INIT: tl.constexpr, KEEP: tl.constexpr,
):
    # One program per (request, BC channels): the state tile [BC, N], a decay per entry.
    i = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    dn = tl.arange(0, BN)
    mc, mn = ch < channels, dn < N
    m2 = mc[:, None] & mn[None, :]
    a = -tl.exp(tl.load(alog_ptr + ch[:, None] * stride_ac + dn[None, :], mask=m2, other=0.0).to(tl.float32))
    dtb = tl.load(dtb_ptr + ch, mask=mc, other=0.0).to(tl.float32)
    dd = tl.load(d_ptr + ch, mask=mc, other=0.0).to(tl.float32)
    row = tl.load(rows_ptr + i).to(tl.int64)
    tile = cache_ptr + row * stride_cr + ch[:, None] * stride_cc + dn[None, :]
    s = tl.load(tile, mask=m2, other=0.0).to(tl.float32)
    if HAS_INIT:
        s = tl.where(tl.load(init_ptr + i) != 0, s, 0.0)
    for t in range(T):
        r = i * T + t
        x = tl.load(x_ptr + r * stride_xb + ch, mask=mc, other=0.0).to(tl.float32)
        dt = _softplus(tl.load(dt_ptr + r * stride_dtb + ch, mask=mc, other=0.0).to(tl.float32) + dtb)
        bv = tl.load(b_ptr + r * stride_bb + dn, mask=mn, other=0.0).to(tl.float32)
        cv = tl.load(c_ptr + r * stride_cb + dn, mask=mn, other=0.0).to(tl.float32)
        s = s * tl.exp(dt[:, None] * a) + (dt * x)[:, None] * bv[None, :]
        tl.store(out_ptr + r * stride_ob + ch, tl.sum(s * cv[None, :], axis=1) + dd * x, mask=mc)
        if KEEP:
            if t < T - 1:
                kept = keep_ptr + (keep_first + row * keep_k + t) * stride_kr
                tl.store(kept + ch[:, None] * stride_cc + dn[None, :], s.to(keep_ptr.dtype.element_ty), mask=m2)
    tl.store(tile, s.to(cache_ptr.dtype.element_ty), mask=m2)


def selective_decode(x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor, cache: torch.Tensor,
                     rows: torch.Tensor, init: Optional[torch.Tensor], a_log: torch.Tensor, dt_bias: torch.Tensor,
                     d: torch.Tensor, tokens: int = 1, keep: Optional[Keep] = None) -> torch.Tensor:
    """Mamba-1: x, dt [B * tokens, C] (dt before dt_proj's bias), b, c [B * tokens, N] (unit
    stride in the last dim); cache [R, C, N]; a_log [C, N]; d [C]: the skip y += d x. Returns
    y [B * tokens, C] float32."""
    n, channels = x.shape
    d_state = b.shape[1]
    assert dt.shape == x.shape and c.shape == b.shape and cache.shape[1:] == (channels, d_state)
    assert x.stride(1) == dt.stride(1) == b.stride(1) == c.stride(1) == cache.stride(2) == a_log.stride(1) == 1
    nb, kept = _verify_args(n, rows, cache, tokens, keep)
    out = torch.empty((n, channels), dtype=torch.float32, device=x.device)
    if n:
        bn = triton.next_power_of_2(d_state)
        bc = min(triton.next_power_of_2(channels), max(16, 4096 // bn))
        _selective_decode_kernel[(nb, triton.cdiv(channels, bc))](
            x, dt, b, c, cache, rows, init if init is not None else rows, a_log, dt_bias, d, out, kept[0],
            x.stride(0), dt.stride(0), b.stride(0), c.stride(0), cache.stride(0), cache.stride(1), a_log.stride(0),
            out.stride(0), kept[1], channels, kept[2], kept[3], tokens, N=d_state, BC=bc, BN=bn,
            HAS_INIT=init is not None, KEEP=keep is not None, num_warps=4,
        )
    return out
