"""GPTQ and AWQ checkpoints (model/layers/int_quant.py, ops/int_linear.py): the packed formats
read back to the values they were packed from, the W4A16 / W8A16 kernel against its twin, and
whole models against transformers on the dequantized weights: dequantized at load on CPU,
kept packed on the Triton path (interpreted here)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from engine_helpers import assert_greedy_matches_hf, lora_runs
from safetensors.torch import load_file, save_file

from pagedserve import LLM
from pagedserve.model.int_quantize import _pack_awq, _pack_gptq, quantize_checkpoint, quantize_groups
from pagedserve.model.layers.int_quant import IntFormat, IntQuantLinear, act_order, pack_rows, read_layer

pytest.importorskip("triton")

from pagedserve.ops.int_linear import int_linear, int_linear_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(n: int, k: int, bits: int, group: int, sym: bool, desc_act: bool, seed: int):
    """A quantized [n, k] weight: (pre-pack q, zeros, scales, g_idx)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.3
    g_idx = torch.arange(k) // group
    if desc_act:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    q, zeros, scales = quantize_groups(w, bits, group, sym, g_idx, min_zero=1)
    return q, zeros, scales, g_idx


@pytest.mark.parametrize("method, bits, fmt, desc_act", [
    ("gptq", 4, "gptq", False), ("gptq", 4, "gptq_v2", True), ("gptq", 8, "gptq", True), ("awq", 4, None, False)])
def test_checkpoint_layouts_read_back(method, bits, fmt, desc_act):
    """The packers written after AutoGPTQ's / AutoAWQ's loops, read by the loader: the same
    integers, zero points and scales, and act order's groups."""
    n, k, group = 48, 64, 16
    q, zeros, scales, g_idx = _layer(n, k, bits, group, sym=False, desc_act=desc_act, seed=bits)
    if method == "gptq":
        off = 1 if fmt == "gptq" else 0
        parts = {"qweight": _pack_gptq(q.t(), bits), "qzeros": _pack_gptq(zeros - off, bits).t().contiguous(),
                 "scales": scales.t().contiguous(), "g_idx": g_idx.to(torch.int32)}
        layout = IntFormat("gptq", bits, group, desc_act, off)
    else:
        parts = {"qweight": _pack_awq(q.t()), "qzeros": _pack_awq(zeros.t()), "scales": scales.t().contiguous()}
        layout = IntFormat("awq", 4, group)
    got = read_layer(parts, layout, "layer")
    assert torch.equal(got.q.long(), q) and torch.equal(got.zeros.long(), zeros)
    assert torch.equal(got.scales, scales.float())
    assert (got.g_idx is not None) == desc_act and torch.equal(got.groups(), g_idx)


def test_act_order_sorts_rows_into_whole_groups():
    g_idx = torch.tensor([1, 0, 2, 1, 0, 2, 2, 0, 1])
    perm = act_order(g_idx, 3, "x")
    assert g_idx[perm.long()].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="every group 3 input rows"):
        act_order(torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2]), 3, "x")


def _packed(n: int, k: int, bits: int, group: int, desc_act: bool, seed: int):
    q, zeros, scales, g_idx = _layer(n, k, bits, group, sym=seed % 2 == 0, desc_act=desc_act, seed=seed)
    perm = act_order(g_idx, group, "w") if desc_act else None
    if perm is not None:
        q = q[:, perm.long()]
    return (pack_rows(q, bits).to(DEVICE), scales.float().to(DEVICE), zeros.to(torch.int16).to(DEVICE),
            perm.to(DEVICE) if perm is not None else None)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("n, k, bits, group, desc_act", [
    (96, 64, 4, 32, False), (80, 128, 4, 64, True), (40, 96, 8, 32, True), (72, 96, 4, 96, False)])
