"""The native CPU decode kernel against its pure-PyTorch twin, and both backends end to end."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.attention import cpu_kernels
from pagedserve.attention.backend import AttentionMetadata
from pagedserve.attention.torch_backend import TorchAttentionBackend

needs_kernel = pytest.mark.skipif(cpu_kernels.load() is None, reason="no C compiler for the CPU kernel")


def _case(num_reqs, num_heads, num_kv_heads, head_dim, block_size, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 5
    kc = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    vc = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g)
    max_blocks = max(-(-n // block_size) for n in lens)
    bt = torch.zeros(num_reqs, max_blocks, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lens):  # scattered, non-contiguous blocks
        nb = -(-n // block_size)
        bt[i, :nb] = perm[used: used + nb]
        used += nb
    q = torch.randn(num_reqs, num_heads, head_dim, generator=g)
    sl = torch.tensor(lens, dtype=torch.int32)
    meta = AttentionMetadata(num_tokens=num_reqs, num_actual_tokens=num_reqs, num_reqs=num_reqs,
                             num_decodes=num_reqs, slot_mapping=torch.zeros(num_reqs, dtype=torch.long),
                             block_tables=bt, seq_lens=sl, query_start_loc=torch.arange(num_reqs + 1),
                             max_query_len=1, max_seq_len=max(lens), seq_lens_cpu=list(lens),
                             query_start_loc_cpu=list(range(num_reqs + 1)), block_size=block_size)
    return q, kc, vc, bt, sl, meta


@needs_kernel
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 16), (8, 2, 64), (8, 1, 128), (12, 4, 32), (2, 2, 80)])
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_decode_kernel_matches_torch(heads, kv_heads, head_dim, block_size):
    lens = [1, block_size, block_size + 1, 3 * block_size - 1, 77, 130]
    q, kc, vc, bt, sl, meta = _case(len(lens), heads, kv_heads, head_dim, block_size, lens)
    scale = head_dim**-0.5
    got = cpu_kernels.paged_decode(q, kc, vc, bt, sl, scale)
    ref = TorchAttentionBackend._decode(q, kc, vc, meta, scale)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_only_reads_listed_blocks():
    q, kc, vc, bt, sl, meta = _case(3, 4, 2, 16, 8, [5, 20, 9])
    ref = cpu_kernels.paged_decode(q, kc, vc, bt, sl, 0.25)
    listed = set(bt[0, :1].tolist() + bt[1, :3].tolist() + bt[2, :2].tolist())
    for b in range(kc.shape[0]):  # poison every block no request may read
        if b not in listed:
            kc[b] = float("nan")
            vc[b] = float("nan")
    torch.testing.assert_close(cpu_kernels.paged_decode(q, kc, vc, bt, sl, 0.25), ref)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_backends_agree_end_to_end(llama_dir, hf_refs, backend):
    from conftest import assert_greedy_matches

    llm = LLM(llama_dir, attention_backend=backend, max_num_batched_tokens=64, block_size=8)
    assert llm.llm_engine.runner.backend.name == backend
    prompts = [[(11 * i + 5 * j) % 1000 + 4 for j in range(n)] for i, n in enumerate((3, 30, 90))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert_greedy_matches(hf_refs["llama"].greedy(p, 20), o.outputs[0].token_ids)


def test_cpu_backend_rejected_on_cuda(llama_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA to be refused")
    with pytest.raises(ValueError, match="CPU only"):
        LLM(llama_dir, attention_backend="cpu", device="cuda")


@needs_kernel
@pytest.mark.parametrize("q_len, ctx", [(1, 7), (3, 1), (5, 30), (16, 45)])
def test_short_chunks_after_context_match_torch(q_len, ctx):
    """A short chunk after cached context (speculative drafts) runs as decode rows of growing
    causal length in the native kernel: the same as PyTorch's masked attention."""
    from pagedserve.attention.torch_backend import CpuAttentionBackend

    seq_len = ctx + q_len
    q, kc, vc, bt, sl, _ = _case(1, 8, 2, 32, 8, [seq_len])
    q = torch.randn(q_len, 8, 32, generator=torch.Generator().manual_seed(1))
    flat_k, flat_v = kc.view(-1, 2, 32), vc.view(-1, 2, 32)
    slots = (bt[0].long()[:, None] * 8 + torch.arange(8)).flatten()[ctx:seq_len]
    key, value = flat_k[slots].clone(), flat_v[slots].clone()  # the chunk's K/V, as already written
    got = CpuAttentionBackend._prefill(q, key, value, kc, vc, bt[0], seq_len, 8, 32**-0.5)
    ref = TorchAttentionBackend._prefill(q, key, value, kc, vc, bt[0], seq_len, 8, 32**-0.5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# (window, softcap): a sliding window shorter than most sequences, a softcap alone, both, a
# window longer than every sequence (no effect); chunked local attention (window < 0: chunks
# of 16 positions, two blocks; of 5, across blocks) with and without a softcap.
WINDOWS = [(5, 0.0), (0, 2.0), (16, 1.5), (500, 0.0), (-16, 0.0), (-5, 1.5)]


@pytest.mark.parametrize("window, softcap", WINDOWS)
def test_decode_window_and_softcap_match_reference(window, softcap):
    from pagedserve.ops.reference import paged_attention_ref

    lens = [1, 5, 6, 17, 77, 130]
    q, kc, vc, bt, sl, meta = _case(len(lens), 8, 2, 32, 8, lens)
    q = q * 4  # scores large enough for the softcap to bite
    ref = paged_attention_ref(q, kc, vc, bt, lens, list(range(len(lens) + 1)), 32**-0.5, window=window,
                              softcap=softcap)
    got = TorchAttentionBackend._decode(q, kc, vc, meta, 32**-0.5, window, softcap)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if cpu_kernels.load() is not None:
        got = cpu_kernels.paged_decode(q, kc, vc, bt, sl, 32**-0.5, window, softcap)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if window == 0:  # the cap changes the result, so the check above can fail
        assert (got - paged_attention_ref(q, kc, vc, bt, lens, list(range(len(lens) + 1)), 32**-0.5)).abs().max() > 1e-3


@pytest.mark.parametrize("window, softcap", WINDOWS)
@pytest.mark.parametrize("q_len, ctx", [(40, 0), (3, 30), (25, 20)])
def test_prefill_window_and_softcap_match_reference(window, softcap, q_len, ctx):
    from pagedserve.attention.torch_backend import CpuAttentionBackend
    from pagedserve.ops.reference import paged_attention_ref

    seq_len = ctx + q_len
    _, kc, vc, bt, _, _ = _case(1, 8, 2, 32, 8, [seq_len])
    q = 4 * torch.randn(q_len, 8, 32, generator=torch.Generator().manual_seed(1))
    slots = (bt[0].long()[:, None] * 8 + torch.arange(8)).flatten()[ctx:seq_len]
    key, value = kc.view(-1, 2, 32)[slots].clone(), vc.view(-1, 2, 32)[slots].clone()
    ref = paged_attention_ref(q, kc, vc, bt, [seq_len], [0, q_len], 32**-0.5, window=window, softcap=softcap)
    for backend in (TorchAttentionBackend, CpuAttentionBackend):
        got = backend._prefill(q, key, value, kc, vc, bt[0], seq_len, 8, 32**-0.5, window, softcap)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("window, softcap", [(0, 0.0), (9, 2.0)])
def test_decode_kernel_reads_bfloat16_caches(window, softcap):
    """A bfloat16 model's cache: the kernel widens each K/V element to float32 (exactly) and
    accumulates in float32, so it matches the float64 reference on the same bf16 values to
    within the output's own rounding."""
    from pagedserve.ops.reference import paged_attention_ref

    lens = [1, 8, 9, 40, 77]
    q, kc, vc, bt, sl, _ = _case(len(lens), 8, 2, 64, 8, lens)
    q, kc, vc = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    got = cpu_kernels.paged_decode(q, kc, vc, bt, sl, 0.125, window, softcap)
    assert got.dtype == torch.bfloat16
    ref = paged_attention_ref(q, kc, vc, bt, lens, list(range(len(lens) + 1)), 0.125, torch.float64, window, softcap)
    torch.testing.assert_close(got.double(), ref, rtol=1e-2, atol=8e-3)
    assert cpu_kernels.supports(q, kc) and not cpu_kernels.supports(q.float(), kc)
