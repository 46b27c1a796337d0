"""The OpenAI-compatible server through the official `openai` client (sync and async) against
a real uvicorn server on a free port: completions, chat, streaming, n > 1, logprobs, stop,
models, tokenize/detokenize, usage, metrics, and 32 concurrent streams with disconnects."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import openai
import pytest
from server_fixtures import MODEL, client, offline, server  # noqa: F401 (fixtures)
from server_helpers import metric, no_requests_left, scrape, wait_for

from pagedserve import SamplingParams
from pagedserve.entrypoints.openai.protocol import CompletionChoice, CompletionResponse
from pagedserve.entrypoints.openai.serving_engine import sse

GREEDY = dict(temperature=0.0)


def test_models_and_version(client, server, llama_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "pagedserve" and models[0].root == llama_dir and models[0].max_model_len == 512
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_completion_matches_offline_engine_and_usage(client, offline):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, extra_body={"ignore_eos": True},
                                  **GREEDY)
    ref = offline.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True, **GREEDY), use_tqdm=False)[0]
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == ref.outputs[0].text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == 10 and r.usage.total_tokens == r.usage.prompt_tokens + 10


def test_streamed_deltas_equal_the_full_text(client):
    kw = dict(model=MODEL, prompt="Streaming is", max_tokens=20, extra_body={"ignore_eos": True}, **GREEDY)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_prompt_forms_and_n(client, server):
    tok = server.llm.tokenizer
    ids = tok.encode("token ids")
    r = client.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=4, n=3, seed=7, temperature=1.0,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert r.usage.completion_tokens == 6 * 4
    assert r.usage.prompt_tokens == len(tok.encode("one")) + len(tok.encode("two"))
    again = client.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=4, n=3, seed=7, temperature=1.0,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, **GREEDY)
    by_text = client.completions.create(model=MODEL, prompt="token ids", max_tokens=5, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], max_tokens=2, **GREEDY)
    assert len(many.choices) == 2 and many.usage.prompt_tokens == len(ids) + 2
    echoed = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, echo=True, **GREEDY)
    assert echoed.choices[0].text == tok.decode(ids) + by_ids.choices[0].text


def test_completion_logprobs_and_echo(client, server):
    r = client.completions.create(model=MODEL, prompt="Logprobs of", max_tokens=6, logprobs=3,
                                  extra_body={"ignore_eos": True}, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for tok_s, tok_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tok_lp <= 0 and 3 <= len(top) <= 4
        assert math.isclose(max(top.values()), tok_lp, rel_tol=1e-5)  # greedy picks the most likely
        assert top[tok_s] == tok_lp
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]

    prompt = "Echo this"
    n_prompt = len(server.llm.tokenizer.encode(prompt))
    e = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1,
                                  extra_body={"ignore_eos": True}, **GREEDY)
    c = e.choices[0]
    assert c.text.startswith(prompt) and len(c.logprobs.tokens) == n_prompt + 3
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in c.logprobs.token_logprobs[1:])


def test_stop_strings_and_stop_token_ids(client, offline):
    kw = dict(model=MODEL, prompt="Stop me", max_tokens=24, extra_body={"ignore_eos": True}, **GREEDY)
    full = client.completions.create(**kw).choices[0]
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), "the random model's text should have a usable stop string"
    cut = client.completions.create(stop=[stop], **kw).choices[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
    assert cut.model_extra["stop_reason"] == stop
    streamed = list(client.completions.create(stop=[stop], stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"

    toks = offline.generate("Stop me", SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY),
                            use_tqdm=False)[0].outputs[0].token_ids
    first = toks.index(toks[2])
    by_id = client.completions.create(model=MODEL, prompt="Stop me", max_tokens=24,
                                      extra_body={"stop_token_ids": [toks[2]]}, **GREEDY)
    assert by_id.choices[0].finish_reason == "stop" and by_id.choices[0].model_extra["stop_reason"] == toks[2]
    assert by_id.usage.completion_tokens == first + 1


def test_chat_full_and_streamed(client, server):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12,
                                          extra_body={"ignore_eos": True}, **GREEDY)
    msg = full.choices[0].message
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    assert msg.role == "assistant" and msg.content and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12
    counted = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert full.usage.prompt_tokens == counted["count"]
    rendered = server.llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert counted["tokens"] == server.llm.tokenizer.encode(rendered, add_special_tokens=False)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == msg.content
    assert body[-1].choices[0].finish_reason == "length"
    # The same prompt again: counts agree, and now part of it comes from the prefix cache.
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert chunks[-1].choices == [] and all(getattr(chunks[-1].usage, k) == getattr(full.usage, k) for k in counts)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > full.usage.prompt_tokens_details.cached_tokens


def test_chat_logprobs_and_n(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Rank"}], max_tokens=5,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True}, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        tops = [t.logprob for t in c.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert c.top_logprobs[0].token == c.token and math.isclose(tops[0], c.logprob, rel_tol=1e-5)
        assert c.bytes == list(c.token.encode())
    n = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Many"}], max_tokens=4, n=2,
                                       temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in n.choices) == [0, 1] and n.usage.completion_tokens == 8


def test_tokenize_detokenize_round_trip(server):
    text = "Round trips keep text intact."
    tok = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == 512
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back["prompt"] == text


def test_async_client_concurrent_requests(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as c:
            kw = dict(model=MODEL, max_tokens=8, extra_body={"ignore_eos": True}, **GREEDY)
            rs = await asyncio.gather(*[c.completions.create(prompt=f"prompt {i % 4}", **kw) for i in range(12)])
            stream = await c.chat.completions.create(messages=[{"role": "user", "content": "hi"}], stream=True, **kw)
            parts = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
            return rs, "".join(parts)

    rs, streamed = asyncio.run(run())
    for i, r in enumerate(rs):
        assert r.choices[0].text == rs[i % 4].choices[0].text  # same prompt, same greedy text
    assert streamed


def test_metrics_counters_move(client, server):
    before = scrape(server.url)
    r = client.completions.create(model=MODEL, prompt="count me", max_tokens=7, extra_body={"ignore_eos": True},
                                  **GREEDY)
    after = scrape(server.url)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("pagedserve:prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("pagedserve:generation_tokens_total") == 7
    assert delta("pagedserve:request_success_total", finished_reason="length") == 1
    assert delta("pagedserve:prefix_cache_queries_total") >= r.usage.prompt_tokens
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"pagedserve:{h}_count", model_name=MODEL) == 1
    assert delta("pagedserve:inter_token_latency_seconds_count") == 6
    # vLLM's per-request histograms: sizes and phase times of the finished request
    assert delta("pagedserve:request_prompt_tokens_sum") == r.usage.prompt_tokens
    assert delta("pagedserve:request_generation_tokens_sum") == 7
    assert delta("pagedserve:request_params_n_sum") == 1
    phases = {h: delta(f"pagedserve:request_{h}_seconds_sum") for h in ("prefill_time", "decode_time",
                                                                          "inference_time")}
    assert all(delta(f"pagedserve:request_{h}_seconds_count") == 1 for h in phases)
    assert phases["inference_time"] == pytest.approx(phases["prefill_time"] + phases["decode_time"], abs=1e-6)
    tpot = delta("pagedserve:request_time_per_output_token_seconds_sum")
    assert tpot == pytest.approx(phases["decode_time"] / 6, rel=1e-6)
    assert metric(after, "pagedserve:kv_cache_usage_perc") == 0
    assert metric(after, "pagedserve:num_requests_running") == 0
    config = server.llm.engine.config
    assert metric(after, "pagedserve:cache_config_info", block_size=str(config.block_size),
                  num_gpu_blocks=str(server.llm.engine.kv.num_blocks), cache_dtype="auto",
                  enable_prefix_caching="True") == 1


def test_non_streaming_client_timeout_aborts(server):
    before = scrape(server.url)
    with pytest.raises(httpx.TimeoutException):
        # The read times out long before 500 tokens are done (they took under 0.5 s here once).
        httpx.post(f"{server.url}/v1/completions", timeout=httpx.Timeout(5.0, read=0.1),
                   json={"prompt": "slow", "max_tokens": 500, "ignore_eos": True, "temperature": 0})
    wait_for(lambda: no_requests_left(server.llm), 5, "the abandoned request to be aborted")
    after = scrape(server.url)
    assert metric(after, "pagedserve:request_success_total", finished_reason="abort") - \
        metric(before, "pagedserve:request_success_total", finished_reason="abort") == 1


def test_32_concurrent_streams_with_disconnects(server):
    disconnecting = set(range(0, 32, 3))  # 11 of 32 leave mid-stream

    async def one(c, i):
        stream = await c.completions.create(model=MODEL, prompt=f"client {i}", stream=True, temperature=0.7, seed=i,
                                            max_tokens=300 if i in disconnecting else 24,
                                            extra_body={"ignore_eos": True})
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
            if i in disconnecting and len(text) > 3:
                await stream.close()
                return i, None
        return i, finish

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as c:
            return await asyncio.gather(*[one(c, i) for i in range(32)])

    before = scrape(server.url)
    results = asyncio.run(run())
    for i, finish in results:
        assert finish == (None if i in disconnecting else "length")
    wait_for(lambda: no_requests_left(server.llm), 10, "KV blocks of disconnected clients to be freed")
    after = scrape(server.url)
    assert metric(after, "pagedserve:kv_cache_usage_perc") == 0
    assert metric(after, "pagedserve:request_success_total", finished_reason="abort") - \
        metric(before, "pagedserve:request_success_total", finished_reason="abort") == len(disconnecting)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "still there?", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_sse_events_survive_naive_line_splitting():
    """Generated text may hold U+2028, U+2029 or U+0085, which JSON leaves raw but
    str.splitlines (httpx's iter_lines) treats as line ends: they are escaped."""
    text = "a\u2028b\u2029c\x85d\re\nf"
    event = sse(CompletionResponse(id="x", model="m", choices=[CompletionChoice(index=0, text=text)]))
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    assert json.loads(event[len("data: "):])["choices"][0]["text"] == text


def test_chat_echo_prepends_the_continued_message(client):
    """vLLM's chat echo: continuing an assistant's message, the reply starts with its text,
    whole and streamed; after a user's message there is nothing to echo."""
    partial = "Sure, the answer is"
    msgs = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": partial}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
              extra_body={"add_generation_prompt": False, "continue_final_message": True})
    plain = client.chat.completions.create(**kw).choices[0].message.content
    echoed = client.chat.completions.create(**{**kw, "extra_body": {**kw["extra_body"], "echo": True}})
    assert echoed.choices[0].message.content == partial + plain
    chunks = list(client.chat.completions.create(stream=True, **{**kw, "extra_body": {**kw["extra_body"],
                                                                                   "echo": True}}))
    assert chunks[1].choices[0].delta.content == partial
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == partial + plain
    user_last = client.chat.completions.create(model=MODEL, messages=msgs[:1], max_tokens=3, temperature=0,
                                               extra_body={"echo": True})
    assert user_last.choices[0].message.content == client.chat.completions.create(
        model=MODEL, messages=msgs[:1], max_tokens=3, temperature=0).choices[0].message.content


