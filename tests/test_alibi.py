"""ALiBi (a per-head linear bias on key distance, BLOOM / MPT / Falcon-RW) in every attention
path: the slopes against transformers', the PyTorch twin against transformers' way of adding
the bias, and the PyTorch and CPU backends' decode and prefill, the C decode kernel and the
Triton kernel (query blocks, split decodes) against the twin."""

from __future__ import annotations

import pytest
import torch

from pagedserve.attention import cpu_kernels
from pagedserve.attention.torch_backend import CpuAttentionBackend, TorchAttentionBackend
from pagedserve.model.layers.alibi import alibi_slopes, mpt_alibi_slopes
from pagedserve.ops.reference import paged_attention_ref
from test_cpu_attention import _case


@pytest.mark.parametrize("heads", [1, 3, 4, 6, 12, 20, 32, 71])
def test_slopes_match_transformers(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    # BLOOM's bias at key position 1 is the slope itself; MPT's at key 0 of 2 keys is -slope.
    bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]
    assert torch.equal(torch.tensor(alibi_slopes(heads)), bloom)
    for bias_max in (8, 4):
        mpt = -build_mpt_alibi_tensor(heads, 2, bias_max)[:, 0, 0]
        assert torch.equal(torch.tensor(mpt_alibi_slopes(heads, bias_max)), mpt)


def _slopes(heads: int) -> torch.Tensor:
    # Steeper than the real ones (which are < 1), so that the bias moves the outputs a lot.
    return torch.tensor(alibi_slopes(heads)) * 2


def test_reference_matches_transformers_form():
    """The twin (bias on key - query distance) against BLOOM's form in transformers: the
    bias on absolute key positions (the same softmax, each row shifted by a constant)."""
    heads, kvh, d, n, bs = 8, 2, 16, 21, 4
    _, kc, vc, bt, _, _ = _case(1, heads, kvh, d, bs, [n])
    q = torch.randn(n, heads, d, generator=torch.Generator().manual_seed(2))
    k = kc[bt[0].long()].reshape(-1, kvh, d)[:n].repeat_interleave(4, 1).transpose(0, 1)
    v = vc[bt[0].long()].reshape(-1, kvh, d)[:n].repeat_interleave(4, 1).transpose(0, 1)
    slopes = _slopes(heads)
    s = q.transpose(0, 1) @ k.transpose(1, 2) * d**-0.5 + slopes[:, None, None] * torch.arange(n)[None, None, :]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    want = (torch.softmax(s, -1) @ v).transpose(0, 1)
    got = paged_attention_ref(q, kc, vc, bt, [n], [0, n], d**-0.5, alibi=slopes)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = paged_attention_ref(q, kc, vc, bt, [n], [0, n], d**-0.5)
    assert (got - plain).abs().max() > 0.1  # the bias matters here


@pytest.mark.parametrize("window", [0, 5])
def test_backends_decode_with_alibi(window):
    lens = [1, 5, 6, 17, 77]
    q, kc, vc, bt, sl, meta = _case(len(lens), 8, 2, 32, 8, lens)
    slopes = _slopes(8)
    ref = paged_attention_ref(q, kc, vc, bt, lens, list(range(len(lens) + 1)), 32**-0.5, window=window, alibi=slopes)
    got = TorchAttentionBackend._decode(q, kc, vc, meta, 32**-0.5, window, 0.0, None, slopes)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if cpu_kernels.load() is not None:
        got = cpu_kernels.paged_decode(q, kc, vc, bt, sl, 32**-0.5, window, 0.0, None, slopes)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        got = cpu_kernels.paged_decode(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), bt, sl, 32**-0.5, window, 0.0,
                                       None, slopes)
        want = paged_attention_ref(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), bt, lens, list(range(len(lens) + 1)),
                                   32**-0.5, torch.float64, window, alibi=slopes)
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=8e-3)


@pytest.mark.parametrize("q_len, ctx", [(40, 0), (3, 30), (25, 20)])
def test_backends_prefill_with_alibi(q_len, ctx):
    """Fresh prompts, chunks after cached context, and short chunks (the CPU backend's decode
    kernel, one row per query)."""
    seq_len = ctx + q_len
    _, kc, vc, bt, _, _ = _case(1, 8, 2, 32, 8, [seq_len])
    q = torch.randn(q_len, 8, 32, generator=torch.Generator().manual_seed(1))
    slots = (bt[0].long()[:, None] * 8 + torch.arange(8)).flatten()[ctx:seq_len]
    key, value = kc.view(-1, 2, 32)[slots].clone(), vc.view(-1, 2, 32)[slots].clone()
    slopes = _slopes(8)
    ref = paged_attention_ref(q, kc, vc, bt, [seq_len], [0, q_len], 32**-0.5, alibi=slopes)
    for backend in (TorchAttentionBackend, CpuAttentionBackend):
        got = backend._prefill(q, key, value, kc, vc, bt[0], seq_len, 8, 32**-0.5, 0, 0.0, None, None, slopes)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


triton = pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_kernel_with_alibi(dtype):
    from test_triton_kernels import DEV, check_mixed

    slopes = _slopes(8).to(DEV)
    check_mixed(8, 2, 32, 8, dtype, block_m=16, tile_n=16, alibi=slopes)
    check_mixed(6, 2, 32, 8, dtype, block_m=16, tile_n=16, alibi=_slopes(6).to(DEV), window=7)
    # Split decodes: each segment's maximum includes its bias; the merge rescales them.
    check_mixed(8, 2, 32, 8, dtype, segments=4, tile_n=16, alibi=slopes,
                reqs=[(1, n) for n in (1, 9, 16, 17, 40, 77)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_with_alibi_on_gpu_shapes():
    """BLOOM-560m's attention shape (16 heads, no GQA, head dim 64) and MPT-7B's (32 x 128)."""
    from test_triton_kernels import check_mixed

    for heads, d in ((16, 64), (32, 128)):
        slopes = torch.tensor(alibi_slopes(heads)).cuda()
        for segments in (1, 8):
            check_mixed(heads, heads, d, 16, torch.bfloat16, segments=segments, alibi=slopes,
                        reqs=[(1, 1), (1, 300), (1, 1000), (200, 200), (77, 500)])


def test_context_length_of_alibi_configs():
    """MPT keeps its context length in max_seq_len; BLOOM has none (2048, as vLLM)."""
    import transformers

    from pagedserve.config import derive_max_model_len

    assert derive_max_model_len(transformers.MptConfig(max_seq_len=4096)) == 4096
    assert derive_max_model_len(transformers.BloomConfig()) == 2048
    assert derive_max_model_len(transformers.LlamaConfig(max_position_embeddings=777)) == 777
