"""EmbeddingGemma's form (Gemma3TextModel with use_bidirectional_attention, plus its
sentence-transformers Pooling, Dense and Normalize modules) against transformers' model and the
modules' own arithmetic: every token sees its whole prompt (in a sliding layer, those less than a
window away either side), each prompt in one step with no KV cache, mean pooling, the two Dense
projections, Matryoshka truncation, normalization."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import transformers
from safetensors.torch import save_file

from pagedserve import LLM


@pytest.fixture(scope="module")
def embedding_gemma(tmp_path_factory) -> tuple[str, list[torch.Tensor]]:
    from pagedserve.model.random_model import build_tokenizer

    path = str(tmp_path_factory.mktemp("embeddinggemma"))
    tok = build_tokenizer(path, 512)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], use_bidirectional_attention=True,
        max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.Gemma3TextModel(cfg)
    with torch.no_grad():  # (norms drawn around their identity, so a misplaced one shows)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Dense", "Dense"), ("3_Dense", "Dense"),
               ("4_Normalize", "Normalize")]
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump([{"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{t}"}
                   for i, (p, t) in enumerate(modules)], f)
    os.makedirs(os.path.join(path, "1_Pooling"))
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True}, f)
    weights = []
    for d, (n_in, n_out) in (("2_Dense", (64, 128)), ("3_Dense", (128, 64))):
        os.makedirs(os.path.join(path, d))
        w = torch.randn(n_out, n_in) / n_in**0.5
        weights.append(w)
        save_file({"linear.weight": w}, os.path.join(path, d, "model.safetensors"))
        with open(os.path.join(path, d, "config.json"), "w") as f:
            json.dump({"in_features": n_in, "out_features": n_out, "bias": False,
                       "activation_function": "torch.nn.modules.linear.Identity"}, f)
    return path, weights


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(4, 500) for _ in range(n)] for n in (3, 17, 40, 1, 29)]


@torch.inference_mode()
def _reference(path: str, weights: list[torch.Tensor], ids: list[int], dims=None) -> torch.Tensor:
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    vec = model(torch.tensor([ids])).last_hidden_state[0].mean(0)
    for w in weights:
        vec = w @ vec
    return torch.nn.functional.normalize(vec[:dims] if dims else vec, dim=-1)


def test_embeddings_match_transformers_and_the_modules(embedding_gemma):
    path, weights = embedding_gemma
    llm = LLM(path, max_num_batched_tokens=64, max_model_len=64)  # (several steps, several prompts each)
    cfg = llm.llm_engine.config
    assert cfg.pooler.pooling_type == "MEAN" and len(cfg.pooler.dense) == 2
    assert not cfg.enable_chunked_prefill and not cfg.enable_prefix_caching
    assert llm.llm_engine.runner.attn_layers == []  # (no KV cache)
    prompts = _prompts()
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    for p, o in zip(prompts, outs):
        torch.testing.assert_close(torch.tensor(o.outputs.embedding), _reference(path, weights, p),
                                   rtol=1e-4, atol=1e-5)
    # Matryoshka: truncated after the projections, then normalized.
    from pagedserve import PoolingParams

    out = llm.embed([{"prompt_token_ids": prompts[2]}], PoolingParams(dimensions=32), use_tqdm=False)[0]
    torch.testing.assert_close(torch.tensor(out.outputs.embedding), _reference(path, weights, prompts[2], 32),
                               rtol=1e-4, atol=1e-5)


def test_bidirectional_model_does_not_generate(embedding_gemma):
    with pytest.raises(ValueError, match="does not generate"):
        LLM(embedding_gemma[0], runner="generate")
