"""The fused Triton kernels of the model's pointwise parts (RMSNorm with residual add, RoPE,
RoPE with the KV-cache write, SiLU-and-mul) against their PyTorch twins in pagedserve/ops/reference.py, which are the
forms the PyTorch path runs. Without CUDA they run in Triton's interpreter on small shapes;
`-m gpu` repeats the checks on the GPU at the benchmark model's sizes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.ops import triton_interpreting  # noqa: E402
from pagedserve.ops.activation import gelu_tanh_and_mul, silu_and_mul  # noqa: E402
from pagedserve.ops.reference import (  # noqa: E402
    gelu_tanh_and_mul_ref,
    reshape_and_cache_ref,
    rms_norm_ref,
    rotary_ref,
    silu_and_mul_ref,
)
from pagedserve.ops.rms_norm import rms_norm  # noqa: E402
from pagedserve.ops.rotary import rotary_embedding, rotary_embedding_and_cache  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def _close(got: torch.Tensor, want: torch.Tensor, exact: bool = False, strict: bool = True) -> None:
    """float32: to rounding. 16-bit: strict (RMSNorm, whose rounding steps match the PyTorch
    form's) means at most one unit in the last place apart and nearly all elements
    bit-identical, as seen on an H100; otherwise (RoPE and SiLU-and-mul, where on the H100
    RoPE agreed only to a unit of the tensor's scale, fp16 76% bit-identical) within a
    unit or two of the tensor's scale. Triton's interpreter rounds float32 -> bfloat16
    toward zero, not to nearest, so there every 16-bit result is held to the latter.
    exact: bit-identical where the rounding is the GPU's."""
    assert got.dtype == want.dtype and got.shape == want.shape and torch.isfinite(got).all()
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    if triton_interpreting() or not strict:
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=2 ** -6 * scale)
        return
    if exact:
        assert torch.equal(got, want)
        return
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)
    assert (got == want).float().mean() > 0.97


def _rand(*shape, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEV).to(dtype)


def check_rms_norm(t: int, h: int, dtype: torch.dtype, seed: int = 0) -> None:
    wide = _rand(t, h + 24, dtype=dtype, seed=seed)
    x = wide[:, 5:5 + h]  # rows with a stride wider than the row
    res = _rand(t, h, dtype=dtype, seed=seed + 1)
    w = (1 + 0.1 * _rand(h, dtype=torch.float32, seed=seed + 2)).to(dtype)
    _close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    out, new_res = rms_norm(x, w, 1e-5, residual=res)
    ref_out, ref_res = rms_norm_ref(x, w, 1e-5, residual=res)
    _close(new_res, ref_res, exact=True)  # one rounded add: bit-identical
    _close(out, ref_out)


def check_rotary(t: int, hq: int, hk: int, d: int, dtype: torch.dtype, seed: int = 0, rot: int = 0) -> None:
    """rot: the rotary dim (partial rotary) when under d: the rest of each head passes through."""
    rot = rot or d
    qkv = _rand(t, (hq + 2 * hk) * d, dtype=dtype, seed=seed)
    before = qkv.clone()
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)
    g = torch.Generator(device=DEV).manual_seed(seed)
    positions = torch.randint(0, 4096, (t,), generator=g, device=DEV)
    positions[0] = 0
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32, device=DEV) / rot))
    freqs = torch.arange(4096, dtype=torch.float32, device=DEV)[:, None] * inv[None, :]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    ref_q, ref_k = rotary_ref(positions, q.clone(), k.clone(), cos_sin)
    if rot < d:  # the twin passes the tail through, and the kernel leaves it in place
        assert torch.equal(ref_q[..., rot:], q[..., rot:]) and torch.equal(ref_k[..., rot:], k[..., rot:])
    got_q, got_k = rotary_embedding(positions, q, k, cos_sin)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    _close(got_q, ref_q, strict=False)
    _close(got_k, ref_k, strict=False)
    assert torch.equal(qkv[:, (hq + hk) * d:], before[:, (hq + hk) * d:])  # v untouched
    assert torch.equal(got_q[0], before[0, : hq * d].view(hq, d))  # position 0 rotates by nothing


