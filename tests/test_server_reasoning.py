"""Reasoning parsers: a `<think>` block goes to reasoning_content, the rest to content, the
same whole and streamed at every chunk size; through the server (the model's reply forced
into shape with a regex), alone and with a tool call after the thinking."""

from __future__ import annotations

import json

import pytest
from server_helpers import openai_client, serving

from pagedserve.reasoning import ReasoningSplitter

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Think first."}]


OPENS_WITH_THINK_CASES = [
    ("<think>\nhmm\n</think>\n\nIt is 4.", ("\nhmm\n", "\n\nIt is 4.")),
    ("It is 4.", (None, "It is 4.")),  # thinking off: no block, all content
    ("<think>still thinking", ("still thinking", None)),  # cut short
    ("<thin", (None, "<thin")),
    ("<think></think>", ("", None)),
]


@pytest.mark.parametrize("parser, text, want", [
    *[(p, text, want) for p in ("qwen3", "glm45") for text, want in OPENS_WITH_THINK_CASES],
    ("deepseek_r1", "hmm</think>It is 4.", ("hmm", "It is 4.")),  # <think> was in the prompt
    ("deepseek_r1", "<think>hmm</think>It is 4.", ("hmm", "It is 4.")),
    ("deepseek_r1", "no end tag", ("no end tag", None)),
    ("deepseek_r1", "a </thin", ("a </thin", None)),
])
def test_split_whole_and_streamed(parser, text, want):
    assert ReasoningSplitter.split(parser, text) == want
    for size in (1, 2, 3, 7):
        s = ReasoningSplitter(parser)
        parts = [s.feed(text[i:i + size]) for i in range(0, len(text), size)] + [s.finish()]
        reasoning, content = "".join(r for r, _ in parts), "".join(c for _, c in parts)
        assert (reasoning if want[0] is not None else None, content or None) == want, size
        if want[0] is None:
            assert reasoning == ""


def test_unknown_parser():
    with pytest.raises(ValueError, match="choose from"):
        ReasoningSplitter("nope")


@pytest.fixture(scope="module")
def server(llama_dir):
    pytest.importorskip("xgrammar")
    with serving(llama_dir, MODEL, reasoning_parser="qwen3", tool_call_parser="hermes") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server) as c:
        yield c


def _both(client, regex: str, **kwargs):
    """The whole answer's message, and the streamed (reasoning, content, tool calls, finish)."""
    kwargs = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=200,
                  extra_body={"structured_outputs": {"regex": regex}}, **kwargs)
    whole = client.chat.completions.create(**kwargs).choices[0]
    reasoning = content = ""
    calls, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        d = chunk.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        content += d.content or ""
        calls += d.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    return whole, (reasoning, content, calls, finish)


def test_reasoning_content_whole_and_streamed(client):
    whole, (reasoning, content, _, finish) = _both(client, r"<think>[a-z]{2,6}( [a-z]{2,6}){1,3}</think>\n\n[a-z]{2,8}")
    thought = whole.message.model_extra["reasoning_content"]
    assert thought and " " in thought and "<" not in thought
    assert whole.message.content.startswith("\n\n") and whole.message.content[2:].isalpha()
    assert (reasoning, content, finish) == (thought, whole.message.content, whole.finish_reason)


def test_reasoning_then_a_tool_call(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"enum": ["a", "b"]}}, "required": ["x"]}}}]
    whole, (reasoning, content, calls, finish) = _both(
        client, r'<think>[a-z]{2,6}</think>ok <tool_call>\{"name": "f", "arguments": \{"x": "(a|b)"\}\}</tool_call>',
        tools=tools)
    assert whole.finish_reason == finish == "tool_calls"
    assert whole.message.model_extra["reasoning_content"] == reasoning and reasoning.isalpha()
    assert whole.message.content == content == "ok "
    (call,) = whole.message.tool_calls
    # Streamed: the name first, then the arguments in pieces as they are generated.
    assert call.function.name == "f" and calls[0].function.name == "f" and len(calls) > 2
    assert {c.index for c in calls} == {0} and "".join(c.function.arguments or "" for c in calls) == \
        call.function.arguments


def test_responses_api_items(client):
    """/v1/responses on the same reply: a reasoning item, a message, a function call, whole
    and streamed; the call's output sent back continues the conversation as chat would."""
    regex = r'<think>[a-z]{2,6}</think>ok <tool_call>\{"name": "f", "arguments": \{"x": "(a|b)"\}\}</tool_call>'
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {
        "x": {"enum": ["a", "b"]}}, "required": ["x"]}}]
    kwargs = dict(model=MODEL, input=MESSAGES, tools=tools, temperature=0, max_output_tokens=200,
                  extra_body={"structured_outputs": {"regex": regex}})
    resp = client.responses.create(**kwargs)
    reasoning, message, call = resp.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text.isalpha()
    assert message.type == "message" and resp.output_text == "ok "
    assert call.type == "function_call" and call.name == "f" and json.loads(call.arguments)["x"] in ("a", "b")
    assert call.call_id.startswith("chatcmpl-tool-") and resp.status == "completed"
    assert resp.usage.output_tokens_details.reasoning_tokens > 0
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    for kind in ("response.reasoning_text.delta", "response.output_text.delta",
                 "response.function_call_arguments.delta", "response.function_call_arguments.done"):
        assert kind in kinds, kind
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in done] == ["reasoning", "message", "function_call"]
    assert (done[0].content[0].text, done[2].name, done[2].arguments) == (
        reasoning.content[0].text, "f", call.arguments)
    assert [i.type for i in events[-1].response.output] == ["reasoning", "message", "function_call"]
    # the call's result, sent back: the prompt is chat's for the same conversation
    follow = client.responses.create(model=MODEL, previous_response_id=resp.id, max_output_tokens=3, temperature=0,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "done"}])
    chat = client.chat.completions.create(model=MODEL, max_tokens=3, temperature=0, messages=[
        *MESSAGES, {"role": "assistant", "content": "ok ", "reasoning_content": reasoning.content[0].text,
                    "tool_calls": [{"id": call.call_id, "type": "function",
                                    "function": {"name": "f", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "done"}])
    assert follow.usage.input_tokens == chat.usage.prompt_tokens
    assert follow.output_text == chat.choices[0].message.content