def test_kernel_matches_twin_fp32(m, n, k, bits, group, desc_act):
    w, s, z, perm = _packed(n, k, bits, group, desc_act, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    bias = torch.randn(n).to(DEVICE) if m % 2 else None
    torch.testing.assert_close(int_linear(x, w, s, z, bits, group, perm, bias),
                               int_linear_ref(x, w, s, z, bits, group, perm, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [(16, 16, 16, 1, 4, 1), (32, 32, 32, 2, 4, 1), (64, 64, 16, 8, 4, 1)])
def test_kernel_launch_shapes(config):
    w, s, z, perm = _packed(72, 64, 4, 32, True, seed=3)
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)  # leading dims kept
    got = int_linear(x, w, s, z, 4, 32, perm, config=config)
    assert got.shape == (3, 7, 72)
    torch.testing.assert_close(got, int_linear_ref(x, w, s, z, 4, 32, perm), rtol=1e-5, atol=1e-5)


def test_kernel_bf16():
    """bf16 activations: the tile dequantized and rounded to bf16 as the twin rounds (the
    interpreter truncates instead of rounding, hence the tolerance on CPU)."""
    w, s, z, perm = _packed(96, 128, 4, 32, False, seed=5)
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    got, want = int_linear(x, w, s, z, 4, 32).float(), int_linear_ref(x, w, s, z, 4, 32).float()
    assert (got - want).abs().max().item() <= (0.01 if DEVICE == "cuda" else 0.03) * want.abs().max().item()


@pytest.mark.parametrize("bits, group, t", [(4, 32, 1), (4, 16, 37), (8, -1, 9)])
def test_fused_moe_int_matches_dequantized_experts(bits, group, t):
    """The fused MoE kernel on packed experts against the same kernel on the experts
    dequantized (itself held to the PyTorch expert path in test_fused_moe.py)."""
    from pagedserve.ops.fused_moe import fused_moe

    e, h, i, k = 4, 64, 96, 2
    gen = torch.Generator().manual_seed(bits + t)

    def experts(n: int, kk: int):
        g = group if group > 0 else kk
        parts = [_packed(n, kk, bits, g, False, seed=bits * 100 + j + n) for j in range(e)]
        packed, s, z = (torch.stack([p[j] for p in parts]) for j in range(3))
        dense = torch.stack([int_linear_ref(torch.eye(kk, device=DEVICE), *p[:3], bits, g).t() for p in parts])
        return packed, s, z, dense.contiguous()

    w13, s13, z13, d13 = experts(2 * i, h)
    w2, s2, z2, d2 = experts(h, i)
    x = torch.randn(t, h, generator=gen).to(DEVICE)
    weights, ids = torch.rand(t, k, generator=gen).to(DEVICE), torch.randint(0, e, (t, k), generator=gen).to(DEVICE)
    g13, g2 = (group, group) if group > 0 else (h, i)
    got = fused_moe(x, w13, w2, weights, ids, scales=(s13, s2, g13, g2), zeros=(z13, z2), int_bits=bits)
    torch.testing.assert_close(got, fused_moe(x, d13, d2, weights, ids), rtol=1e-5, atol=1e-5)


CASES = [
    *[("llama", dict(method="gptq"), b) for b in ("cpu", "triton")],
    *[("llama", dict(method="awq", sym=False), b) for b in ("cpu", "triton")],
    *[("llama", dict(method="gptq", sym=False, desc_act=True), b) for b in ("cpu", "triton")],
    ("llama", dict(method="gptq", bits=8, group_size=-1, checkpoint_format="gptq_v2"), "triton"),
    ("qwen2", dict(method="gptq", desc_act=True), "triton"),  # q/k/v biases beside packed weights
    ("qwen2_moe", dict(method="gptq", sym=False), "triton"),  # experts packed on the fused MoE kernel
    ("mixtral", dict(method="awq", sym=False), "triton"),
    ("qwen3_moe", dict(method="gptq", bits=8, group_size=-1), "triton"),
    ("qwen2_moe", dict(method="gptq", desc_act=True), "triton"),  # experts with act order: dequantized
    ("phi3", dict(method="awq", sym=False), "triton"),  # a checkpoint with qkv / gate_up already fused
    ("cohere", dict(method="gptq", desc_act=True), "triton"),  # q/k rows permuted at load: scales, zeros too
    # compressed-tensors: transformers decompresses the checkpoint itself (the reference)
    *[("llama", dict(method="compressed-tensors"), b) for b in ("cpu", "triton")],
    ("llama", dict(method="compressed-tensors", sym=False, bits=8, group_size=-1), "triton"),
    ("qwen3", dict(method="compressed-tensors", sym=False), "triton"),
    # (older compressed-tensors' actorder "group", with a weight_g_idx: transformers' current
    # compressed-tensors refuses it, so the reference is the dequantized copy)
    ("llama", dict(method="compressed-tensors", desc_act=True), "triton"),
    # W8A8 int8 (int-quantized): transformers runs them decompressed, activations unquantized
    *[("llama", dict(method="w8a8", group_size=-1), b) for b in ("cpu", "triton")],
    ("qwen3", dict(method="w8a8", group_size=32), "triton"),
    # (transformers cannot decompress compressed-tensors experts: the dequantized copy is the reference)
    ("qwen2_moe", dict(method="w8a8", group_size=-1, reference="dequantized"), "triton"),
]


def _reference(path: str, ref_dir: str, quant: dict):
    import transformers

    if quant["method"] in ("compressed-tensors", "w8a8") and not quant.get("desc_act") and not quant.get("reference"):
        cfg = transformers.CompressedTensorsConfig(run_compressed=False)
        return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg,
                                                                 dtype=torch.float32).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("name, quant, backend", CASES)
