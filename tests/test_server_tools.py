"""Function calling on /v1/chat/completions, through the official openai client: a named
tool_choice and "required" give calls whose arguments fit the tools' schemas; "auto" with
the hermes parser takes `<tool_call>` blocks out of the text, streamed and whole; tools and
earlier tool calls reach the chat template; misuse is a 400 naming the field."""

from __future__ import annotations

import json

import httpx
import pytest
from server_helpers import no_requests_left, openai_client, serving, wait_for

from pagedserve.entrypoints.openai.tool_calls import HermesStream, parse_hermes

pytest.importorskip("xgrammar")

MODEL = "tiny-llama"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                                     "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# A Hermes-style answer, forced with a regex so that a random model writes it.
HERMES_TEXT = (r'Sure\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-7]\}\}'
               r'</tool_call>')


@pytest.fixture(scope="module")
def server(llama_dir):
    with serving(llama_dir, MODEL, tool_call_parser="hermes", trust_request_chat_template=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server) as c:
        yield c


def _check_weather_args(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "days"} and args["city"] in ("Paris", "Rome") and 1 <= args["days"] <= 7


def test_named_function_whole_and_streamed(client, server):
    kwargs = dict(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], temperature=0, max_tokens=60,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = client.chat.completions.create(**kwargs).choices[0]
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    _check_weather_args(call.function.arguments)
    assert choice.message.content == "" and choice.finish_reason == "stop"  # vLLM's answer for a named call

    chunks = [c.choices[0].delta for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    parts = [tc for d in chunks for tc in d.tool_calls or []]
    assert parts[0].id and parts[0].function.name == "get_weather" and all(p.index == 0 for p in parts)
    assert all(p.id is None and p.function.name is None for p in parts[1:])
    assert "".join(p.function.arguments or "" for p in parts) == call.function.arguments
    wait_for(lambda: no_requests_left(server.llm), 10, "requests to drain")


@pytest.mark.parametrize("stream", [False, True])
def test_required_gives_one_valid_call(client, stream):
    """parallel_tool_calls=False: exactly one call (a random model would go on adding calls)."""
    kwargs = dict(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required", temperature=0.8,
                  seed=5, max_tokens=120, n=2, parallel_tool_calls=False)
    if stream:
        calls: dict[int, list] = {0: [], 1: []}
        finish = {}
        for c in client.chat.completions.create(stream=True, **kwargs):
            for ch in c.choices:
                calls[ch.index] += ch.delta.tool_calls or []
                finish[ch.index] = ch.finish_reason or finish.get(ch.index)
        assert all(len(calls[i]) > 2 for i in (0, 1))  # the name, then the arguments as generated
        results = [(_joined(calls[i]), finish[i]) for i in (0, 1)]
    else:
        results = [([(t.function.name, t.function.arguments) for t in ch.message.tool_calls], ch.finish_reason)
                   for ch in client.chat.completions.create(**kwargs).choices]
    for tool_calls, finish in results:
        assert finish == "tool_calls" and len(tool_calls) == 1
        for name, arguments in tool_calls:
            assert name in ("get_weather", "get_time")
            if name == "get_weather":
                _check_weather_args(arguments)
            else:
                assert json.loads(arguments)["zone"] in ("UTC", "CET")


def test_auto_with_the_hermes_parser(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, tools=[WEATHER], temperature=0, max_tokens=200,
                  extra_body={"structured_outputs": {"regex": HERMES_TEXT}})  # tool_choice: "auto" by default
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure. "
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    _check_weather_args(call.function.arguments)

    content, calls, finish = "", [], None
    for c in client.chat.completions.create(stream=True, **kwargs):
        d = c.choices[0].delta
        content += d.content or ""
        calls += d.tool_calls or []
        finish = c.choices[0].finish_reason or finish
    assert content == "Sure. " and finish == "tool_calls"
    # The call's name first (with its id), then its arguments in pieces as they are generated.
    assert calls[0].function.name == "get_weather" and calls[0].id and len(calls) > 2
    assert all(tc.index == 0 and tc.function.name is None and tc.id is None for tc in calls[1:])
    assert "".join(tc.function.arguments or "" for tc in calls) == call.function.arguments

    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER], temperature=0,
                                           max_tokens=8).choices[0]
    assert plain.message.tool_calls == [] and plain.finish_reason == "length"  # no call in the text: plain content


