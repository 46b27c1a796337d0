"""Scoring and reranking: a cross-encoder's pair scores equal transformers' sigmoid on the
tokenizer's pair encoding; an embedding model's are cosine similarities; /score and /rerank
give the offline engine's scores."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from server_helpers import serving
from test_classify import _build

from pagedserve import LLM
from pagedserve.errors import ParamError

QUERY = "What is a list?"
DOCS = ["A list is a mutable sequence.", "Tuples are immutable.", "The for statement iterates."]


@pytest.fixture(scope="module")
def cross_dir(tokenizer_dir, tmp_path_factory):
    return _build(tokenizer_dir, str(tmp_path_factory.mktemp("cross")), "Qwen3ForSequenceClassification", 1)


def test_cross_encoder_scores_match_transformers(cross_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    llm = LLM(cross_dir)
    got = llm.score(QUERY, DOCS, use_tqdm=False)
    hf = AutoModelForSequenceClassification.from_pretrained(cross_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(cross_dir)
    for d, o in zip(DOCS, got):
        ids = tok(text=QUERY, text_pair=d)["input_ids"]
        assert o.prompt_token_ids == ids
        with torch.inference_mode():
            want = float(torch.sigmoid(hf(torch.tensor([ids])).logits[0, 0]))
        assert abs(o.outputs.score - want) < 1e-5
    pairwise = llm.score(DOCS, DOCS[::-1], use_tqdm=False)
    assert len(pairwise) == 3 and abs(pairwise[1].outputs.score - llm.score(DOCS[1], DOCS[1], use_tqdm=False)[0]
                                      .outputs.score) < 1e-6
    with pytest.raises(ParamError, match="text_1 has 2 entries for 3"):
        llm.score(DOCS[:2], DOCS, use_tqdm=False)


def test_embedding_model_scores_are_cosine_similarities(base_dir):
    llm = LLM(base_dir)
    got = [o.outputs.score for o in llm.score(QUERY, DOCS, use_tqdm=False)]
    vecs = [np.asarray(o.outputs.embedding) for o in llm.embed([QUERY] + DOCS, use_tqdm=False)]
    want = [float(vecs[0] @ v / np.linalg.norm(vecs[0]) / np.linalg.norm(v)) for v in vecs[1:]]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_score_and_rerank_endpoints(cross_dir, llama_dir, tokenizer_dir, tmp_path):
    offline = [o.outputs.score for o in LLM(cross_dir, max_model_len=512).score(QUERY, DOCS, use_tqdm=False)]
    with serving(cross_dir, "tiny-cross") as srv:
        for path in ("/score", "/v1/score"):
            r = httpx.post(f"{srv.url}{path}", json={"text_1": QUERY, "text_2": DOCS})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose([d["score"] for d in r.json()["data"]], offline, rtol=1e-5)
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            r = httpx.post(f"{srv.url}{path}", json={"query": QUERY, "documents": DOCS, "top_n": 2})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            best = sorted(range(3), key=lambda i: -offline[i])[:2]
            assert [x["index"] for x in results] == best
            assert [x["document"]["text"] for x in results] == [DOCS[i] for i in best]
            np.testing.assert_allclose([x["relevance_score"] for x in results], [offline[i] for i in best], rtol=1e-5)
        for body, param in (({"query": QUERY, "documents": []}, "documents"),
                            ({"query": QUERY, "documents": DOCS, "top_n": 0}, "top_n")):
            r = httpx.post(f"{srv.url}/rerank", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # A classifier with 3 labels is no cross-encoder; a generative model scores nothing.
    three = _build(tokenizer_dir, str(tmp_path / "three"), "LlamaForSequenceClassification", 3)
    for path in (three, llama_dir):
        with serving(path, "m") as srv:
            r = httpx.post(f"{srv.url}/score", json={"text_1": "a", "text_2": "b"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text


def test_causal_lm_reranker_from_tokens(model_dirs, hf_refs):
    """vLLM's hf_overrides recipe for Qwen3-Reranker: a causal LM run as a one-label classifier
    on two tokens' logits; the score is the 2-way softmax's second token, as the model card
    computes it from transformers' logits."""
    path = model_dirs["qwen3"]  # tied embeddings: the LM head is the embedding table
    tok = LLM(path).get_tokenizer()
    no, yes = tok.convert_ids_to_tokens([300, 301])
    llm = LLM(path, runner="pooling", hf_overrides={"architectures": ["Qwen3ForSequenceClassification"],
                                                    "classifier_from_token": [no, yes]})
    assert llm.llm_engine.config.pooling_task == "classify"
    outs = llm.score(QUERY, DOCS, use_tqdm=False)
    for d, o in zip(DOCS, outs):
        ids = tok(text=QUERY, text_pair=d)["input_ids"]
        with torch.inference_mode():
            logits = hf_refs["qwen3"].model(torch.tensor([ids])).logits[0, -1].double()
        want = float(torch.softmax(logits[[300, 301]], -1)[1])
        assert abs(o.outputs.score - want) < 1e-5
    with pytest.raises(ValueError, match="not a token"):
        LLM(path, runner="pooling", hf_overrides={"architectures": ["Qwen3ForSequenceClassification"],
                                                  "classifier_from_token": ["no such token", yes]})
