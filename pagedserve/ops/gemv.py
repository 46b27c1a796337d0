"""Triton kernel: y = x @ W^T (+ b) for a few rows of x (decode at batch <= GEMV_MAX_M), the
weight read once in [BLOCK_N, BLOCK_K] tiles along its contiguous K. At batch 1 a decode step
is the weights streamed from memory, and on small layers cuBLAS stops short of the bandwidth
(H100, 1.1B Llama: the 8-10 MB qkv / o projections at 1.4-1.7 TB/s of ~3).

It also folds in the small kernels around a projection, launches that cost as much as they
compute at batch 1: the RMSNorm with the residual add before qkv / gate_up (forward_rmsnorm)
and the SiLU-and-mul before down (forward_silu_mul).

Which layer shapes use it, and how, is measured, not assumed: PAGEDSERVE_GEMV names the
(N, K) shapes where benchmarks/gpu_check.py found it faster than cuBLAS on the GPU at hand,
each with its launch shape; unset, the GPU model's tuned file (ops/tuned.py) does, and without
one every layer stays on cuBLAS. Twin: torch.nn.functional.linear
(the test compares against it in float64)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pagedserve.ops import triton_interpreting, tuned
from pagedserve.ops.pdl import gdc_launch_dependents, gdc_wait, pdl_launch

GEMV_MAX_M = 4  # rows (decode requests) up to which a configured shape takes this kernel

# BLOCK_N, BLOCK_K, num_warps, num_stages[, dot[, max_rows]]: dot 1 (the default) runs the
# products on tensor cores, 0 and 2 on the CUDA cores (0: the input read per output column,
# 2: computed once and broadcast; see _gemv_tile); max_rows is read by install().
Config = tuple[int, ...]


@triton.jit
def _norm_input(x_rows, r_rows, koff, mask, HAS_RES: tl.constexpr, dtype: tl.constexpr):
    """x (+ residual), rounded to the model dtype as the residual stream is, in float32."""
    s = tl.load(x_rows + koff, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s = (s + tl.load(r_rows + koff, mask=mask, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    return s


@triton.jit
def _gemv_tile(acc, sq, w, koff, k_ok, mask, x_rows, r_rows, r_out_rows, nw_rows, pid, K,
               SILU_MUL: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr, USE_DOT: tl.constexpr,
               UPCAST: tl.constexpr, X_FP32: tl.constexpr, X_BCAST: tl.constexpr):
    """One BLOCK_K step: the input tile (with the SiLU or norm prologue) times the weight
    tile `w`, added to acc; sq gathers the norm's squares. koff / k_ok / mask are the K
    offsets, their bounds and the input mask, shaped to broadcast against the row pointers.

    Tensor cores: x [BLOCK_M, BLOCK_K] and w [BLOCK_N, BLOCK_K], acc [BLOCK_M, BLOCK_N].
    CUDA cores: w [1, BLOCK_N, BLOCK_K], and x (with the residual and norm weight) loaded as
    [BLOCK_M, BLOCK_N, BLOCK_K], each column's copy from L1, so that both share one layout
    (see _gemv_kernel); acc and sq are [BLOCK_M, BLOCK_N, BLOCK_K] per-thread partial sums,
    summed over K once after the loop (a sum across threads per step adds barriers).
    X_BCAST (CUDA cores): x, its prologue and sq are [BLOCK_M, BLOCK_K], computed once per
    program instead of once per column, then broadcast over the columns; Triton moves x into
    the weight tile's layout through shared memory (two barriers a step)."""
    dtype = w.dtype
    if SILU_MUL:  # x rows are [gate | up]: SiLU(gate) * up, rounded as silu_and_mul rounds
        g = tl.load(x_rows + koff, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_rows + K + koff, mask=mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        x = (act * u).to(dtype)
    elif NORM:
        s = _norm_input(x_rows, r_rows, koff, mask, HAS_RES, dtype)
        if USE_DOT:
            sq += tl.sum(s * s, axis=1)
        else:
            sq += s * s  # per-thread partials, [BLOCK_M, BLOCK_K] with X_BCAST
        if HAS_RES:
            if pid == 0:
                tl.store(r_out_rows + koff, s.to(dtype), mask=mask)
        nw = tl.load(nw_rows + koff, mask=k_ok, other=0.0).to(tl.float32)
        x = (s * nw).to(dtype)
    else:
        x = tl.load(x_rows + koff, mask=mask, other=0.0)
    if X_BCAST:
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)
    elif not USE_DOT:
        acc += x.to(tl.float32) * w.to(tl.float32)
    elif UPCAST:  # Triton's interpreter has no 16-bit dot
        acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    elif X_FP32:
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    else:
        acc += tl.dot(x, tl.trans(w))
    return acc, sq


