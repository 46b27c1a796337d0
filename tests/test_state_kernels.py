"""The state layers' decode kernels (pagedserve/ops/state_decode.py) against their PyTorch twins
(ops/state_reference.py): several steps in a row over rows scattered in a larger state tensor,
inputs that are strided views of a fused projection, requests that start fresh in a row that
holds NaN (the kernel must not read it) and rows no request owns (they must stay as they
were); a speculative verification's tokens in one call, the states after each kept. Without CUDA the kernels run in Triton's interpreter on small shapes; `-m gpu` runs the
same checks on CUDA at real models' sizes."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.model.layers.gated_delta import GatedRMSNorm  # noqa: E402
from pagedserve.model.layers.mamba2 import GroupGatedRMSNorm  # noqa: E402
from pagedserve.ops.gated_norm import gated_rms_norm  # noqa: E402
from pagedserve.ops.state_decode import conv_decode, gated_delta_decode, selective_decode, ssd_decode  # noqa: E402
from pagedserve.ops.state_reference import (  # noqa: E402
    conv_decode_ref, gated_delta_decode_ref, selective_decode_ref, ssd_decode_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 3
# (rtol, atol) for outputs and states after STEPS steps, by (input dtype, state dtype). A
# bfloat16 state may round the other way on one side (values of order 4 here: 1/32 apart).
TOL = {(torch.float32, torch.float32): (1e-5, 1e-5), (torch.bfloat16, torch.float32): (2e-3, 2e-3),
       (torch.bfloat16, torch.bfloat16): (2e-2, 6e-2)}


def _fused(n: int, widths: list[int], dtype: torch.dtype, g: torch.Generator) -> list[torch.Tensor]:
    """Slices of one [n, sum + 3] projection (strided rows, as the layers split theirs)."""
    full = torch.randn(n, sum(widths) + 3, generator=g).to(dtype).to(DEV)
    return list(full[:, 3:].split(widths, dim=-1))


def _rows(batch: int, total: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scattered rows, and init flags with the second request (if any) starting fresh."""
    rows = torch.randperm(total, generator=g)[:batch].to(DEV)
    init = torch.ones(batch, device=DEV)
    if batch > 1:
        init[1] = 0
    return rows, init


