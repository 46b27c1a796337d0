"""Streamed tool calls of every format (call_stream.py, json_prefix.py): fed in chunks of any
size, the content and the calls' pieces add up exactly to what the whole-output parser gives
(names, arguments text, ids), and arguments go out while they are generated, a long string
argument character by character."""

from __future__ import annotations

import json
import random

import pytest

from pagedserve.entrypoints.openai.json_prefix import JsonObjectPrefix, dumps
from pagedserve.entrypoints.openai.tool_calls import parser_for

ARGS = {"path": "src/app.py", "content": 'def f(x):\n    return "é\\t✓ 😀" + x  # {"not": [json]}\n',
        "n": 12, "ok": True, "opts": {"mode": "w", "tags": ["a", "b"]}, "ratio": 0.5, "none": None}
RAW = json.dumps(ARGS)  # as a model writes it: \n, \" and \u escapes in the strings
SMALL = '{"city": "Paris"}'


def _tools():
    from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest

    props = {"path": {"type": "string"}, "content": {"type": "string"}, "n": {"type": "integer"},
             "ok": {"type": "boolean"}, "opts": {"type": "object"}, "ratio": {"type": "number"},
             "none": {"type": "null"}, "city": {"type": "string"}}
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": props}}}
             for n in ("write", "get_weather")]
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools).tools


def _qwen(name: str, args: dict) -> str:
    params = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
                     for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def _glm(name: str, args: dict) -> str:
    pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v if isinstance(v, str) else json.dumps(v)}</arg_value>\n"
                    for k, v in args.items())
    return f"<tool_call>{name}\n{pairs}</tool_call>"


DS_CALL, DS_SEP, DS_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
DS_BEGIN, DS_CLOSE = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
KIMI_BEGIN, KIMI_CLOSE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"


def _kimi(name: str, args: str, i: int) -> str:
    return f"<|tool_call_begin|>functions.{name}:{i}<|tool_call_argument_begin|>{args}<|tool_call_end|>"


CASES = {
    "mistral": ["Sure. [TOOL_CALLS][" + json.dumps({"name": "write", "arguments": ARGS}) + ", "
                + json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}) + "]",
                "[TOOL_CALLS]write[ARGS]" + RAW + "[TOOL_CALLS]get_weather[CALL_ID]123456789[ARGS]" + SMALL,
                '[TOOL_CALLS] {"name": "s", "arguments": "{\\"k\\": 2}"}'],  # arguments as a JSON string
    "granite": ["<|tool_call|>[" + json.dumps({"name": "write", "arguments": ARGS}) + "]",
                ' [{"name": "get_weather", "arguments": ' + SMALL + '}, {"name": "ping"}]'],
    "phi4_mini_json": ["functools[" + json.dumps({"name": "write", "arguments": ARGS}) + "]"],
    "qwen3_coder": ["Let me write it.\n" + _qwen("write", ARGS) + "\n" + _qwen("get_weather", {"city": "Rome"}),
                    _qwen("get_weather", {}) + _qwen("write", {"content": "tail <para\n\n"})],
    "glm45": ["Writing." + _glm("write", ARGS) + _glm("get_weather", {"city": "Rome"}), _glm("ping", {})],
    "deepseek_v3": ["OK" + DS_BEGIN + f"{DS_CALL}function{DS_SEP}write\n```json\n{RAW}\n```{DS_END}"
                    + f"{DS_CALL}function{DS_SEP}get_weather\n```json\n{SMALL}\n```{DS_END}" + DS_CLOSE],
    "deepseek_v31": ["OK" + DS_BEGIN + f"{DS_CALL}write{DS_SEP}{RAW}{DS_END}{DS_CALL}get_weather{DS_SEP}{SMALL}{DS_END}"
                     + DS_CLOSE],
    "pythonic": ["[write(" + ", ".join(f"{k}={v!r}" for k, v in ARGS.items()) + "), get_weather(city='Paris')]",
                 "<|python_start|>[ping(), f(x=[1, (2, 3)], s=\"\"\"it's \"quoted, or not)\"\n\"\"\", d={'a': ')'})]"
                 "<|python_end|>"],
    "kimi_k2": ["Look. " + KIMI_BEGIN + _kimi("write", RAW, 0) + " " + _kimi("get_weather", SMALL, 1) + KIMI_CLOSE],
}


def _assemble(pieces: list) -> list[tuple]:
    calls: dict = {}
    for index, name, args, call_id in pieces:
        if name is not None:
            assert index not in calls and args == ""  # the first piece names the call (and gives its id)
            calls[index] = [name, "", call_id]
        else:
            calls[index][1] += args
    return [tuple(calls[i]) for i in sorted(calls)]