def test_tools_and_earlier_calls_reach_the_chat_template(client, server):
    """Tools are handed to the template; an assistant turn's call arguments arrive as a mapping."""
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}"
                "{% if m.tool_calls %}<{{ m.tool_calls[0].function.arguments.city }}>{% endif %}"
                "{{ m.content }}{% endfor %}")
    history = MESSAGES + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Rome", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME], tool_choice="none",
                                       max_tokens=1, extra_body={"chat_template": template})
    tok = server.llm.tokenizer
    want = tok.encode("[get_weather][get_time]What is the weather in Paris?<Rome>sunny", add_special_tokens=False)
    assert r.usage.prompt_tokens == len(want)
    counted = httpx.post(f"{server.url}/tokenize", json={"messages": history, "tools": [WEATHER, TIME],
                                                          "chat_template": template}).json()
    assert counted["tokens"] == want  # /tokenize renders the tools as the chat request does


@pytest.mark.parametrize("body, param, match", [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not one of the tools"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools", "unique"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools", "invalid json"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
])
def test_misuse_is_400(server, body, param, match):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and match in err["message"], err
    assert no_requests_left(server.llm)


def test_auto_needs_a_parser_and_request_templates_need_trust(llama_dir):
    with serving(llama_dir, MODEL) as srv:  # no --enable-auto-tool-choice, no --trust-request-chat-template
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4,
                                                                "chat_template": "{{ messages[0].content }}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template", r.text
        for body in ({"tools": [WEATHER]}, {"tools": [WEATHER], "tool_choice": "auto"}):
            r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
            assert "--enable-auto-tool-choice" in r.json()["error"]["message"]
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4,
                                                                "tools": [WEATHER], "tool_choice": "none"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] == []


# ---- the hermes parser alone ----------------------------------------------------------------
def test_parse_hermes():
    text = 'Let me check. <tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>{"name": "b", ' \
           '"arguments": {}}</tool_call>'
    content, calls = parse_hermes(text)
    assert content == "Let me check. " and [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}),
                                                                                                ("b", {})]
    assert parse_hermes("no calls here") == ("no calls here", [])
    assert parse_hermes('<tool_call>{"name": broken') == ('<tool_call>{"name": broken', [])  # nothing is lost
    content, calls = parse_hermes('<tool_call>{"name": "a", "arguments": {"y": 2}}')  # unclosed at the end
    assert content == "" and calls[0].name == "a"


def _streamed(text: str, size: int, stream=HermesStream) -> tuple[str, list[tuple[str, str]], list]:
    """(content, [(name, arguments)] assembled from the call pieces (or, for a stream that
    sends calls whole, from its finish), the pieces) of `text` fed `size` characters at a
    time to a new `stream()`."""
    s = stream()
    content, pieces = "", []
    for i in range(0, len(text), size):
        content += s.feed(text[i:i + size])
        pieces += s.take_call_pieces() if getattr(s, "streams_calls", False) else []
    rest, whole = s.finish()
    content += rest
    if not getattr(s, "streams_calls", False):
        return content, [(c.name, c.arguments) for c in whole], []
    pieces += s.take_call_pieces()
    calls: dict = {}
    for index, name, args, *_ in pieces:
        if name is not None:
            assert index not in calls and args == ""  # a call's first piece names it
            calls[index] = [name, ""]
        else:
            calls[index][1] += args
    return content, [tuple(calls[i]) for i in sorted(calls)], pieces


def _joined(deltas) -> list[tuple[str, str]]:
    """Streamed tool-call deltas joined by index: the name from the first, the arguments
    concatenated."""
    joined: dict = {}
    for t in deltas:
        name, args = joined.get(t.index, (None, ""))
        joined[t.index] = (name or t.function.name, args + (t.function.arguments or ""))
    return list(joined.values())


@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
def test_hermes_stream_holds_back_what_may_be_a_tag(size):
    text = 'Hi <tool <tool_call>{"name": "a", "arguments": {"x": "<tool_call>"}}</tool_call>'
    content, calls, _ = _streamed(text, size)
    assert content == "Hi <tool " and calls == [("a", '{"x": "<tool_call>"}')]
    s = HermesStream()
    head = text[:8]  # "Hi <tool": ends like the start of a tag, but no call follows
    streamed = "".join(s.feed(head[i:i + size]) for i in range(0, len(head), size))
    assert streamed == "Hi " and streamed + s.finish()[0] == head  # held back, then all of it is content


HERMES_CASES = [
    'Let me check. <tool_call>\n{"name": "a", "arguments": {"x": 1, "y": [1, {"z": "}]\\""}]}}\n</tool_call>\n'
    '<tool_call>{"name": "b", "arguments": {}}</tool_call>',
    '<tool_call>{"arguments": {"q": "first"}, "name": "late"}</tool_call>',  # the name after the arguments
    '<tool_call>{"name": "s", "arguments": "{\\"k\\": 2}"}</tool_call>',  # arguments as a JSON string
    '<tool_call>{"name": "n", "parameters": {"p": true}}</tool_call><tool_call>{"name": "none"}</tool_call>',
    '<tool_call>{"name": "open", "arguments": {"a": 1}}',  # unclosed at the end of the output
]