@triton.jit
def _k_offsets(k0, K, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr):
    """The step's K offsets and their bounds, shaped [1, BLOCK_K] or [1, 1, BLOCK_K]."""
    offs = k0 + tl.arange(0, BLOCK_K)
    if USE_DOT:
        koff = offs[None, :]
    else:
        koff = offs[None, None, :]
    return koff, koff < K


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    r_ptr, nw_ptr, r_out_ptr, stride_rm, stride_rom, eps,
    HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    X_BCAST: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):
    # One program per BLOCK_N output columns, all (<= BLOCK_M) rows: each weight element is
    # read once. USE_DOT: the products run on tensor cores with x padded to 16 rows (x is
    # tiny); else on the CUDA cores with BLOCK_M the rows rounded up to a power of two (no
    # operand shuffle into the tensor-core layout, which costs most when x is computed in
    # the loop, as with NORM and SILU_MUL). See _gemv_tile for the shapes.
    # NORM: the input is RMSNorm(x + residual) * norm weight. The sum of squares is gathered
    # in the same pass as the products (a separate pass over x would hold back the weight
    # stream) and 1 / rms scales the accumulator at the end: (s * w_norm) rounded to the
    # dtype instead of ops/rms_norm.py's (s / rms) * w_norm, the same within one rounding.
    # Program 0 also writes the new residual stream x + residual.
    # PDL (ops/pdl.py): the first weight tile (CUDA cores: the first two) is loaded while
    # the kernel before finishes; with BLOCK_K >= K that is the program's whole slice.
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    rows_m = offs_m.to(tl.int64)
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        n_b = n_ok[:, None]
        m_b = m_ok[:, None]
        x_rows = x_ptr + rows_m[:, None] * stride_xm
        r_rows = r_ptr + rows_m[:, None] * stride_rm
        r_out_rows = r_out_ptr + rows_m[:, None] * stride_rom
        nw_rows = nw_ptr
    else:  # scalars until the first step: then acc takes the layout of the weight load (a
        # zeros tensor's default layout differed, and every step converted w into it)
        acc = 0.0
        sq = 0.0
        w_rows = w_ptr + offs_n.to(tl.int64)[None, :, None] * stride_wn
        n_b = n_ok[None, :, None]
        # x rows (and the norm weight) are read once per output column of the tile
        # ([BLOCK_M, BLOCK_N, 1] row pointers; from L1): x then shares the weight tile's
        # layout and nothing moves between layouts through shared memory in the loop (a
        # broadcast [BLOCK_M, 1, BLOCK_K] x did, with barriers). The norm and SiLU work
        # repeats per column; the loop waits on the weight stream all the same.
        if X_BCAST:  # x once per program, [BLOCK_M, BLOCK_K], broadcast in the product
            m_b = m_ok[:, None]
            x_rows = x_ptr + rows_m[:, None] * stride_xm
            r_rows = r_ptr + rows_m[:, None] * stride_rm
            r_out_rows = r_out_ptr + rows_m[:, None] * stride_rom
            nw_rows = nw_ptr
        else:
            spread = tl.zeros([1, BLOCK_N, 1], dtype=tl.int64)
            m_b = m_ok[:, None, None]
            x_rows = x_ptr + rows_m[:, None, None] * stride_xm + spread
            r_rows = r_ptr + rows_m[:, None, None] * stride_rm + spread
            # (program 0's columns all write the same residual values to the same places)
            r_out_rows = r_out_ptr + rows_m[:, None, None] * stride_rom + spread
            nw_rows = nw_ptr + spread
    x_fp32 = x_ptr.dtype.element_ty == tl.float32
    k_start = 0
    if PDL or not USE_DOT:  # the first step outside the loop (see above)
        if PDL:
            gdc_launch_dependents()
        koff, k_ok = _k_offsets(0, K, BLOCK_K, USE_DOT)
        w = tl.load(w_rows + koff, mask=n_b & k_ok, other=0.0)
        if not USE_DOT:  # the next weight tile is in flight while this one is used
            koff_next, k_ok_next = _k_offsets(BLOCK_K, K, BLOCK_K, USE_DOT)
            w_next = tl.load(w_rows + koff_next, mask=n_b & k_ok_next, other=0.0)
        if PDL:  # both tiles were requested before the kernel before this one is done
            gdc_wait()
        xoff, xk_ok = _k_offsets(0, K, BLOCK_K, USE_DOT or X_BCAST)  # x's: [1, BLOCK_K] unless spread
        acc, sq = _gemv_tile(acc, sq, w, xoff, xk_ok, m_b & xk_ok, x_rows, r_rows, r_out_rows, nw_rows, pid, K,
                             SILU_MUL, NORM, HAS_RES, USE_DOT, UPCAST, x_fp32, X_BCAST)
        k_start = BLOCK_K
    if USE_DOT:  # Triton pipelines these loads itself (asynchronous copies, num_stages)
        for k0 in range(k_start, K, BLOCK_K):
            koff, k_ok = _k_offsets(k0, K, BLOCK_K, USE_DOT)
            w = tl.load(w_rows + koff, mask=n_b & k_ok, other=0.0)
            acc, sq = _gemv_tile(acc, sq, w, koff, k_ok, m_b & k_ok, x_rows, r_rows, r_out_rows, nw_rows, pid, K,
                                 SILU_MUL, NORM, HAS_RES, USE_DOT, UPCAST, x_fp32, X_BCAST)
    else:  # it does not for these: tile k + 1 is loaded by hand before tile k is used
        w = w_next
        for k0 in range(BLOCK_K, K, BLOCK_K):
            koff_next, k_ok_next = _k_offsets(k0 + BLOCK_K, K, BLOCK_K, USE_DOT)
            w_next = tl.load(w_rows + koff_next, mask=n_b & k_ok_next, other=0.0)  # past K: masked, no traffic
            xoff, xk_ok = _k_offsets(k0, K, BLOCK_K, USE_DOT or X_BCAST)
            acc, sq = _gemv_tile(acc, sq, w, xoff, xk_ok, m_b & xk_ok, x_rows, r_rows, r_out_rows, nw_rows, pid, K,
                                 SILU_MUL, NORM, HAS_RES, USE_DOT, UPCAST, x_fp32, X_BCAST)
            w = w_next
    if USE_DOT:
        if NORM:
            acc = acc * tl.math.rsqrt(sq / K + eps)[:, None]
    else:
        acc = tl.sum(acc, axis=2)
        if NORM:
            if X_BCAST:
                acc = acc * tl.math.rsqrt(tl.sum(sq, axis=1) / K + eps)[:, None]
            else:
                acc = acc * tl.math.rsqrt(tl.sum(sq, axis=2) / K + eps)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], config: Config,
         silu_mul: bool = False, norm: Optional[tuple[Optional[torch.Tensor], torch.Tensor, float]] = None,
         ) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
    """x: [M, K] (M <= 16, unit stride in K), weight: [N, K] contiguous, bias: [N] or None.
    silu_mul: x is [M, 2K], a fused gate_up output, and the input is SiLU(gate) * up (the
    MLP's activation, done while loading x: one kernel fewer).
    norm=(residual or None, norm_weight, eps): the input is rms_norm(x, norm_weight, eps,
    residual) (ops/rms_norm.py) and the result is (y, x + residual), or (y, x) without a
    residual: the decoder layer's norm and the projection after it in one kernel."""
    m, k = x.shape
    if silu_mul:
        k //= 2
    n = weight.shape[0]
    assert m <= 16 and weight.shape[1] == k and x.stride(-1) == 1 and weight.is_contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    residual, norm_weight, eps = norm if norm is not None else (None, weight, 0.0)
    res_out = torch.empty_like(x) if residual is not None else x
    if m:
        block_n, block_k, warps, stages = config[:4]
        path = config[4] if len(config) > 4 else 1
        use_dot = path == 1
        r = residual if residual is not None else x
        assert r.stride(-1) == 1
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            x, weight, bias if bias is not None else weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
            r, norm_weight, res_out, r.stride(0), res_out.stride(0), eps,
            HAS_BIAS=bias is not None, SILU_MUL=silu_mul, NORM=norm is not None, HAS_RES=residual is not None,
            BLOCK_M=16 if use_dot else triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot,
            X_BCAST=path == 2, UPCAST=x.dtype != torch.float32 and triton_interpreting(), num_warps=warps, num_stages=stages,
            **pdl_launch(x.device),
        )
    return y if norm is None else (y, res_out)


