"""Every error class of the server with its status and OpenAI-style body: 400 (pydantic and
SamplingParams validation, context length, bad prompts), 404 (model, route), 401 (API key),
an error event mid-stream when the engine dies, 503 afterwards; no KV blocks leak."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_helpers import ServerThread, make_async_llm, no_requests_left, wait_for

from pagedserve.entrypoints.openai.api_server import build_app

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def llm(llama_dir):
    llm = make_async_llm(llama_dir)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def server(llm):
    srv = ServerThread(build_app(llm, MODEL))
    yield srv
    srv.stop()


def _error(r: httpx.Response, status: int, type_: str, match: str = "", param=None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["type"] == type_ and err["code"] == status and match in err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize("route,body,match,param", [
    ("completions", {"prompt": "x", "max_tokens": "many"}, "valid integer", "max_tokens"),
    ("completions", {"max_tokens": 3}, "prompt is required", "prompt"),  # (or prompt_embeds)
    ("completions", {"prompt": {"a": 1}}, "prompt", "prompt"),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", None),
    # would overflow int64 inside the engine step (and kill it) if let through
    ("completions", {"prompt": "x", "seed": 2 ** 64}, "less than or equal", "seed"),
    ("completions", {"prompt": "x", "top_k": 2 ** 70}, "less than or equal", "top_k"),
    ("completions", {"prompt": "x", "n": 10 ** 6}, "at most 128 (--max-n)", "n"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "less than or equal", "top_logprobs"),
    ("chat/completions", {"messages": "hi"}, "messages", "messages"),
    ("chat/completions", {"messages": []}, "at least 1", "messages"),
    ("chat/completions", {"messages": [{"content": "no role"}]}, "role", "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "messages"),
    # Fields that would change the result but are not implemented: refused, not ignored.
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "use_beam_search": True,
                          "tools": [{"type": "function", "function": {"name": "f"}}]}, "not supported", "tools"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "use_beam_search": True, "stream": True},
     "not supported", "stream"),
    ("completions", {"prompt": "x", "use_beam_search": True, "n": 2, "stream": True}, "not supported", "stream"),
    ("completions", {"prompt": "x", "use_beam_search": True, "logprobs": 2}, "not supported", "logprobs"),
    ("completions", {"prompt": "x", "use_beam_search": True, "top_p": 0.5}, "not supported", "top_p"),
    ("completions", {"prompt": "x", "use_beam_search": True, "guided_regex": "a+"}, "not supported", "guided_regex"),
    ("completions", {"prompt": "x", "best_of": 3}, "best_of", "best_of"),
    ("completions", {"prompt": "x", "priority": 1}, "needs priority scheduling", "priority"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "priority": -2}, "needs priority scheduling",
     "priority"),
    ("responses", {"input": "x", "priority": 1}, "needs priority scheduling", "priority"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]},
     "use tools", "functions"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "function_call": "auto"},
     "use tools", "function_call"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True, "use_beam_search": True,
                          "n": 2}, "not supported with use_beam_search", "echo"),
])
def test_pydantic_errors_are_400(server, route, body, match, param):
    _error(httpx.post(f"{server.url}/v1/{route}", json=body), 400, "BadRequestError", match, param)


@pytest.mark.parametrize("body,match", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 2, "temperature": 0}, "greedy"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "presence_penalty": 5}, "presence_penalty"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"999999": 1}}, "out of vocabulary"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": ""}, "empty"),
    ({"prompt": []}, "empty"),
    ({"prompt": [1, 2, 10 ** 7]}, "out of vocabulary"),
    ({"prompt": "x", "max_tokens": 1000}, "maximum context length is 512 tokens"),
    ({"prompt": [7] * 600, "max_tokens": 1}, "maximum model length of 512"),
    ({"prompt": ["fine", [1] * 600]}, "prompt"),
])
def test_invalid_completion_requests_are_400(server, llm, body, match):
    _error(httpx.post(f"{server.url}/v1/completions", json=body), 400, "BadRequestError", match)
    assert no_requests_left(llm)


@pytest.mark.parametrize("body,match", [
    ({"max_completion_tokens": 1000}, "maximum context length is 512 tokens"),
    ({"top_logprobs": 2}, "logprobs must be set"),
    ({"temperature": 3, "min_p": 2}, "min_p"),
    ({"messages": [{"role": "user", "content": "x " * 600}]}, "maximum model length"),
    ({"add_generation_prompt": True, "continue_final_message": True}, "continue_final_message"),
])
def test_invalid_chat_requests_are_400(server, llm, body, match):
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    _error(httpx.post(f"{server.url}/v1/chat/completions", json=body), 400, "BadRequestError", match)
    assert no_requests_left(llm)


def test_streamed_invalid_request_is_a_400_not_a_stream(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 9999, "stream": True})
    _error(r, 400, "BadRequestError", "maximum context length")


def test_invalid_json_is_400(server):
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    _error(r, 400, "BadRequestError")


def test_openai_client_sees_400_and_404(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=100000)
    assert "maximum context length is 512 tokens" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert "The model `gpt-4` does not exist." in e.value.message


def test_unknown_model_and_route_are_404(server):
    for route, body in [("completions", {"prompt": "x"}), ("chat/completions",
                                                             {"messages": [{"role": "user", "content": "x"}]})]:
        _error(httpx.post(f"{server.url}/v1/{route}", json={"model": "nope", **body}), 404, "NotFoundError",
               "The model `nope` does not exist.", "model")
    _error(httpx.post(f"{server.url}/tokenize", json={"model": "nope", "prompt": "x"}), 404, "NotFoundError")
    _error(httpx.get(f"{server.url}/v1/nothing-here"), 404, "NotFoundError")
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": [-1]})
    _error(r, 400, "BadRequestError", "out of vocabulary")


def test_api_key(llm):
    srv = ServerThread(build_app(llm, MODEL, api_key="s3cret"))
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "s3cret"}):
            _error(httpx.get(f"{srv.url}/v1/models", headers=headers), 401, "AuthenticationError")
            _error(httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x"}, headers=headers), 401,
                   "AuthenticationError")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == [MODEL]
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1
        # Only /v1 is protected, as in vLLM.
        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert httpx.get(f"{srv.url}/metrics").status_code == 200
    finally:
        srv.stop()


def test_engine_failure_mid_stream(llama_dir):
    """The engine step raises: open streams get an error event then [DONE]; other requests
    get 503; /health turns 503; new requests fail fast."""
    llm = make_async_llm(llama_dir)
    srv = ServerThread(build_app(llm, MODEL))
    real, steps = llm.engine.step, []

    def step():
        steps.append(1)
        if len(steps) == 6:
            raise RuntimeError("simulated device failure")
        return real()

    llm.engine.step = step
    try:
        with httpx.stream("POST", f"{srv.url}/v1/completions", json={
                "prompt": "x", "max_tokens": 100, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert len(events) >= 3 and events[-1] == "[DONE]"
        err = httpx.Response(200, content=events[-2]).json()["error"]
        assert err["type"] == "EngineDeadError" and "simulated device failure" in err["message"]
        assert err["code"] == 503

        assert httpx.get(f"{srv.url}/health").status_code == 503
        _error(httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x"}), 503, "EngineDeadError")
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError):
            list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                stream=True))
    finally:
        srv.stop()
        llm.shutdown()


def test_openai_client_raises_on_error_event(llama_dir):
    llm = make_async_llm(llama_dir)
    srv = ServerThread(build_app(llm, MODEL))
    real, steps = llm.engine.step, []

    def step():
        steps.append(1)
        return real() if len(steps) < 4 else 1 / 0

    llm.engine.step = step
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        got = []
        with pytest.raises(openai.APIError, match="ZeroDivisionError"):
            for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                        stream=True, max_tokens=50,
                                                        extra_body={"ignore_eos": True}):
                got.append(chunk)
        assert got and got[0].choices[0].delta.role == "assistant"
    finally:
        srv.stop()
        llm.shutdown()


def test_extreme_but_valid_values_do_not_hurt(server):
    for extra in ({"seed": 2 ** 63 - 1, "n": 3}, {"seed": -(2 ** 63)}, {"top_k": 2 ** 63 - 1},
                  {"temperature": 1e308, "repetition_penalty": 1e308}, {"logit_bias": {"5": 1e9, "6": -1e9}},
                  {"truncate_prompt_tokens": 2 ** 63 - 1}, {"min_tokens": 4, "max_tokens": 4, "stop": ["a"]}):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 4, **extra})
        assert r.status_code == 200, (extra, r.text)


def test_no_leaks_after_errors(server, llm):
    wait_for(lambda: no_requests_left(llm), 5, "no requests left")
    assert not llm.errored
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "after all that", "max_tokens": 2})
    assert r.status_code == 200