@pytest.mark.parametrize("size", [1, 2, 7, 1000])
def test_hermes_streams_arguments_as_they_come(size):
    """At every chunk size the pieces add up to what the whole-output parser gives, and the
    arguments of an object value go out before the call is over."""
    for text in HERMES_CASES:
        content, calls, pieces = _streamed(text, size)
        want_content, want = parse_hermes(text)
        assert content == want_content and calls == [(c.name, c.arguments) for c in want], text
    _, calls, pieces = _streamed(HERMES_CASES[0], 1)
    assert calls[0] == ("a", '{"x": 1, "y": [1, {"z": "}]\\""}]}')
    assert sum(1 for p in pieces if p[0] == 0) > 10  # one piece a character: streamed as generated
    assert _streamed(HERMES_CASES[2], 3)[1] == [("s", '{"k": 2}')]  # a string value: decoded, whole
    assert _streamed(HERMES_CASES[3], 3)[1] == [("n", '{"p": true}'), ("none", "{}")]
    broken = '<tool_call>{"nam": "x"}</tool_call>'  # never named: all content, as the whole-output parser
    assert _streamed(broken, 2)[:2] == (broken, [])


# ---- the llama3_json parser ---------------------------------------------------------------
def test_parse_llama3_json():
    from pagedserve.entrypoints.openai.tool_calls import parse_llama3_json

    content, calls = parse_llama3_json('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", '
                                       '"parameters": {}}')
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {})]
    assert parse_llama3_json(' {"name": "a", "arguments": {"y": [1]}}')[1][0].arguments == '{"y": [1]}'
    for text in ("Paris is sunny.", '{"name": "a", "parameters": {"x": ', '{"no_name": 1}', '{"name": "a"} trailing'):
        assert parse_llama3_json(text) == (text, [])  # not (well-formed) calls: all content


@pytest.mark.parametrize("size", [1, 3, 8, 100])
def test_llama3_json_stream(size):
    from pagedserve.entrypoints.openai.tool_calls import Llama3JsonStream, parse_llama3_json

    for text in ('<|python_tag|>{"name": "a", "parameters": {"x": 1}}', '  {"name": "a", "parameters": {}}',
                 '{"name": "a", "parameters": {"x": [1, "}"]}}; {"name": "b", "arguments": {"y": 2}}',
                 "It is <|python_tag|> sunny", "<|pyth", "", '{"broken'):
        content, calls, pieces = _streamed(text, size, Llama3JsonStream)
        want_content, want_calls = parse_llama3_json(text)
        assert content == want_content and calls == [(c.name, c.arguments) for c in want_calls], text
    # The arguments go out as they are generated.
    assert len(_streamed('{"name": "a", "parameters": {"x": 12345}}', 1, Llama3JsonStream)[2]) > 5


# ---- the mistral and pythonic parsers -------------------------------------------------------
def test_parse_mistral():
    from pagedserve.entrypoints.openai.tool_calls import parse_mistral

    content, calls = parse_mistral('Checking. [TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, '
                                   '{"name": "b", "arguments": {}}]')
    assert content == "Checking. " and [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}),
                                                                                             ("b", {})]
    # The newer tokenizers' form: one tag per call, name[ARGS]{...} (a call id may sit between).
    content, calls = parse_mistral('[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[CALL_ID]123456789[ARGS]{}')
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {})]
    for text in ("no calls", '[TOOL_CALLS] [{"name": "a", "argu', "[TOOL_CALLS]a{}", "[TOOL_CALLS]"):
        assert parse_mistral(text) == (text, [])  # nothing the model wrote is lost


def test_parse_pythonic():
    from pagedserve.entrypoints.openai.tool_calls import parse_pythonic

    content, calls = parse_pythonic('[get_weather(city="Paris", days=2), get_time(zone=\'UTC\', dst=None, x=[1, '
                                    '{"a": True}])]')
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("get_time", {"zone": "UTC", "dst": None, "x": [1, {"a": True}]})]
    assert parse_pythonic("<|python_start|>[f(x=1)]<|python_end|>")[1][0].arguments == '{"x": 1}'
    # Not calls (or not literal arguments: nothing is evaluated): all content.
    for text in ("Paris is sunny.", "[1, 2]", "[f(1)]", "[f(x=g())]", "[f(**k)]", "[os.system(c='ls')]", "[f(x=",
                 "[]"):
        assert parse_pythonic(text) == (text, [])


