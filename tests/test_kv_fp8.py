"""kv_cache_dtype="fp8": K/V stored in FP8 e4m3 (saturating at +-448). The Triton writes and
the attention kernel against their twins on FP8 caches, the backends against each other in
the engine, and what it buys: twice the blocks of bf16 in the same memory."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from pagedserve import LLM, SamplingParams

pytest.importorskip("triton")

from pagedserve.ops.paged_attention import DecodeRope, paged_attention  # noqa: E402
from pagedserve.ops.reference import paged_attention_ref, reshape_and_cache_ref, rotary_ref  # noqa: E402
from pagedserve.ops.reshape_and_cache import reshape_and_cache  # noqa: E402
from test_triton_kernels import (DEV, assert_attention_close, make_batch, mixed_requests,  # noqa: E402
                                 reference, run_kernels)

FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("scale", [3.0, 0.01, 1000.0])  # normal values, subnormals, saturation
def test_fp8_write_matches_twin(scale):
    g = torch.Generator().manual_seed(int(scale * 7))
    k, v = (torch.randn(40, 2, 16, generator=g) * scale for _ in range(2))
    slots = torch.randperm(4 * 16, generator=g)[:40]
    slots[3] = -1  # padding: not written
    kc, vc = (torch.zeros(16, 4, 2, 16, dtype=FP8, device=DEV) for _ in range(2))
    kc_ref, vc_ref = (torch.zeros(16, 4, 2, 16, dtype=FP8) for _ in range(2))
    reshape_and_cache(k.to(DEV), v.to(DEV), kc, vc, slots.to(DEV))
    reshape_and_cache_ref(k, v, kc_ref, vc_ref, slots)
    for got, want in ((kc.cpu(), kc_ref), (vc.cpu(), vc_ref)):
        assert torch.equal(got.float(), want.float())  # (-0 and +0 may differ in sign only)
        assert got.float().abs().max() <= 448 and torch.isfinite(got.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("segments", [1, 4])
def test_attention_reads_fp8_caches(dtype, segments):
    """Decodes (split or not) and prefill chunks over FP8 caches: the kernel widens each tile
    as the twin widens the cache."""
    b = make_batch(mixed_requests(8), 8, 2, 32, 8, torch.float32, seed=3)
    b = replace(b, query=b.query.to(dtype), k_cache=b.k_cache.to(FP8), v_cache=b.v_cache.to(FP8))
    out = torch.full_like(b.query, float("nan"))
    run_kernels(b, out, 32 ** -0.5, segments)
    assert_attention_close(out, reference(b, 32 ** -0.5), dtype)


@pytest.mark.parametrize("segments", [1, 4])
def test_fused_rope_decode_on_fp8_caches(segments):
    """The decode kernel that also rotates and writes the new key: it writes FP8 as the twin
    does, and attends to the new key as the cache holds it (the next step reads the same)."""
    heads, kv_heads, d, bs = 4, 2, 16, 8
    lens = [1, 8, 9, 23]
    b = make_batch([(1, s) for s in lens], heads, kv_heads, d, bs, torch.float32, seed=5)
    b = replace(b, k_cache=b.k_cache.to(FP8), v_cache=b.v_cache.to(FP8))
    n = len(lens)
    g = torch.Generator().manual_seed(9)
    bt = b.block_tables.cpu()
    pos = [s - 1 for s in lens]
    slots = torch.tensor([int(bt[r, p // bs]) * bs + p % bs for r, p in enumerate(pos)], device=DEV)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d, generator=g).to(DEV) * 4
    q, k, v = (x.view(n, -1, d) for x in qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1))
    angles = torch.randn(max(lens), d // 2, generator=g)
    cos_sin = torch.cat([angles.cos(), angles.sin()], -1).to(DEV)
    positions = torch.tensor(pos, device=DEV)
    q_ref, k_ref = rotary_ref(positions.cpu(), q.cpu(), k.cpu(), cos_sin.cpu())
    kc_ref, vc_ref = b.k_cache.cpu().clone(), b.v_cache.cpu().clone()
    reshape_and_cache_ref(k_ref, v.cpu(), kc_ref, vc_ref, slots.cpu())
    want = paged_attention_ref(q_ref, kc_ref, vc_ref, bt, lens, b.qsl_cpu, d ** -0.5, compute_dtype=torch.float64)
    out = torch.empty(n, heads, d, device=DEV)
    paged_attention(q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.qsl, n, n, d ** -0.5, out=out, decode=True,
                    num_segments=segments, rope=DecodeRope(positions, cos_sin, k, v, slots))
    assert_attention_close(out, want, torch.float32)
    assert torch.equal(b.k_cache.cpu().float().nan_to_num(), kc_ref.float().nan_to_num())
    assert torch.equal(b.v_cache.cpu().float().nan_to_num(), vc_ref.float().nan_to_num())


def _run(path: str, backend: str, kv: str, dtype: str = "float32", **kw):
    prompts = [[(7 * i + 3 * j) % 900 + 4 for j in range(n)] for i, n in enumerate((5, 21, 40))]
    llm = LLM(path, attention_backend=backend, dtype=dtype, kv_cache_dtype=kv, block_size=8, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1), use_tqdm=False)
    return llm, [(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                           o.outputs[0].token_ids)]) for o in outs]


def test_backends_agree_on_fp8_caches(model_dirs):
    """The PyTorch backend (the reference), the CPU one and the Triton one (interpreted) read
    and write the same FP8 values: the same tokens, logprobs within float32 round-off."""
    ref_llm, ref = _run(model_dirs["llama"], "torch", "fp8")
    assert ref_llm.llm_engine.runner.kv_caches[0][0].dtype == FP8
    for backend in ("cpu", "triton"):
        _, got = _run(model_dirs["llama"], backend, "fp8")
        for (t1, l1), (t2, l2) in zip(ref, got):
            assert t1 == t2
            assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4


def test_fp8_cache_stays_close_to_full_precision(tmp_path, tokenizer_dir):
    """On a model with weights of a realistic scale, FP8 K/V move the logprobs a little and
    (here) no greedy choice."""
    from pagedserve.model.random_model import build_random_model

    path = build_random_model(str(tmp_path / "m"), "LlamaForCausalLM", initializer_range=0.05,
                              tokenizer_dir=tokenizer_dir)
    _, full = _run(path, "torch", "auto")
    _, fp8 = _run(path, "torch", "fp8")
    gaps = [abs(a - b) for (_, l1), (_, l2) in zip(full, fp8) for a, b in zip(l1, l2)]
    assert [t for t, _ in full] == [t for t, _ in fp8]
    assert 0 < max(gaps) < 0.05  # it does round (not a silent full-precision cache), and not much


def test_fp8_cache_holds_twice_the_blocks(model_dirs):
    budget = 1 << 20
    bf16 = LLM(model_dirs["llama"], dtype="bfloat16", kv_cache_memory_bytes=budget).llm_engine.config.num_gpu_blocks
    fp8 = LLM(model_dirs["llama"], dtype="bfloat16", kv_cache_memory_bytes=budget,
              kv_cache_dtype="fp8").llm_engine.config.num_gpu_blocks
    assert fp8 == 2 * bf16
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(model_dirs["llama"], kv_cache_dtype="int8")


@pytest.mark.gpu
def test_fp8_cache_on_gpu_with_cuda_graphs(model_dirs):
    """On a GPU (hardware FP8 conversion, decode steps in CUDA graphs): the Triton backend
    agrees with the PyTorch one on the same FP8 cache."""
    kw = dict(device="cuda", kv_cache_memory_bytes=64 << 20)
    llm, ref = _run(model_dirs["llama"], "torch", "fp8", **kw)
    del llm
    llm, got = _run(model_dirs["llama"], "triton", "fp8", **kw)
    assert llm.llm_engine.runner.graphs is not None
    for (t1, l1), (t2, l2) in zip(ref, got):
        assert t1 == t2
        assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-3


def _rescaled_copy(src: str, dst: str, shift: int, scale_names: dict) -> str:
    """The model at `src` with keys and values made 2^-shift as large (k/v projections down,
    q/o projections up: the same function, exactly, in full precision) and the KV scales
    `scale_names` ({suffix after self_attn: value}) written beside each layer's."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (path,) = [f"{dst}/{f}" for f in os.listdir(dst) if f.endswith(".safetensors")]
    t = load_file(path)
    layers = sorted({n.split(".self_attn.")[0] for n in t if ".self_attn." in n})
    for layer in layers:
        a = f"{layer}.self_attn"
        for proj, f in (("k_proj", 2.0 ** -shift), ("v_proj", 2.0 ** -shift), ("q_proj", 2.0 ** shift),
                        ("o_proj", 2.0 ** shift)):
            t[f"{a}.{proj}.weight"] = t[f"{a}.{proj}.weight"] * f
        for suffix, value in scale_names.items():
            t[f"{a}.{suffix}"] = torch.tensor(value, dtype=torch.float32)
    save_file(t, path, metadata={"format": "pt"})
    return dst


