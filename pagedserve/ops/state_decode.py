"""Triton kernels for the decode step of the state layers (Gated DeltaNet, Mamba-2, Mamba-1
and their short convolutions): one token for each of B requests, whose states sit in rows `rows` of a
layer's state tensor and are updated there in place, so that a step reads and writes each
state once (the PyTorch form gathers the rows, computes in several passes and scatters them
back). `init` [B] (None: all continue) zeroes the states of requests that start fresh. The
gates, the q/k normalisation and the softplus of the step size are computed inside, from
the layer's raw projections. Twins: state_reference.conv_decode_ref, gated_delta_decode_ref,
ssd_decode_ref, selective_decode_ref."""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from pagedserve.ops.state_reference import L2_EPS


@triton.jit
def _softplus(x):
    # torch's softplus (threshold 20: the identity above it)
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _conv_decode_kernel(
    x_ptr, cache_ptr, rows_ptr, init_ptr, w_ptr, bias_ptr, out_ptr,
    stride_x, stride_cr, stride_cc, stride_ck, stride_w, stride_o, channels,
    K: tl.constexpr, BLOCK: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < channels
    row = tl.load(rows_ptr + i).to(tl.int64)
    x = tl.load(x_ptr + i * stride_x + c, mask=mask, other=0.0)
    acc = x.to(tl.float32) * tl.load(w_ptr + c * stride_w + (K - 1), mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
    state = cache_ptr + row * stride_cr + c * stride_cc
    for j in tl.static_range(K - 1):
        s = tl.load(state + j * stride_ck, mask=mask, other=0.0)
        if HAS_INIT:
            s = tl.where(tl.load(init_ptr + i) != 0, s, tl.zeros_like(s))
        acc += s.to(tl.float32) * tl.load(w_ptr + c * stride_w + j, mask=mask, other=0.0).to(tl.float32)
        if j > 0:  # the window slides by one: input j moves to j - 1 (this thread read it just now)
            tl.store(state + (j - 1) * stride_ck, s, mask=mask)
    tl.store(state + (K - 2) * stride_ck, x.to(cache_ptr.dtype.element_ty), mask=mask)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + i * stride_o + c, acc.to(out_ptr.dtype.element_ty), mask=mask)


def conv_decode(x: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor, init: Optional[torch.Tensor],
                weight: torch.Tensor, bias: Optional[torch.Tensor] = None, silu: bool = True) -> torch.Tensor:
    """x [B, C] (unit stride in C); cache [R, C, K-1]; weight [C, K]. Returns out [B, C] in x's
    dtype; the rows' convolution states slide by x."""
    b, c = x.shape
    k = weight.shape[1]
    assert x.stride(1) == 1 and weight.stride(1) == 1 and cache.shape[1:] == (c, k - 1) and k >= 2
    out = torch.empty((b, c), dtype=x.dtype, device=x.device)
    if b:
        block = min(triton.next_power_of_2(c), 1024)
        _conv_decode_kernel[(b, triton.cdiv(c, block))](
            x, cache, rows, init if init is not None else rows, weight, bias if bias is not None else weight, out,
            x.stride(0), cache.stride(0), cache.stride(1), cache.stride(2), weight.stride(0), out.stride(0), c,
            K=k, BLOCK=block, HAS_INIT=init is not None, HAS_BIAS=bias is not None, SILU=silu,
            num_warps=4 if block >= 512 else 1,
        )
    return out


@triton.jit
def _gated_delta_decode_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, cache_ptr, rows_ptr, init_ptr, alog_ptr, dtb_ptr, out_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ab, stride_bb,
    stride_cr, stride_ch, stride_ck, stride_ob, stride_oh, scale,
    REP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, EPS: tl.constexpr,
):
    # One program per (request, value head, slice of BV value columns): the state tile
    # [Dk, BV] is read once, decayed, corrected by the delta rule, read out and written back.
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dk = tl.arange(0, BK)
    dv = tl.program_id(2) * BV + tl.arange(0, BV)
    mk, mv = dk < DK, dv < DV
    kh = h // REP  # each key head serves REP consecutive value heads
    q = tl.load(q_ptr + i * stride_qb + kh * stride_qh + dk, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + i * stride_kb + kh * stride_kh + dk, mask=mk, other=0.0).to(tl.float32)
    q = q * tl.math.rsqrt(tl.sum(q * q, axis=0) + EPS) * scale
    k = k * tl.math.rsqrt(tl.sum(k * k, axis=0) + EPS)
    v = tl.load(v_ptr + i * stride_vb + h * stride_vh + dv, mask=mv, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + i * stride_ab + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
    decay = tl.exp(-tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * _softplus(a))
    beta = 1.0 / (1.0 + tl.exp(-tl.load(b_ptr + i * stride_bb + h).to(tl.float32)))
    row = tl.load(rows_ptr + i).to(tl.int64)
    tile = cache_ptr + row * stride_cr + h * stride_ch + dk[:, None] * stride_ck + dv[None, :]
    m2 = mk[:, None] & mv[None, :]
    s = tl.load(tile, mask=m2, other=0.0).to(tl.float32)
    if HAS_INIT:
        s = tl.where(tl.load(init_ptr + i) != 0, s, 0.0)
    s = s * decay
    u = beta * (v - tl.sum(k[:, None] * s, axis=0))
    s = s + k[:, None] * u[None, :]
    tl.store(tile, s.to(cache_ptr.dtype.element_ty), mask=m2)
    tl.store(out_ptr + i * stride_ob + h * stride_oh + dv, tl.sum(q[:, None] * s, axis=0), mask=mv)


def gated_delta_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       cache: torch.Tensor, rows: torch.Tensor, init: Optional[torch.Tensor],
                       a_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """q, k [B, Hk, Dk] and v [B, Hv, Dv] as the convolution left them (unit stride in the
    last dim); a, b [B, Hv] raw; cache [R, Hv, Dk, Dv]. Returns out [B, Hv, Dv] float32."""
    n, hk, dk = q.shape
    hv, dv = v.shape[1:]
    assert k.shape == q.shape and cache.shape[1:] == (hv, dk, dv) and hv % hk == 0
    assert q.stride(2) == k.stride(2) == v.stride(2) == a.stride(1) == b.stride(1) == cache.stride(3) == 1
    out = torch.empty((n, hv, dv), dtype=torch.float32, device=v.device)
    if n:
        bk = triton.next_power_of_2(dk)
        bv = min(triton.next_power_of_2(dv), max(16, 4096 // bk))  # a [Dk, BV] tile in registers
        _gated_delta_decode_kernel[(n, hv, triton.cdiv(dv, bv))](
            q, k, v, a, b, cache, rows, init if init is not None else rows, a_log, dt_bias, out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), a.stride(0), b.stride(0),
            cache.stride(0), cache.stride(1), cache.stride(2), out.stride(0), out.stride(1), dk ** -0.5,
            REP=hv // hk, DK=dk, DV=dv, BK=bk, BV=bv, HAS_INIT=init is not None, EPS=L2_EPS, num_warps=4,
        )
    return out


@triton.jit
def _ssd_decode_kernel(
    x_ptr, dt_ptr, b_ptr, c_ptr, cache_ptr, rows_ptr, init_ptr, alog_ptr, dtb_ptr, d_ptr, out_ptr,
    stride_xb, stride_xh, stride_dtb, stride_bb, stride_bg, stride_cb, stride_cg,
    stride_cr, stride_ch, stride_cn, stride_ob, stride_oh, dt_lo, dt_hi,
    PER_GROUP: tl.constexpr, N: tl.constexpr, P: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
    HAS_INIT: tl.constexpr, CLAMP: tl.constexpr, HAS_D: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    # One program per (request, head, slice of BP head columns): the state tile [N, BP].
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dn = tl.arange(0, BN)
    dp = tl.program_id(2) * BP + tl.arange(0, BP)
    mn, mp = dn < N, dp < P
    g = h // PER_GROUP  # B and C are shared by the heads of a group
    dt = tl.load(dt_ptr + i * stride_dtb + h).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt + tl.load(dtb_ptr + h).to(tl.float32))
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    decay = tl.exp(-dt * tl.exp(tl.load(alog_ptr + h).to(tl.float32)))
    x = tl.load(x_ptr + i * stride_xb + h * stride_xh + dp, mask=mp, other=0.0).to(tl.float32)
    bv = tl.load(b_ptr + i * stride_bb + g * stride_bg + dn, mask=mn, other=0.0).to(tl.float32)
    cv = tl.load(c_ptr + i * stride_cb + g * stride_cg + dn, mask=mn, other=0.0).to(tl.float32)
    row = tl.load(rows_ptr + i).to(tl.int64)
    tile = cache_ptr + row * stride_cr + h * stride_ch + dn[:, None] * stride_cn + dp[None, :]
    m2 = mn[:, None] & mp[None, :]
    s = tl.load(tile, mask=m2, other=0.0).to(tl.float32)
    if HAS_INIT:
        s = tl.where(tl.load(init_ptr + i) != 0, s, 0.0)
    s = s * decay + bv[:, None] * (x * dt)[None, :]
    tl.store(tile, s.to(cache_ptr.dtype.element_ty), mask=m2)
    y = tl.sum(cv[:, None] * s, axis=0)
    if HAS_D:
        y += tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(out_ptr + i * stride_ob + h * stride_oh + dp, y, mask=mp)


def ssd_decode(x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor, cache: torch.Tensor,
               rows: torch.Tensor, init: Optional[torch.Tensor], a_log: torch.Tensor, dt_bias: torch.Tensor,
               dt_limit: tuple[float, float], d: Optional[torch.Tensor] = None,
               dt_softplus: bool = True) -> torch.Tensor:
    """x [B, H, P], dt [B, H] raw, b, c [B, G, N] (unit stride in the last dim); cache
    [R, H, N, P]; d [H]: the skip y += d x, if given; dt_softplus False: dt taken as it is.
    Returns y [B, H, P] float32."""
    n, h, p = x.shape
    groups, d_state = b.shape[1:]
    assert c.shape == b.shape and cache.shape[1:] == (h, d_state, p) and h % groups == 0
    assert x.stride(2) == dt.stride(1) == b.stride(2) == c.stride(2) == cache.stride(3) == 1
    out = torch.empty((n, h, p), dtype=torch.float32, device=x.device)
    if n:
        bn = triton.next_power_of_2(d_state)
        bp = min(triton.next_power_of_2(p), max(16, 4096 // bn))
        clamp = tuple(dt_limit) != (0.0, math.inf)
        _ssd_decode_kernel[(n, h, triton.cdiv(p, bp))](
            x, dt, b, c, cache, rows, init if init is not None else rows, a_log, dt_bias, d if d is not None else a_log,
            out,
            x.stride(0), x.stride(1), dt.stride(0), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            cache.stride(0), cache.stride(1), cache.stride(2), out.stride(0), out.stride(1),
            float(dt_limit[0]) if clamp else 0.0, float(dt_limit[1]) if clamp else 0.0,
            PER_GROUP=h // groups, N=d_state, P=p, BN=bn, BP=bp, HAS_INIT=init is not None, CLAMP=clamp,
            HAS_D=d is not None, SOFTPLUS=dt_softplus, num_warps=4,
        )
    return out


@triton.jit
def _selective_decode_kernel(
    x_ptr, dt_ptr, b_ptr, c_ptr, cache_ptr, rows_ptr, init_ptr, alog_ptr, dtb_ptr, d_ptr, out_ptr,
    stride_xb, stride_dtb, stride_bb, stride_cb, stride_cr, stride_cc, stride_ac, stride_ob, channels,
    N: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, HAS_INIT: tl.constexpr,
):
    # One program per (request, BC channels): the state tile [BC, N], a decay per entry.
    i = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    dn = tl.arange(0, BN)
    mc, mn = ch < channels, dn < N
    m2 = mc[:, None] & mn[None, :]
    x = tl.load(x_ptr + i * stride_xb + ch, mask=mc, other=0.0).to(tl.float32)
    dt = _softplus(tl.load(dt_ptr + i * stride_dtb + ch, mask=mc, other=0.0).to(tl.float32)
                   + tl.load(dtb_ptr + ch, mask=mc, other=0.0).to(tl.float32))
    bv = tl.load(b_ptr + i * stride_bb + dn, mask=mn, other=0.0).to(tl.float32)
    cv = tl.load(c_ptr + i * stride_cb + dn, mask=mn, other=0.0).to(tl.float32)
    a = -tl.exp(tl.load(alog_ptr + ch[:, None] * stride_ac + dn[None, :], mask=m2, other=0.0).to(tl.float32))
    row = tl.load(rows_ptr + i).to(tl.int64)
    tile = cache_ptr + row * stride_cr + ch[:, None] * stride_cc + dn[None, :]
    s = tl.load(tile, mask=m2, other=0.0).to(tl.float32)
    if HAS_INIT:
        s = tl.where(tl.load(init_ptr + i) != 0, s, 0.0)
    s = s * tl.exp(dt[:, None] * a) + (dt * x)[:, None] * bv[None, :]
    tl.store(tile, s.to(cache_ptr.dtype.element_ty), mask=m2)
    y = tl.sum(s * cv[None, :], axis=1) + tl.load(d_ptr + ch, mask=mc, other=0.0).to(tl.float32) * x
    tl.store(out_ptr + i * stride_ob + ch, y, mask=mc)


def selective_decode(x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor, cache: torch.Tensor,
                     rows: torch.Tensor, init: Optional[torch.Tensor], a_log: torch.Tensor, dt_bias: torch.Tensor,
                     d: torch.Tensor) -> torch.Tensor:
    """Mamba-1: x, dt [B, C] (dt before dt_proj's bias), b, c [B, N] (unit stride in the last
    dim); cache [R, C, N]; a_log [C, N]; d [C]: the skip y += d x. Returns y [B, C] float32."""
    n, channels = x.shape
    d_state = b.shape[1]
    assert dt.shape == x.shape and c.shape == b.shape and cache.shape[1:] == (channels, d_state)
    assert x.stride(1) == dt.stride(1) == b.stride(1) == c.stride(1) == cache.stride(2) == a_log.stride(1) == 1
    out = torch.empty((n, channels), dtype=torch.float32, device=x.device)
    if n:
        bn = triton.next_power_of_2(d_state)
        bc = min(triton.next_power_of_2(channels), max(16, 4096 // bn))
        _selective_decode_kernel[(n, triton.cdiv(channels, bc))](
            x, dt, b, c, cache, rows, init if init is not None else rows, a_log, dt_bias, d, out,
            x.stride(0), dt.stride(0), b.stride(0), c.stride(0), cache.stride(0), cache.stride(1), a_log.stride(0),
            out.stride(0), channels, N=d_state, BC=bc, BN=bn, HAS_INIT=init is not None, num_warps=4,
        )
    return out
