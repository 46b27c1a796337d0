"""Hostile input: every request parameter at and beyond its limits, malformed and oversize
bodies. Each gets a 4xx OpenAI-style error naming the field, within a bounded time; the limits
are configurable; the server keeps serving and leaks nothing."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from server_helpers import ServerThread, make_async_llm, no_requests_left, wait_for

from pagedserve.entrypoints.cli import build_parser, main
from pagedserve.entrypoints.openai.api_server import build_app
from pagedserve.entrypoints.openai.limits import ServerLimits

MODEL = "tiny"
NAN, INF = float("nan"), float("inf")
SMALL = ServerLimits(max_request_body_bytes=64 << 10, max_n=4, max_stop_strings=3, max_stop_string_chars=8,
                     max_logit_bias=2, max_prompt_chars=100)


@pytest.fixture(scope="module")
def llm(llama_dir):
    llm = make_async_llm(llama_dir, max_waiting_requests=ServerLimits().max_waiting_requests)  # as `serve` does
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def server(llm):  # default limits
    srv = ServerThread(build_app(llm, MODEL))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small(llm):  # small, non-default limits on the same engine
    srv = ServerThread(build_app(llm, MODEL, limits=SMALL))
    yield srv
    srv.stop()


def _error(r: httpx.Response, status: int, param=None, match: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["code"] == status and match in err["message"], err
    assert err["param"] == param, err
    return err


CMPL = {"prompt": "x", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

HOSTILE = [
    # n: zero, negative, wrong type, thousands, beyond 64 bits
    ("completions", {"n": 0}, "n"), ("completions", {"n": -3}, "n"), ("completions", {"n": "many"}, "n"),
    ("completions", {"n": 5000, "temperature": 1}, "n"), ("completions", {"n": 2 ** 70}, "n"),
    # max_tokens: above the context, zero, beyond int64, fractional
    ("completions", {"max_tokens": 10 ** 6}, "max_tokens"), ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"max_tokens": 2 ** 64}, "max_tokens"), ("completions", {"max_tokens": 1.5}, "max_tokens"),
    # stop lists: 10^4 entries, a huge string, empty string, wrong types
    ("completions", {"stop": ["ab"] * 10 ** 4}, "stop"), ("completions", {"stop": "s" * 5000}, "stop"),
    ("completions", {"stop": [""]}, "stop"), ("completions", {"stop": [1, 2]}, "stop"),
    ("completions", {"stop_token_ids": list(range(10 ** 4))}, "stop_token_ids"),
    ("completions", {"bad_words": ["w"] * 10 ** 4}, "bad_words"),
    ("completions", {"logit_bias": {str(i): 1 for i in range(5000)}}, "logit_bias"),
    ("completions", {"logit_bias": {"1": "x"}}, "logit_bias"),
    ("completions", {"logprobs": 10 ** 4}, "logprobs"), ("completions", {"logprobs": -1}, "logprobs"),
    ("completions", {"prompt_logprobs": 10 ** 4}, "prompt_logprobs"),
    # floats: negative, NaN, infinite, strings
    ("completions", {"temperature": -1}, "temperature"), ("completions", {"temperature": NAN}, "temperature"),
    ("completions", {"temperature": "hot"}, "temperature"), ("completions", {"top_p": NAN}, "top_p"),
    ("completions", {"top_p": 2}, "top_p"), ("completions", {"presence_penalty": INF}, "presence_penalty"),
    ("completions", {"min_p": NAN, "temperature": 1}, "min_p"), ("completions", {"top_k": -5}, "top_k"),
    ("completions", {"seed": "x"}, "seed"), ("completions", {"repetition_penalty": NAN}, "repetition_penalty"),
    # prompts: 10^6 characters, empty, empty token list, bad ids, wrong types, thousands of prompts, bad Unicode
    ("completions", {"prompt": "x" * 10 ** 6}, "prompt"), ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": [[]]}, "prompt"), ("completions", {"prompt": [-1]}, "prompt"),
    ("completions", {"prompt": [0.5]}, "prompt"), ("completions", {"prompt": None}, "prompt"),
    ("completions", {"prompt": [7] * 10 ** 6}, "prompt"), ("completions", {"prompt": ["x"] * 5000}, "prompt"),
    ("completions", {"prompt": "a\ud800b"}, "prompt"),
    # other fields
    ("completions", {"stream": "maybe"}, "stream"), ("completions", {"stream_options": {"include_usage": True}},
                                                     "stream_options"),
    ("completions", {"cache_salt": ""}, "cache_salt"), ("completions", {"cache_salt": 5}, "cache_salt"),
    ("completions", {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("completions", {"min_tokens": 10}, "min_tokens"), ("completions", {"allowed_token_ids": []}, "allowed_token_ids"),
    ("completions", {"allowed_token_ids": [10 ** 7]}, "allowed_token_ids"), ("completions", {"suffix": "y"}, "suffix"),
    # chat: unknown roles, non-string content, 10^6 characters, bad Unicode, 10^4 messages
    ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": {"a": 1}}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                      "image_url": {"url": "x"}}]}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x" * 10 ** 6}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "\udc00"}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 10 ** 4}, "messages"),
    ("chat/completions", {"messages": []}, "messages"), ("chat/completions", {"messages": None}, "messages"),
    ("chat/completions", {"max_completion_tokens": 10 ** 6}, "max_completion_tokens"),
    ("chat/completions", {"max_tokens": 10 ** 6}, "max_tokens"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("chat/completions", {"n": 5000, "temperature": 1}, "n"),
    ("chat/completions", {"continue_final_message": True}, "continue_final_message"),
    ("chat/completions", {"cache_salt": ""}, "cache_salt"),
]


@pytest.mark.parametrize("route,extra,param", HOSTILE, ids=[f"{r}-{p}-{i}" for i, (r, _, p) in enumerate(HOSTILE)])
def test_hostile_parameters_get_400_naming_the_field(server, llm, route, extra, param):
    body = {**(CMPL if route == "completions" else CHAT), **extra}
    start = time.monotonic()
    # json.dumps, not httpx's encoder: it writes NaN and Infinity as Python's parser reads them.
    r = httpx.post(f"{server.url}/v1/{route}", content=json.dumps(body), timeout=30,
                   headers={"content-type": "application/json"})
    took = time.monotonic() - start
    _error(r, 400, param)
    assert took < 3.0, f"{took:.2f}s to refuse"  # no tokenizing 10^6 characters, no 10^4-entry work
    assert no_requests_left(llm)


def _post(url: str, content: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": content_type})


def test_malformed_bodies(server):
    _error(_post(server.url, b"{not json"), 400, None, "not valid JSON")
    _error(_post(server.url, b'{"prompt": "\xff\xfe"}'), 400, None, "UTF-8")
    _error(_post(server.url, b"[" * 100_000 + b"]" * 100_000), 400)  # nesting deeper than the parser goes
    _error(_post(server.url, b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"), 400)  # >4300 digits
    _error(_post(server.url, b"[1, 2]"), 400)
    _error(_post(server.url, b""), 400)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        _error(_post(server.url, json.dumps(CMPL).encode(), ctype), 415, None, "application/json")
    # /tokenize validates its text the same way
    r = httpx.post(f"{server.url}/tokenize", content=json.dumps({"prompt": "\ud800"}),
                   headers={"content-type": "application/json"})
    _error(r, 400, "prompt", "Unicode")


def _raw_request(url: str, head: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):  # the server closes the connection after the 413
            data += chunk
        return data


def test_oversize_bodies_get_413_before_being_read(small):
    start = time.monotonic()
    raw = _raw_request(small.url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 1000000000\r\n\r\n")  # announces 1 GB, sends nothing
    assert time.monotonic() - start < 2.0  # answered without waiting for the body
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["type"] == "RequestTooLargeError"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(200):
            yield b"x" * 1024
        yield b'"}'

    err = _error(httpx.post(f"{small.url}/v1/completions", content=chunks(),
                            headers={"content-type": "application/json"}), 413)
    assert "--max-request-body-bytes" in err["message"]
    # Under the cap the body is read and parsed (and then refused by the prompt limit).
    _error(httpx.post(f"{small.url}/v1/completions", json={"prompt": "x" * 60_000}), 400, "prompt",
           "--max-prompt-chars")


def test_limits_are_configurable(small):
    def post(**extra):
        return httpx.post(f"{small.url}/v1/completions", json={**CMPL, "temperature": 1, **extra})

    assert post(n=4).status_code == 200
    _error(post(n=5), 400, "n", "at most 4")
    assert post(stop=["a", "b", "c"]).status_code == 200
    _error(post(stop=["a", "b", "c", "d"]), 400, "stop", "at most 3")
    _error(post(stop=["123456789"]), 400, "stop", "at most 8 characters")
    _error(post(bad_words=["a", "b", "c", "d"]), 400, "bad_words")
    _error(post(logit_bias={"1": 1, "2": 1, "3": 1}), 400, "logit_bias", "at most 2")
    assert post(prompt="y" * 100).status_code == 200
    _error(post(prompt="y" * 101), 400, "prompt")
    _error(httpx.post(f"{small.url}/v1/chat/completions", json={**CHAT, "messages": [
        {"role": "user", "content": "y" * 101}]}), 400, "messages")
    # truncate_prompt_tokens asks for a long prompt to be cut: the character cap does not apply
    assert post(prompt="y " * 200, truncate_prompt_tokens=8).status_code == 200


def test_limit_flags(capsys):
    ns = build_parser().parse_args(["serve", "m", "--max-n", "7", "--max-request-body-bytes", "1000",
                                    "--max-stop-strings", "5", "--max-waiting-requests", "9"])
    limits = ServerLimits.from_args(ns)
    assert (limits.max_n, limits.max_request_body_bytes, limits.max_stop_strings, limits.max_waiting_requests) == \
        (7, 1000, 5, 9)
    assert ServerLimits.from_args(build_parser().parse_args(["serve", "m"])) == ServerLimits()
    assert main(["serve", "/nonexistent", "--max-n", "0"]) == 2
    assert "--max-n" in capsys.readouterr().err


def test_still_serving_after_all_that(server, llm):
    wait_for(lambda: no_requests_left(llm), 5, "no requests left")
    assert not llm.errored
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "after all that", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(f"{server.url}/health").status_code == 200
