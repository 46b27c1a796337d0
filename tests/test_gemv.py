"""The small-batch GEMV kernel against torch.nn.functional.linear in float64 (Triton's
interpreter on CPU; `-m gpu` at the benchmark model's layer shapes), its configuration
string, and the engine with every layer routed through it against transformers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.ops import gemv as gemv_mod  # noqa: E402
from pagedserve.ops import triton_interpreting  # noqa: E402
from pagedserve.ops.gemv import gemv, parse_shapes  # noqa: E402
from pagedserve.ops.reference import rms_norm_ref, silu_and_mul_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def check(m: int, n: int, k: int, dtype: torch.dtype, config, bias: bool, seed: int = 0) -> None:
    g = torch.Generator(device=DEV).manual_seed(seed)
    wide = torch.randn(m, k + 8, generator=g, device=DEV).to(dtype)
    x = wide[:, 3:3 + k]  # rows with a stride wider than the row
    w = torch.randn(n, k, generator=g, device=DEV).to(dtype)
    b = torch.randn(n, generator=g, device=DEV).to(dtype) if bias else None
    got = gemv(x, w, b, config)
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (m, n) and got.dtype == dtype
    err = (got.double() - want).abs().max().item() / want.abs().max().item()
    assert err < TOL[dtype], f"relative error {err:.3g}"


def check_silu_mul(m: int, n: int, k: int, dtype: torch.dtype, config, seed: int = 0) -> None:
    """gate_up [M, 2K] in: the product with SiLU(gate) * up, rounded to the dtype first as
    silu_and_mul does (its twin), then the layer in float64."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    gate_up = (torch.randn(m, 2 * k, generator=g, device=DEV) * 2).to(dtype)
    w = torch.randn(n, k, generator=g, device=DEV).to(dtype)
    got = gemv(gate_up, w, None, config, silu_mul=True)
    want = torch.nn.functional.linear(silu_and_mul_ref(gate_up).double(), w.double())
    err = (got.double() - want).abs().max().item() / want.abs().max().item()
    # Triton's interpreter rounds float32 -> bfloat16 toward zero, not to nearest: there the
    # rounded activation may sit a unit off the twin's in every element.
    tol = 2 ** -5 if triton_interpreting() and dtype != torch.float32 else 2 * TOL[dtype]
    assert got.shape == (m, n) and err < tol, f"relative error {err:.3g}"


def check_rmsnorm(m: int, n: int, k: int, dtype: torch.dtype, config, residual: bool, seed: int = 0) -> None:
    """The norm prologue: the layer of rms_norm_ref(x, w, eps, residual) (its twin, which
    rounds as the RMSNorm kernel does), and the residual stream x + residual bit-exact."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=DEV).to(dtype)
    res = torch.randn(m, k, generator=g, device=DEV).to(dtype) if residual else None
    nw = (1 + 0.1 * torch.randn(k, generator=g, device=DEV)).to(dtype)
    w = torch.randn(n, k, generator=g, device=DEV).to(dtype)
    got, got_res = gemv(x, w, None, config, norm=(res, nw, 1e-5))
    if residual:
        h, want_res = rms_norm_ref(x, nw, 1e-5, residual=res)
        if triton_interpreting() and dtype != torch.float32:  # rounds toward zero there: a unit off
            torch.testing.assert_close(got_res.float(), want_res.float(), rtol=2 ** -7, atol=0)
        else:  # one rounded add, as the twin's
            assert torch.equal(got_res, want_res)
    else:
        h = rms_norm_ref(x, nw, 1e-5)
        assert got_res is x
    want = torch.nn.functional.linear(h.double(), w.double())
    err = (got.double() - want).abs().max().item() / want.abs().max().item()
    tol = 2 ** -5 if triton_interpreting() and dtype != torch.float32 else 2 * TOL[dtype]
    assert got.shape == (m, n) and err < tol, f"relative error {err:.3g}"


# Every variant, shape and dtype, except the CUDA-core variants' many-tile shape in bf16: the
# interpreter runs their loops slowly, and fp32 checks those tiles, bf16 the small shapes.
_GEMV_CASES = [pytest.param(dot, m, n, k, dtype, id=f"{name}-{m}-{n}-{k}-{dn}")
               for dot, name in ((1, "dot"), (0, "fma"), (2, "fma_bcast"))
               for m, n, k in ((1, 40, 96), (3, 33, 70), (4, 128, 256), (16, 20, 48))
               for dtype, dn in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
               if not (dot != 1 and (m, n, k) == (4, 128, 256) and dtype == torch.bfloat16)]


@pytest.mark.parametrize("dot, m, n, k, dtype", _GEMV_CASES)
def test_gemv_matches_linear(m, n, k, dtype, dot):
    narrow = 16 if dot == 1 else 4  # the CUDA-core paths take any power-of-two tile
    check(m, n, k, dtype, (narrow, 32, 4, 2, dot), bias=False)
    check(m, n, k, dtype, (32, 64, 4, 3, dot), bias=True, seed=1)
    check_silu_mul(m, n, k, dtype, (narrow, 32, 4, 2, dot), seed=2)
    check_rmsnorm(m, n, k, dtype, (narrow, 32, 4, 2, dot), residual=True, seed=3)
    check_rmsnorm(m, n, k, dtype, (32, 64, 4, 3, dot), residual=False, seed=4)


def test_parse_shapes():
    assert parse_shapes(None) == {} and parse_shapes("") == {}
    assert parse_shapes("64x32:4,1024,4,2,2") == {(64, 32): (4, 1024, 4, 2, 2, 4)}
    assert parse_shapes("2560x2048:32,256,4,3;2048X5632:16,512,8,4,1;2048x2048:8,512,4,3,0,1") == {
        (2560, 2048): (32, 256, 4, 3, 1, 4), (2048, 5632): (16, 512, 8, 4, 1, 4), (2048, 2048): (8, 512, 4, 3, 0, 1)}
    for bad in ("2560x2048", "2560:32,256,4,3", "1x2:24,256,4,3", "1x2:32,8,4,3", "1x2:32,256,0,3",
                "1x2:8,256,4,3", "1x2:32,256,4,3,3", "1x2:32,256,4,3,1,0", "1x2:32,256,4,3,1,5",
                "1x2:32,256,4,3,1,1,1"):
        with pytest.raises(ValueError, match="PAGEDSERVE_GEMV"):
            parse_shapes(bad)


def test_install_sends_at_most_max_rows_to_the_kernel(monkeypatch):
    """A shape configured for batch 1 only (max_rows 1) takes the kernel for one row and
    cuBLAS for two; without max_rows, up to GEMV_MAX_M rows take it."""
    calls = []
    real = gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    g = torch.Generator(device=DEV).manual_seed(0)
    for config, expect in (((16, 32, 4, 2, 0, 1), [1]), ((16, 32, 4, 2, 0), [1, 2, 4])):
        calls.clear()
        layer = torch.nn.Linear(48, 20, bias=False).to(DEV)
        gemv_mod.install(layer, config)
        for rows in (1, 2, 4, 5):
            x = torch.randn(rows, 48, generator=g, device=DEV)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        assert calls == expect


class _Every(dict):
    """A shape table that routes every layer through the kernel, in one launch shape."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config

    def __contains__(self, key) -> bool:
        return True

    def __getitem__(self, key):
        return self.config


