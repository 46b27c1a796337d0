"""GPT-OSS's harmony messages (`--reasoning-parser openai_gptoss`): the analysis channel goes
to reasoning_content, final and commentary to content, markers removed, the same whole and
streamed at every chunk size; through the server on a model whose tokenizer has harmony's
special tokens: a reply forced into harmony's shape with a regex, and the markers kept in the
text for the parser (skip_special_tokens off for such requests)."""

from __future__ import annotations

import httpx
import pytest
from server_helpers import openai_client, serving

from pagedserve.reasoning import ReasoningSplitter

MODEL = "tiny-harmony"
HARMONY_TOKENS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"]
A, F = "<|channel|>analysis<|message|>", "<|start|>assistant<|channel|>final<|message|>"


@pytest.mark.parametrize("text, want", [
    (A + "2 + 2 is 4.<|end|>" + F + "It is 4.", ("2 + 2 is 4.", "It is 4.")),
    (A + "still thinking", ("still thinking", None)),  # cut short
    (A + "done<|end|><|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>" + F + "Yes.",
     ("done", "Checking.Yes.")),  # a preamble (commentary) is content
    ("<|channel|>final<|message|>No thinking.", (None, "No thinking.")),
    (A + "a<|end|><|start|>assistant<|channel|>analysis<|message|>b<|end|>" + F + "c<|return|>", ("ab", "c")),
    ('{"x": 1}', (None, '{"x": 1}')),  # no harmony at all (a grammar from the first token): the answer
    (A + "a < b <|end|>" + F + "x <| y", ("a < b ", "x <| y")),  # "<" and "<|" that open no marker
])
def test_split_whole_and_streamed(text, want):
    assert ReasoningSplitter.split("openai_gptoss", text) == want
    for size in (1, 2, 3, 7):
        s = ReasoningSplitter("openai_gptoss")
        parts = [s.feed(text[i:i + size]) for i in range(0, len(text), size)] + [s.finish()]
        reasoning, content = "".join(r for r, _ in parts), "".join(c for _, c in parts)
        assert (reasoning if want[0] is not None else None, content or None) == want, size


@pytest.fixture(scope="module")
def harmony_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer carries harmony's markers as special tokens."""
    from pagedserve.model.random_model import build_random_model, build_tokenizer

    tok_dir = str(tmp_path_factory.mktemp("harmony_tok"))
    tok = build_tokenizer(tok_dir, 1024)
    tok.add_special_tokens({"additional_special_tokens": HARMONY_TOKENS})
    tok.save_pretrained(tok_dir)
    return build_random_model(str(tmp_path_factory.mktemp("harmony")), tokenizer_dir=tok_dir, initializer_range=0.5)


@pytest.fixture(scope="module")
def client(harmony_dir):
    pytest.importorskip("xgrammar")
    with serving(harmony_dir, MODEL, reasoning_parser="openai_gptoss") as srv:
        with openai_client(srv) as c:
            yield c


def test_harmony_reply_whole_and_streamed(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Think first."}], temperature=0, max_tokens=80,
                  extra_body={"structured_outputs": {"regex": r"<\|channel\|>analysis<\|message\|>[a-z]{2,6} [a-z]{2,6}"
                                                              r"<\|end\|><\|start\|>assistant<\|channel\|>final"
                                                              r"<\|message\|>[a-z]{2,8}"}})
    whole = client.chat.completions.create(**kwargs).choices[0]
    thought = whole.message.model_extra["reasoning_content"]
    assert thought.count(" ") == 1 and thought.replace(" ", "").isalpha()
    assert whole.message.content.isalpha()
    reasoning = content = ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        d = chunk.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        content += d.content or ""
    assert (reasoning, content) == (thought, whole.message.content)


def test_markers_reach_the_parser_as_text(client, harmony_dir):
    """The model made to emit the special token <|message|> at every step: with special tokens
    skipped the reply would be empty; kept, the first opens a message and the rest are its
    text."""
    from transformers import AutoTokenizer

    msg_id = AutoTokenizer.from_pretrained(harmony_dir).convert_tokens_to_ids("<|message|>")
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           temperature=0, logit_bias={str(msg_id): 100})
    assert reply.choices[0].message.content == "<|message|>" * 3


# ---- tool calls (--tool-call-parser openai) ------------------------------------------------
ANALYSIS = "<|channel|>analysis<|message|>Need the weather.<|end|>"
CALL = ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
        '{"city": "Paris"}<|call|>')


