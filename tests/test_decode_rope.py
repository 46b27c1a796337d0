"""Decode attention with RoPE and the KV write inside (paged_attention's `rope`) against the
three steps it replaces, in their PyTorch twins: rotary_ref, reshape_and_cache_ref and
paged_attention_ref. The new token's own cache slot starts as NaN, so a kernel that reads it
instead of taking the new key from registers fails; graph padding rows (seq_len 0, slot -1)
must give 0 and write nothing. Interpreter-sized on CPU; `-m gpu` on the benchmark shape."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.ops import triton_interpreting  # noqa: E402
from pagedserve.ops.paged_attention import DecodeRope, paged_attention  # noqa: E402
from pagedserve.ops.reference import paged_attention_ref, reshape_and_cache_ref, rotary_ref  # noqa: E402
from test_triton_kernels import DEV, assert_attention_close, make_batch  # noqa: E402


def _check(heads, kv_heads, head_dim, block_size, dtype, segments, seq_lens, padding=1, seed=0, sinks=None):
    reqs = [(1, s) for s in seq_lens] + [(1, 0)] * padding
    b = make_batch(reqs, heads, kv_heads, head_dim, block_size, dtype, seed=seed)
    n = len(reqs)
    g = torch.Generator().manual_seed(seed + 1)
    bt = b.block_tables.cpu()
    pos = [max(s - 1, 0) for s, _ in ((s, None) for _, s in reqs)]
    slots = [int(bt[r, p // block_size]) * block_size + p % block_size if s else -1
             for r, (p, (_, s)) in enumerate(zip(pos, reqs))]
    for r, slot in enumerate(slots):  # the new token's slot: not yet written
        if slot >= 0:
            b.k_cache.view(-1, kv_heads, head_dim)[slot] = float("nan")
            b.v_cache.view(-1, kv_heads, head_dim)[slot] = float("nan")
    # q, k, v as views into one qkv projection output, as the model passes them.
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(DEV)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (x.view(n, -1, head_dim) for x in (q, k, v))
    angles = torch.randn(max(seq_lens) + 1, head_dim // 2, generator=g) * 3
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(DEV)
    positions = torch.tensor(pos, dtype=torch.int64, device=DEV)
    slot_t = torch.tensor(slots, dtype=torch.int64, device=DEV)
    qkv_before = qkv.clone()

    # The three steps, in PyTorch.
    q_ref, k_ref = rotary_ref(positions.cpu(), q.cpu(), k.cpu(), cos_sin.cpu())
    kc_ref, vc_ref = b.k_cache.cpu().clone(), b.v_cache.cpu().clone()
    reshape_and_cache_ref(k_ref, v.cpu(), kc_ref, vc_ref, slot_t.cpu())
    want = paged_attention_ref(q_ref, kc_ref, vc_ref, bt, b.seq_lens_cpu, b.qsl_cpu, head_dim**-0.5,
                               compute_dtype=torch.float64, sinks=sinks)

    out = torch.full((n, heads, head_dim), float("nan"), dtype=dtype, device=DEV)
    paged_attention(q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.qsl, n, n, head_dim**-0.5, out=out,
                    decode=True, num_segments=segments, rope=DecodeRope(positions, cos_sin, k, v, slot_t),
                    sinks=None if sinks is None else sinks.to(DEV))
    assert_attention_close(out, want, dtype)
    assert (out[len(seq_lens):] == 0).all()  # padding rows: no key, zero output
    assert torch.equal(qkv, qkv_before)  # q and k are rotated in registers, not in place
    # The caches now hold the rotated key and the value at each token's slot, nothing else changed.
    # 16-bit: within two units at the tensor's scale (RoPE's roundings, as in test_fused_ops;
    # Triton's interpreter also rounds toward zero).
    scale = float(kc_ref.nan_to_num().abs().max())
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=0, atol=2 * 2 ** -8 * scale)
    torch.testing.assert_close(b.k_cache.cpu(), kc_ref, equal_nan=True, **tol)
    torch.testing.assert_close(b.v_cache.cpu(), vc_ref, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 16), (8, 2, 64), (6, 2, 32), (4, 2, 24)])
def test_decode_rope_matches_the_three_steps(heads, kv_heads, head_dim, dtype, segments):
    # Lengths 1 (the new key alone), at and across page boundaries, and longer than a tile.
    _check(heads, kv_heads, head_dim, 8, dtype, segments, [1, 8, 9, 23, 70])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("segments", [1, 16])
def test_decode_rope_on_gpu_benchmark_shape(segments):
    _check(32, 4, 64, 16, torch.bfloat16, segments, [1, 16, 17, 130, 800, 1023], padding=2)
    _check(28, 4, 128, 16, torch.bfloat16, segments, [5, 300], padding=0, seed=3)


# One architecture per kind of attention the fused decode path meets. Left out: plain Llama-like
# attention (mistral, granite; llama runs in test_triton_kernels.py) and MoE variants, which
# attend as their dense twins do (mixtral, qwen2_moe, glm4_moe, deepseek_v3).
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama3_rope", "mistral_swa", "gemma2", "gemma3", "phi3", "olmo2",
                                  "smollm3", "cohere", "glm4", "glm", "gpt_oss", "deepseek_v2"])
def test_engine_on_triton_backend_matches_transformers(model_dirs, hf_refs, name):
    """Every kind of attention through the fused decode path (qkv bias, q/k norms before the
    RoPE, Llama-3 and long RoPE scaling, sliding windows, softcapping, no-RoPE layers, interleaved and
    partial RoPE, sinks, MLA): greedy tokens equal transformers' (interpreted on CPU)."""
    from conftest import assert_greedy_matches

    from pagedserve import LLM, SamplingParams

    llm = LLM(model_dirs[name], attention_backend="triton", block_size=8, max_num_seqs=4, dtype="float32")
    prompts = [[(7 * i + 3 * j) % 500 + 4 for j in range(n)] for i, n in enumerate((5, 19))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert_greedy_matches(hf_refs[name].greedy(p, 6), o.outputs[0].token_ids)


def _kernels_per_decode_step(llm) -> dict[str, int]:
    """Triton kernel launches (by kernel) of one decode-only step, counted in the interpreter."""
    import collections

    from triton.runtime import interpreter

    from pagedserve import SamplingParams

    eng = llm.llm_engine
    eng.add_request("k", {"prompt_token_ids": [5, 6, 7, 8, 9]}, SamplingParams(temperature=0, max_tokens=8,
                                                                              ignore_eos=True))
    eng.step()
    eng.step()  # prefill, then a first decode step (compiles nothing here, but settles the state)
    counts: collections.Counter = collections.Counter()
    real = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return real(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = counted
    try:
        eng.step()
    finally:
        interpreter.InterpretedFunction.run = real
    eng.abort_request(["k"])
    return dict(counts)


def test_decode_step_kernel_count(llama_dir, monkeypatch):
    """What a decode step launches per layer, so that a kernel added to the hot path shows:
    the RMSNorms, one attention kernel (RoPE, KV write and segment merge inside), SiLU-and-
    mul; with every layer on the GEMV kernel, the GEMVs (norms and SiLU folded in) and the
    attention kernel alone, plus the final norm."""
    if not triton_interpreting():
        pytest.skip("counts launches in Triton's interpreter")
    from test_gemv import _Every

    from pagedserve import LLM
    from pagedserve.ops import gemv as gemv_mod

    llm = LLM(llama_dir, attention_backend="triton", block_size=8, max_num_seqs=4, dtype="float32")
    layers = len(llm.llm_engine.runner.model.model.layers)
    assert _kernels_per_decode_step(llm) == {"_rms_norm_kernel": 2 * layers + 1, "_paged_attention_kernel": layers,
                                             "_silu_and_mul_kernel": layers}
    del llm
    monkeypatch.setattr(gemv_mod, "GEMV_SHAPES", _Every((8, 32, 4, 2, 2)))
    llm = LLM(llama_dir, attention_backend="triton", block_size=8, max_num_seqs=4, dtype="float32")
    assert _kernels_per_decode_step(llm) == {"_gemv_kernel": 4 * layers + 1, "_paged_attention_kernel": layers,
                                             "_rms_norm_kernel": 1}
