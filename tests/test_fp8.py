"""FP8 checkpoints (model/layers/fp8.py, ops/fp8_linear.py): the W8A16 kernel against its twin,
and whole models in each checkpoint format against transformers: dequantized at load on CPU,
kept in FP8 on the Triton path (interpreted here)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from engine_helpers import HF_PROMPTS, assert_greedy_matches_hf, lora_runs
from safetensors.torch import load_file, save_file

from pagedserve import LLM, SamplingParams
from pagedserve.model.fp8_quantize import quantize_block, quantize_checkpoint, quantize_rows
from pagedserve.model.layers.fp8 import FP8, Fp8Format, Fp8Linear, row_scales

pytest.importorskip("triton")

from pagedserve.ops.fp8_linear import fp8_linear, fp8_linear_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = (32, 32)  # tiles small enough that a tiny model has several


def _weight(n: int, k: int, fmt: Fp8Format, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.3
    if fmt.block is not None:
        q, s = quantize_block(w, *fmt.block)
    else:
        q, s = quantize_rows(w, per_tensor=seed % 2 == 0)
    scales, bk = row_scales(s, (n, k), fmt, "w")
    return q.to(DEVICE), scales.to(DEVICE), bk


@pytest.mark.parametrize("m", [1, 5, 33, 100])
@pytest.mark.parametrize("n, k, block", [(96, 64, (32, 32)), (80, 72, None), (48, 128, (16, 64)), (40, 96, (128, 128))])
def test_kernel_matches_twin_fp32(m, n, k, block):
    q, scales, bk = _weight(n, k, Fp8Format(block), seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    bias = torch.randn(n).to(DEVICE) if m % 2 else None
    torch.testing.assert_close(fp8_linear(x, q, scales, bk, bias), fp8_linear_ref(x, q, scales, bk, bias),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [(16, 16, 16, 1, 4, 1), (32, 32, 32, 2, 4, 1), (64, 64, 32, 8, 4, 1)])
def test_kernel_launch_shapes(config):
    q, scales, bk = _weight(72, 64, Fp8Format((32, 32)), seed=3)
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)  # leading dims kept
    got = fp8_linear(x, q, scales, bk, config=config)
    assert got.shape == (3, 7, 72)
    torch.testing.assert_close(got, fp8_linear_ref(x, q, scales, bk), rtol=1e-5, atol=1e-5)


def test_kernel_bf16():
    """bf16 activations: the tile dequantized and rounded to bf16 as the twin rounds (the
    interpreter truncates instead of rounding, hence the tolerance on CPU)."""
    q, scales, bk = _weight(96, 128, Fp8Format((32, 32)), seed=5)
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    got, want = fp8_linear(x, q, scales, bk).float(), fp8_linear_ref(x, q, scales, bk).float()
    assert (got - want).abs().max().item() <= (0.01 if DEVICE == "cuda" else 0.03) * want.abs().max().item()


def _hf_reference(path: str, scheme: str, tmp_path):
    """transformers on the same weights: its own FP8 dequantization for its format; for
    compressed-tensors (whose transformers integration needs another package), the checkpoint
    dequantized here, weight * scale, and loaded as a plain one."""
    import transformers

    if scheme == "block":
        cfg = transformers.FineGrainedFP8Config(dequantize=True, weight_block_size=BLOCK)
        return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg,
                                                                 dtype=torch.float32).eval()
    plain = tmp_path / "dequantized"
    shutil.copytree(path, plain)
    tensors = load_file(str(plain / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        w = name[: -len("_scale")]
        scale = tensors.pop(name).float()
        tensors[w] = tensors[w].float() * (scale if scale.numel() > 1 else scale.reshape(()))
    save_file(tensors, str(plain / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["quantization_config"]
    (plain / "config.json").write_text(json.dumps(cfg))
    return transformers.AutoModelForCausalLM.from_pretrained(str(plain), dtype=torch.float32).eval()


@pytest.mark.parametrize("name, scheme, backend", [
    *[("llama", s, b) for s in ("block", "channel", "tensor") for b in ("cpu", "triton")],
    ("qwen3", "block", "triton"),  # q/k norms after the FP8 qkv
    ("qwen2_moe", "block", "triton"),  # experts in FP8 on the fused MoE kernel, the shared expert too
    ("mixtral", "channel", "triton"),
    ("minimax_m2", "block", "triton"),  # (released in block FP8) whole-q/k norms after the FP8 qkv, biased router
])
def test_fp8_checkpoints_match_transformers(model_dirs, tmp_path, name, scheme, backend):
    path = quantize_checkpoint(model_dirs[name], str(tmp_path / "fp8"), scheme, BLOCK)
    hf = _hf_reference(path, scheme, tmp_path)
    llm = LLM(path, attention_backend=backend, dtype="float32")
    model = llm.llm_engine.runner.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    if backend == "triton":  # the projections and the experts stay in FP8
        assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == FP8
        experts = [m for m in model.modules() if type(m).__name__ == "FusedMoE"]
        assert all(m.w13.dtype == FP8 and m.w2.dtype == FP8 for m in experts)
    else:
        assert qkv.weight.dtype == torch.float32
    assert_greedy_matches_hf(llm, hf)


def test_fp8_weights_take_half_the_memory(model_dirs, tmp_path):
    path = quantize_checkpoint(model_dirs["llama"], str(tmp_path / "fp8"), "block", BLOCK)

    def linear_bytes(llm) -> int:
        return sum(p.numel() * p.element_size() for n, p in llm.llm_engine.runner.model.named_parameters()
                   if ".layers." in n and "norm" not in n)

    fp8 = linear_bytes(LLM(path, attention_backend="triton", dtype="bfloat16"))
    bf16 = linear_bytes(LLM(model_dirs["llama"], attention_backend="triton", dtype="bfloat16"))
    assert fp8 < 0.6 * bf16  # one byte a weight, plus a float32 scale per row and 32 columns


def test_lora_on_fp8_layers(model_dirs, tmp_path):
    """An adapter on an FP8 checkpoint: on the Triton path its product is added to the FP8
    layers' outputs, and gives what the dequantized layers give on the CPU path."""
    from pagedserve.lora.random_adapter import make_adapter
    adapter, _ = make_adapter(model_dirs["llama"], str(tmp_path / "lora"), seed=3)
    path = quantize_checkpoint(model_dirs["llama"], str(tmp_path / "fp8"), "block", BLOCK)
    runs = lora_runs(path, adapter)
    for (t1, l1), (t2, l2) in zip(runs["cpu", True], runs["triton", True]):
        assert t1 == t2 and max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4
    assert runs["triton", True] != runs["triton", False]  # the adapter is applied