@pytest.mark.parametrize("size", [1, 4, 100])
def test_mistral_and_pythonic_streams(size):
    from pagedserve.entrypoints.openai.tool_calls import TOOL_PARSERS

    cases = {"mistral": ['Hi [TOOL [TOOL_CALLS] [{"name": "a", "arguments": {"x": "[TOOL_CALLS]"}}]', "Hi [TOOL_",
                         "plain text"],
             "pythonic": ['[f(x="[")]', "  <|python_start|>[f(x=1)]<|python_end|>", "[not a call", "It is sunny",
                          "<|python"],
             "granite": ['<|tool_call|>[{"name": "a", "arguments": {"x": 1}}]', ' [{"name": "b", "arguments": {}}]',
                         "<tool_call>[not json", "Sunny.", "<|tool"],
             "phi4_mini_json": ['functools[{"name": "a", "arguments": {"x": "]"}}]', "functools[oops", "It rains."],
             "qwen3_coder": ["Hi <tool_call>\n<function=f>\n<parameter=x>\n<tool_call>\n</parameter>\n</function>\n"
                             "</tool_call>", "Hi <tool_", "plain text"]}
    for name, texts in cases.items():
        parse, make = TOOL_PARSERS[name]
        for text in texts:
            content, calls, _ = _streamed(text, size, make)
            want_content, want_calls = parse(text)
            assert content == want_content, (name, text)
            assert calls == [(c.name, c.arguments) for c in want_calls]
            if want_calls:
                assert "[TOOL_CALLS]" not in content and "f(" not in content  # calls never stream as content


@pytest.mark.parametrize("parser, regex", [
    ("llama3_json", r'\{"name": "get_weather", "parameters": \{"city": "(Paris|Rome)", "days": [1-7]\}\}'),
    ("mistral", r'Sure\. \[TOOL_CALLS\]\[\{"name": "get_weather", "arguments": '
                r'\{"city": "(Paris|Rome)", "days": [1-7]\}\}\]'),
    ("pythonic", r'\[get_weather\(city="(Paris|Rome)", days=[1-7]\)\]'),
    ("granite", r'<\|tool_call\|>\[\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-7]\}\}\]'),
    ("phi4_mini_json", r'functools\[\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-7]\}\}\]')])
def test_auto_with_the_other_parsers(llama_dir, parser, regex):
    """Replies forced into each format with a regex: one call, whole and streamed; a reply in
    plain text is content."""
    with serving(llama_dir, MODEL, tool_call_parser=parser) as srv, openai_client(srv) as client:
        kwargs = dict(model=MODEL, messages=MESSAGES, tools=[WEATHER], temperature=0, max_tokens=200,
                      extra_body={"structured_outputs": {"regex": regex}})
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls"
        assert (choice.message.content or "") == ("Sure. " if parser == "mistral" else "")
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        _check_weather_args(call.function.arguments)
        calls, content = [], ""
        for c in client.chat.completions.create(stream=True, **kwargs):
            calls += c.choices[0].delta.tool_calls or []
            content += c.choices[0].delta.content or ""
        assert content == (choice.message.content or "")
        assert _joined(calls) == [("get_weather", call.function.arguments)]
        assert len(calls) > 2  # the name, then the arguments as they are generated
        plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER], temperature=0,
                                               max_tokens=8, extra_body={"structured_outputs": {"regex": "[a-z ]+"}})
        assert plain.choices[0].message.tool_calls == [] and plain.choices[0].message.content  # text: content


def _tools(*specs):
    from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest

    req = ChatCompletionRequest(model=MODEL, messages=MESSAGES, tools=list(specs))
    return req.tools


def test_parse_granite_and_phi4_mini():
    from pagedserve.entrypoints.openai.tool_calls import parse_granite, parse_phi4_mini_json

    two = '[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "parameters": {"y": "z"}}]'
    for text in ("<|tool_call|>" + two, "<tool_call> " + two, two):
        content, calls = parse_granite(text)
        assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}),
                                                                                         ("b", {"y": "z"})]
    content, calls = parse_phi4_mini_json("functools" + two)
    assert content == "" and [c.name for c in calls] == ["a", "b"]
    for text in ("It is sunny.", "<|tool_call|>[oops", "[1, 2]", ""):
        assert parse_granite(text) == (text, [])
    for text in ("It is sunny.", "functools[oops", "use functools[...] here"):
        assert parse_phi4_mini_json(text) == (text, [])