def test_checkpoint_kv_scales(tmp_path, tokenizer_dir):
    """Per-layer KV scales in the checkpoint (each name vLLM reads). The model's keys and
    values are made 2^-6 as large (exact in floating point), into FP8's subnormals, and
    k_scale = v_scale = 2^-6 given: the FP8 cache then holds exactly the original model's
    values, so the logprobs are the original's on an FP8 cache (all three backends); without
    the scales they move far more; a full-precision cache ignores them."""
    from pagedserve.model.random_model import build_random_model

    src = build_random_model(str(tmp_path / "m"), "LlamaForCausalLM", initializer_range=0.05,
                             tokenizer_dir=tokenizer_dir)
    s = 2.0 ** -6
    _, want = _run(src, "torch", "fp8")
    _, full = _run(src, "torch", "auto")
    bare = _rescaled_copy(src, str(tmp_path / "bare"), 6, {})
    _, unscaled = _run(bare, "torch", "fp8")
    for i, names in enumerate([{"k_scale": s, "v_scale": s}, {"kv_scale": s},
                               {"k_proj.output_scale": s, "v_proj.output_scale": s, "q_scale": 1.0}]):
        path = _rescaled_copy(src, str(tmp_path / f"scaled{i}"), 6, names)
        for backend in ("torch", "cpu", "triton") if i == 0 else ("torch",):
            llm, got = _run(path, backend, "fp8")
            assert llm.llm_engine.runner.attn_layers[0].k_scale == s
            for (t1, l1), (t2, l2) in zip(want, got):
                assert t1 == t2 and max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4
    gap = max(abs(a - b) for (_, l1), (_, l2) in zip(want, unscaled) for a, b in zip(l1, l2))
    assert gap > 0.01  # subnormal K/V lose precision without their scales (0.30 when written)
    llm, ignored = _run(path, "torch", "auto")
    assert llm.llm_engine.runner.attn_layers[0].k_scale == 1.0
    for (t1, l1), (t2, l2) in zip(full, ignored):
        assert t1 == t2 and max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4
    per_head = _rescaled_copy(src, str(tmp_path / "per_head"), 0, {"k_scale": [1.0, 1.0]})
    with pytest.raises(ValueError, match="per head"):
        LLM(per_head)
