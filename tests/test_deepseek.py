"""DeepSeek-V2 / V3 beyond the transformers comparison in test_correctness.py: the latent KV
cache's size, the group-limited routers against a per-token reference, V3 without interleaved
RoPE, and checkpoints with multi-token-prediction layers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import HFReference, assert_greedy_matches
from pagedserve import LLM, SamplingParams
from pagedserve.model.layers.moe import select_grouped_experts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[(11 * i + 5 * j) % 900 + 4 for j in range(n)] for i, n in enumerate((3, 29, 70))]


def test_cache_holds_one_latent_per_token(model_dirs):
    llm = LLM(model_dirs["deepseek_v3"], block_size=8)
    runner = llm.llm_engine.runner
    cfg = llm.llm_engine.config.hf_config
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    for k, v in runner.kv_caches:
        assert k.shape[1:] == (8, 1, latent)
        assert v.data_ptr() == k.data_ptr()  # values are read from the same cache
    assert runner.kv_block_bytes() == cfg.num_hidden_layers * 8 * latent * 4
    # Per-head keys and values (what transformers' expanded form would cache) take far more.
    expanded = cfg.num_hidden_layers * 8 * cfg.num_attention_heads * (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4
    assert runner.kv_block_bytes() < expanded / 2
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    assert llm.llm_engine.kv.pool.num_free_blocks == llm.llm_engine.kv.num_blocks


def _reference_route(scores: torch.Tensor, bias, top_k: int, groups: int, topk_groups: int, renormalize: bool,
                     scale: float) -> list[tuple[set[int], dict[int, float]]]:
    """Token by token: rank the groups, keep the best, take the best experts within them."""
    out = []
    e = scores.shape[1]
    per = e // groups
    for row in scores.double():
        choice = row + (bias.double() if bias is not None else 0)
        worth = []
        for g in range(groups):
            vals = sorted(choice[g * per : (g + 1) * per].tolist(), reverse=True)
            worth.append(sum(vals[:2]) if bias is not None else vals[0])
        kept = sorted(range(groups), key=lambda g: -worth[g])[:topk_groups]
        allowed = [i for g in kept for i in range(g * per, (g + 1) * per)]
        chosen = sorted(allowed, key=lambda i: -float(choice[i]))[:top_k]
        w = {i: float(row[i]) for i in chosen}
        total = sum(w.values()) if renormalize else 1.0
        out.append((set(chosen), {i: x / total * scale for i, x in w.items()}))
    return out


@pytest.mark.parametrize("scoring,with_bias,renormalize", [("sigmoid", True, True), ("softmax", False, False),
                                                           ("softmax", False, True)])
def test_grouped_router_matches_per_token_reference(scoring, with_bias, renormalize):
    torch.manual_seed(0)
    logits = torch.randn(40, 16) * 2
    bias = torch.randn(16) if with_bias else None
    weights, ids = select_grouped_experts(logits, 3, scoring, num_groups=4, topk_groups=2, correction_bias=bias,
                                          renormalize=renormalize, scale=2.5)
    scores = torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, -1)
    ref = _reference_route(scores, bias, 3, 4, 2, renormalize, 2.5)
    for t, (chosen, w) in enumerate(ref):
        assert set(ids[t].tolist()) == chosen
        for e, x in zip(ids[t].tolist(), weights[t].tolist()):
            assert x == pytest.approx(w[e], rel=1e-5)
    # Without groups: the plain top k of the (biased) scores.
    _, plain = select_grouped_experts(logits, 3, scoring, correction_bias=bias)
    expected = torch.topk(scores + (bias if bias is not None else 0), 3).indices
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(plain, expected))
    with pytest.raises(ValueError, match="scoring function 'tanh'"):
        select_grouped_experts(logits, 3, "tanh")


def test_v3_without_interleaved_rope(tmp_path, tokenizer_dir):
    from pagedserve.model.random_model import build_random_model

    path = build_random_model(str(tmp_path / "m"), "DeepseekV3ForCausalLM", num_heads=4, num_layers=2,
                              initializer_range=0.5, tokenizer_dir=tokenizer_dir, rope_interleave=False)
    ref = HFReference(path)
    outs = LLM(path).generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    for p, o in zip(PROMPTS, outs):
        assert_greedy_matches(ref.greedy(p, 12), o.outputs[0].token_ids)


def _with_mtp_layer(src: str, dst) -> str:
    """The checkpoint plus a layer past num_hidden_layers (V3's multi-token-prediction module:
    its own norms and projections), as DeepSeek ships it; config num_nextn_predict_layers 1."""
    shutil.copytree(src, dst)
    (path,) = dst.glob("*.safetensors")
    tensors = load_file(str(path))
    cfg = json.loads((dst / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    for name in [k for k in tensors if k.startswith("model.layers.1.")]:
        tensors[name.replace("model.layers.1.", f"model.layers.{n}.")] = torch.randn_like(tensors[name])
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.randn(cfg["hidden_size"], 2 * cfg["hidden_size"])
    save_file(tensors, str(path), metadata={"format": "pt"})
    cfg["num_nextn_predict_layers"] = 1
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_multi_token_prediction_layers_are_skipped(model_dirs, tmp_path):
    src = model_dirs["deepseek_v3"]
    base = LLM(src).generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    mtp = LLM(_with_mtp_layer(src, tmp_path / "mtp")).generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY,
                                                              use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mtp] == [o.outputs[0].token_ids for o in base]


def test_missing_latent_projection_is_named(model_dirs, tmp_path):
    dst = tmp_path / "missing"
    shutil.copytree(model_dirs["deepseek_v2"], dst)
    (path,) = dst.glob("*.safetensors")
    tensors = load_file(str(path))
    del tensors["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.kv_b_proj\.weight"):
        LLM(str(dst))


def _dequantized(path: str, dst, block: int) -> str:
    """The FP8 checkpoint as float32, weight x its tile's scale_inv, loaded as a plain one.
    (transformers 5.24's FineGrainedFP8Config(dequantize=True) leaves DeepSeek-V3's q_a_proj
    and q_b_proj off their dequantized values, so it is not the reference here.)"""
    shutil.copytree(path, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(".weight_scale_inv")]:
        w = tensors[name[: -len("_scale_inv")]].float()
        scale = tensors.pop(name).float().repeat_interleave(block, 0).repeat_interleave(block, 1)
        tensors[name[: -len("_scale_inv")]] = w * scale[: w.shape[0], : w.shape[1]]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fp8_checkpoint_in_deepseek_v3s_own_format(model_dirs, tmp_path, backend):
    """DeepSeek-V3 ships e4m3 weights with a scale per 128x128 tile (transformers' fine-grained
    FP8; 32x32 here). On the Triton path the projections and experts stay FP8; kv_b_proj,
    used as two matrices, is dequantized as it loads. On CPU every layer is dequantized."""
    pytest.importorskip("triton")
    import transformers
    from engine_helpers import assert_greedy_matches_hf

    from pagedserve.model.fp8_quantize import quantize_checkpoint
    from pagedserve.model.layers.fp8 import FP8, Fp8Linear

    path = quantize_checkpoint(model_dirs["deepseek_v3"], str(tmp_path / "fp8"), "block", (32, 32))
    hf = transformers.AutoModelForCausalLM.from_pretrained(_dequantized(path, tmp_path / "plain", 32),
                                                           dtype=torch.float32).eval()
    llm = LLM(path, attention_backend=backend, dtype="float32", block_size=8)
    layers = llm.llm_engine.runner.model.model.layers
    kept = backend == "triton"
    assert isinstance(layers[0].self_attn.q_a_proj, Fp8Linear) == kept
    assert (layers[0].self_attn.q_a_proj.weight.dtype == FP8) == kept
    assert (layers[1].mlp.experts.w13.dtype == FP8) == kept
    assert layers[0].self_attn.kv_b_proj.weight.dtype == torch.float32
    assert_greedy_matches_hf(llm, hf)