def _check(kernel, twin, inputs_per_step, state_shape, rows, init, state_dtype, tol, **params) -> None:
    """Run kernel and twin for each step's inputs from the same states (the kernel's fresh rows
    hold NaN); compare outputs and whole state tensors after every step."""
    g = torch.Generator().manual_seed(7)
    ref_cache = torch.randn(state_shape, generator=g).to(state_dtype).to(DEV)
    cache = ref_cache.clone()
    fresh = rows[init == 0]
    cache[fresh] = float("nan")
    for step, inputs in enumerate(inputs_per_step):
        step_init = init if step == 0 else None  # later steps: every request continues
        out = kernel(*inputs, cache, rows, step_init, **params)
        ref = twin(*inputs, ref_cache, rows, step_init, **params)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=tol[0], atol=tol[1])
        torch.testing.assert_close(cache.float(), ref_cache.float(), rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("batch,channels,k,bias,silu", [(3, 40, 4, True, True), (1, 7, 2, False, False),
                                                        (4, 130, 3, False, True)])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_conv_decode(batch, channels, k, bias, silu, dtype, state_dtype):
    g = torch.Generator().manual_seed(batch * channels)
    rows, init = _rows(batch, 6, g)
    weight = torch.randn(channels, k, generator=g).to(dtype).to(DEV)
    b = torch.randn(channels, generator=g).to(dtype).to(DEV) if bias else None
    steps = [_fused(batch, [channels], dtype, g) for _ in range(STEPS)]
    _check(conv_decode, conv_decode_ref, steps, (6, channels, k - 1), rows, init, state_dtype,
           TOL[(dtype, state_dtype)], weight=weight, bias=b, silu=silu)


def _gdn_steps(batch: int, hk: int, hv: int, dk: int, dv: int, dtype: torch.dtype, g: torch.Generator) -> list:
    steps = []
    for _ in range(STEPS):
        q, k, v, a, b = _fused(batch, [hk * dk, hk * dk, hv * dv, hv, hv], dtype, g)
        steps.append((q.view(batch, hk, dk), k.view(batch, hk, dk), v.view(batch, hv, dv), a, b))
    return steps


@pytest.mark.parametrize("batch,hk,hv,dk,dv", [(3, 2, 4, 16, 24), (1, 1, 1, 32, 32), (2, 2, 2, 8, 40)])
@pytest.mark.parametrize("dtype,state_dtype", list(TOL))
def test_gated_delta_decode(batch, hk, hv, dk, dv, dtype, state_dtype):
    g = torch.Generator().manual_seed(batch * dv + hv)
    rows, init = _rows(batch, 5, g)
    params = dict(a_log=torch.randn(hv, generator=g).to(DEV), dt_bias=torch.randn(hv, generator=g).to(dtype).to(DEV))
    _check(gated_delta_decode, gated_delta_decode_ref, _gdn_steps(batch, hk, hv, dk, dv, dtype, g),
           (5, hv, dk, dv), rows, init, state_dtype, TOL[(dtype, state_dtype)], **params)


def _ssd_steps(batch: int, heads: int, groups: int, n: int, p: int, dtype: torch.dtype, g: torch.Generator) -> list:
    steps = []
    for _ in range(STEPS):
        x, dt, b, c = _fused(batch, [heads * p, heads, groups * n, groups * n], dtype, g)
        steps.append((x.view(batch, heads, p), dt, b.view(batch, groups, n), c.view(batch, groups, n)))
    return steps


@pytest.mark.parametrize("batch,heads,groups,n,p", [(3, 4, 2, 16, 8), (1, 2, 1, 8, 24), (2, 3, 3, 12, 16)])
@pytest.mark.parametrize("dt_limit,skip,softplus", [((0.0, math.inf), True, True), ((0.05, 0.4), False, True),
                                                    ((0.0, math.inf), False, False)])  # (the last: MiniMax's)
@pytest.mark.parametrize("dtype,state_dtype", list(TOL))
def test_ssd_decode(batch, heads, groups, n, p, dt_limit, skip, softplus, dtype, state_dtype):
    g = torch.Generator().manual_seed(batch * p + heads)
    rows, init = _rows(batch, 5, g)
    params = dict(a_log=torch.randn(heads, generator=g).to(DEV),
                  dt_bias=torch.randn(heads, generator=g).to(dtype).to(DEV), dt_limit=dt_limit,
                  d=torch.randn(heads, generator=g).to(dtype).to(DEV) if skip else None, dt_softplus=softplus)
    steps = _ssd_steps(batch, heads, groups, n, p, dtype, g)
    if not softplus:  # dt taken as given: a step size (MiniMax's is 1)
        steps = [(x, dt.abs(), b, c) for x, dt, b, c in steps]
    _check(ssd_decode, ssd_decode_ref, steps, (5, heads, n, p), rows, init, state_dtype, TOL[(dtype, state_dtype)],
           **params)


def _selective_steps(batch: int, channels: int, n: int, dtype: torch.dtype, g: torch.Generator) -> list:
    return [tuple(_fused(batch, [channels, channels, n, n], dtype, g)) for _ in range(STEPS)]


@pytest.mark.parametrize("batch,channels,n", [(3, 40, 16), (1, 7, 4), (2, 130, 12)])
@pytest.mark.parametrize("dtype,state_dtype", list(TOL))
def test_selective_decode(batch, channels, n, dtype, state_dtype):
    """Mamba-1's step: a decay per channel and state entry."""
    g = torch.Generator().manual_seed(batch * channels + n)
    rows, init = _rows(batch, 5, g)
    params = dict(a_log=torch.randn(channels, n, generator=g).to(DEV),
                  dt_bias=torch.randn(channels, generator=g).to(dtype).to(DEV),
                  d=torch.randn(channels, generator=g).to(dtype).to(DEV))
    _check(selective_decode, selective_decode_ref, _selective_steps(batch, channels, n, dtype, g),
           (5, channels, n), rows, init, state_dtype, TOL[(dtype, state_dtype)], **params)


def _check_verify(kernel, twin, inputs, state_shape, rows, init, state_dtype, tol, tokens, **params) -> None:
    """A verification of `tokens` tokens a request in one kernel call against the twin's token
    loop (verify_ref): outputs, the whole state tensor and the whole snapshot tensor (k = tokens
    slots a row after 2 others, so a state kept one slot off lands where none belongs)."""
    from functools import partial

    from pagedserve.ops.state_reference import verify_ref

    g = torch.Generator().manual_seed(11)
    ref_cache = torch.randn(state_shape, generator=g).to(state_dtype).to(DEV)
    cache = ref_cache.clone()
    cache[rows[init == 0]] = float("nan")
    ref_snap = torch.randn((2 + state_shape[0] * tokens, *state_shape[1:]), generator=g).to(state_dtype).to(DEV)
    snap = ref_snap.clone()
    out = kernel(*inputs, cache, rows, init, tokens=tokens, keep=(snap, 2, tokens), **params)
    ref = verify_ref(partial(twin, **params), inputs, ref_cache, rows, init, tokens, (ref_snap, 2, tokens))
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(cache.float(), ref_cache.float(), rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(snap.float(), ref_snap.float(), rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_verification_in_one_call(tokens, dtype, state_dtype):
    """Speculative verification: every decode kernel running `tokens` tokens a request, the
    states after each but the last kept, a fresh request among them."""
    batch, tol = 3, TOL[(dtype, state_dtype)]
    n = batch * tokens
    g = torch.Generator().manual_seed(tokens)
    rows, init = _rows(batch, 6, g)
    weight = torch.randn(40, 4, generator=g).to(dtype).to(DEV)
    _check_verify(conv_decode, conv_decode_ref, _fused(n, [40], dtype, g), (6, 40, 3), rows, init, state_dtype, tol,
                  tokens, weight=weight, bias=torch.randn(40, generator=g).to(dtype).to(DEV), silu=True)
    gdn = dict(a_log=torch.randn(4, generator=g).to(DEV), dt_bias=torch.randn(4, generator=g).to(dtype).to(DEV))
    _check_verify(gated_delta_decode, gated_delta_decode_ref, _gdn_steps(n, 2, 4, 16, 24, dtype, g)[0],
                  (6, 4, 16, 24), rows, init, state_dtype, tol, tokens, **gdn)
    ssd = dict(a_log=torch.randn(4, generator=g).to(DEV), dt_bias=torch.randn(4, generator=g).to(dtype).to(DEV),
               dt_limit=(0.05, 0.4), d=torch.randn(4, generator=g).to(dtype).to(DEV))
    _check_verify(ssd_decode, ssd_decode_ref, _ssd_steps(n, 4, 2, 16, 8, dtype, g)[0], (6, 4, 16, 8), rows, init,
                  state_dtype, tol, tokens, **ssd)
    sel = dict(a_log=torch.randn(40, 12, generator=g).to(DEV), dt_bias=torch.randn(40, generator=g).to(dtype).to(DEV),
               d=torch.randn(40, generator=g).to(dtype).to(DEV))
    _check_verify(selective_decode, selective_decode_ref, _selective_steps(n, 40, 12, dtype, g)[0], (6, 40, 12), rows,
                  init, state_dtype, tol, tokens, **sel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selective_scan_kernel(dtype):
    """Mamba-1's prefill scan: three sequences of their own lengths from their own states, the
    states kept after 0, some and all of a sequence's tokens, against the PyTorch scan (float64
    inputs: the kernel computes in float32)."""
    from pagedserve.model.layers.mamba1 import selective_scan
    from pagedserve.ops.selective_scan import selective_scan_triton

    g = torch.Generator().manual_seed(5)
    c, n = 20, 6
    cases = [(9, 3, [3, 8, 12]), (1, 0, []), (14, 64, [64, 70])]  # (length, first position, keep)
    seqs = [tuple(t.to(dtype).to(DEV) for t in (
        torch.randn(length, c, generator=g), torch.rand(length, c, generator=g), torch.randn(length, n, generator=g),
        torch.randn(length, n, generator=g))) for length, _, _ in cases]
    states = torch.randn(3, c, n, generator=g).to(dtype).to(DEV)
    a = -torch.rand(c, n, generator=g).to(DEV) * 2
    d = torch.randn(c, generator=g).to(DEV)
    args = (seqs, states, [at for _, at, _ in cases], [k for _, _, k in cases], a)
    ys, final, kept = selective_scan_triton(*args, d=d)
    want_ys, want_final, want_kept = selective_scan(*args, d=d)
    for got, want in zip(ys + [final], want_ys + [want_final]):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    assert [len(k) for k in kept] == [3, 0, 2]
    for got, want in zip(sum(kept, []), sum(want_kept, [])):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-5)


def _block_inputs(shapes: list[tuple[int, ...]], g: torch.Generator) -> list[torch.Tensor]:
    return [(torch.randn(shape, generator=g) * 0.3).to(DEV) for shape in shapes]


@pytest.mark.parametrize("dv", [16, 24])
def test_gdn_blocks_kernel(dv):
    """Gated DeltaNet's block-to-block recurrence: two sequences of 3 blocks, states kept after
    blocks 0 and 2 (two asked for at the same block) and one after none (the starting state)."""
    from pagedserve.model.layers.gated_delta import gdn_blocks
    from pagedserve.ops.chunk_scan import gdn_blocks_triton

    g = torch.Generator().manual_seed(dv)
    r, h, n, c, dk = 2, 2, 3, 16, 16
    u, w, q, sc, kt, states = _block_inputs([(r, h, n, c, dv), (r, h, n, c, dk), (r, h, n, c, dk), (r, h, n, c, c),
                                             (r, h, n, dk, c), (r, h, dk, dv)], g)
    ed = torch.rand(r, h, n, 1, 1, generator=g).to(DEV)
    after, counts = {0: [(0, 0)], 2: [(1, 0), (1, 2)]}, [2, 3]
    got = gdn_blocks_triton(u, w, q, sc, kt, ed, states, after, counts)
    want = gdn_blocks(u, w, q, sc, kt, ed, states, after, counts)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert [len(k) for k in got[2]] == counts
    for a, b in zip(sum(got[2], []), sum(want[2], [])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [16, 40])
def test_ssd_blocks_kernel(p):
    from pagedserve.model.layers.mamba2 import ssd_blocks
    from pagedserve.ops.chunk_scan import ssd_blocks_triton

    g = torch.Generator().manual_seed(p)
    r, h, n, c, d_state = 3, 2, 2, 16, 16
    intra, cd, bt, xdt, states = _block_inputs([(r, h, n, c, p), (r, h, n, c, d_state), (r, h, n, d_state, c),
                                                (r, h, n, c, p), (r, h, d_state, p)], g)
    ed = torch.rand(r, h, n, 1, 1, generator=g).to(DEV)
    after, counts = {1: [(2, 0), (0, 0)]}, [1, 0, 2]
    got = ssd_blocks_triton(intra, cd, bt, xdt, ed, states, after, counts)
    want = ssd_blocks(intra, cd, bt, xdt, ed, states, after, counts)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(sum(got[2], []), sum(want[2], [])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_scans_on_the_block_kernels():
    """gated_delta_chunks and ssd_chunks through the kernels, sequences from unaligned starts
    with kept states, against the same scans on the PyTorch loop."""
    from pagedserve.model.layers.gated_delta import gated_delta_chunks
    from pagedserve.model.layers.mamba2 import ssd_chunks
    from pagedserve.ops.chunk_scan import gdn_blocks_triton, ssd_blocks_triton
    from pagedserve.ops.state_reference import l2_normalize

    g = torch.Generator().manual_seed(9)
    cases = [(40, 5, [16, 32]), (7, 0, []), (20, 16, [32])]
    h, dk, dv = 2, 16, 24
    seqs = [(l2_normalize(torch.randn(n, h, dk, generator=g)) * dk ** -0.5,
             l2_normalize(torch.randn(n, h, dk, generator=g)), torch.randn(n, h, dv, generator=g),
             -torch.rand(n, h, generator=g), torch.rand(n, h, generator=g)) for n, _, _ in cases]
    seqs = [tuple(t.to(DEV) for t in seq) for seq in seqs]
    states = torch.randn(3, h, dk, dv, generator=g).to(DEV)
    args = (seqs, states, [at for _, at, _ in cases], [k for _, _, k in cases])
    got, want = gated_delta_chunks(*args, chunk=16, blocks=gdn_blocks_triton), gated_delta_chunks(*args, chunk=16)
    for x, y in zip(got[0] + [got[1]] + sum(got[2], []), want[0] + [want[1]] + sum(want[2], [])):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    p, n_state = 8, 16
    seqs = [tuple(t.to(DEV) for t in (torch.randn(n, h, p, generator=g), torch.rand(n, h, generator=g),
                                      torch.randn(n, h, n_state, generator=g), torch.randn(n, h, n_state, generator=g)))
            for n, _, _ in cases]
    states = torch.randn(3, h, n_state, p, generator=g).to(DEV)
    a = -torch.rand(h, generator=g).to(DEV)
    args = (seqs, states, [at for _, at, _ in cases], [k for _, _, k in cases], a)
    got, want = ssd_chunks(*args, chunk=16, blocks=ssd_blocks_triton), ssd_chunks(*args, chunk=16)
    for x, y in zip(got[0] + [got[1]] + sum(got[2], []), want[0] + [want[1]] + sum(want[2], [])):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["head", "gate_then_norm", "norm_then_gate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm(norm, dtype):
    """The kernel against the layers' PyTorch norms: Gated DeltaNet's per-head one (a weight
    shared by the heads), Mamba-2's gate-then-norm over 2 groups, Falcon-H1's norm-then-gate;
    from a float32 x and a strided gate."""
    g = torch.Generator().manual_seed(3)
    heads, dim, t = 4, 24, 5
    x = torch.randn(t, heads * dim, generator=g).to(DEV)
    z = _fused(t, [heads * dim], dtype, g)[0]
    if norm == "head":
        module = GatedRMSNorm(dim, 1e-6)
    else:
        module = GroupGatedRMSNorm(heads * dim, 2, 1e-5, norm_before_gate=norm == "norm_then_gate")
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=g))
    module = module.to(dtype).to(DEV)
    if norm == "head":
        ref = module(x.view(t, heads, dim), z.view(t, heads, dim)).view(t, -1)
        out = gated_rms_norm(x, z, module.weight, dim, 1e-6, norm_before_gate=True)
    else:
        ref = module(x, z)
        out = gated_rms_norm(x, z, module.weight, heads * dim // 2, 1e-5, module.norm_before_gate)
    assert out.dtype == dtype
    tol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    torch.testing.assert_close(out, ref, rtol=tol[0], atol=tol[1])
    module.use_triton = True  # the layer's own Triton path
    fused = module(x.view(t, heads, dim), z.view(t, heads, dim)).view(t, -1) if norm == "head" else module(x, z)
    torch.testing.assert_close(fused, out, rtol=0, atol=0)


def test_empty_batch():
    empty = torch.empty(0, 8, device=DEV)
    cache = torch.randn(2, 8, 3, device=DEV)
    before = cache.clone()
    rows = torch.empty(0, dtype=torch.long, device=DEV)
    assert conv_decode(empty, cache, rows, None, torch.randn(8, 4, device=DEV)).shape == (0, 8)
    assert torch.equal(cache, before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_state_kernels_gpu(dtype, state_dtype):
    """Qwen3.5 / Qwen3-Next's, Granite 4.0-H / Nemotron-H's and Falcon Mamba's shapes, 64
    requests."""
    g = torch.Generator().manual_seed(0)
    tol = TOL[(dtype, state_dtype)]
    rows, init = _rows(64, 96, g)
    conv = 2 * 16 * 128 + 32 * 128
    _check(conv_decode, conv_decode_ref, [_fused(64, [conv], dtype, g) for _ in range(STEPS)], (96, conv, 3),
           rows, init, dtype, TOL[(dtype, dtype)], weight=torch.randn(conv, 4, generator=g).to(dtype).to(DEV),
           bias=None)  # (outputs and state in the model's dtype)
    params = dict(a_log=torch.randn(32, generator=g).to(DEV), dt_bias=torch.randn(32, generator=g).to(dtype).to(DEV))
    _check(gated_delta_decode, gated_delta_decode_ref, _gdn_steps(64, 16, 32, 128, 128, dtype, g), (96, 32, 128, 128),
           rows, init, state_dtype, tol, **params)
    params = dict(a_log=torch.randn(128, generator=g).to(DEV), dt_bias=torch.randn(128, generator=g).to(dtype).to(DEV),
                  dt_limit=(0.0, math.inf), d=torch.randn(128, generator=g).to(DEV))
    _check(ssd_decode, ssd_decode_ref, _ssd_steps(64, 128, 1, 128, 64, dtype, g), (96, 128, 128, 64), rows, init,
           state_dtype, tol, **params)
    params = dict(a_log=torch.randn(8192, 16, generator=g).to(DEV),
                  dt_bias=torch.randn(8192, generator=g).to(dtype).to(DEV), d=torch.randn(8192, generator=g).to(DEV))
    _check(selective_decode, selective_decode_ref, _selective_steps(64, 8192, 16, dtype, g), (96, 8192, 16), rows,
           init, state_dtype, tol, **params)


@pytest.mark.gpu
def test_prefill_scan_kernels_gpu():
    """The prefill scans' kernels at real sizes: Gated DeltaNet (64-token blocks, 128 x 128
    states), Mamba-2 (128 x 64 states) and Mamba-1 (8192 channels)."""
    from pagedserve.model.layers.gated_delta import gdn_blocks
    from pagedserve.model.layers.mamba1 import selective_scan
    from pagedserve.model.layers.mamba2 import ssd_blocks
    from pagedserve.ops.chunk_scan import gdn_blocks_triton, ssd_blocks_triton
    from pagedserve.ops.selective_scan import selective_scan_triton

    g = torch.Generator().manual_seed(1)
    r, h, n, c = 3, 8, 5, 64
    gdn = _block_inputs([(r, h, n, c, 128), (r, h, n, c, 128), (r, h, n, c, 128), (r, h, n, c, c), (r, h, n, 128, c)],
                        g) + [torch.rand(r, h, n, 1, 1, generator=g).to(DEV), _block_inputs([(r, h, 128, 128)], g)[0]]
    ssd = _block_inputs([(r, h, n, c, 64), (r, h, n, c, 128), (r, h, n, 128, c), (r, h, n, c, 64)], g) + [
        torch.rand(r, h, n, 1, 1, generator=g).to(DEV), _block_inputs([(r, h, 128, 64)], g)[0]]
    after, counts = {1: [(0, 0)], 4: [(2, 0)]}, [1, 0, 1]
    for kernel, twin, inputs in ((gdn_blocks_triton, gdn_blocks, gdn), (ssd_blocks_triton, ssd_blocks, ssd)):
        got, want = kernel(*inputs, after, counts), twin(*inputs, after, counts)
        for x, y in zip([got[0], got[1]] + sum(got[2], []), [want[0], want[1]] + sum(want[2], [])):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    seqs = [tuple(t.to(DEV) for t in (
        torch.randn(length, 8192, generator=g), torch.rand(length, 8192, generator=g) * 0.1,
        torch.randn(length, 16, generator=g), torch.randn(length, 16, generator=g))) for length in (300, 7)]
    states = torch.randn(2, 8192, 16, generator=g).to(DEV)
    args = (seqs, states, [256, 0], [[512], []], -torch.rand(8192, 16, generator=g).to(DEV))
    got, want = selective_scan_triton(*args), selective_scan(*args)
    for x, y in zip(got[0] + [got[1]] + sum(got[2], []), want[0] + [want[1]] + sum(want[2], [])):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