def test_parse_qwen3_coder():
    """Values typed by the tool's schema: a string stays a string even when it reads as a
    number; an integer, a boolean, an array and an object become JSON values; a parameter the
    schema does not know is JSON where it reads as JSON."""
    from pagedserve.entrypoints.openai.tool_calls import parse_qwen3_coder

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "code": {"type": "string"}, "n": {"type": "integer"}, "ok": {"type": "boolean"},
        "xs": {"type": "array"}, "cfg": {"type": "object"}, "x": {"type": "number"}}}}}
    text = ("Let me check.\n<tool_call>\n<function=f>\n<parameter=code>\n007\n</parameter>\n<parameter=n>\n12\n"
            "</parameter>\n<parameter=ok>\nTrue\n</parameter>\n<parameter=xs>\n[1, \"a\"]\n</parameter>\n"
            "<parameter=cfg>\n{'k': 2}\n</parameter>\n<parameter=x>\n2.5\n</parameter>\n<parameter=extra>\n3\n"
            "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=g>\n<parameter=q>\nmulti\nline\n"
            "</parameter>\n</function>\n</tool_call>")
    content, calls = parse_qwen3_coder(text, _tools(tool))
    assert content == "Let me check.\n"
    assert [c.name for c in calls] == ["f", "g"]
    assert json.loads(calls[0].arguments) == {"code": "007", "n": 12, "ok": True, "xs": [1, "a"], "cfg": {"k": 2},
                                              "x": 2.5, "extra": 3}
    assert json.loads(calls[1].arguments) == {"q": "multi\nline"}
    assert parse_qwen3_coder("no calls here") == ("no calls here", [])
    assert parse_qwen3_coder("<tool_call>\n<nonsense>") == ("<tool_call>\n<nonsense>", [])


@pytest.mark.parametrize("parser, regex", [
    ("qwen3_coder", r"<tool_call>\n<function=get_weather>\n<parameter=city>\n(Paris|Rome)\n</parameter>\n"
                    r"<parameter=days>\n[1-7]\n</parameter>\n</function>\n</tool_call>"),
    ("glm45", r"<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>(Paris|Rome)</arg_value>\n"
              r"<arg_key>days</arg_key>\n<arg_value>[1-7]</arg_value>\n</tool_call>")])
def test_auto_with_the_schema_typed_parsers(llama_dir, parser, regex):
    """A reply forced into Qwen3-Coder's or GLM-4.5's format: the days come back as an integer
    because the schema says so; whole and streamed alike."""
    with serving(llama_dir, MODEL, tool_call_parser=parser) as srv, openai_client(srv) as client:
        kwargs = dict(model=MODEL, messages=MESSAGES, tools=[WEATHER], temperature=0, max_tokens=200,
                      extra_body={"structured_outputs": {"regex": regex}})
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        _check_weather_args(call.function.arguments)
        assert isinstance(json.loads(call.function.arguments)["days"], int)
        calls = []
        for c in client.chat.completions.create(stream=True, **kwargs):
            calls += c.choices[0].delta.tool_calls or []
            assert not c.choices[0].delta.content
        assert _joined(calls) == [("get_weather", call.function.arguments)]
        assert len(calls) > 1  # the name, then each parameter as it completes


DS = {"begin": "<｜tool▁calls▁begin｜>", "call": "<｜tool▁call▁begin｜>", "sep": "<｜tool▁sep｜>",
      "end": "<｜tool▁call▁end｜>", "close": "<｜tool▁calls▁end｜>"}


def _ds_v3(name: str, args: str) -> str:
    return f"{DS['call']}function{DS['sep']}{name}\n```json\n{args}\n```{DS['end']}"


def _ds_v31(name: str, args: str) -> str:
    return f"{DS['call']}{name}{DS['sep']}{args}{DS['end']}"


KIMI = {"begin": "<|tool_calls_section_begin|>", "close": "<|tool_calls_section_end|>"}


def _kimi(name: str, args: str, i: int = 0) -> str:
    return f"<|tool_call_begin|>functions.{name}:{i}<|tool_call_argument_begin|>{args}<|tool_call_end|>"


def test_parse_kimi_k2():
    from pagedserve.entrypoints.openai.tool_calls import parse_kimi_k2

    body = _kimi("get_weather", '{"city": "Paris"}') + " " + _kimi("f", "{}", 1) + KIMI["close"]
    for begin in (KIMI["begin"], "<|tool_call_section_begin|>"):  # either spelling of the section
        content, calls = parse_kimi_k2("Look. " + begin + body)
        assert content == "Look. " and [(c.name, c.id) for c in calls] == [
            ("get_weather", "functions.get_weather:0"), ("f", "functions.f:1")]  # the model's own ids


@pytest.mark.parametrize("parser, call, marks", [("deepseek_v3", _ds_v3, DS), ("deepseek_v31", _ds_v31, DS),
                                                 ("kimi_k2", _kimi, KIMI)])
