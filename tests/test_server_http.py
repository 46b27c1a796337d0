"""The server's HTTP options (vLLM's serve flags): CORS for browsers (open by default,
restricted by --allowed-origins, answered before the API key is asked for), X-Request-Id
headers, the docs pages switched off, TLS, and logprob tokens as token ids."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess

import httpx
import pytest
import uvicorn
from server_helpers import ServerThread, make_async_llm

from pagedserve.entrypoints.cli import build_parser
from pagedserve.entrypoints.openai.api_server import build_app
from pagedserve.entrypoints.openai.http_options import HttpOptions

MODEL = "tiny"
PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def llm(llama_dir):
    llm = make_async_llm(llama_dir)
    yield llm
    llm.shutdown()


def _serve(llm, **kw):
    return ServerThread(build_app(llm, MODEL, **kw))


def test_cors_is_open_by_default_and_answered_before_the_key(llm):
    srv = _serve(llm, api_key="k")
    try:
        r = httpx.options(f"{srv.url}/v1/chat/completions", headers=PREFLIGHT)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        assert "POST" in r.headers["access-control-allow-methods"]
        # the page can read the refusal, and the answer with the key
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=CHAT,
                       headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        assert "x-request-id" not in r.headers  # off unless asked for
    finally:
        srv.stop()


def test_cors_restricted_to_named_origins(llm):
    http = HttpOptions(allowed_origins=["https://app.example"], allow_credentials=True)
    srv = _serve(llm, http=http)
    try:
        r = httpx.options(f"{srv.url}/v1/chat/completions", headers=PREFLIGHT)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert r.headers["access-control-allow-credentials"] == "true"
        r = httpx.options(f"{srv.url}/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = httpx.get(f"{srv.url}/v1/models", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # the browser hides it
    finally:
        srv.stop()


def test_request_id_headers_and_no_docs(llm):
    srv = _serve(llm, api_key="k", http=HttpOptions(enable_request_id_headers=True, disable_fastapi_docs=True))
    try:
        auth = {"Authorization": "Bearer k"}
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=CHAT, headers={**auth, "X-Request-Id": "trace-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
        ids = {httpx.get(f"{srv.url}/v1/models", headers=auth).headers["x-request-id"] for _ in range(2)}
        assert len(ids) == 2 and all(len(i) == 32 for i in ids)  # new ones, each its own
        assert httpx.get(f"{srv.url}/v1/models").headers["x-request-id"]  # the 401 too
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json={**CHAT, "stream": True},
                          headers={**auth, "X-Request-Id": "s-1"}) as s:
            assert s.headers["x-request-id"] == "s-1" and "[DONE]" in s.read().decode()
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(f"{srv.url}{path}").status_code == 404
    finally:
        srv.stop()
    srv = _serve(llm)
    try:
        assert httpx.get(f"{srv.url}/docs").status_code == 200
        assert httpx.get(f"{srv.url}/openapi.json").status_code == 200
    finally:
        srv.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(llm, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    http = HttpOptions(ssl_keyfile=str(key), ssl_certfile=str(cert))
    app = build_app(llm, MODEL, http=http)
    srv = ServerThread(app, make_server=lambda cfg: uvicorn.Server(
        uvicorn.Config(cfg.app, log_level="warning", **http.uvicorn_kwargs())))
    try:
        url = srv.url.replace("http://", "https://")
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, verify=ssl.create_default_context(cafile=str(cert)))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        with pytest.raises(httpx.TransportError):  # plain HTTP is not spoken there
            httpx.get(f"{srv.url}/health")
    finally:
        srv.stop()


def test_options_are_checked():
    with pytest.raises(ValueError, match="go together"):
        HttpOptions(ssl_keyfile="k.pem")
    with pytest.raises(ValueError, match="name the origins"):
        HttpOptions(allow_credentials=True)
    with pytest.raises(ValueError, match="ssl-cert-reqs"):
        HttpOptions(ssl_cert_reqs=5)
    ns = build_parser().parse_args(["serve", "m", "--allowed-origins", '["https://a.example"]',
                                    "--enable-request-id-headers"])
    http = HttpOptions.from_args(ns)
    assert http.allowed_origins == ["https://a.example"] and http.enable_request_id_headers
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--allowed-origins", "https://a.example"])  # not JSON


def test_return_tokens_as_token_ids(llm, llama_dir):
    """Logprob tokens as "token_id:N" (vLLM's --return-tokens-as-token-ids and request field):
    the same tokens, named by id; completions' text offsets still index the text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    srv = _serve(llm, return_tokens_as_token_ids=True)
    try:
        chat = {**CHAT, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2}
        by_id = httpx.post(f"{srv.url}/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]
        as_text = httpx.post(f"{srv.url}/v1/chat/completions", json={**chat, "return_tokens_as_token_ids": False}
                             ).json()["choices"][0]["logprobs"]["content"]
        assert all(e["token"].startswith("token_id:") for e in by_id)
        assert [tok.decode([int(e["token"][9:])]) for e in by_id] == [e["token"] for e in as_text]
        assert [[tok.decode([int(t["token"][9:])]) for t in e["top_logprobs"]] for e in by_id] == [
            [t["token"] for t in e["top_logprobs"]] for e in as_text]
        assert by_id[0]["bytes"] == list(by_id[0]["token"].encode())
        body = {"model": MODEL, "prompt": "one two", "max_tokens": 5, "temperature": 0, "logprobs": 1}
        c_id = httpx.post(f"{srv.url}/v1/completions", json=body).json()["choices"][0]
        c_text = httpx.post(f"{srv.url}/v1/completions", json={**body, "return_tokens_as_token_ids": False}
                            ).json()["choices"][0]
        assert c_id["text"] == c_text["text"] and c_id["logprobs"]["text_offset"] == c_text["logprobs"]["text_offset"]
        assert [tok.decode([int(t[9:])]) for t in c_id["logprobs"]["tokens"]] == c_text["logprobs"]["tokens"]
        assert all(all(k.startswith("token_id:") for k in d) for d in c_id["logprobs"]["top_logprobs"])
    finally:
        srv.stop()


def test_sagemaker_routes_and_load_tracking(llm):
    """/ping and /invocations (SageMaker's), and GET /load (--enable-server-load-tracking)."""
    srv = _serve(llm, http=HttpOptions(enable_server_load_tracking=True))
    try:
        for method in ("GET", "POST"):
            assert httpx.request(method, f"{srv.url}/ping").status_code == 200
        chat = httpx.post(f"{srv.url}/invocations", json={**CHAT, "temperature": 0}).json()
        direct = httpx.post(f"{srv.url}/v1/chat/completions", json={**CHAT, "temperature": 0}).json()
        assert chat["object"] == "chat.completion"
        assert chat["choices"][0]["message"] == direct["choices"][0]["message"]
        text = httpx.post(f"{srv.url}/invocations", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}).json()
        assert text["object"] == "text_completion" and text["usage"]["completion_tokens"] == 2
        r = httpx.post(f"{srv.url}/invocations", json={"model": MODEL, "messages": "not a list"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = httpx.post(f"{srv.url}/invocations", json={"model": MODEL})
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
        r = httpx.post(f"{srv.url}/invocations", json={"model": MODEL, "input": "x"})
        assert r.status_code == 400  # embeddings, from a generative model: the pooling endpoint's 400
        assert httpx.get(f"{srv.url}/load").json() == {"server_load": 0}  # errors too left it balanced
    finally:
        srv.stop()
    srv = _serve(llm)
    try:
        assert httpx.get(f"{srv.url}/load").status_code == 404  # off unless asked for
    finally:
        srv.stop()


def test_load_counts_api_requests_until_their_last_byte():
    import asyncio

    from pagedserve.entrypoints.openai.http_options import LoadTracker, LoadTrackingMiddleware

    async def run():
        release, seen = asyncio.Event(), []

        async def app(scope, receive, send):  # a response that takes its time (a stream)
            await release.wait()

        tracker = LoadTracker()
        mw = LoadTrackingMiddleware(app, tracker)
        calls = [asyncio.create_task(mw({"type": "http", "path": p}, None, None))
                 for p in ("/v1/chat/completions", "/invocations", "/health", "/metrics", "/v1x")]
        await asyncio.sleep(0)
        seen.append(await tracker.report())
        release.set()
        await asyncio.gather(*calls)
        seen.append(await tracker.report())
        return seen

    assert asyncio.run(run()) == [{"server_load": 2}, {"server_load": 0}]


def test_force_include_usage(llm):
    srv = _serve(llm, enable_force_include_usage=True)
    try:
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json={**CHAT, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2
    finally:
        srv.stop()


def test_chat_documents_reach_the_template(llm):
    """vLLM's chat `documents`: passed to the chat template (a RAG template lists them)."""
    template = ("{% for d in documents %}[{{ d.title }}: {{ d.text }}] {% endfor %}"
                "{% for m in messages %}{{ m.content }}{% endfor %}")
    srv = _serve(llm, chat_template=template)
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "question"}],
                "documents": [{"title": "A", "text": "first"}, {"title": "B", "text": "second"}]}
        got = httpx.post(f"{srv.url}/tokenize", json=body).json()["tokens"]
        want = httpx.post(f"{srv.url}/tokenize", json={"model": MODEL, "add_special_tokens": False,
                                                      "prompt": "[A: first] [B: second] question"}).json()["tokens"]
        assert got == want
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want)
    finally:
        srv.stop()