def test_bad_quantization_is_a_clear_error(model_dirs, tmp_path):
    bnb = tmp_path / "bnb"
    shutil.copytree(model_dirs["llama"], bnb)
    cfg = json.loads((bnb / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (bnb / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes' is not supported"):
        LLM(str(bnb))
    lost = quantize_checkpoint(model_dirs["llama"], str(tmp_path / "lost"), "block", BLOCK)
    tensors = load_file(f"{lost}/model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight_scale_inv"]
    save_file(tensors, f"{lost}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj has no scale"):
        LLM(lost)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 200, 1000])
def test_kernel_bf16_on_gpu(m):
    """The issue model's shapes in bf16 on tensor cores: within two units of bf16's last place."""
    for n, k, block in ((2560, 2048, (128, 128)), (11264, 2048, None), (2048, 5632, (128, 128))):
        q, scales, bk = _weight(n, k, Fp8Format(block), seed=m + n)
        x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
        got, want = fp8_linear(x, q, scales, bk).float(), fp8_linear_ref(x, q, scales, bk).float()
        assert (got - want).abs().max().item() <= 2 ** -6 * want.abs().max().item()


def _rows_dequantized(src: str, dst) -> str:
    """The checkpoint with each weight online FP8 quantizes replaced by its FP8 value times its
    row scale: what transformers runs as the reference."""
    from pagedserve.model.fp8_quantize import online_fp8_weights

    shutil.copytree(src, dst)
    tensors = load_file(f"{dst}/model.safetensors")
    out = dict(online_fp8_weights(tensors.items()))
    for name in [n for n in out if n.endswith(".weight_scale")]:
        w = name[: -len("_scale")]
        out[w] = out[w].float() * out.pop(name)
    save_file({n: t.float() for n, t in out.items()}, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize("name, backend", [("llama", "cpu"), ("llama", "triton"), ("qwen2_moe", "triton")])
def test_online_fp8_matches_transformers(model_dirs, tmp_path, name, backend):
    """quantization="fp8" on an unquantized checkpoint (vLLM's online FP8): the decoder's linear
    layers (and experts) held in FP8 on the Triton path, quantized and dequantized on CPU, and
    the same as transformers on the weights quantized per row."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(_rows_dequantized(model_dirs[name], tmp_path / "ref"),
                                                           dtype=torch.float32).eval()
    llm = LLM(model_dirs[name], attention_backend=backend, dtype="float32", quantization="fp8")
    model = llm.llm_engine.runner.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    if backend == "triton":
        assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == FP8 and qkv.weight_scale.shape[1] == 1
        assert all(m.w13.dtype == FP8 for m in model.modules() if type(m).__name__ == "FusedMoE")
        assert model.lm_head.weight.dtype == torch.float32  # the LM head and embeddings stay
    outs = assert_greedy_matches_hf(llm, hf)
    plain = LLM(model_dirs[name], attention_backend=backend, dtype="float32").generate(
        [{"prompt_token_ids": p} for p in HF_PROMPTS],
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2), use_tqdm=False)
    moved = 0.0
    for o, u in zip(outs, plain):
        tokens = o.outputs[0].token_ids
        for i in range(len(tokens)):
            if u.outputs[0].token_ids[:i] == tokens[:i]:
                mine, theirs = o.outputs[0].logprobs[i], u.outputs[0].logprobs[i]
                moved = max([moved] + [abs(mine[c].logprob - theirs[c].logprob) for c in mine.keys() & theirs.keys()])
    assert moved > 1e-3  # the weights were quantized: logprobs differ from the unquantized model's


def test_quantization_argument_is_checked(model_dirs, tmp_path):
    from pagedserve.model.int_quantize import quantize_checkpoint as int_checkpoint

    gptq = int_checkpoint(model_dirs["llama"], str(tmp_path / "gptq"))
    LLM(gptq, quantization="gptq")
    LLM(gptq, quantization="gptq_marlin")  # vLLM's kernel name for the same checkpoints
    with pytest.raises(ValueError, match="quantization='awq', but the checkpoint is quantized with 'gptq'"):
        LLM(gptq, quantization="awq")
    with pytest.raises(ValueError, match="the checkpoint is not quantized"):
        LLM(model_dirs["llama"], quantization="awq")
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(model_dirs["llama"], quantization="int3")
    fp8 = quantize_checkpoint(model_dirs["llama"], str(tmp_path / "fp8"), "block", BLOCK)
    llm = LLM(fp8, quantization="fp8", attention_backend="triton")  # an FP8 checkpoint stays as it is
    assert llm.llm_engine.runner.model.model.layers[0].self_attn.qkv_proj.block_k == BLOCK[1]


def test_quantization_flag_reaches_the_engine_args():
    from pagedserve.entrypoints.cli import build_parser, engine_args_from

    for argv, want in ((["serve", "m", "--quantization", "fp8"], "fp8"), (["serve", "m", "-q", "awq_marlin"],
                                                                         "awq_marlin"), (["serve", "m"], None)):
        assert engine_args_from(build_parser().parse_args(argv), "m").quantization == want


def test_fp8_mimo_v2_flash(model_dirs, tmp_path):
    """MiMo-V2-Flash reshapes its attention projections as they load (model/mimo_v2_flash.py): on
    the Triton path they load dequantized while its experts stay in FP8, and it matches transformers."""
    path = quantize_checkpoint(model_dirs["mimo_v2_flash"], str(tmp_path / "fp8"), "block", BLOCK)
    hf = _hf_reference(path, "block", tmp_path)
    llm = LLM(path, attention_backend="triton", dtype="float32")
    model = llm.llm_engine.runner.model
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32
    experts = [m for m in model.modules() if type(m).__name__ == "FusedMoE"]
    assert experts and all(m.w13.dtype == FP8 and m.w2.dtype == FP8 for m in experts)
    assert_greedy_matches_hf(llm, hf)