def parse_shapes(text: Optional[str]) -> dict[tuple[int, int], Config]:
    """PAGEDSERVE_GEMV="NxK:BLOCK_N,BLOCK_K,warps,stages[,dot[,max_rows]];..." -> {(N, K):
    config}. max_rows (1..GEMV_MAX_M, default GEMV_MAX_M): the most rows the layer sends to
    the kernel, for a shape that wins at batch 1 only."""
    out: dict[tuple[int, int], Config] = {}
    for item in filter(None, (text or "").split(";")):
        try:
            shape, cfg = item.split(":")
            n, k = (int(v) for v in shape.lower().split("x"))
            bn, bk, warps, stages, *rest = (int(v) for v in cfg.split(","))
            dot = rest[0] if rest else 1
            max_rows = rest[1] if len(rest) > 1 else GEMV_MAX_M
            if len(rest) > 2 or dot not in (0, 1, 2) or not 1 <= max_rows <= GEMV_MAX_M:
                raise ValueError
        except ValueError:
            raise ValueError(f"PAGEDSERVE_GEMV: expected 'NxK:BLOCK_N,BLOCK_K,warps,stages[,dot 0|1|2[,max_rows "
                             f"1..{GEMV_MAX_M}]]', got {item!r}") from None
        if min(bn, bk) < (16 if dot == 1 else 1) or bn & (bn - 1) or bk & (bk - 1) or warps < 1 or stages < 1:
            raise ValueError(f"PAGEDSERVE_GEMV: BLOCK_N and BLOCK_K must be powers of two (>= 16 with dot) "
                             f"in {item!r}")
        out[(n, k)] = (bn, bk, warps, stages, dot, max_rows)
    return out


