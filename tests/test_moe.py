"""Mixture-of-experts layers beyond what the transformers comparison in test_correctness.py
covers: routing against a per-token reference, checkpoint errors, no CUDA graphs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve import LLM
from pagedserve.model.layers.moe import FusedMoE, select_experts


def _reference_moe(moe: FusedMoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    i = moe.intermediate
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            h = moe.w13[e].double() @ x[t].double()
            act = torch.nn.functional.silu(h[:i]) * h[i:]
            out[t] += w * (moe.w2[e].double() @ act)
    return out


@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_moe_matches_per_token_reference(renormalize):
    torch.manual_seed(0)
    moe = FusedMoE(num_experts=6, hidden_size=32, intermediate_size=24, act="silu")
    with torch.no_grad():
        moe.w13.normal_(0, 0.2)
        moe.w2.normal_(0, 0.2)
    x = torch.randn(37, 32)
    logits = torch.randn(37, 6)
    logits[:, 5] = -1e4  # an expert no token picks
    weights, ids = select_experts(logits, 3, renormalize)
    assert torch.equal(ids, torch.topk(logits, 3).indices)
    probs = torch.softmax(logits.double(), -1).gather(1, ids)
    expected_w = probs / probs.sum(-1, keepdim=True) if renormalize else probs
    torch.testing.assert_close(weights.double(), expected_w, rtol=1e-6, atol=1e-7)
    got = moe(x, weights, ids)
    torch.testing.assert_close(got.double(), _reference_moe(moe, x, weights, ids), rtol=1e-4, atol=1e-5)


def _edit_checkpoint(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    (path,) = dst.glob("*.safetensors")
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return str(dst)


def test_checkpoint_errors_name_the_expert(model_dirs, tmp_path):
    src = model_dirs["mixtral"]
    missing = _edit_checkpoint(src, tmp_path / "missing", lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.1\.mlp\.experts expert 2:w13:up"):
        LLM(missing)

    def extra(t):
        t["model.layers.0.block_sparse_moe.experts.9.w1.weight"] = t["model.layers.0.block_sparse_moe.experts.0.w1.weight"].clone()

    with pytest.raises(ValueError, match="expert 9 does not exist"):
        LLM(_edit_checkpoint(src, tmp_path / "extra", extra))

    def wrong_shape(t):
        t["model.layers.0.block_sparse_moe.experts.1.w2.weight"] = t["model.layers.0.block_sparse_moe.experts.1.w2.weight"][:, :-1].clone()

    with pytest.raises(ValueError, match="experts.1.w2.weight: checkpoint shape"):
        LLM(_edit_checkpoint(src, tmp_path / "shape", wrong_shape))
    # An expert tensor in a dense model is no silent no-op either.
    dense = tmp_path / "dense"
    shutil.copytree(model_dirs["qwen3_moe"], dense)
    cfg = json.loads((dense / "config.json").read_text())
    cfg["mlp_only_layers"] = [0, 1]
    (dense / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has no place"):
        LLM(str(dense))


def test_moe_models_are_graph_safe_only_on_the_kernel_path(model_dirs):
    """The PyTorch expert path reads group sizes on the host, so it keeps CUDA graphs off;
    the fused Triton kernel (the Triton backend) has no host sync."""
    for name in ("mixtral", "qwen2_moe", "qwen3_moe"):
        assert LLM(model_dirs[name]).llm_engine.runner.model.cuda_graph_safe is False
    assert LLM(model_dirs["llama"]).llm_engine.runner.model.cuda_graph_safe is True
    pytest.importorskip("triton")
    llm = LLM(model_dirs["qwen3_moe"], attention_backend="triton", dtype="float32")
    assert llm.llm_engine.runner.model.cuda_graph_safe is True
