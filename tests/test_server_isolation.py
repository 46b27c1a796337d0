"""Isolation and auth: the API key guards every /v1 route (compared in constant time); the
prefix cache is partitioned per tenant by cache_salt (seen in usage.prompt_tokens_details and
the prefix-cache counters); request ids are random; prompts reach the logs only with
--enable-log-requests."""

from __future__ import annotations

import hmac
import json
import logging
import uuid

import httpx
import pytest
from server_helpers import ServerThread, make_async_llm, metric, scrape

from pagedserve.entrypoints.openai.api_server import build_app

MODEL = "tiny"
CHAT = [{"role": "user", "content": "a fairly long question about salts and caches, long enough to fill "
         "several blocks of sixteen tokens each"}]


@pytest.fixture(scope="module")
def llm(llama_dir):
    llm = make_async_llm(llama_dir)  # a fresh engine: an empty prefix cache
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def server(llm):
    srv = ServerThread(build_app(llm, MODEL))
    yield srv
    srv.stop()


def test_every_v1_route_needs_the_key(llm, monkeypatch):
    app = build_app(llm, MODEL, api_key="s3cret")
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    routes = [(m.upper(), path) for path, ops in app.openapi()["paths"].items()
              if path.startswith(("/v1", "/v2")) or path in ("/classify", "/score", "/rerank", "/invocations")
              for m in ops]
    pooling = {"/v1/embeddings", "/v1/classify", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank",
               "/v2/rerank"}
    # GET, DELETE, POST .../cancel: past the key, this id is unknown (404)
    stored = {"/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel"}
    assert {p for _, p in routes} == {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/responses",
                                      "/invocations", *stored} | pooling
    srv = ServerThread(app)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "input": "x",
            "text_1": "x", "text_2": "y", "query": "x", "documents": ["y"]}
    try:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer s3cre"}, {"Authorization": "Bearer s3cret2"},
                            {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer"}):
                r = httpx.request(method, f"{srv.url}{path}", json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"]["type"] == "AuthenticationError"
            # Refused before the body is looked at: no schema hints for strangers.
            r = httpx.request(method, f"{srv.url}{path}", content=b"{bad json", headers={
                "content-type": "application/json"})
            assert r.status_code == 401 and "json" not in r.text.lower(), r.text
            # (/v1/responses' `prompt` is a stored prompt template, refused; chat's `documents` are
            # its template's, objects rather than the reranker's strings.)
            drop = {"/v1/responses": {"prompt"}, "/v1/chat/completions": {"documents"}, "/invocations": {"documents"}}
            ok = {k: v for k, v in body.items() if k not in drop.get(path, ())}
            r = httpx.request(method, f"{srv.url}{path}", json=ok, headers={"Authorization": "Bearer s3cret"})
            # (Past the key, pooling requests to this generative model are the model's 400.)
            assert r.status_code == (400 if path in pooling else 404 if path in stored else 200), r.text
        assert (b"s3cre", b"s3cret") in compared and (b"s3cret", b"s3cret") in compared  # constant-time compare
        # Unknown /v1 paths look the same to a stranger; the open routes stay open.
        assert httpx.get(f"{srv.url}/v1/no-such-route").status_code == 401
        assert httpx.get(f"{srv.url}/v1/no-such-route", headers={"Authorization": "Bearer s3cret"}).status_code == 404
        for path in ("/health", "/metrics", "/version"):
            assert httpx.get(f"{srv.url}{path}").status_code == 200
    finally:
        srv.stop()


def _cached(r: httpx.Response) -> int:
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_cache_salt_partitions_the_prefix_cache(server):
    url = f"{server.url}/v1/completions"
    prompt = list(range(5, 55))  # 50 tokens: three full blocks of 16 that a later request can hit

    def complete(**salt) -> int:
        return _cached(httpx.post(url, json={"prompt": prompt, "max_tokens": 2, "temperature": 0, **salt}))

    def hits() -> float:
        return metric(scrape(server.url), "pagedserve:prefix_cache_hits_total")

    before = hits()
    assert complete(cache_salt="tenant-a") == 0
    assert complete(cache_salt="tenant-b") == 0  # same prompt, other tenant: nothing shared
    assert complete() == 0  # no salt: its own (shared, unsalted) space
    assert hits() == before
    a_again = complete(cache_salt="tenant-a")
    assert a_again == 48  # the same tenant's prefix: three blocks
    assert complete() == 48
    assert hits() - before == 96
    assert complete(cache_salt="tenant-c") == 0

    chat = f"{server.url}/v1/chat/completions"

    def chat_cached(**salt) -> int:
        return _cached(httpx.post(chat, json={"messages": CHAT, "max_tokens": 2, **salt}))

    assert chat_cached(cache_salt="tenant-a") == 0  # the chat prompt differs from the completion's
    assert chat_cached(cache_salt="tenant-a") > 0
    assert chat_cached(cache_salt="tenant-b") == 0
    streamed = httpx.post(chat, json={"messages": CHAT, "max_tokens": 2, "stream": True,
                                      "stream_options": {"include_usage": True}, "cache_salt": "tenant-a"})
    usage = json.loads(streamed.text.split("data: ")[-2])["usage"]  # the chunk before [DONE]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0
    r = httpx.post(url, json={"prompt": "x", "cache_salt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_request_ids_are_random(server):
    ids = [httpx.post(f"{server.url}/v1/completions", json={"prompt": "id", "max_tokens": 1}).json()["id"]
           for _ in range(8)]
    ids += [httpx.post(f"{server.url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}).json()["id"]
            for _ in range(4)]
    assert len(set(ids)) == len(ids)
    for rid in ids:
        prefix, _, hex_part = rid.rpartition("-")
        assert prefix in ("cmpl", "chatcmpl") and uuid.UUID(hex_part).version == 4  # 122 random bits


def test_prompts_reach_the_logs_only_with_enable_log_requests(llm, caplog):
    quiet = ServerThread(build_app(llm, MODEL))
    loud = ServerThread(build_app(llm, MODEL, enable_log_requests=True))

    def traffic(url: str, secret: str) -> None:
        for body in ({"prompt": f"{secret} completion", "max_tokens": 2},
                     {"prompt": f"{secret} too long", "max_tokens": 10 ** 5},  # refused: error paths too
                     {"prompt": f"{secret} bad", "temperature": -1}):
            httpx.post(f"{url}/v1/completions", json=body)
        httpx.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": f"{secret} chat"}], "max_tokens": 2, "stream": True})
        httpx.post(f"{url}/tokenize", json={"prompt": f"{secret} tokenize"})

    try:
        with caplog.at_level(logging.DEBUG):
            traffic(quiet.url, "QUIET-SECRET-7f3a")
            traffic(loud.url, "LOUD-SECRET-19c2")
        assert caplog.records  # the capture works at all
        assert "QUIET-SECRET-7f3a" not in caplog.text
        assert "LOUD-SECRET-19c2 completion" in caplog.text and "LOUD-SECRET-19c2 chat" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            cut = ServerThread(build_app(llm, MODEL, enable_log_requests=True, max_log_len=9))
            traffic(cut.url, "CUT-SECRET-5e1b")
            cut.stop()
        assert "'CUT-SECRE'" in caplog.text and "CUT-SECRET" not in caplog.text  # --max-log-len
    finally:
        quiet.stop()
        loud.stop()
