"""GPT-OSS's attention sinks (a learned logit per head in each softmax's denominator) in every
attention path, against transformers' own eager attention and the PyTorch twin: the twin
itself, the PyTorch and CPU backends' decode and prefill, the C decode kernel, and the Triton
kernel (query blocks, split decodes, fused RoPE decode, with sliding windows)."""

from __future__ import annotations

import pytest
import torch

from pagedserve.attention import cpu_kernels
from pagedserve.attention.torch_backend import CpuAttentionBackend, TorchAttentionBackend
from pagedserve.ops.reference import paged_attention_ref
from test_cpu_attention import _case

# Spread wide enough that some heads are dominated by their sink and some barely touched.
def _sinks(heads: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(heads, generator=torch.Generator().manual_seed(seed)) * 3


def test_reference_matches_transformers_eager_attention():
    """The twin (paged, flat varlen) against transformers' GptOss eager attention on the same
    q/k/v, causal, with and without a window."""
    from types import SimpleNamespace

    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    heads, kvh, d, n, bs = 8, 2, 16, 21, 4
    _, kc, vc, bt, _, _ = _case(1, heads, kvh, d, bs, [n])
    q = torch.randn(n, heads, d, generator=torch.Generator().manual_seed(2))
    k = kc[bt[0].long()].reshape(-1, kvh, d)[:n]
    v = vc[bt[0].long()].reshape(-1, kvh, d)[:n]
    sinks = _sinks(heads)
    for window in (0, 6):
        rows, cols = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = cols <= rows
        if window:
            allowed &= cols > rows - window
        mask = torch.zeros(n, n).masked_fill(~allowed, float("-inf"))[None, None]
        module = SimpleNamespace(num_key_value_groups=heads // kvh, sinks=sinks, training=False)
        want, _ = eager_attention_forward(module, q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                          v.transpose(0, 1)[None], mask, scaling=d**-0.5)
        got = paged_attention_ref(q, kc, vc, bt, [n], [0, n], d**-0.5, window=window, sinks=sinks)
        torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)
        plain = paged_attention_ref(q, kc, vc, bt, [n], [0, n], d**-0.5, window=window)
        assert (got - plain).abs().max() > 1e-2  # the sinks matter here


@pytest.mark.parametrize("window", [0, 5])
def test_backends_decode_with_sinks(window):
    lens = [1, 5, 6, 17, 77]
    q, kc, vc, bt, sl, meta = _case(len(lens), 8, 2, 32, 8, lens)
    sinks = _sinks(8)
    ref = paged_attention_ref(q, kc, vc, bt, lens, list(range(len(lens) + 1)), 32**-0.5, window=window, sinks=sinks)
    got = TorchAttentionBackend._decode(q, kc, vc, meta, 32**-0.5, window, 0.0, sinks)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if cpu_kernels.load() is not None:
        got = cpu_kernels.paged_decode(q, kc, vc, bt, sl, 32**-0.5, window, 0.0, sinks)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        got = cpu_kernels.paged_decode(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), bt, sl, 32**-0.5, window, 0.0,
                                       sinks)
        want = paged_attention_ref(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), bt, lens, list(range(len(lens) + 1)),
                                   32**-0.5, torch.float64, window, sinks=sinks)
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=8e-3)


@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("q_len, ctx", [(40, 0), (3, 30), (25, 20)])
def test_backends_prefill_with_sinks(window, q_len, ctx):
    """Fresh prompts (SDPA's causal path without sinks), chunks after cached context, and
    short chunks (the CPU backend's decode kernel, one row per query)."""
    seq_len = ctx + q_len
    _, kc, vc, bt, _, _ = _case(1, 8, 2, 32, 8, [seq_len])
    q = torch.randn(q_len, 8, 32, generator=torch.Generator().manual_seed(1))
    slots = (bt[0].long()[:, None] * 8 + torch.arange(8)).flatten()[ctx:seq_len]
    key, value = kc.view(-1, 2, 32)[slots].clone(), vc.view(-1, 2, 32)[slots].clone()
    sinks = _sinks(8)
    ref = paged_attention_ref(q, kc, vc, bt, [seq_len], [0, q_len], 32**-0.5, window=window, sinks=sinks)
    for backend in (TorchAttentionBackend, CpuAttentionBackend):
        got = backend._prefill(q, key, value, kc, vc, bt[0], seq_len, 8, 32**-0.5, window, 0.0, sinks)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


triton = pytest.importorskip("triton")


@pytest.mark.parametrize("window", [0, 5, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_kernel_with_sinks(window, dtype):
    from test_triton_kernels import DEV, check_mixed

    sinks = _sinks(8).to(DEV)
    check_mixed(8, 2, 32, 8, dtype, block_m=16, tile_n=16, window=window, sinks=sinks)
    # Split decodes: the sink joins once, in the merge (8 segments: some empty).
    for segments in (4, 8):
        check_mixed(8, 2, 32, 8, dtype, segments=segments, tile_n=16, window=window, sinks=sinks,
                    reqs=[(1, n) for n in (1, 9, 16, 17, 40, 77)])


@pytest.mark.parametrize("segments", [1, 4])
def test_triton_fused_rope_decode_with_sinks(segments):
    from test_decode_rope import _check

    _check(8, 2, 32, 8, torch.float32, segments, [1, 8, 9, 23, 70], sinks=_sinks(8))
    _check(8, 2, 32, 8, torch.bfloat16, segments, [1, 9, 70], sinks=_sinks(8) / 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_with_sinks_on_gpu_shapes():
    """GPT-OSS-20B's attention shape (64 query heads, 8 KV heads, head dim 64, window 128)."""
    from test_decode_rope import _check
    from test_triton_kernels import check_mixed

    sinks = _sinks(64).cuda()
    for window in (0, 128):
        check_mixed(64, 8, 64, 16, torch.bfloat16, window=window, sinks=sinks,
                    reqs=[(1, 1), (1, 300), (1, 1000), (200, 200), (77, 500)])
    for segments in (1, 16):
        _check(64, 8, 64, 16, torch.bfloat16, segments, [1, 130, 1000], sinks=sinks)
