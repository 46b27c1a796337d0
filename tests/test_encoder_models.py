"""Encoder-only models (model/bert.py): BERT and XLM-RoBERTa embeddings, sequence classifiers
and cross-encoder scoring, against transformers on the same weights; the engine computes each
prompt in one step (bidirectional attention) and refuses what it cannot run."""

from __future__ import annotations

import os
import random

import pytest
import torch
import transformers

from pagedserve import LLM, PoolingParams
from pagedserve.errors import ParamError

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "red", "blue", "fish", "runs", "fast", "slow", "why",
         "what", "is", "rain", "sun", "hot", "cold", "##s", "##ing", "##ed"]


@pytest.fixture(scope="module")
def bert_tokenizer_dir(tmp_path_factory) -> str:
    """A WordPiece tokenizer written locally (BERT's pair encoding gives token types)."""
    path = tmp_path_factory.mktemp("bert_tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"w{i}" for i in range(200)]
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory, bert_tokenizer_dir) -> dict[str, str]:
    from pagedserve.model.random_model import build_random_model

    out = {}
    for arch in ("BertModel", "XLMRobertaModel", "BertForSequenceClassification",
                 "XLMRobertaForSequenceClassification"):
        out[arch] = build_random_model(str(tmp_path_factory.mktemp(arch)), arch, hidden_size=64, intermediate_size=128,
                                       num_layers=2, num_heads=4, tokenizer_dir=bert_tokenizer_dir,
                                       initializer_range=0.2, max_position_embeddings=128, type_vocab_size=2)
    return out


def _prompts(lengths=(3, 17, 40, 1, 90), seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 200) for _ in range(n)] for n in lengths]


@torch.inference_mode()
def _hf_hidden(path: str, ids: list[int], types=None) -> torch.Tensor:
    model = transformers.AutoModel.from_pretrained(path).eval()
    kwargs = {"token_type_ids": torch.tensor([types])} if types is not None else {}
    return model(torch.tensor([ids]), **kwargs).last_hidden_state[0]


@torch.inference_mode()
def _hf_logits(path: str, ids: list[int], types=None) -> torch.Tensor:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    kwargs = {"token_type_ids": torch.tensor([types])} if types is not None else {}
    return model(torch.tensor([ids]), **kwargs).logits[0]


@pytest.mark.parametrize("arch", ["BertModel", "XLMRobertaModel"])
@pytest.mark.parametrize("pooling", ["CLS", "MEAN"])
def test_embeddings_match_transformers(encoders, arch, pooling):
    """CLS (the default without sentence-transformers files) and MEAN pooling of transformers'
    last_hidden_state, normalized; a small token budget splits the batch over several steps,
    but never a prompt (its tokens all see each other)."""
    path = encoders[arch]
    llm = LLM(path, pooler_config={"pooling_type": pooling} if pooling != "CLS" else None,
              max_num_batched_tokens=124, max_model_len=120)
    cfg = llm.llm_engine.config
    assert cfg.pooler.pooling_type == pooling and not cfg.enable_chunked_prefill and not cfg.enable_prefix_caching
    steps = []
    step = llm.llm_engine.scheduler.schedule
    llm.llm_engine.scheduler.schedule = lambda *a, **k: steps.append(step(*a, **k)) or steps[-1]
    prompts = _prompts()
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    for p, o in zip(prompts, outs):
        h = _hf_hidden(path, p)
        ref = torch.nn.functional.normalize(h[0] if pooling == "CLS" else h.mean(0), dim=-1)
        torch.testing.assert_close(torch.tensor(o.outputs.embedding), ref, rtol=1e-4, atol=1e-5)
    chunks = [(s.request.num_prompt_tokens, s.start, s.end) for out in steps for s in getattr(out, "scheduled", [])]
    assert chunks and all(start == 0 and end == n for n, start, end in chunks)
    assert len({id(out) for out in steps if getattr(out, "scheduled", None)}) > 1


def test_xlm_roberta_positions_start_past_the_padding_index(encoders):
    """XLM-R's position table begins at pad_token_id + 1: max_model_len is what is left."""
    llm = LLM(encoders["XLMRobertaModel"])
    cfg = llm.llm_engine.config
    assert cfg.max_model_len == 128 - (cfg.hf_config.pad_token_id + 1)
    assert LLM(encoders["BertModel"]).llm_engine.config.max_model_len == 128
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(encoders["XLMRobertaModel"], max_model_len=128)


def test_classifier_probabilities_match_transformers(encoders):
    path = encoders["XLMRobertaForSequenceClassification"]
    llm = LLM(path)
    prompts = _prompts(seed=1)
    for p, o in zip(prompts, llm.classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)):
        torch.testing.assert_close(torch.tensor(o.outputs.probs), _hf_logits(path, p).softmax(-1), rtol=1e-4,
                                   atol=1e-6)