def test_parse_call_sections(parser, call, marks):
    from pagedserve.entrypoints.openai.tool_calls import TOOL_PARSERS

    parse, make = TOOL_PARSERS[parser]
    calls = call("get_weather", '{"city": "Paris"}') + call("f", "{}")
    text = "Let me look. " + marks["begin"] + calls + marks["close"]
    content, calls = parse(text)
    assert content == "Let me look. "
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("f", {})]
    for bad in ("It is sunny.", marks["begin"] + call("f", "[1, 2]"), marks["begin"] + call("f", "{oops"),
                marks["begin"] + "nothing"):
        assert parse(bad) == (bad, [])
    for size in (1, 3, 100):  # streamed: the content before the marker only, then the calls
        content, got, _ = _streamed(text, size, make)
        assert content == "Let me look. " and got == [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("parser, call, marks", [("deepseek_v3", _ds_v3, DS), ("deepseek_v31", _ds_v31, DS),
                                                 ("kimi_k2", _kimi, KIMI)])
def test_auto_with_marker_section_parsers(llama_dir, parser, call, marks):
    """A reply forced (by a regex) into DeepSeek's or Kimi K2's format: the call, whole and
    streamed (Kimi's keeps the model's call id)."""
    import re

    pattern = re.escape("OK" + marks["begin"] + call("get_weather", "@")).replace("@", r'\{"city": "(Paris|Rome)"\}')
    with serving(llama_dir, MODEL, tool_call_parser=parser) as srv, openai_client(srv) as client:
        kwargs = dict(model=MODEL, messages=MESSAGES, tools=[WEATHER], temperature=0, max_tokens=200,
                      extra_body={"structured_outputs": {"regex": pattern + re.escape(marks["close"])}})
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "OK"
        (tc,) = choice.message.tool_calls
        assert tc.function.name == "get_weather" and json.loads(tc.function.arguments)["city"] in ("Paris", "Rome")
        assert (tc.id == "functions.get_weather:0") == (parser == "kimi_k2")
        calls, content = [], ""
        for c in client.chat.completions.create(stream=True, **kwargs):
            calls += c.choices[0].delta.tool_calls or []
            content += c.choices[0].delta.content or ""
        assert content == "OK" and _joined(calls) == [("get_weather", tc.function.arguments)]
        assert calls[0].id == tc.id or parser != "kimi_k2"


def test_parse_glm45():
    from pagedserve.entrypoints.openai.tool_calls import TOOL_PARSERS, parse_glm45

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "zip": {"type": "string"}}}}}
    text = ("Checking.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
            "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>zip</arg_key>\n<arg_value>75001</arg_value>\n"
            "</tool_call><tool_call>ping</tool_call>")
    content, calls = parse_glm45(text, _tools(tool))
    assert content == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 3, "zip": "75001"}), ("ping", {})]
    _, untyped = parse_glm45(text)  # no schema: JSON where it reads as JSON
    assert json.loads(untyped[0].arguments)["zip"] == 75001
    for bad in ("plain text", "<tool_call>\n<arg_key>x</arg_key><arg_value>1</arg_value></tool_call>"):
        assert parse_glm45(bad) == (bad, [])
    parse, make = TOOL_PARSERS["glm45"]
    for size in (1, 4, 100):
        content, got, _ = _streamed(text, size, make)
        assert content == "Checking." and [name for name, _ in got] == ["get_weather", "ping"]


# ---- minimax_m2, seed_oss, hunyuan_a13b, xlam (tool_parsers_more.py), qwen3_xml -----------------
TYPED = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "code": {"type": "string"}, "n": {"type": "integer"}, "ok": {"type": "boolean"}, "x": {"type": "number"},
    "cfg": {"type": "object"}, "xs": {"type": "array"}, "unit": {"enum": [1, 2]},
    "maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}}}


def _check_parse(parser: str, text: str, content: str, calls: list, tools=(TYPED,), streamed=True) -> None:
    """The whole-output parse, and the stream at several chunk sizes: the same content and calls
    (each call named first, its argument pieces adding up to the whole-output arguments).
    `streamed=False`: an output whose calls the stream sends before the format turns out not to
    hold them (as vLLM's streaming does)."""
    from pagedserve.entrypoints.openai.tool_calls import parser_for

    parse, make = parser_for(parser, _tools(*tools) if tools else None)
    got_content, got = parse(text)
    assert (got_content, [(c.name, json.loads(c.arguments)) for c in got]) == (content, calls), text
    for size in (1, 3, 1000) if streamed else ():
        assert _streamed(text, size, make)[:2] == (got_content, [(c.name, c.arguments) for c in got]), (text, size)


