"""Triton paged attention over a flat varlen batch (vLLM's "unified" design): one kernel for
prefill chunks and decode tokens, K/V read through block tables. Twin:
reference.paged_attention_ref.

Each program owns one (query block, kv head): BLOCK_Q consecutive query tokens of one request
times the GROUP query heads that share the kv head, as a BLOCK_M = BLOCK_Q * GROUP row tile
(GQA: every K/V tile is loaded once for the whole group). It walks the request's keys in
TILE_N-wide tiles (a tile may span several cache pages or part of one: each key finds its page
through the block table) with an online softmax in float32, up to the last key its last query
may see (query i of a chunk sees keys [0, seq_len - q_len + i]).

Grid axis 0 enumerates query blocks across all requests of the launch; a program finds its
request by binary search over query_start_loc (request r's blocks start at
qsl[r] // BLOCK_Q + r), so the grid depends only on token and request counts, never on
lengths held on the device (CUDA graphs replay it unchanged). Decode launches (one query
token per request) skip the search, and may split each request's keys into NUM_SEGMENTS
(flash-decoding) so that a small batch still fills the GPU; the last segment program of
each (request, kv head) to finish merges them."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from pagedserve.ops import triton_interpreting, tuned
from pagedserve.ops.pdl import pdl_launch, pdl_start
from pagedserve.ops.reshape_and_cache import fp8_kv_value

_LOG2E = 1.4426950408889634
# K tiles loaded key-major and transposed in registers (1), or gathered head-dim-major (0).
# Both are exact; benchmarks/gpu_check.py times both. On an H100 (bf16, 32/4 heads, d 64)
# key-major was faster: decode of 256 x 800 keys 100.5 vs 118.6 us, prefill of 8 x 1024
# 179.6 vs 190.9 us. PAGEDSERVE_ATTN_K_ROWS=0 picks the other (unset: the GPU model's tuned
# file, ops/tuned.py, else key-major).
K_ROWS_DEFAULT = True
K_ROWS = tuned.from_env("PAGEDSERVE_ATTN_K_ROWS", lambda v: v == "1")


def parse_decode_config(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    """PAGEDSERVE_ATTN_DECODE_CONFIG="TILE_N,num_warps,num_stages": the decode variant's
    launch shape (benchmarks/gpu_check.py times a few on the GPU at hand and runs the engine
    with the fastest). None (empty): TILE_N from the head dim, warps from the tile, Triton's
    stages."""
    if not text:
        return None
    try:
        tile_n, warps, stages = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"PAGEDSERVE_ATTN_DECODE_CONFIG must be 'TILE_N,num_warps,num_stages', got {text!r}") from None
    for name, v, lo in (("TILE_N", tile_n, 16), ("num_warps", warps, 1), ("num_stages", stages, 1)):
        if v < lo or (name != "num_stages" and v & (v - 1)):
            raise ValueError(f"PAGEDSERVE_ATTN_DECODE_CONFIG: {name} must be a power of two >= {lo}, got {v}")
    return tile_n, warps, stages


# The environment's decode launch shape (None where set empty: the built-in one), else
# tuned.UNSET, where the GPU model's tuned file decides.
DECODE_CONFIG = tuned.from_env("PAGEDSERVE_ATTN_DECODE_CONFIG", parse_decode_config)


@triton.jit
def _find_seq(qsl_ptr, target, num_seqs, BLOCK_Q: tl.constexpr):
    """Last request r in [0, num_seqs) with qsl[r] // BLOCK_Q + r <= target."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if start <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in float32. UPCAST only under TRITON_INTERPRET: the interpreter
    multiplies bfloat16 bit patterns as integers (triton-lang/triton#11584), so both
    operands go through float32 there; bf16 x bf16 products are exact in float32, so this
    matches the GPU's tensor-core result up to summation order."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _rope(x, x_swap, cos, sin, sign, dtype):
    """Rotate-half RoPE of x (float32 copies of dtype values): x * cos + sign * x_swap * sin,
    x_swap the other half, sign -1 on the first half; each product rounded to the dtype,
    then the sum, as ops/rotary.py (and the PyTorch form) round."""
    a = (x * cos).to(dtype).to(tl.float32)
    b = (x_swap * sin).to(dtype).to(tl.float32)
    return (a + sign * b).to(dtype)


@triton.jit
def _softcap(s, cap_log2):
    """Gemma 2's logit softcap in the kernel's base-2 units: cap * tanh(score / cap) with both
    sides scaled by log2(e); tanh from exp2, which saturates cleanly at +-1."""
    return cap_log2 * (1.0 - 2.0 / (tl.math.exp2(2.0 * _LOG2E * (s / cap_log2)) + 1.0))


# Arguments that change from step to step are kept out of Triton's specialisation key (it
# keys on integers' divisibility by 16 and pointers' alignment): otherwise a step whose
# request count, block-table width or slice offset lands on a new combination compiles a
# new variant mid-run, a pause of a second or more.
@triton.jit(do_not_specialize=["block_tables_ptr", "seq_lens_ptr", "qsl_ptr", "num_seqs", "stride_bt"])
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
    seg_acc_ptr, seg_max_ptr, seg_sum_ptr, counter_ptr, sinks_ptr,
    alibi_ptr,  # ALIBI: [Hq] float32 slopes; scores gain slope * (key position - query position)
    scale_log2,  # softmax scale * log2(e): the kernel works in base 2
    window,  # SLIDING: each query sees only its last `window` keys, itself included; CHUNKED:
    # -window is the chunk length (chunked local attention: keys of the query's chunk)
    softcap_log2,  # SOFTCAP: the logit softcap * log2(e)
    num_seqs,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_k_b, stride_k_s, stride_k_h, stride_v_b, stride_v_s, stride_v_h,
    stride_bt,
    kn_ptr, vn_ptr, pos_ptr, cos_sin_ptr, slot_ptr, stride_kn_t, stride_kn_h, stride_vn_t, stride_vn_h, stride_cs,
    limit_ptr,  # LIMIT: [T] int32 keys each query token sees (two-way image spans), instead of causal
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    IS_DECODE: tl.constexpr, NUM_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, K_ROWS: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr,
    SLIDING: tl.constexpr, CHUNKED: tl.constexpr, SOFTCAP: tl.constexpr, KV_FP8: tl.constexpr, SINKS: tl.constexpr,
    LIMIT: tl.constexpr, ALIBI: tl.constexpr, INTERPRET: tl.constexpr,
):
    # ROPE (decode only): q, the new key (kn) and value (vn) come straight from the qkv
    # projection; the kernel rotates q and kn, segment 0 writes kn and vn into the cache at
    # the token's slot (-1: padding, skipped), and the new key enters the softmax from
    # registers while the cache walk stops before it (so no program reads the slot being
    # written). One kernel instead of the RoPE + KV-write kernel and this one.
    pdl_start(PDL)  # ops/pdl.py: q and the new keys come from the kernel before
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    if IS_DECODE:
        seq = pid
        q_block = 0
    else:
        target = pid + tl.load(qsl_ptr) // BLOCK_Q  # qsl may start past 0 (prefills after decodes)
        seq = _find_seq(qsl_ptr, target, num_seqs, BLOCK_Q)
        q_block = target - (tl.load(qsl_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # keys cached before this chunk

    offs_m = tl.arange(0, BLOCK_M)
    q_pos = q_block * BLOCK_Q + offs_m // GROUP  # position within the chunk
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m // GROUP < BLOCK_Q) & (q_pos < q_len)
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_ok = offs_d < HEAD_DIM
    q_rows = (q_start + q_pos).to(tl.int64)
    q_ptrs = q_ptr + q_rows[:, None] * stride_q_t + head[:, None] * stride_q_h
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptrs + offs_d[None, :], mask=q_mask, other=0.0)
    q_abs = context + q_pos  # absolute position: sees keys [0, q_abs]

    # Keys the block's last query sees bound the walk (causal: later tiles are all masked).
    last_q = tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_len = tl.minimum(context + last_q + 1, seq_len)
    if LIMIT:  # each query's own bound; the walk goes to the farthest
        q_see = tl.load(limit_ptr + q_rows, mask=row_ok, other=0)
        kv_len = tl.minimum(tl.max(q_see, axis=0), seq_len)
    if ALIBI:  # in the kernel's base-2 units, like the scores
        slope_log2 = tl.load(alibi_ptr + head, mask=row_ok, other=0.0) * _LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    if ROPE:
        dtype = q_ptr.dtype.element_ty
        first = offs_d < HEAD_DIM // 2
        d_swap = tl.where(first, offs_d + HEAD_DIM // 2, offs_d - HEAD_DIM // 2)  # the other half
        d_cs = tl.where(first, offs_d, offs_d - HEAD_DIM // 2)
        sign = tl.where(first, -1.0, 1.0)
        cs_row = cos_sin_ptr + tl.load(pos_ptr + q_start).to(tl.int64) * stride_cs
        cos = tl.load(cs_row + d_cs, mask=d_ok, other=0.0).to(dtype).to(tl.float32)
        sin = tl.load(cs_row + HEAD_DIM // 2 + d_cs, mask=d_ok, other=0.0).to(dtype).to(tl.float32)
        q_swap = tl.load(q_ptrs + d_swap[None, :], mask=q_mask, other=0.0)
        q = _rope(q.to(tl.float32), q_swap.to(tl.float32), cos[None, :], sin[None, :], sign[None, :], dtype)
        kn_row = kn_ptr + q_start.to(tl.int64) * stride_kn_t + kv_head * stride_kn_h
        kn = _rope(tl.load(kn_row + offs_d, mask=d_ok, other=0.0).to(tl.float32),
                   tl.load(kn_row + d_swap, mask=d_ok, other=0.0).to(tl.float32), cos, sin, sign, dtype)
        vn = tl.load(vn_ptr + q_start.to(tl.int64) * stride_vn_t + kv_head * stride_vn_h + offs_d, mask=d_ok, other=0.0)
        if KV_FP8:  # the new key and value as the cache will hold them, for this step too
            kn = fp8_kv_value(kn.to(tl.float32), INTERPRET).to(k_cache_ptr.dtype.element_ty).to(dtype)
            vn = fp8_kv_value(vn.to(tl.float32), INTERPRET).to(v_cache_ptr.dtype.element_ty).to(dtype)
        slot = tl.load(slot_ptr + q_start).to(tl.int64)
        if segment == 0:
            if slot >= 0:
                page_s = (slot // BLOCK_SIZE) * stride_k_b + (slot % BLOCK_SIZE) * stride_k_s
                tl.store(k_cache_ptr + page_s + kv_head * stride_k_h + offs_d, kn.to(k_cache_ptr.dtype.element_ty),
                         mask=d_ok)
                page_v = (slot // BLOCK_SIZE) * stride_v_b + (slot % BLOCK_SIZE) * stride_v_s
                tl.store(v_cache_ptr + page_v + kv_head * stride_v_h + offs_d, vn.to(v_cache_ptr.dtype.element_ty),
                         mask=d_ok)
        # The new key, the last position, starts segment 0's softmax; the walk stops before it.
        kv_len = context
        own = (segment == 0) & (seq_len > 0)  # graph padding rows have no key at all
        s_new = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], axis=1) * scale_log2
        if SOFTCAP:
            s_new = _softcap(s_new, softcap_log2)
        m_i = tl.where(own, s_new, m_i)
        l_i = tl.where(own, 1.0, l_i)
        acc = tl.where(own, vn.to(tl.float32)[None, :] + acc, acc)
    num_tiles = tl.cdiv(kv_len, TILE_N)
    first_tile = 0
    if SLIDING:  # tiles wholly before the block's first query's window are skipped
        first_tile = tl.maximum(context + q_block * BLOCK_Q - window + 1, 0) // TILE_N
    if CHUNKED:  # ... or before its chunk
        q_first = tl.maximum(context + q_block * BLOCK_Q, 0)
        first_tile = (q_first - q_first % -window) // TILE_N
    if NUM_SEGMENTS > 1:
        per_seg = tl.cdiv(num_tiles - first_tile, NUM_SEGMENTS)
        tile_lo = first_tile + segment * per_seg
        tile_hi = tl.minimum(tile_lo + per_seg, num_tiles)
    else:
        tile_lo = first_tile
        tile_hi = num_tiles

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(tile_lo, tile_hi):
        offs_n = tile * TILE_N + tl.arange(0, TILE_N)
        n_ok = offs_n < kv_len
        page = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        in_page = (offs_n % BLOCK_SIZE).to(tl.int64)
        if K_ROWS:  # [TILE_N, HEAD_DIM_P] in memory order, transposed for the product
            k = tl.load(k_cache_ptr + page[:, None] * stride_k_b + in_page[:, None] * stride_k_s
                        + kv_head * stride_k_h + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(q.dtype)  # (an FP8 cache: widened)
            s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * scale_log2
        else:  # loaded directly as [HEAD_DIM_P, TILE_N]
            k = tl.load(k_cache_ptr + page[None, :] * stride_k_b + in_page[None, :] * stride_k_s
                        + kv_head * stride_k_h + offs_d[:, None],
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0).to(q.dtype)
            s = _dot(q, k, DOT_PRECISION, UPCAST_DOT) * scale_log2
        if SOFTCAP:
            s = _softcap(s, softcap_log2)
        if ALIBI:
            s += slope_log2[:, None] * (offs_n[None, :] - q_abs[:, None]).to(tl.float32)
        if LIMIT:
            visible = (offs_n[None, :] < q_see[:, None]) & n_ok[None, :]
        else:
            visible = (offs_n[None, :] <= q_abs[:, None]) & n_ok[None, :]
        if SLIDING:
            visible &= offs_n[None, :] > q_abs[:, None] - window
        if CHUNKED:
            visible &= offs_n[None, :] >= q_abs[:, None] - q_abs[:, None] % -window
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + page[:, None] * stride_v_b + in_page[:, None] * stride_v_s
                    + kv_head * stride_v_h + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(q.dtype)  # [TILE_N, HEAD_DIM_P]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new

    if NUM_SEGMENTS > 1:
        # Unnormalised partials, indexed by request (decode: one token each) and query head.
        # The last of the request's NUM_SEGMENTS programs for this kv head to get here merges
        # them (no second kernel): a counter per (request, kv head) counts the programs done,
        # the last one resets it for the next launch.
        seg_row = (seq.to(tl.int64) * (GROUP * tl.num_programs(1)) + head) * NUM_SEGMENTS + segment
        tl.store(seg_max_ptr + seg_row, m_i, mask=row_ok)
        tl.store(seg_sum_ptr + seg_row, l_i, mask=row_ok)
        tl.store(seg_acc_ptr + seg_row[:, None] * HEAD_DIM_P + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.debug_barrier()  # every thread's partials are stored before the count (released below)
        count_ptr = counter_ptr + seq.to(tl.int64) * tl.num_programs(1) + kv_head
        if tl.atomic_add(count_ptr, 1, sem="acq_rel") == NUM_SEGMENTS - 1:
            tl.store(count_ptr, 0)
            _merge_segments(out_ptr, seg_acc_ptr, seg_max_ptr, seg_sum_ptr, q_start, kv_head, seq,
                            tl.num_programs(1), stride_o_t, stride_o_h, offs_d, d_ok, sinks_ptr,
                            GROUP, GROUP_P, HEAD_DIM_P, NUM_SEGMENTS, SINKS)
    else:
        if SINKS:  # the sink's logit joins the denominator (exp2(+inf) when nothing is visible: 0 out)
            l_i += tl.math.exp2(tl.load(sinks_ptr + head, mask=row_ok, other=0.0) * _LOG2E - m_i)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no visible key -> 0
        tl.store(out_ptr + q_rows[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_segments(out_ptr, seg_acc_ptr, seg_max_ptr, seg_sum_ptr, token, kv_head, seq, num_kv_heads,
                    stride_o_t, stride_o_h, offs_d, d_ok, sinks_ptr,
                    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM_P: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
                    SINKS: tl.constexpr):
    """One token's output for the GROUP query heads of a kv head from the segments'
    partials: each segment's sum rescaled to the largest maximum (empty segments weigh 0).
    The partials come from other multiprocessors: read past L1 (.cg), which may hold stale
    lines of a previous launch's partials at the same addresses."""
    g = tl.arange(0, GROUP_P)
    g_ok = g < GROUP
    offs_s = tl.arange(0, NUM_SEGMENTS)
    head = kv_head * GROUP + g
    rows = (seq.to(tl.int64) * (GROUP * num_kv_heads) + head)[:, None] * NUM_SEGMENTS + offs_s[None, :]
    m = tl.load(seg_max_ptr + rows, mask=g_ok[:, None], other=float("-inf"), cache_modifier=".cg")
    l = tl.load(seg_sum_ptr + rows, mask=g_ok[:, None], other=0.0, cache_modifier=".cg")
    acc = tl.load(seg_acc_ptr + rows[:, :, None] * HEAD_DIM_P + offs_d[None, None, :], mask=g_ok[:, None, None],
                  other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, axis=1)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_max[:, None])  # empty segments: exp2(-inf) = 0
    total = tl.sum(l * w, axis=1)
    if SINKS:  # once per head, after the segments (see the kernel's end)
        total += tl.math.exp2(tl.load(sinks_ptr + head, mask=g_ok, other=0.0) * _LOG2E - m_max)
    out = tl.sum(acc * w[:, :, None], axis=1) / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out_ptr + token.to(tl.int64) * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _segment_counters(device: torch.device, n: int) -> torch.Tensor:
    """The zeroed int32 counters of the segment merge, at least n of them, per device. Each
    launch leaves them zeroed. A CUDA graph holds the address it captured, so a buffer is
    never freed (a larger one is added beside it; n is below the multiprocessor count in
    the engine, so the first one, 4096, serves). Launches on one device must not overlap
    (one stream), as the engine's do."""
    bufs = _COUNTERS.setdefault(device, [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return bufs[-1]


def block_m_for(group: int, decode: bool) -> int:
    """Rows per program: decode holds one token's group of heads; prefill packs several query
    tokens so each K/V tile feeds a wider matrix product."""
    rows = 16 if decode else 64
    return max(rows, triton.next_power_of_2(group))


def tile_n_for(head_dim_p: int, decode: bool = False) -> int:
    """Keys per tile. Decode takes 32: on an H100 (benchmarks/gpu_check.py's sweep, head dim
    64, batch 256 x 800 keys, twice) it beat 64 by 11-14%. Prefill takes 64 at head dim 64
    and 32 above. Both from the sm_90 builds at head dim 128, which spill registers with 64
    (decode 64-504 bytes of stack at 4 warps, prefill 48-64 at 8 warps) and not with 32."""
    if decode or head_dim_p > 64:
        return 32
    return 64


def num_warps_for(block_m: int, head_dim_p: int) -> int:
    """4 warps, 8 from a [64, 128] accumulator up (prefill at head dim 128 spilled 336-992
    bytes at 4 warps in its sm_90 build). Left as measured: prefill at head dim 64 with 4
    warps (the H100 benchmark's), where MHA spills 32 bytes and GQA 4+ nothing."""
    return 4 if block_m * head_dim_p < 64 * 128 else 8


class DecodeRope(NamedTuple):
    """What a decode launch needs to do the RoPE and the KV write itself (paged_attention's
    `rope`): the step's positions [T] and slots [T] (int64, -1: not written), the model's
    cos/sin table [max_positions, D] (float32, cos then sin), and the new key and value
    [T, KVH, D], unrotated, as the qkv projection left them (views are fine)."""

    positions: torch.Tensor
    cos_sin: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    slot_mapping: torch.Tensor


def paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, num_seqs: int, num_tokens: int, scale: float,
    out: Optional[torch.Tensor] = None, decode: bool = False, num_segments: int = 1,
    block_m: Optional[int] = None, tile_n: Optional[int] = None, k_rows: Optional[bool] = None,
    num_warps: Optional[int] = None, num_stages: Optional[int] = None, rope: Optional[DecodeRope] = None,
    window: int = 0, softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
    kv_limit: Optional[torch.Tensor] = None, alibi: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention for requests [0, num_seqs) described by block_tables [num_seqs, *] int32,
    seq_lens [num_seqs] int32 and query_start_loc [num_seqs + 1] int32 (absolute token rows;
    it may start past 0 when the caller passes a slice). query/out: [T, Hq, D]; caches:
    [num_blocks, block_size, KVH, D]. num_tokens: query rows these requests span (a host
    upper bound; sizes the grid). decode=True promises one query token per request and
    allows num_segments > 1 (a power of two). Rows of `out` outside the requests are not
    written. k_rows: how K tiles are loaded (default: K_ROWS, else the tuned file, else
    K_ROWS_DEFAULT). tile_n, num_warps, num_stages: launch shape (decode default:
    DECODE_CONFIG, else the tuned file, else derived from the head dim). rope (decode only):
    query and rope.key are unrotated; the kernel rotates them and writes the new key and
    value into the caches, which then hold only the keys before each token (see the kernel).
    window > 0: each query sees only its last `window` keys (sliding window), window < 0 those
    of its chunk of -window positions (chunked local attention, Llama 4); softcap > 0:
    scores become softcap * tanh(score / softcap) before the softmax (Gemma 2). sinks [Hq]
    float32 (GPT-OSS): one more logit per head in each softmax's denominator, with no value.
    kv_limit [T] int32 (prefill only): how many keys each query row sees, in place of its
    causal bound (AttentionMetadata.kv_limit: Gemma 3's two-way image spans). alibi [Hq]
    float32 (BLOOM, MPT): each score gains slope[h] * (key position - query position), after
    the softcap."""
    t, hq, d = query.shape
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    assert hq % kvh == 0 and k_cache.shape[3] == d and query.stride(-1) == 1 and k_cache.stride(-1) == 1
    assert num_segments == 1 or (decode and num_segments & (num_segments - 1) == 0)
    assert rope is None or (decode and d % 2 == 0 and rope.key.shape[1:] == (kvh, d) and rope.value.shape[1:] == (kvh, d)
                            and rope.key.stride(-1) == 1 and rope.value.stride(-1) == 1 and rope.cos_sin.shape[1] == d
                            and rope.cos_sin.stride(-1) == 1)
    out = torch.empty_like(query) if out is None else out
    assert block_tables.stride(-1) == 1 and out.stride(-1) == 1
    assert sinks is None or (sinks.shape == (hq,) and sinks.dtype == torch.float32 and sinks.stride(0) == 1)
    assert alibi is None or (alibi.shape == (hq,) and alibi.dtype == torch.float32 and alibi.stride(0) == 1)
    assert kv_limit is None or (not decode and kv_limit.dtype == torch.int32 and kv_limit.stride(0) == 1)
    if num_seqs == 0:
        return out
    group = hq // kvh
    head_dim_p = max(16, triton.next_power_of_2(d))
    block_m = block_m or block_m_for(group, decode)
    block_q = 1 if decode else block_m // group
    decode_config = tuned.resolve(DECODE_CONFIG, "attn_decode_config", query.device, None) if decode else None
    if decode_config is not None:
        tile_n = tile_n or decode_config[0]
        num_warps = num_warps or decode_config[1]
        num_stages = num_stages or decode_config[2]
    tile_n = tile_n or tile_n_for(head_dim_p, decode)
    launch = {"num_warps": num_warps or num_warps_for(block_m, head_dim_p)}
    if num_stages:
        launch["num_stages"] = num_stages
    assert block_m >= group and block_m >= 16 and tile_n >= 16, "tl.dot needs 16-wide tiles"
    grid0 = num_seqs if decode else triton.cdiv(num_tokens, block_q) + num_seqs
    precision = "ieee" if query.dtype == torch.float32 else "tf32"  # float32 stays exact; 16-bit ignores it
    if num_segments > 1:
        seg_acc = torch.empty(num_seqs, hq, num_segments, head_dim_p, dtype=torch.float32, device=query.device)
        seg_max = torch.empty(num_seqs, hq, num_segments, dtype=torch.float32, device=query.device)
        seg_sum = torch.empty_like(seg_max)
        counters = _segment_counters(query.device, num_seqs * kvh)
    else:
        seg_acc = seg_max = seg_sum = out  # unused
        counters = query  # unused
    pdl = pdl_launch(query.device)
    _paged_attention_kernel[(grid0, kvh, num_segments)](
        out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        seg_acc, seg_max, seg_sum, counters, sinks if sinks is not None else seg_max,
        alibi if alibi is not None else seg_max,
        scale * _LOG2E, int(window), float(softcap) * _LOG2E, num_seqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        *((rope.key, rope.value, rope.positions, rope.cos_sin, rope.slot_mapping, rope.key.stride(0),
           rope.key.stride(1), rope.value.stride(0), rope.value.stride(1), rope.cos_sin.stride(0))
          if rope is not None else (query,) * 5 + (0,) * 5),  # unused; aligned, so no new variant
        kv_limit if kv_limit is not None else seq_lens,
        GROUP=group, GROUP_P=triton.next_power_of_2(group), HEAD_DIM=d, HEAD_DIM_P=head_dim_p, BLOCK_SIZE=block_size, TILE_N=tile_n,
        BLOCK_M=block_m, BLOCK_Q=block_q, IS_DECODE=decode, NUM_SEGMENTS=num_segments, DOT_PRECISION=precision,
        UPCAST_DOT=query.dtype == torch.bfloat16 and triton_interpreting(),
        K_ROWS=tuned.resolve(K_ROWS, "attn_k_rows", query.device, K_ROWS_DEFAULT) if k_rows is None else k_rows,
        ROPE=rope is not None, SLIDING=window > 0, CHUNKED=window < 0, SOFTCAP=softcap > 0, KV_FP8=k_cache.dtype == torch.float8_e4m3fn,
        SINKS=sinks is not None, LIMIT=kv_limit is not None, ALIBI=alibi is not None,
        INTERPRET=triton_interpreting(), **launch, **pdl,
    )
    return out


def decode_segments(num_decodes: int, num_kv_heads: int, num_sms: int, max_segments: int = 16) -> int:
    """Split each decode request's keys so that about 2 programs per multiprocessor run;
    depends on the batch size only (a CUDA graph bucket fixes it)."""
    programs = num_decodes * num_kv_heads
    if programs >= num_sms:
        return 1
    return min(max_segments, triton.next_power_of_2(triton.cdiv(2 * num_sms, programs)))