def test_continuous_usage_stats(client):
    """vLLM's stream_options.continuous_usage_stats: with include_usage, every chunk carries the
    usage so far; the last chunk the whole."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=6, stream=True, stream_options=opts,
                                               extra_body={"ignore_eos": True}))
    text = list(client.completions.create(model=MODEL, prompt="one two", max_tokens=6, stream=True,
                                          stream_options=opts, extra_body={"ignore_eos": True}))
    for chunks in (chat, text):
        used = [c.usage.completion_tokens for c in chunks]  # every chunk has its usage
        assert used == sorted(used) and used[-1] == 6 and chunks[-1].choices == []
        assert len({c.usage.prompt_tokens for c in chunks}) == 1
    plain = list(client.completions.create(model=MODEL, prompt="one two", max_tokens=3, stream=True,
                                           stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage.completion_tokens == 3


def test_response_role(llama_dir):
    """vLLM's --response-role names the reply after a generation prompt; continuing a final
    message keeps that message's role."""
    from server_helpers import serving

    msgs = [{"role": "user", "content": "hi"}]
    with serving(llama_dir, MODEL, response_role="bot") as srv:
        url = f"{srv.url}/v1/chat/completions"
        full = httpx.post(url, json={"model": MODEL, "messages": msgs, "max_tokens": 2}).json()
        assert full["choices"][0]["message"]["role"] == "bot"
        with httpx.stream("POST", url, json={"model": MODEL, "messages": msgs, "max_tokens": 2, "stream": True}) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: {"))
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "bot"
        cont = httpx.post(url, json={"model": MODEL, "max_tokens": 2, "add_generation_prompt": False,
                                     "continue_final_message": True,
                                     "messages": msgs + [{"role": "assistant", "content": "Hello"}]}).json()
        assert cont["choices"][0]["message"]["role"] == "assistant"