@pytest.mark.parametrize("text, want", [
    (ANALYSIS + CALL, ("Need the weather.", None, [("get_weather", '{"city": "Paris"}')])),
    # the recipient before the channel; a preamble; the call cut short (no <|call|>)
    (ANALYSIS + "<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant "
     'to=functions.get_time<|channel|>commentary json<|message|>{"tz": "UTC"',
     ("Need the weather.", "Checking.", [("get_time", '{"tz": "UTC"')])),
    (CALL + '<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{}<|call|>',
     (None, None, [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")])),
    # a built-in tool's recipient is not a function: content
    ("<|channel|>analysis to=browser.search<|message|>q<|end|>", ("q", None, [])),
    (ANALYSIS + "<|start|>assistant<|channel|>final<|message|>Sunny.", ("Need the weather.", "Sunny.", [])),
])
def test_tool_calls_whole_and_streamed(text, want):
    """The openai parser's calls (GPT-OSS's harmony messages to=functions.NAME): the same
    message whole and streamed in chunks of every size, finish_reason tool_calls."""
    from pagedserve.entrypoints.openai.chat_output import ChoiceStream, whole_message
    from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest

    req = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "Weather?"}],
                                tools=[{"type": "function", "function": {"name": "get_weather"}}])
    reasoning, content, calls = want
    message, finish = whole_message(req, text, "stop", "openai_gptoss", "openai")
    assert (message.reasoning_content, message.content) == (reasoning, content)
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == calls
    assert finish == ("tool_calls" if calls else "stop")
    ids = {c.id for c in message.tool_calls}
    assert len(ids) == len(calls) and all(i.startswith("chatcmpl-tool-") for i in ids)
    for size in (1, 2, 5, len(text)):
        stream = ChoiceStream(req, "openai_gptoss", "openai")
        r = c = ""
        got: dict[int, list[str]] = {}
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        for i, piece in enumerate(pieces):
            delta, fin = stream.delta(piece, "stop" if i == len(pieces) - 1 else None)
            r, c = r + (delta.reasoning_content or ""), c + (delta.content or "")
            for call in delta.tool_calls or ():
                if call.function.name is not None:
                    assert call.index not in got and call.id and call.type == "function"
                    got[call.index] = [call.function.name, ""]
                got[call.index][1] += call.function.arguments or ""
        assert (r or None, c or None) == (reasoning, content), size
        assert [tuple(got[i]) for i in sorted(got)] == calls and fin == finish, size
    # Without tool parsing the calls' text is content, as before.
    plain, _ = whole_message(req, text, "stop", "openai_gptoss", None)
    assert plain.tool_calls == [] and all(a in (plain.content or "") for _, a in calls)


def test_openai_parser_needs_harmony(harmony_dir):
    from pagedserve.entrypoints.openai.api_server import build_app
    from server_helpers import make_async_llm

    llm = make_async_llm(harmony_dir)
    try:
        with pytest.raises(ValueError, match="openai_gptoss"):
            build_app(llm, MODEL, tool_call_parser="openai")
    finally:
        llm.shutdown()


# ---- end to end on scripted models ---------------------------------------------------------
WORDS = ["analysis", "commentary", "final", " to=functions.get_weather", " json", '{"city": "Paris"}']
HARMONY_TEMPLATE = (  # GPT-OSS's template, cut down to what the tests use
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}"
    "{% if m.thinking %}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif %}"
    "{% set c = m.tool_calls[0].function %}<|start|>assistant to=functions.{{ c.name }}<|channel|>commentary json"
    "<|message|>{{ c.arguments|tojson }}<|call|>"
    "{% elif m.role == 'tool' %}<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
    "{{ m.content }}<|end|>"
    "{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """Two models that write harmony text after `<|start|>assistant` (greedy): `call` a tool
    call of get_weather, `final` a final message's header (then free text)."""
    from scripted_model import build_scripted_model

    from pagedserve.model.random_model import build_tokenizer

    tok_dir = str(tmp_path_factory.mktemp("scripted_tok"))
    tok = build_tokenizer(tok_dir, 1024)
    tok.add_special_tokens({"additional_special_tokens": HARMONY_TOKENS})
    tok.add_tokens(WORDS)
    tok.chat_template = HARMONY_TEMPLATE
    tok.save_pretrained(tok_dir)
    start = tok.encode("<|start|>assistant", add_special_tokens=False)[-1:]
    eos = tok.convert_tokens_to_ids(["<|return|>", "<|call|>"])
    scripts = {"call": "<|channel|>commentary to=functions.get_weather json<|message|>{\"city\": \"Paris\"}<|call|>",
               "final": "<|channel|>final<|message|>"}
    dirs = {name: build_scripted_model(str(tmp_path_factory.mktemp(name)), tok_dir,
                                       [start + tok.encode(text, add_special_tokens=False)], eos)
            for name, text in scripts.items()}
    return dirs, tok