def _run(parser: str, text: str, cuts: list[int]) -> tuple[str, list[tuple], list, list[tuple]]:
    """(content, [(name, arguments, id)], pieces, the calls as they stood before finish) of
    `text` cut at `cuts` and fed to the stream."""
    parse, make = parser_for(parser, _tools())
    s = make()
    content, pieces, at = "", [], 0
    for cut in cuts + [len(text)]:
        content += s.feed(text[at:cut])
        pieces += s.take_call_pieces()
        at = cut
    fed = _assemble(pieces)
    rest, whole = s.finish()
    assert whole == []  # every call went out in pieces
    pieces += s.take_call_pieces()
    return content + rest, _assemble(pieces), pieces, fed


@pytest.mark.parametrize("parser", sorted(CASES))
def test_pieces_add_up_to_the_whole_output_parse(parser):
    rng = random.Random(parser)
    parse, _ = parser_for(parser, _tools())
    for text in CASES[parser]:
        want_content, want = parse(text)
        assert want, text  # (the cases are well-formed)
        want_calls = [(c.name, c.arguments, c.id) for c in want]
        for size in (1, 2, 3, 7, 1000):
            got = _run(parser, text, list(range(size, len(text), size)))
            assert got[:2] == (want_content, want_calls), size
            # Every call of these replies is whole before the output ends: sent by then, not by finish.
            assert got[3] == want_calls, size
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 40))))
            assert _run(parser, text, cuts)[:2] == (want_content, want_calls)


@pytest.mark.parametrize("parser", sorted(CASES))
def test_arguments_stream_while_generated(parser):
    """One character at a time: the long call's arguments arrive in many pieces, most of them
    before its text is over (the string content character by character)."""
    text = CASES[parser][0]
    _, calls, pieces, _ = _run(parser, text, list(range(1, len(text))))
    (index,) = [i for i, c in enumerate(calls) if c[0] == "write"]
    args_pieces = [p for p in pieces if p[0] == index and p[1] is None]
    # (pythonic: each keyword argument once complete, then the closing brace)
    assert len(args_pieces) > 40 or parser == "pythonic" and len(args_pieces) == len(ARGS) + 1, len(args_pieces)
    assert json.loads(calls[index][1]) == ARGS


def test_malformed_output_stays_content():
    """A call that never gets a name sends nothing: the whole output is content, as the
    whole-output parser says."""
    for parser, text in (("mistral", "[TOOL_CALLS][{\"nam\": 1}]"), ("qwen3_coder", "Hi <tool_call>\n<nonsense>"),
                         ("deepseek_v31", "OK" + DS_BEGIN + "nothing"), ("granite", "[not json")):
        parse, _ = parser_for(parser, _tools())
        assert _run(parser, text, list(range(1, len(text))))[:2] == (text, []) == parse(text)


def test_json_object_prefix_settles_a_prefix_of_the_normalized_text():
    rng = random.Random(0)
    for raw in (RAW, "  {}", '{"a" : [1, {"b": "}"}] , "c":"\\ud83d\\ude00\\"x\\\\"}', '{"k":1e3}'):
        want = dumps(json.loads(raw))
        for _ in range(50):
            p, prev, at = JsonObjectPrefix(0), "", 0
            while at < len(raw):
                at += rng.randint(1, 4)
                out = p.update(raw[:at])
                assert want.startswith(out) and out.startswith(prev)
                prev = out
            assert out == want and p.end == len(raw)


def test_required_calls_stream_too():
    """tool_choice "required" (a JSON array of {"name", "parameters"}): pieces add up to
    parse_required's calls at every chunking."""
    from pagedserve.entrypoints.openai.tool_calls import RequiredStream, parse_required

    text = json.dumps([{"name": "write", "parameters": ARGS}, {"name": "get_weather", "parameters": {"city": "Rome"}}])
    want = [(c.name, c.arguments) for c in parse_required(text)]
    for size in (1, 3, 50):
        s, pieces = RequiredStream(), []
        for i in range(0, len(text), size):
            assert s.feed(text[i:i + size]) == ""
            pieces += s.take_call_pieces()
        assert s.finish() == ("", [])
        pieces += s.take_call_pieces()
        got: dict = {}
        for index, name, args, _ in pieces:
            got[index] = (got[index][0], got[index][1] + args) if name is None else (name, "")
        assert list(got.values()) == want and (size > 1 or len(pieces) > 60)
