"""POST /v1/responses (OpenAI's Responses API) through the official openai client: the same
reply as chat on the same conversation, whole and streamed (OpenAI's event sequence),
instructions, stored responses (retrieve, delete, previous_response_id), background responses
(polled, streamed and resumed, cancelled), logprobs, structured text formats, and clear 400 / 404
errors. Tool calls and reasoning: tests/test_harmony.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_fixtures import MODEL, client, server  # noqa: F401  (fixtures)


def _chat(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


def test_text_reply_matches_chat(client):
    resp = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=12, temperature=0)
    chat = _chat(client, [{"role": "user", "content": "Hello there"}], max_tokens=12)
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == MODEL
    assert resp.output_text == chat.choices[0].message.content
    (item,) = resp.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens == 12
    assert resp.usage.total_tokens == 12 + chat.usage.prompt_tokens
    # cut at max_output_tokens: incomplete, as OpenAI reports it
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    # instructions are the system message; message items with text parts are messages
    resp = client.responses.create(model=MODEL, instructions="Be brief.", max_output_tokens=6, temperature=0,
                                   input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}])
    chat = _chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                 max_tokens=6)
    assert resp.output_text == chat.choices[0].message.content and resp.instructions == "Be brief."


def test_streamed_events(client):
    kwargs = dict(model=MODEL, input="Tell me more", max_output_tokens=10, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-4].text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == 10
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id


def test_stored_responses_continue(client):
    first = client.responses.create(model=MODEL, input="Hello", max_output_tokens=5, temperature=0)
    again = client.responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == first.output_text
    second = client.responses.create(model=MODEL, input="And then?", previous_response_id=first.id,
                                      max_output_tokens=5, temperature=0)
    chat = _chat(client, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.output_text},
                          {"role": "user", "content": "And then?"}], max_tokens=5)
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens and second.previous_response_id == first.id
    # the stream's final response is stored too
    events = list(client.responses.create(model=MODEL, input="Go", max_output_tokens=3, stream=True))
    assert client.responses.retrieve(events[-1].response.id).output_text == events[-1].response.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="x", previous_response_id=first.id)
    assert e.value.body["param"] == "previous_response_id"
    unstored = client.responses.create(model=MODEL, input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_json_schema_text_format(client):
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    resp = client.responses.create(model=MODEL, input="A number", max_output_tokens=40, temperature=0,
                                   text={"format": {"type": "json_schema", "name": "num", "schema": schema}})
    assert resp.status == "completed" and isinstance(json.loads(resp.output_text)["n"], int)


@pytest.mark.parametrize("body, param, match", [
    ({"input": "x", "background": True, "store": False}, "background", "store"),
    ({"input": "x", "include": ["reasoning.encrypted_content"]}, "include", "only message.output_text.logprobs"),
    ({"input": "x", "top_logprobs": 50}, "top_logprobs", "20"),
    ({"input": "x", "conversation": "conv_1"}, "conversation", "conversation"),
    ({"input": "x", "max_tool_calls": 2}, "max_tool_calls", "max_tool_calls"),
    # (a text model: images are read only by a vision-language one, tests/test_server_images.py)
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input",
     "takes no images"),
    ({"input": [{"type": "web_search_call"}]}, "input", "web_search_call"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input", "role"),
    ({"input": "x", "max_output_tokens": -1}, "max_output_tokens", ""),
    ({"input": "x", "tool_choice": {"type": "function", "name": "f"}}, "tool_choice", "no tools"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text", "schema"),
    ({"input": "x", "temperature": -1}, "temperature", ""),
])
def test_bad_requests_are_400(server, body, param, match):
    r = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and match in err["message"], err


def test_unknown_model_and_response_are_404(server):
    r = httpx.post(f"{server.url}/v1/responses", json={"model": "nope", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert httpx.get(f"{server.url}/v1/responses/resp_nope").status_code == 404
    assert httpx.delete(f"{server.url}/v1/responses/resp_nope").status_code == 404


def test_streams_closed_early_free_everything(server):
    """Clients that leave a stream at once (after response.created) or mid-text: their
    requests are aborted, their KV blocks and queue places released."""
    from server_helpers import no_requests_left, wait_for

    async def one(c, i):
        stream = await c.responses.create(model=MODEL, input=f"client {i}", stream=True, max_output_tokens=200)
        async for event in stream:
            if i % 2 == 0 or event.type == "response.output_text.delta":
                await stream.close()
                return

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as c:
            await asyncio.gather(*[one(c, i) for i in range(8)])

    asyncio.run(run())
    wait_for(lambda: no_requests_left(server.llm) and server.llm._reserved == 0, 10, "requests to be freed")


def test_logprobs_match_chat(client):
    kwargs = dict(model=MODEL, input="Logprobs, please", max_output_tokens=8, temperature=0)
    chat = _chat(client, [{"role": "user", "content": "Logprobs, please"}], max_tokens=8, logprobs=True,
                 top_logprobs=2).choices[0].logprobs.content
    whole = client.responses.create(include=["message.output_text.logprobs"], top_logprobs=2, **kwargs)
    part = whole.output[0].content[0]
    assert whole.top_logprobs == 2
    assert [lp.token for lp in part.logprobs] == [lp.token for lp in chat]
    # (the prefix cache serves the second request: float noise only)
    assert [lp.logprob for lp in part.logprobs] == pytest.approx([lp.logprob for lp in chat], abs=1e-4)
    assert all(len(lp.top_logprobs) == 2 and lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob
               for lp in part.logprobs)
    assert "".join(lp.token for lp in part.logprobs) == part.text
    # streamed: each delta carries its tokens' logprobs, the done event all of them
    events = list(client.responses.create(stream=True, include=["message.output_text.logprobs"], **kwargs))
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert [lp.token for lp in streamed] == [lp.token for lp in done.logprobs] == [lp.token for lp in chat]
    assert all(lp.top_logprobs == [] for lp in streamed)  # top_logprobs unset: no alternatives
    # without include, none
    assert client.responses.create(**kwargs).output[0].content[0].logprobs == []


def _finished(client, response_id, timeout=30.0):
    from server_helpers import wait_for
    wait_for(lambda: client.responses.retrieve(response_id).status not in ("queued", "in_progress"), timeout,
             "the background response to finish")
    return client.responses.retrieve(response_id)


def test_background_response_is_polled_to_the_same_reply(client):
    kwargs = dict(model=MODEL, input="Background, please", max_output_tokens=9, temperature=0)
    whole = client.responses.create(**kwargs)
    queued = client.responses.create(background=True, **kwargs)
    assert queued.status == "queued" and queued.background is True and queued.output == []
    done = _finished(client, queued.id)
    assert done.status == "incomplete" and done.background is True and done.id == queued.id
    assert done.output_text == whole.output_text and done.usage.output_tokens == 9
    # a finished background response continues a conversation like any other
    after = client.responses.create(model=MODEL, input="And then?", previous_response_id=done.id,
                                    max_output_tokens=4, temperature=0)
    assert after.status == "incomplete" and after.usage.input_tokens > done.usage.input_tokens + 9
    # cancelling a finished one is idempotent: it stays as it ended
    assert client.responses.cancel(done.id).status == "incomplete"


def test_background_stream_outlives_its_client_and_resumes(client):
    kwargs = dict(model=MODEL, input="Stream in the background", max_output_tokens=24, temperature=0)
    whole = client.responses.create(**kwargs)
    stream = client.responses.create(background=True, stream=True, **kwargs)
    first = []
    for event in stream:
        first.append(event)
        if event.type == "response.output_text.delta":
            break
    stream.close()  # the client leaves: the run goes on
    response_id = first[0].response.id
    assert first[0].type == "response.created" and first[0].response.background is True
    done = _finished(client, response_id)
    assert done.output_text == whole.output_text
    seen = first[-1].sequence_number
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=seen))
    assert [e.sequence_number for e in rest] == list(range(seen + 1, seen + 1 + len(rest)))
    text = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    assert text == whole.output_text and rest[-1].type == "response.incomplete"
    # from the start: the whole stream again
    again = list(client.responses.retrieve(response_id, stream=True))
    assert again[0].type == "response.created" and len(again) == seen + 1 + len(rest)


def test_background_cancel_and_delete_free_everything(server, client):
    from server_helpers import no_requests_left, wait_for

    ids = []

    def start():
        stream = client.responses.create(model=MODEL, input="A long one", background=True, stream=True,
                                         max_output_tokens=400)
        for event in stream:
            if event.type == "response.created":
                ids.append(event.response.id)
            if event.type == "response.output_text.delta":
                stream.close()
                return ids[-1]
        raise AssertionError("no text came")

    rid = start()
    assert client.responses.retrieve(rid).status == "in_progress"
    cancelled = client.responses.cancel(rid)
    assert cancelled.status == "cancelled" and cancelled.id == rid
    wait_for(lambda: no_requests_left(server.llm) and server.llm._reserved == 0, 10, "the request to be freed")
    assert client.responses.retrieve(rid).status == "cancelled"
    assert client.responses.cancel(rid).status == "cancelled"  # idempotent
    # the follow-up of a cancelled response, and cancelling a foreground one: clear 400s
    with pytest.raises(openai.BadRequestError, match="cancelled"):
        client.responses.create(model=MODEL, input="x", previous_response_id=rid)
    fg = client.responses.create(model=MODEL, input="x", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.cancel(fg.id)
    r = httpx.get(f"{server.url}/v1/responses/{fg.id}", params={"stream": "true"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    # deleting a running one stops it too
    rid = start()
    client.responses.delete(rid)
    wait_for(lambda: no_requests_left(server.llm) and server.llm._reserved == 0, 10, "the request to be freed")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(rid)
