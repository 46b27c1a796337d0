"""GPT-OSS beyond tests/test_correctness.py (where the bf16-style checkpoint is held to
transformers on every path): MXFP4 experts, as openai/gpt-oss-* ship them. The dequantizer
against transformers' own, the fused MoE kernel on packed MXFP4 experts against the same
kernel on the dequantized ones, whole MXFP4 checkpoints against transformers on both paths,
and the errors."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch

from engine_helpers import assert_greedy_matches_hf
from pagedserve import LLM
from pagedserve.model.layers import mxfp4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _codes(shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks [..., G, 16] and scales [..., G] (scales 2^-7 to 2^-3)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(120, 125, shape, generator=g, dtype=torch.int32).to(torch.uint8)
    return blocks, scales


def test_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _codes((3, 40, 4), seed=0)  # [E, N, G]
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, K, N]
    got = mxfp4.dequantize(blocks, scales, torch.float32)  # [E, N, K]
    assert torch.equal(got, want.transpose(1, 2))


def test_quantize_rounds_to_nearest_code():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    blocks, scales = mxfp4.quantize(w)
    back = mxfp4.dequantize(blocks, scales, torch.float32)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)  # 1 unit of the scaled grid
    assert ((back - w).abs() <= step).all()  # e2m1's largest gap is 2 units (4 -> 6): half of it
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(back), torch.float32), back)  # codes are fixed points


@pytest.mark.parametrize("t", [1, 9, 37])
def test_fused_moe_mxfp4_matches_dequantized_experts(t):
    """Packed MXFP4 experts (the int32 view of the checkpoint's bytes) with biases and the
    clamped SwiGLU, against the same kernel on the experts dequantized."""
    pytest.importorskip("triton")
    from pagedserve.ops.fused_moe import fused_moe

    e, h, i, k = 4, 64, 96, 2
    gen = torch.Generator().manual_seed(t)
    b13, s13 = _codes((e, 2 * i, h // 32), seed=t)
    b2, s2 = _codes((e, h, i // 32), seed=t + 1)
    w13, sc13 = mxfp4.packed(b13, s13)
    w2, sc2 = mxfp4.packed(b2, s2)
    d13, d2 = mxfp4.dequantize(b13, s13, torch.float32), mxfp4.dequantize(b2, s2, torch.float32)
    bias = (torch.randn(e, 2 * i, generator=gen).to(DEVICE), torch.randn(e, h, generator=gen).to(DEVICE))
    x = torch.randn(t, h, generator=gen).to(DEVICE)
    weights, ids = torch.rand(t, k, generator=gen).to(DEVICE), torch.randint(0, e, (t, k), generator=gen).to(DEVICE)
    act = dict(activation="swigluoai", act_params=(1.702, 7.0), biases=bias)
    got = fused_moe(x, w13.to(DEVICE), w2.to(DEVICE), weights, ids, scales=(sc13.to(DEVICE), sc2.to(DEVICE), 32, 32),
                    int_bits=4, fp4=True, **act)
    want = fused_moe(x, d13.to(DEVICE), d2.to(DEVICE), weights, ids, **act)
    # (float32 sums in another order: FP4 tiles are at most one 32-wide scale group deep)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def _mxfp4_checkpoint(src: str, dst: str, reference_dir: str) -> str:
    """The GPT-OSS test model with its experts in MXFP4 as the released checkpoints hold them
    (blocks / scales rows = output features), and a float32 copy with the experts
    dequantized (the reference)."""
    from safetensors.torch import load_file, save_file

    for d in (dst, reference_dir):
        shutil.copytree(src, d)
        for f in glob.glob(os.path.join(d, "*.safetensors")):
            os.remove(f)
    quantized, reference = {}, {}
    for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        for name, t in load_file(f).items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = mxfp4.quantize(t.transpose(1, 2).contiguous())  # [E, N, K] rows
                quantized[name + "_blocks"], quantized[name + "_scales"] = blocks, scales
                reference[name] = mxfp4.dequantize(blocks, scales, torch.float32).transpose(1, 2).contiguous()
            else:
                quantized[name] = reference[name] = t
    save_file(quantized, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    save_file(reference, os.path.join(reference_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as fh:
        cfg = json.load(fh)
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    return dst


@pytest.fixture(scope="module")
def mxfp4_dirs(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    ref = str(root / "reference")
    return _mxfp4_checkpoint(model_dirs["gpt_oss"], str(root / "mxfp4"), ref), ref


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_mxfp4_checkpoint_matches_transformers(mxfp4_dirs, backend):
    """CPU: experts dequantized as they load; Triton: kept in MXFP4 (4-bit codes and the uint8
    exponents, as the checkpoint holds them)."""
    import transformers

    path, ref = mxfp4_dirs
    if backend == "triton":
        pytest.importorskip("triton")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    llm = LLM(path, attention_backend=backend, dtype="float32", quantization="mxfp4")
    experts = [m for m in llm.llm_engine.runner.model.modules() if type(m).__name__ == "FusedMoE"]
    assert experts and all(m.fp4 == (backend == "triton") for m in experts)
    if backend == "triton":
        m = experts[0]
        assert m.w13.dtype == torch.int32 and m.w13.shape[-1] * 8 == m.w2.shape[1] and m.w13_scale.dtype == torch.uint8
        held = sum(t.numel() * t.element_size() for t in (m.w13, m.w2, m.w13_scale, m.w2_scale))
        assert held / (2 * (m.w13.numel() + m.w2.numel()) * 8) == pytest.approx(4.25 / 16)  # against bf16
    assert_greedy_matches_hf(llm, hf)


def test_mxfp4_errors(mxfp4_dirs, model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = mxfp4_dirs
    with pytest.raises(ValueError, match="quantized with 'mxfp4'"):
        LLM(path, quantization="fp8")
    # A scales tensor missing: named, not loaded as garbage.
    broken = str(tmp_path / "broken")
    shutil.copytree(path, broken)
    f = os.path.join(broken, "model.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.experts.down_proj_blocks has no matching _scales"):
        LLM(broken)
    # MXFP4 on another architecture.
    other = str(tmp_path / "llama")
    shutil.copytree(model_dirs["llama"], other)
    with open(os.path.join(other, "config.json")) as fh:
        cfg = json.load(fh)
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    with open(os.path.join(other, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    with pytest.raises(ValueError, match="mxfp4.*GPT-OSS"):
        LLM(other)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 64, 512])
def test_fused_moe_mxfp4_bf16_on_gpu(t):
    """GPT-OSS-20B's expert shapes (hidden 2880, 32 experts, top 4) in bf16."""
    from pagedserve.ops.fused_moe import fused_moe

    e, h, i, k = 32, 2880, 2880, 4
    gen = torch.Generator().manual_seed(t)
    b13, s13 = _codes((e, 2 * i, h // 32), seed=t)
    b2, s2 = _codes((e, h, i // 32), seed=t + 1)
    w13, sc13 = (x.cuda() for x in mxfp4.packed(b13, s13))
    w2, sc2 = (x.cuda() for x in mxfp4.packed(b2, s2))
    d13 = mxfp4.dequantize(b13, s13, torch.bfloat16).cuda()
    d2 = mxfp4.dequantize(b2, s2, torch.bfloat16).cuda()
    x = (torch.randn(t, h, generator=gen) * 0.05).to("cuda", torch.bfloat16)
    weights, ids = torch.rand(t, k, generator=gen).cuda(), torch.randint(0, e, (t, k), generator=gen).cuda()
    act = dict(activation="swigluoai", act_params=(1.702, 7.0))
    got = fused_moe(x, w13, w2, weights, ids, scales=(sc13, sc2, 32, 32), int_bits=4, fp4=True, **act).float()
    want = fused_moe(x, d13, d2, weights, ids, **act).float()
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