def check_rotary_and_cache(t: int, hq: int, hk: int, d: int, dtype: torch.dtype, block_size: int,
                           seed: int = 0) -> None:
    """The fused kernel: q and k rotated in place as rotary_embedding does, and the caches
    holding exactly the rotated k and v at each token's slot; padding (-1) writes nothing."""
    qkv = _rand(t, (hq + 2 * hk) * d, dtype=dtype, seed=seed)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d:].view(t, hk, d)
    g = torch.Generator(device=DEV).manual_seed(seed)
    positions = torch.randint(0, 4096, (t,), generator=g, device=DEV)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=DEV) / d))
    freqs = torch.arange(4096, dtype=torch.float32, device=DEV)[:, None] * inv[None, :]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    num_blocks = -(-t // block_size) + 2
    slots = torch.randperm(num_blocks * block_size, generator=g, device=DEV)[:t]
    slots[1::3] = -1  # padding rows
    ref_q, ref_k = rotary_ref(positions, q.clone(), k.clone(), cos_sin)
    ref_kc = torch.zeros(num_blocks, block_size, hk, d, dtype=dtype, device=DEV)
    ref_vc = torch.zeros_like(ref_kc)
    reshape_and_cache_ref(ref_k, v, ref_kc, ref_vc, slots)
    kc, vc = torch.full_like(ref_kc, 7.0), torch.full_like(ref_vc, 7.0)
    rotary_embedding_and_cache(positions, q, k, v, cos_sin, kc, vc, slots)
    _close(q, ref_q, strict=False)
    _close(k, ref_k, strict=False)
    keep = slots >= 0
    flat_k, flat_v = kc.view(-1, hk, d), vc.view(-1, hk, d)
    assert torch.equal(flat_k[slots[keep]], k[keep]) and torch.equal(flat_v[slots[keep]], v[keep])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=DEV)
    untouched[slots[keep]] = False
    assert (flat_k[untouched] == 7).all() and (flat_v[untouched] == 7).all()
    _close(kc.view(-1, hk, d)[slots[keep]], ref_kc.view(-1, hk, d)[slots[keep]], strict=False)


def check_silu_and_mul(t: int, n: int, dtype: torch.dtype, seed: int = 0) -> None:
    x = _rand(t, 2 * n, dtype=dtype, seed=seed) * 3
    _close(silu_and_mul(x), silu_and_mul_ref(x), strict=False)
    _close(gelu_tanh_and_mul(x), gelu_tanh_and_mul_ref(x), strict=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("t, h", [(5, 64), (3, 96)])
def test_rms_norm(t, h, dtype):
    check_rms_norm(t, h, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("hq, hk, d, rot", [(4, 2, 16, 0), (6, 1, 24, 0), (4, 2, 16, 8), (3, 1, 32, 24)])
def test_rotary(hq, hk, d, rot, dtype):
    check_rotary(7, hq, hk, d, dtype, rot=rot)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("hq, hk, d, block_size", [(4, 2, 16, 4), (6, 1, 24, 8)])
def test_rotary_and_cache(hq, hk, d, block_size, dtype):
    check_rotary_and_cache(9, hq, hk, d, dtype, block_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [40, 1500])  # 1500: two column blocks, the last one partial
def test_silu_and_mul(n, dtype):
    check_silu_and_mul(3, n, dtype)


def test_empty_batches():
    x = torch.empty(0, 64, device=DEV)
    assert rms_norm(x, torch.ones(64, device=DEV), 1e-6).shape == (0, 64)
    assert silu_and_mul(torch.empty(0, 8, device=DEV)).shape == (0, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_ops_gpu(dtype):
    check_rms_norm(4096, 2048, dtype, seed=3)
    check_rms_norm(17, 5120, dtype, seed=4)
    check_rotary(4096, 32, 4, 64, dtype, seed=5)
    check_rotary(33, 28, 4, 128, dtype, seed=6)
    check_rotary_and_cache(4096, 32, 4, 64, dtype, 16, seed=8)
    check_rotary_and_cache(33, 28, 4, 128, dtype, 16, seed=9)
    check_silu_and_mul(4096, 5632, dtype, seed=7)
