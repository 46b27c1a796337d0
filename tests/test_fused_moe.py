"""The fused MoE Triton kernels (ops/fused_moe.py) against their twin, FusedMoE's PyTorch
path (itself held to a per-token float64 reference in test_moe.py). Without CUDA they run in
Triton's interpreter; on a GPU, `-m gpu` repeats them there in bfloat16."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.model.layers.moe import FusedMoE, select_experts  # noqa: E402
from pagedserve.ops.fused_moe import default_config, fused_moe, moe_align  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (T tokens, E experts, top k, hidden, intermediate): decode-sized and prefill-sized batches,
# sizes that are not multiples of the tiles, more experts than routed pairs.
SHAPES = [(1, 8, 2, 32, 48), (3, 16, 4, 64, 40), (37, 6, 3, 32, 24), (130, 4, 2, 48, 80)]
CONFIGS = [None, (16, 32, 16, 1, 4, 1), (32, 16, 32, 2, 4, 1), (64, 64, 64, 8, 4, 1)]


def _moe(e: int, h: int, i: int, dtype: torch.dtype, seed: int) -> FusedMoE:
    torch.manual_seed(seed)
    moe = FusedMoE(e, h, i, "silu")
    with torch.no_grad():
        moe.w13.normal_(0, 0.2)
        moe.w2.normal_(0, 0.2)
    return moe.to(device=DEVICE, dtype=dtype)


def _routing(t: int, e: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    if e > k + 1:
        logits[:, e - 1] = -1e4  # an expert no token picks
    weights, ids = select_experts(logits, k, renormalize=True)
    return weights.to(DEVICE), ids.to(DEVICE)


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_moe_align_groups_every_pair_once(shape, block_m):
    t, e, k, _, _ = shape
    _, ids = _routing(t, e, k, seed=t)
    sorted_ids, block_experts, num_padded = moe_align(ids, e, block_m)
    n = t * k
    flat = ids.reshape(-1).cpu()
    s, be, total = sorted_ids.cpu(), block_experts.cpu(), int(num_padded.item())
    counts = torch.bincount(flat, minlength=e)
    assert total == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert sorted(s[s < n].tolist()) == list(range(n))  # every pair exactly once
    assert torch.all(s[total:] == n)  # nothing past the padded total
    for b in range(total // block_m):
        pairs = s[b * block_m:(b + 1) * block_m]
        pairs = pairs[pairs < n]
        assert len(pairs), "a block with no pair"
        assert torch.all(flat[pairs.long()] == be[b])  # a block holds one expert's pairs
        assert torch.equal(pairs, pairs.sort().values)  # in token order within the expert
    # Sizes depend only on (T, k, E, block_m): a graph captured once serves any routing.
    other = moe_align(torch.zeros_like(ids), e, block_m)
    assert other[0].shape == sorted_ids.shape and other[1].shape == block_experts.shape


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_moe_matches_pytorch_path_fp32(shape, config):
    t, e, k, h, i = shape
    moe = _moe(e, h, i, torch.float32, seed=t)
    weights, ids = _routing(t, e, k, seed=t + 1)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(t + 2)).to(DEVICE)
    want = moe(x, weights, ids)
    got = fused_moe(x, moe.w13, moe.w2, weights, ids, config)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_moe_matches_pytorch_path_bf16(shape):
    """bfloat16 rounds the gate_up and activation to the model dtype as the PyTorch path
    does. Triton's interpreter truncates float32 -> bfloat16 instead of rounding to nearest,
    so on CPU a few units of the last place can separate the two; on a GPU they agree
    closer."""
    t, e, k, h, i = shape
    moe = _moe(e, h, i, torch.bfloat16, seed=t)
    weights, ids = _routing(t, e, k, seed=t + 1)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(t + 2)).to(DEVICE, torch.bfloat16)
    want = moe(x, weights, ids).float()
    got = fused_moe(x, moe.w13, moe.w2, weights, ids).float()
    assert got.dtype == want.dtype
    scale = want.abs().max().item()
    tol = (0.01 if DEVICE == "cuda" else 0.04) * scale
    assert (got - want).abs().max().item() <= tol
    assert (got - want).abs().mean().item() <= tol / 8


@pytest.mark.parametrize("block", [(32, 32), None])
@pytest.mark.parametrize("shape", [(5, 8, 2, 64, 96), (70, 4, 2, 96, 64)])
def test_fp8_experts_match_dequantized_twin(shape, block):
    """FP8 experts (per 32x32 block, or per row): each tile dequantized in the kernel equals the
    PyTorch path on the dequantized weights."""
    from pagedserve.model.fp8_quantize import quantize_block, quantize_rows
    from pagedserve.model.layers.fp8 import Fp8Format, dequantize, row_scales

    t, e, k, h, i = shape
    moe = _moe(e, h, i, torch.float32, seed=t)
    fmt = Fp8Format(block)
    packed = {}
    for name in ("w13", "w2"):
        qs, ss, deq = [], [], []
        for w in getattr(moe, name).detach().cpu():
            q, s = quantize_block(w, *block) if block else quantize_rows(w, per_tensor=False)
            rows, bk = row_scales(s, tuple(w.shape), fmt, name)
            qs.append(q)
            ss.append(rows)
            deq.append(dequantize(q, rows, bk, torch.float32))
        packed[name] = (torch.stack(qs).to(DEVICE), torch.stack(ss).to(DEVICE), bk)
        with torch.no_grad():
            getattr(moe, name).copy_(torch.stack(deq))
    weights, ids = _routing(t, e, k, seed=t + 1)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(t)).to(DEVICE)
    want = moe(x, weights, ids)
    (q13, s13, bk13), (q2, s2, bk2) = packed["w13"], packed["w2"]
    got = fused_moe(x, q13, q2, weights, ids, scales=(s13, s2, bk13, bk2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_moe_without_tokens():
    moe = _moe(4, 16, 32, torch.float32, seed=0)
    ids = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    out = fused_moe(torch.zeros(0, 16, device=DEVICE), moe.w13, moe.w2, torch.zeros(0, 2, device=DEVICE), ids)
    assert out.shape == (0, 16)


def test_default_config_shapes_blocks_to_the_batch():
    assert default_config(2, 8)[0] == 16  # decode: a block is mostly padding otherwise
    assert default_config(4096, 8)[0] == 64


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 8, 2, 1024, 1408), (200, 8, 2, 1024, 1408), (5, 128, 8, 512, 256),
                                   (700, 64, 6, 512, 320)])
def test_fused_moe_bf16_on_gpu(shape):
    """Real-sized layers in bfloat16 (tensor-core dots, rounding to nearest): within two units
    of bf16's last place of the PyTorch path."""
    t, e, k, h, i = shape
    moe = _moe(e, h, i, torch.bfloat16, seed=t)
    weights, ids = _routing(t, e, k, seed=t + 1)
    x = torch.randn(t, h, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(t)).to(torch.bfloat16)
    want = moe(x, weights, ids).float()
    got = fused_moe(x, moe.w13, moe.w2, weights, ids).float()
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 2 ** -6 * scale
    assert (got - want).abs().mean().item() <= 2 ** -9 * scale


@pytest.mark.gpu
def test_fused_moe_replays_in_a_cuda_graph():
    """Captured once, a graph serves any routing of the same batch size (no host sync, sizes
    fixed by T, k and E)."""
    t, e, k, h, i = 24, 16, 4, 256, 384
    moe = _moe(e, h, i, torch.bfloat16, seed=0)
    moe.use_triton = True
    x = torch.randn(t, h, device=DEVICE).to(torch.bfloat16)
    weights, ids = _routing(t, e, k, seed=1)
    moe(x, weights, ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe(x, weights, ids)
    for seed in (2, 3):
        w2, ids2 = _routing(t, e, k, seed=seed)
        x.copy_(torch.randn(t, h, device=DEVICE).to(torch.bfloat16))
        weights.copy_(w2)
        ids.copy_(ids2)
        graph.replay()
        torch.testing.assert_close(out, fused_moe(x, moe.w13, moe.w2, weights, ids), rtol=0, atol=0)
