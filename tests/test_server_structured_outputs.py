"""Structured outputs through the server: OpenAI's response_format (json_schema, json_object,
and vLLM's structural_tag), vLLM's structured_outputs object and its older guided_* fields give
the offline engine's constrained output; a bad constraint is a 400 naming the field the client
used."""

from __future__ import annotations

import httpx
import pytest
from server_fixtures import MODEL, client, offline, server  # noqa: F401 (fixtures)
from server_helpers import no_requests_left, wait_for

from pagedserve import LLM, SamplingParams

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "n": {"type": "integer",
          "minimum": 0, "maximum": 9}}, "required": ["color", "n"], "additionalProperties": False}
PROMPT = "the value of an object is"
# vLLM's response_format of type structural_tag, in xgrammar's format: a fixed opening, then JSON
TAG = {"format": {"type": "sequence", "elements": [{"type": "const_string", "value": "Answer: "},
                                                  {"type": "json_schema", "json_schema": {"enum": ["a", "b"]}}]}}


def _offline_text(offline: LLM, **spec) -> str:
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=spec)
    return offline.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].text


@pytest.mark.parametrize("body, spec", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}}, dict(json=SCHEMA)),
    ({"response_format": {"type": "json_object"}}, dict(json_object=True)),
    ({"structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}}, dict(regex="[a-c]{3}-[0-9]{2}")),
    ({"guided_choice": ["yes", "no", "maybe"]}, dict(choice=["yes", "no", "maybe"])),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "xgrammar"}, dict(json=SCHEMA)),
    ({"guided_regex": "[0-9]{4}"}, dict(regex="[0-9]{4}")),
    ({"guided_grammar": 'root ::= "x" [0-9]'}, dict(grammar='root ::= "x" [0-9]')),
    ({"response_format": {"type": "structural_tag", **TAG}}, dict(structural_tag={"type": "structural_tag", **TAG})),
])
def test_completion_fields_map_to_the_engines_constraint(client, offline, body, spec):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, extra_body=body)
    assert r.choices[0].text == _offline_text(offline, **spec)


def test_chat_json_schema_streamed_and_whole(client, server, offline):
    messages = [{"role": "user", "content": "Give me a color."}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                  response_format={"type": "json_schema", "json_schema": {"name": "color", "schema": SCHEMA,
                                                                          "strict": True}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=40, structured_outputs={"json": SCHEMA}),
                       use_tqdm=False)[0].outputs[0].text
    assert whole == streamed == ref and whole.lstrip().startswith("{")
    wait_for(lambda: no_requests_left(server.llm), 10, "requests to drain")


@pytest.mark.parametrize("body, param, match", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "invalid json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", ""),
    ({"guided_regex": "[a-"}, "guided_regex", "invalid regex"),
    ({"response_format": {"type": "structural_tag", "structures": [{"begin": "<f>"}], "triggers": ["<f>"]}},
     "response_format", "invalid structural_tag"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar", "invalid grammar"),
    ({"structured_outputs": {"regex": "a", "nope": 1}}, "structured_outputs", "unknown field"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"guided_json": SCHEMA, "response_format": {"type": "json_object"}}, "guided_json", "only one"),
    ({"guided_regex": "a", "guided_whitespace_pattern": " "}, "guided_regex", "whitespace_pattern"),
    ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend", "xgrammar"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_constraints_are_400_naming_the_field(server, body, param, match, stream):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": stream, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and match in err["message"], err
    assert "/project/" not in err["message"]  # xgrammar's C++ source paths are cut out
    assert no_requests_left(server.llm)