def parser_for_tools(parser: str, tools):
    from pagedserve.entrypoints.openai.tool_calls import parser_for

    return parser_for(parser, tools)[0]


def _minimax(*invokes: str) -> str:
    return "<minimax:tool_call>\n" + "".join(invokes) + "</minimax:tool_call>"


def _invoke(name: str, **params: str) -> str:
    body = "".join(f'<parameter name="{k}">{v}</parameter>\n' for k, v in params.items())
    return f'<invoke name="{name}">\n{body}</invoke>\n'


def test_minimax_m2_parser():
    """Values stripped and typed by the schema (its type, enum, anyOf): a string stays text, a
    number that is whole is an integer, yes is true, nil is null; a parameter the schema does
    not know stays text. Only closed blocks and invokes are calls."""
    text = "Let me check.\n" + _minimax(_invoke("f", code=" 007 ", n="12", ok="yes", x="2.0", cfg='{"k": [1]}',
                                                 unit="2", maybe="nil", extra="7"),
                                         "<invoke name='g'>\n</invoke>\n") + "\n" + _minimax(_invoke("h", q="a\nb"))
    _check_parse("minimax_m2", text, "Let me check.\n", [
        ("f", {"code": "007", "n": 12, "ok": True, "x": 2, "cfg": {"k": [1]}, "unit": 2, "maybe": None,
               "extra": "7"}), ("g", {}), ("h", {"q": "a\nb"})])
    _, untyped = parser_for_tools("minimax_m2", None)(text)
    assert json.loads(untyped[0].arguments)["n"] == "12"  # no schema: text
    for bad in ("It is sunny.", _minimax("nothing")):
        _check_parse("minimax_m2", bad, bad, [])
    # The block or the invoke never closes: content (a stream has sent the call as far as it went).
    for unclosed in ("<minimax:tool_call>\n" + _invoke("f", n="1"),
                     _minimax('<invoke name="f"><parameter name="n">1</parameter>')):
        _check_parse("minimax_m2", unclosed, unclosed, [], streamed=False)


def test_seed_oss_parser():
    """Values typed by the schema's type name (bool: "true" or not, arrays as Python literals);
    null is null; a parameter the schema does not know stays text; a call inside the closed
    thinking is not read, and the thinking stays content; closing tags are optional."""
    text = ("<seed:think>Maybe <function=f></seed:think>Sure.<seed:tool_call>\n<function=f>\n<parameter=code>\n"
            "007\n</parameter>\n<parameter=n>\n12\n</parameter>\n<parameter=ok>\nTrue\n</parameter>\n<parameter=x>"
            "4.0</parameter><parameter=xs>[1, 'a']</parameter><parameter=cfg>{\"k\": null}</parameter><parameter=extra>"
            "5</parameter><parameter=maybe>null</parameter>\n</function>\n</seed:tool_call><seed:tool_call><function=g>"
            "</function></seed:tool_call>")
    _check_parse("seed_oss", text, "<seed:think>Maybe <function=f></seed:think>Sure.", [
        ("f", {"code": "007", "n": 12, "ok": True, "x": 4, "xs": [1, "a"], "cfg": {"k": None}, "extra": "5",
               "maybe": None}), ("g", {})])
    thinking = "<seed:think>Use <function=g>?</seed:think>"  # (without the block tags, only after the thinking)
    _check_parse("seed_oss", thinking + "OK <function=f><parameter=n>1</parameter></function>", thinking + "OK ",
                 [("f", {"n": 1})])
    # Without the block tags, and unclosed at the end of the output.
    _check_parse("seed_oss", "Hi <function=f><parameter=n>3</parameter><parameter=ok>yes", "Hi ",
                 [("f", {"n": 3, "ok": False})])
    for bad in ("It is sunny.", "<seed:tool_call><function=f"):  # (a name runs to its ">")
        _check_parse("seed_oss", bad, bad, [])
    bad = "<seed:tool_call><function=f><parameter=n</function>"  # a parameter without its ">": content
    _check_parse("seed_oss", bad, bad, [], streamed=False)