def test_checkpoints_match_transformers(model_dirs, tmp_path, name, quant, backend):
    ref_dir = str(tmp_path / "reference")
    path = quantize_checkpoint(model_dirs[name], str(tmp_path / "quantized"), reference_dir=ref_dir,
                               **{k: v for k, v in quant.items() if k != "reference"})
    hf = _reference(path, ref_dir, quant)
    llm = LLM(path, attention_backend=backend, dtype="float32")
    model = llm.llm_engine.runner.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    if backend == "triton":
        assert isinstance(qkv, IntQuantLinear) and qkv.weight.dtype == torch.int32
        assert (qkv.weight_perm is not None) == quant.get("desc_act", False)
        experts = [m for m in model.modules() if type(m).__name__ == "FusedMoE"]
        want = 0 if quant.get("desc_act") else 8 if quant["method"] == "w8a8" else quant.get("bits", 4)
        assert all(m.int_bits == want and (m.w13.dtype == torch.int32) == bool(want) for m in experts)
    else:
        assert type(qkv) is torch.nn.Linear and qkv.weight.dtype == torch.float32
    assert_greedy_matches_hf(llm, hf)


def test_int4_weights_take_a_third_of_bf16(model_dirs, tmp_path):
    path = quantize_checkpoint(model_dirs["llama"], str(tmp_path / "gptq"), group_size=32)

    def linear_bytes(llm) -> int:
        return sum(p.numel() * p.element_size() for n, p in llm.llm_engine.runner.model.named_parameters()
                   if ".layers." in n and "norm" not in n)

    int4 = linear_bytes(LLM(path, attention_backend="triton", dtype="bfloat16"))
    bf16 = linear_bytes(LLM(model_dirs["llama"], attention_backend="triton", dtype="bfloat16"))
    # half a byte a weight, plus a float32 scale and an int16 zero per row and 32 columns
    assert int4 < 0.35 * bf16


def test_lora_on_int4_layers(model_dirs, tmp_path):
    """An adapter on a GPTQ checkpoint: added to the packed layers' outputs on the Triton path,
    equal to the dequantized layers' result on the CPU path."""
    from pagedserve.lora.random_adapter import make_adapter
    adapter, _ = make_adapter(model_dirs["llama"], str(tmp_path / "lora"), seed=3)
    path = quantize_checkpoint(model_dirs["llama"], str(tmp_path / "gptq"), desc_act=True)
    runs = lora_runs(path, adapter)
    for (t1, l1), (t2, l2) in zip(runs["cpu", True], runs["triton", True]):
        assert t1 == t2 and max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4
    assert runs["triton", True] != runs["triton", False]  # the adapter is applied


def _edit(path: str, fn) -> None:
    tensors = load_file(f"{path}/model.safetensors")
    fn(tensors)
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})


def _edit_config(path: str, **quant) -> None:
    cfg = json.loads(open(f"{path}/config.json").read())
    cfg["quantization_config"].update(quant)
    open(f"{path}/config.json", "w").write(json.dumps(cfg))


