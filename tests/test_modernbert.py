"""ModernBERT (model/modernbert.py): embeddings and sequence classifiers against transformers on
the same weights: RoPE at each layer type's theta, local layers seeing 4 positions either side,
several prompts padded into one attention call, the classifier over the first token or the mean."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from pagedserve import LLM


@pytest.fixture(scope="module")
def modernbert(tmp_path_factory) -> dict[str, str]:
    from pagedserve.model.random_model import build_random_model

    tok_dir = str(tmp_path_factory.mktemp("tok"))  # (a WordPiece vocabulary written locally)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(220)]
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tok_dir)
    out = {}
    for name, arch, extra in (("embed", "ModernBertModel", {}),
                              ("cls", "ModernBertForSequenceClassification", {}),
                              ("mean", "ModernBertForSequenceClassification", {"classifier_pooling": "mean"})):
        out[name] = build_random_model(str(tmp_path_factory.mktemp(name)), arch, hidden_size=64,
                                       intermediate_size=96, num_layers=4, num_heads=4,
                                       tokenizer_dir=tok_dir, initializer_range=0.2,
                                       max_position_embeddings=128, random_norms=True, norm_bias=True,
                                       random_biases=True, attention_bias=True, mlp_bias=True,
                                       classifier_bias=True, global_rope_theta=1000.0, local_rope_theta=50.0,
                                       **extra)
    return out


def _prompts(lengths=(3, 17, 40, 1, 29), seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 200) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("pooling", ["CLS", "MEAN"])
def test_embeddings_match_transformers(modernbert, pooling):
    path = modernbert["embed"]
    hf = transformers.AutoModel.from_pretrained(path).eval()
    llm = LLM(path, pooler_config={"pooling_type": pooling} if pooling != "CLS" else None)
    assert llm.llm_engine.config.pooler.pooling_type == pooling
    prompts = _prompts()
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    for p, o in zip(prompts, outs):
        with torch.inference_mode():
            h = hf(torch.tensor([p])).last_hidden_state[0]
        ref = torch.nn.functional.normalize(h[0] if pooling == "CLS" else h.mean(0), dim=-1)
        torch.testing.assert_close(torch.tensor(o.outputs.embedding), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["cls", "mean"])
def test_classifier_matches_transformers(modernbert, name):
    """classifier_pooling decides the default pooling: the first token, or the prompt's mean."""
    path = modernbert[name]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    llm = LLM(path)
    assert llm.llm_engine.config.pooler.pooling_type == name.upper()
    prompts = _prompts(seed=1)
    for p, o in zip(prompts, llm.classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)):
        with torch.inference_mode():
            ref = hf(torch.tensor([p])).logits[0].softmax(-1)
        torch.testing.assert_close(torch.tensor(o.outputs.probs), ref, rtol=1e-4, atol=1e-6)