# The routing is the same for every kernel variant; each variant's arithmetic (plain, bias,
# norm prologue, SiLU-and-mul) is checked against its twin in test_gemv_matches_linear.
@pytest.mark.parametrize("config", [(16, 32, 4, 2)], ids=["dot"])
def test_engine_with_gemv_matches_transformers(llama_dir, hf_refs, monkeypatch, config):
    from conftest import assert_greedy_matches

    from pagedserve import LLM, SamplingParams

    monkeypatch.setattr(gemv_mod, "GEMV_SHAPES", _Every(config))
    llm = LLM(llama_dir, attention_backend="triton", dtype="float32", block_size=8, max_num_seqs=4,
              max_num_batched_tokens=64)
    model = llm.llm_engine.runner.model
    routed = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" in vars(m)]
    assert len(routed) == 4 * len(model.model.layers) + 1  # qkv, o, gate_up, down per layer; lm_head
    calls = []
    real = gemv_mod.gemv
    kinds = set()

    def counted(*a, **kw):
        calls.append(a[0].shape[0])
        kinds.add("norm" if kw.get("norm") else "silu_mul" if kw.get("silu_mul") else "plain")
        return real(*a, **kw)

    monkeypatch.setattr(gemv_mod, "gemv", counted)
    prompts = [[5 + i, 17, 42 + 3 * i, 9] for i in range(3)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert calls and max(calls) <= gemv_mod.GEMV_MAX_M  # decode steps took it; prefills stayed on cuBLAS
    assert kinds == {"norm", "silu_mul", "plain"}  # qkv/gate_up with their norms, down with SiLU, o and lm_head
    assert all("forward_silu_mul" in vars(layer.mlp.down_proj) for layer in model.model.layers)
    assert all("forward_rmsnorm" in vars(layer.self_attn.qkv_proj) for layer in model.model.layers)
    for p, o in zip(prompts, outs):
        assert_greedy_matches(hf_refs["llama"].greedy(p, 6), o.outputs[0].token_ids)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_gpu(dtype):
    for n, k in ((2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632), (32000, 2048)):
        for m in (1, 4):
            check(m, n, k, dtype, (32, 256, 4, 3), bias=False)
            check(m, n, k, dtype, (16, 512, 8, 4), bias=True, seed=2)
            check(m, n, k, dtype, (16, 512, 4, 3, 0), bias=True, seed=7)
            check(m, n, k, dtype, (8, 512, 4, 3, 2), bias=False, seed=12)
    check_silu_mul(1, 2048, 5632, dtype, (32, 256, 4, 3), seed=3)
    check_silu_mul(1, 2048, 5632, dtype, (4, 1024, 4, 2, 2), seed=13)
    check_silu_mul(4, 2048, 5632, dtype, (16, 512, 8, 4), seed=4)
    check_silu_mul(1, 2048, 5632, dtype, (8, 512, 4, 3, 0), seed=8)
    check_silu_mul(4, 2048, 5632, dtype, (16, 256, 4, 3, 0), seed=9)
    for n in (2560, 11264):
        check_rmsnorm(1, n, 2048, dtype, (32, 256, 4, 3), residual=True, seed=5)
        check_rmsnorm(4, n, 2048, dtype, (16, 512, 8, 4), residual=False, seed=6)
        check_rmsnorm(1, n, 2048, dtype, (16, 512, 4, 3, 0), residual=True, seed=10)
        check_rmsnorm(4, n, 2048, dtype, (32, 256, 8, 3, 0), residual=True, seed=11)
        check_rmsnorm(1, n, 2048, dtype, (8, 512, 4, 3, 2), residual=True, seed=14)
        check_rmsnorm(4, n, 2048, dtype, (2, 2048, 4, 1, 2), residual=True, seed=15)