def test_bad_checkpoints_are_clear_errors(model_dirs, tmp_path):
    base = quantize_checkpoint(model_dirs["llama"], str(tmp_path / "base"), desc_act=True)

    def copy(name: str) -> str:
        return shutil.copytree(base, tmp_path / name)

    lost = copy("lost")
    _edit(lost, lambda t: t.pop("model.layers.1.mlp.down_proj.qzeros"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj has no qzeros"):
        LLM(str(lost))
    order = copy("order")  # k_proj's act order differs from q_proj's: they cannot share one fused input order
    _edit(order, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.g_idx",
                                         t["model.layers.0.self_attn.k_proj.g_idx"].flip(0).contiguous()))
    with pytest.raises(ValueError, match="act orders"):
        LLM(str(order), attention_backend="triton", dtype="float32")
    LLM(str(order), attention_backend="cpu", dtype="float32")  # dequantized, each with its own g_idx: fine
    for i, (quant, match) in enumerate([
            (dict(bits=3), "bits 3"), (dict(quant_method="awq", version="gemv"), "'gemv'"),
            (dict(checkpoint_format="marlin"), "checkpoint_format 'marlin'"), (dict(group_size=0), "group_size 0"),
            (dict(group_size=16), "do not fit")]):
        bad = copy(f"cfg{i}")
        _edit_config(str(bad), **quant)
        with pytest.raises(ValueError, match=match):
            LLM(str(bad))
    trivial = copy("trivial")  # desc_act false with a g_idx that is not k // group_size
    _edit_config(str(trivial), desc_act=False)
    with pytest.raises(ValueError, match="g_idx is not k // group_size"):
        LLM(str(trivial))


def test_bad_w8a8_checkpoints_are_clear_errors(model_dirs, tmp_path):
    base = quantize_checkpoint(model_dirs["llama"], str(tmp_path / "base"), method="w8a8", group_size=-1)
    def group(path) -> dict:
        return json.loads(open(f"{path}/config.json").read())["quantization_config"]["config_groups"]
    for i, (edit, match) in enumerate([
            (lambda g: g["weights"].update(symmetric=False), "int8, symmetric"),
            (lambda g: g["weights"].update(num_bits=4), "int8, symmetric"),
            (lambda g: g["weights"].update(strategy="tensor"), "by 'channel' or 'group'"),
            (lambda g: g["input_activations"].update(type="float"), "only weight-only 'pack-quantized'")]):
        bad = shutil.copytree(base, tmp_path / f"bad{i}")
        groups = group(bad)
        edit(groups["group_0"])
        _edit_config(str(bad), config_groups=groups)
        with pytest.raises(ValueError, match=match):
            LLM(str(bad))
    wrong = shutil.copytree(base, tmp_path / "wrong")  # a quantized layer's weight stored as float
    _edit(wrong, lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight",
                                         t["model.layers.0.mlp.down_proj.weight"].float()))
    with pytest.raises(ValueError, match="down_proj has no weight"):
        LLM(str(wrong))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 200, 1000])
def test_kernel_bf16_on_gpu(m):
    """The issue model's shapes in bf16 on tensor cores: within two units of bf16's last place."""
    for n, k, bits, desc_act in ((2560, 2048, 4, False), (11264, 2048, 4, True), (2048, 5632, 8, False)):
        w, s, z, perm = _packed(n, k, bits, 128, desc_act, seed=m + n)
        x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
        got = int_linear(x, w, s, z, bits, 128, perm).float()
        want = int_linear_ref(x, w, s, z, bits, 128, perm).float()
        assert (got - want).abs().max().item() <= 2 ** -6 * want.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 700])
def test_fused_moe_int4_bf16_on_gpu(t):
    """Packed 4-bit experts of a Qwen3-30B-A3B-shaped layer in bf16: within two units of bf16's
    last place of the kernel on the dequantized experts."""
    from pagedserve.ops.fused_moe import fused_moe

    e, h, i, k, group = 16, 2048, 768, 8, 128

    def experts(n: int, kk: int):
        parts = [_packed(n, kk, 4, group, False, seed=j + n) for j in range(e)]
        packed, s, z = (torch.stack([p[j] for p in parts]) for j in range(3))
        eye = torch.eye(kk, device=DEVICE)
        dense = torch.stack([int_linear_ref(eye, *p[:3], 4, group).t() for p in parts]).to(torch.bfloat16)
        return packed, s, z, dense.contiguous()

    w13, s13, z13, d13 = experts(2 * i, h)
    w2, s2, z2, d2 = experts(h, i)
    x = torch.randn(t, h, device=DEVICE).to(torch.bfloat16)
    weights, ids = torch.rand(t, k, device=DEVICE), torch.randint(0, e, (t, k), device=DEVICE)
    got = fused_moe(x, w13, w2, weights, ids, scales=(s13, s2, group, group), zeros=(z13, z2), int_bits=4).float()
    want = fused_moe(x, d13, d2, weights, ids).float()
    assert (got - want).abs().max().item() <= 2 ** -6 * want.abs().max().item()