def test_bert_cross_encoder_scores_pairs_with_token_types(encoders, bert_tokenizer_dir):
    """LLM.score on a BERT cross-encoder: the tokenizer's pair encoding, second text as token
    type 1, equals transformers' sigmoid of the same encoding; without the types it would not."""
    path = encoders["BertForSequenceClassification"]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    llm = LLM(path)
    query, docs = "why is the sun hot", ["the sun is hot", "a cat sat on the mat", "rain is cold"]
    got = [o.outputs.score for o in llm.score(query, docs, use_tqdm=False)]
    for doc, score in zip(docs, got):
        enc = tok(query, doc)
        assert any(enc["token_type_ids"])
        want = torch.sigmoid(_hf_logits(path, enc["input_ids"], enc["token_type_ids"]))[0].item()
        assert abs(score - want) < 1e-5
        untyped = torch.sigmoid(_hf_logits(path, enc["input_ids"], [0] * len(enc["input_ids"])))[0].item()
        assert abs(untyped - want) > 1e-4  # the types matter to this model


def test_token_types_are_checked(encoders, model_dirs):
    llm = LLM(encoders["BertModel"])
    with pytest.raises(ParamError, match="token_type_ids must be 3 integers"):
        llm.embed([{"prompt_token_ids": [5, 6, 7], "token_type_ids": [0, 1]}], use_tqdm=False)
    with pytest.raises(ParamError, match=r"in \[0, 2\)"):
        llm.embed([{"prompt_token_ids": [5, 6, 7], "token_type_ids": [0, 2, 0]}], use_tqdm=False)
    typed = llm.embed([{"prompt_token_ids": [5, 6, 7], "token_type_ids": [0, 1, 1]}], use_tqdm=False)[0]
    want = torch.nn.functional.normalize(_hf_hidden(encoders["BertModel"], [5, 6, 7], [0, 1, 1])[0], dim=-1)
    torch.testing.assert_close(torch.tensor(typed.outputs.embedding), want, rtol=1e-4, atol=1e-5)
    decoder = LLM(model_dirs["qwen3"], runner="pooling")
    with pytest.raises(ParamError, match="token_type_ids are for BERT-family models"):
        decoder.embed([{"prompt_token_ids": [5, 6], "token_type_ids": [0, 1]}], use_tqdm=False)
    assert llm.llm_engine.kv.pool.num_free_blocks == llm.llm_engine.kv.num_blocks  # nothing held


def test_encoders_refuse_what_they_cannot_do(encoders):
    with pytest.raises(ValueError, match="encoder-only model"):
        LLM(encoders["BertModel"], runner="generate")
    llm = LLM(encoders["BertModel"])
    with pytest.raises(ParamError):
        llm.generate("the cat", use_tqdm=False)
    with pytest.raises(ValueError, match="128"):
        llm.embed([{"prompt_token_ids": [5] * 129}], use_tqdm=False)
    assert os.path.isdir(encoders["BertModel"])


def test_server_embeddings_and_rerank_on_encoders(encoders):
    """/v1/embeddings on a BERT embedding model and /rerank on a BERT cross-encoder (its token
    types through the async path) give what the offline engine gives."""
    import httpx
    from server_helpers import serving

    texts = ["the cat sat on the mat", "why is the sun hot"]
    offline = [o.outputs.embedding for o in LLM(encoders["BertModel"]).embed(texts, use_tqdm=False)]
    with serving(encoders["BertModel"], "bert", engine_kwargs={"max_model_len": 128}) as srv:
        r = httpx.post(f"{srv.url}/v1/embeddings", json={"model": "bert", "input": texts})
        assert r.status_code == 200, r.text
        got = [d["embedding"] for d in r.json()["data"]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(offline), rtol=1e-5, atol=1e-6)
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "bert", "prompt": "the cat"})
        assert r.status_code == 400, r.text
    query, docs = "why is the sun hot", ["rain is cold", "the sun is hot", "a red fish"]
    scores = [o.outputs.score for o in LLM(encoders["BertForSequenceClassification"]).score(query, docs,
                                                                                        use_tqdm=False)]
    with serving(encoders["BertForSequenceClassification"], "rerank", engine_kwargs={"max_model_len": 128}) as srv:
        r = httpx.post(f"{srv.url}/rerank", json={"query": query, "documents": docs})
        assert r.status_code == 200, r.text
        by_index = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert [round(by_index[i], 5) for i in range(3)] == [round(s, 5) for s in scores]