def test_hunyuan_a13b_parser():
    """The first <tool_calls> JSON list outside the thinking; items without a name or arguments
    skipped; string arguments as they are."""
    text = ('<think>x <tool_calls>[{"name": "no", "arguments": {}}]</tool_calls> y</think>OK <tool_calls>'
            '[{"name": "f", "arguments": {"n": 1, "s": "é"}}, {"name": "skipped"}, {"name": "g", "arguments": '
            '"{\\"a\\": 2}"}]</tool_calls>')
    _check_parse("hunyuan_a13b", text, text[:text.index("OK") + 3], [("f", {"n": 1, "s": "é"}), ("g", {"a": 2})],
                 tools=None)
    _check_parse("hunyuan_a13b", '<tool_calls>[{"name": "f", "arguments": {}}]</tool_calls>', "", [("f", {})], None)
    for bad in ("It is sunny.", '<tool_calls>{"name": "f", "arguments": {}}</tool_calls>',
                "<tool_calls>[{oops]</tool_calls>", '<tool_calls>[{"name": "f"}]</tool_calls>'):
        _check_parse("hunyuan_a13b", bad, bad, [], None)


@pytest.mark.parametrize("text, content", [
    ('[{"name": "f", "arguments": {"n": 1}}, {"name": "g", "arguments": {}}]', ""),
    ('Sure.\n```json\n[{"name": "f", "arguments": {"n": 1}}, {"name": "g", "arguments": {}}]\n```\nDone.',
     "Sure.\n\nDone."),
    ('Hi [TOOL_CALLS][{"name": "f", "arguments": {"n": 1}}, {"name": "g", "arguments": {}}]', "Hi"),
    ('<tool_call>[{"name": "f", "arguments": {"n": 1}}, {"name": "x"}, {"name": "g", "arguments": {}}]</tool_call>',
     "")])
def test_xlam_parser(text, content):
    """A JSON list of calls: the whole output, in a fence, after [TOOL_CALLS] or in <tool_call>;
    the content is the rest, stripped."""
    _check_parse("xlam", text, content, [("f", {"n": 1}), ("g", {})], None)


def test_xlam_parser_other_outputs():
    _check_parse("xlam", '<think>hm</think>\n[{"name": "f", "arguments": {}}]', "<think>hm</think>", [("f", {})],
                 None)
    for bad in ("It is sunny.", "[1] is the answer", '{"name": "f"}', "```python\nprint(1)\n```",
                '```json\n{"name": "f", "arguments": {}}\n```'):
        _check_parse("xlam", bad, bad, [], None)
    for cut_short in ('[{"name": "f", "arguments": {"n": ', '```json\n[{"name": "f", "arguments": [1]}]\n```'):
        _check_parse("xlam", cut_short, cut_short, [], None, streamed=False)  # (streamed as far as it went)


def test_qwen3_xml_reads_as_qwen3_coder():
    text = ("Checking.\n<tool_call>\n<function=f>\n<parameter=n>\n12\n</parameter>\n<parameter=code>\n007\n"
            "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=g>\n</function>\n</tool_call>")
    _check_parse("qwen3_xml", text, "Checking.\n", [("f", {"n": 12, "code": "007"}), ("g", {})])


@pytest.mark.parametrize("parser, regex", [
    ("minimax_m2", r'OK<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">(Paris|Rome)'
                   r'</parameter>\n<parameter name="days">[1-7]</parameter>\n</invoke>\n</minimax:tool_call>'),
    ("seed_oss", r"OK<seed:tool_call>\n<function=get_weather>\n<parameter=city>\n(Paris|Rome)\n</parameter>\n"
                 r"<parameter=days>\n[1-7]\n</parameter>\n</function>\n</seed:tool_call>"),
    ("hunyuan_a13b", r'OK<tool_calls>\[\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
                     r'"days": [1-7]\}\}\]</tool_calls>'),
    ("xlam", r'OK\n```json\n\[\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-7]\}\}\]'
             r'\n```'),
    ("qwen3_xml", r"OK<tool_call>\n<function=get_weather>\n<parameter=city>\n(Paris|Rome)\n</parameter>\n"
                  r"<parameter=days>\n[1-7]\n</parameter>\n</function>\n</tool_call>")])
def test_auto_with_more_parsers(llama_dir, parser, regex):
    """A reply forced into each format: "OK" is the content, the call's days an integer (the
    schema's type, for the typed formats), whole and streamed alike."""
    with serving(llama_dir, MODEL, tool_call_parser=parser) as srv, openai_client(srv) as client:
        kwargs = dict(model=MODEL, messages=MESSAGES, tools=[WEATHER], temperature=0, max_tokens=200,
                      extra_body={"structured_outputs": {"regex": regex}})
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "OK"
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        _check_weather_args(call.function.arguments)
        assert isinstance(json.loads(call.function.arguments)["days"], int)
        calls, content = [], ""
        for c in client.chat.completions.create(stream=True, **kwargs):
            calls += c.choices[0].delta.tool_calls or []
            content += c.choices[0].delta.content or ""
        assert content == "OK" and _joined(calls) == [("get_weather", call.function.arguments)]
        assert calls[0].function.name == "get_weather" and calls[0].id and len(calls) > 1