def test_a_tool_call_end_to_end(scripted):
    """A model writing a harmony tool call, through the server with --tool-call-parser openai:
    the call whole and streamed, finish_reason tool_calls (<|call|> is a stop token)."""
    dirs, _ = scripted
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
                  temperature=0, max_tokens=40)
    with serving(dirs["call"], MODEL, reasoning_parser="openai_gptoss", tool_call_parser="openai") as srv:
        with openai_client(srv) as c:
            choice = c.chat.completions.create(**kwargs).choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            (call,) = choice.message.tool_calls
            assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')
            name, args, finish = None, "", None
            for chunk in c.chat.completions.create(stream=True, **kwargs):
                for d in chunk.choices[0].delta.tool_calls or ():
                    name, args = d.function.name or name, args + (d.function.arguments or "")
                assert not chunk.choices[0].delta.content
                finish = chunk.choices[0].finish_reason or finish
            assert (name, args, finish) == ("get_weather", '{"city": "Paris"}', "tool_calls")
            # tool_choice "none": no parsing, the call's text is the content
            none = c.chat.completions.create(tool_choice="none", **kwargs).choices[0]
            assert none.message.tool_calls in (None, []) and '{"city": "Paris"}' in none.message.content
            # the Responses API: a function_call item
            resp = c.responses.create(model=MODEL, input="Weather in Paris?", temperature=0, max_output_tokens=40,
                                      tools=[{"type": "function", **tools[0]["function"]}])
            (item,) = resp.output
            assert (item.type, item.name, item.arguments) == ("function_call", "get_weather", '{"city": "Paris"}')
        # The call sent back with its reasoning and the tool's result: the template gets the
        # arguments as a mapping and the reasoning as `thinking`, as GPT-OSS's template wants.
        history = [{"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": None, "reasoning_content": "Need the weather.",
                    "tool_calls": [{"id": call.id, "type": "function", "function": {
                        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                   {"role": "tool", "tool_call_id": call.id, "content": "Sunny"}]
        tok = httpx.post(f"{srv.url}/tokenize", json={"messages": history, "return_token_strs": True}).json()
        prompt = srv.llm.tokenizer.decode(tok["tokens"])
        assert prompt == ("<|start|>user<|message|>Weather in Paris?<|end|>"
                          "<|start|>assistant<|channel|>analysis<|message|>Need the weather.<|end|>"
                          '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>'
                          '{"city": "Paris"}<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary'
                          "<|message|>Sunny<|end|><|start|>assistant"), prompt


def test_the_grammar_waits_for_the_final_channel(scripted):
    """With the openai_gptoss reasoning parser a grammar holds only the final message's body:
    the header the model writes first passes free; a commentary message never opens it; a
    prompt that opened the final message gets the grammar at once. Without the parser the
    grammar holds from the first token."""
    from pagedserve import LLM, SamplingParams

    dirs, tok = scripted
    regex = SamplingParams(temperature=0, max_tokens=30, skip_special_tokens=False,
                           structured_outputs={"regex": "[a-z]{3,8}"})
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    prompt = [{"prompt_token_ids": tok.encode(text, add_special_tokens=False)}]
    gated = LLM(dirs["final"], max_model_len=256, reasoning_parser="openai_gptoss", async_scheduling=False)
    out = gated.generate(prompt, regex, use_tqdm=False)[0].outputs[0]
    head = "<|channel|>final<|message|>"
    assert out.text.startswith(head), out.text
    body = out.text[len(head):].removesuffix("<|return|>")
    assert 3 <= len(body) <= 8 and body.isalpha() and body.islower(), out.text
    opened = [{"prompt_token_ids": prompt[0]["prompt_token_ids"] + tok.encode(head, add_special_tokens=False)}]
    out = gated.generate(opened, regex, use_tqdm=False)[0].outputs[0]
    assert out.text.removesuffix("<|return|>").isalpha(), out.text
    del gated
    free = LLM(dirs["final"], max_model_len=256, async_scheduling=False)
    out = free.generate(prompt, regex, use_tqdm=False)[0].outputs[0]
    assert out.text.removesuffix("<|return|>").isalpha(), out.text
    del free
    waiting = LLM(dirs["call"], max_model_len=256, reasoning_parser="openai_gptoss", async_scheduling=False)
    held = waiting.generate(prompt, regex, use_tqdm=False)[0].outputs[0]
    unheld = waiting.generate(prompt, SamplingParams(temperature=0, max_tokens=30, skip_special_tokens=False),
                              use_tqdm=False)[0].outputs[0]
    assert held.token_ids == unheld.token_ids and '{"city": "Paris"}' in held.text


def test_gpt_oss_is_served_with_harmony_by_default(model_dirs, harmony_dir):
    from pagedserve.entrypoints.openai.api_server import default_reasoning_parser

    assert default_reasoning_parser(model_dirs["gpt_oss"]) == "openai_gptoss"
    assert default_reasoning_parser(harmony_dir) is None  # a Llama
    assert default_reasoning_parser("/nonexistent") is None
