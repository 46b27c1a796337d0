"""/v1/embeddings through the official openai client: the offline engine's vectors, every
input form, base64, dimensions, and clear 400s; /classify on a sequence classifier."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
from server_helpers import metric, no_requests_left, openai_client, scrape, serving

from pagedserve import LLM, PoolingParams


@pytest.fixture(scope="module")
def emb_server(base_dir):
    with serving(base_dir, "tiny-embed") as srv:
        yield srv


def test_embeddings_equal_the_offline_engine(emb_server, base_dir):
    offline = LLM(base_dir, max_model_len=512)
    tok = offline.get_tokenizer()
    with openai_client(emb_server) as client:
        texts = ["The capital of France is", "A list is a mutable sequence."]
        got = client.embeddings.create(model="tiny-embed", input=texts)
        want = offline.embed(texts, use_tqdm=False)
        assert [d.index for d in got.data] == [0, 1] and got.model == "tiny-embed"
        for d, w in zip(got.data, want):
            np.testing.assert_allclose(d.embedding, w.outputs.embedding, rtol=1e-5, atol=1e-6)
        assert got.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
        # One string, token ids, lists of token ids: the same vectors.
        ids = tok.encode(texts[0])
        for inp in (texts[0], ids, [ids]):
            one = client.embeddings.create(model="tiny-embed", input=inp).data[0].embedding
            np.testing.assert_allclose(one, want[0].outputs.embedding, rtol=1e-5, atol=1e-6)
        # dimensions (then normalized) and base64 (little-endian float32, as OpenAI's).
        short = client.embeddings.create(model="tiny-embed", input=texts[0], dimensions=8).data[0].embedding
        ref = offline.embed(texts[0], PoolingParams(dimensions=8), use_tqdm=False)[0].outputs.embedding
        np.testing.assert_allclose(short, ref, rtol=1e-5, atol=1e-6)
        raw = httpx.post(f"{emb_server.url}/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()
        vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(vec, want[0].outputs.embedding, rtol=1e-5, atol=1e-6)
        # Bad input: 400s naming the field; chat on an embedding model is a 400 too.
        for kwargs, param in ((dict(input=[]), "input"), (dict(input=texts[0], dimensions=100_000), "dimensions"),
                              (dict(input=[[5] * 600]), "prompt")):
            with pytest.raises(openai.BadRequestError) as e:
                client.embeddings.create(model="tiny-embed", **kwargs)
            assert e.value.body["param"] == param, e.value.body
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.chat.completions.create(model="tiny-embed", messages=[{"role": "user", "content": "hi"}])
        # Embedding requests count on /metrics: their prompt tokens and one success each.
        before = scrape(emb_server.url)
        got = client.embeddings.create(model="tiny-embed", input=texts)
        after = scrape(emb_server.url)
        assert metric(after, "pagedserve:prompt_tokens_total") - metric(before, "pagedserve:prompt_tokens_total") \
            == got.usage.prompt_tokens
        assert metric(after, "pagedserve:request_success_total", finished_reason="stop") - metric(
            before, "pagedserve:request_success_total", finished_reason="stop") == 2
        assert metric(after, "pagedserve:e2e_request_latency_seconds_count") - metric(
            before, "pagedserve:e2e_request_latency_seconds_count") == 2
    assert no_requests_left(emb_server.llm)


def test_embeddings_on_a_generative_model_is_a_400(llama_dir):
    with serving(llama_dir, "tiny-llama") as srv, openai_client(srv) as client:
        with pytest.raises(openai.BadRequestError, match="does not support the Embeddings API"):
            client.embeddings.create(model="tiny-llama", input="hi")
        r = httpx.post(f"{srv.url}/classify", json={"input": "hi"})
        assert r.status_code == 400 and "does not support classification" in r.json()["error"]["message"]


def test_classify_endpoint(tokenizer_dir, tmp_path):
    from test_classify import _build

    path = _build(tokenizer_dir, str(tmp_path / "cls"), "LlamaForSequenceClassification", 3)
    offline = LLM(path, max_model_len=512)
    texts = ["great movie", "terrible plot, fine acting"]
    want = offline.classify(texts, use_tqdm=False)
    with serving(path, "tiny-cls") as srv:
        for route in ("/v1/classify", "/classify"):
            r = httpx.post(f"{srv.url}{route}", json={"model": "tiny-cls", "input": texts})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
            for d, w in zip(body["data"], want):
                np.testing.assert_allclose(d["probs"], w.outputs.probs, rtol=1e-5, atol=1e-7)
                assert d["num_classes"] == 3 and d["label"] == f"LABEL_{int(np.argmax(w.outputs.probs))}"
        r = httpx.post(f"{srv.url}/v1/embeddings", json={"input": "x"})
        assert r.status_code == 400 and "does not support the Embeddings API" in r.json()["error"]["message"]
    with serving(path, "tiny-cls", api_key="k") as srv:
        assert httpx.post(f"{srv.url}/classify", json={"input": "x"}).status_code == 401


def test_embedding_a_conversation(emb_server):
    """vLLM's chat form of /v1/embeddings: `messages` rendered with the chat template (no
    generation prompt unless asked for), embedded as its token ids would be."""
    url = f"{emb_server.url}"
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    for gen in (False, True):
        ids = httpx.post(f"{url}/tokenize", json={"model": "tiny-embed", "messages": msgs,
                                                  "add_generation_prompt": gen}).json()["tokens"]
        body = {"model": "tiny-embed", "messages": msgs, **({"add_generation_prompt": True} if gen else {})}
        chat = httpx.post(f"{url}/v1/embeddings", json=body).json()
        plain = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny-embed", "input": ids}).json()
        np.testing.assert_allclose(chat["data"][0]["embedding"], plain["data"][0]["embedding"], rtol=1e-5, atol=1e-6)
        assert chat["usage"]["prompt_tokens"] == len(ids)
    for body in ({"model": "tiny-embed"}, {"model": "tiny-embed", "input": "x", "messages": msgs}):
        r = httpx.post(f"{url}/v1/embeddings", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text
    assert no_requests_left(emb_server.llm)