# The environment's shapes ({} where set empty), else tuned.UNSET: see shapes_for.
GEMV_SHAPES = tuned.from_env("PAGEDSERVE_GEMV", parse_shapes)


def shapes_for(device: torch.device) -> dict[tuple[int, int], Config]:
    """The layer shapes that take the kernel on `device`: PAGEDSERVE_GEMV, else the GPU's
    tuned file, else none."""
    return tuned.resolve(GEMV_SHAPES, "gemv", device, {})


def install(module: torch.nn.Linear, config: Config) -> None:
    """Route the layer's small-batch calls (up to the config's max_rows, else GEMV_MAX_M rows)
    through the kernel; also gives it forward_silu_mul(gate_up), the MLP's activation and this
    layer in one, and forward_rmsnorm (the model uses them where present)."""
    linear = torch.nn.functional.linear
    max_rows = config[5] if len(config) > 5 else GEMV_MAX_M

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= max_rows:
            return gemv(x, module.weight, module.bias, config)
        return linear(x, module.weight, module.bias)

    def forward_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        if gate_up.dim() == 2 and gate_up.shape[0] <= max_rows:
            return gemv(gate_up, module.weight, module.bias, config, silu_mul=True)
        from pagedserve.ops.activation import silu_and_mul

        return linear(silu_and_mul(gate_up), module.weight, module.bias)

    def forward_rmsnorm(x: torch.Tensor, residual: Optional[torch.Tensor], norm: torch.nn.Module):
        """(layer(norm(x + residual)), x + residual); (layer(norm(x)), x) without residual.
        `norm` is the RMSNorm module before this layer (its weight and eps)."""
        if x.dim() == 2 and x.shape[0] <= max_rows:
            return gemv(x, module.weight, module.bias, config, norm=(residual, norm.weight, norm.eps))
        if residual is None:
            return linear(norm(x), module.weight, module.bias), x
        h, residual = norm(x, residual)
        return linear(h, module.weight, module.bias), residual

    module.forward = forward
    module.forward_silu_mul = forward_silu_mul
    module.forward_rmsnorm = forward_rmsnorm


def install_all(model: torch.nn.Module, shapes: Optional[dict[tuple[int, int], Config]] = None
                ) -> dict[tuple[int, int], Config]:
    """Every nn.Linear of the model whose (out, in) shape is configured (default: shapes_for
    the model's device); returns the shapes installed."""
    if shapes is None:
        shapes = shapes_for(next(model.parameters()).device)
    done = {}
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        shape = (m.out_features, m.in_features)
        if shape in shapes:
            install(m, shapes[shape])
            done[shape] = shapes[shape]
    return done
