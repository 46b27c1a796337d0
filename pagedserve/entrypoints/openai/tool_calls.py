"""Function calling for /v1/chat/completions, as vLLM does it.

- tool_choice naming a function: the output is held (structured outputs) to that function's
  parameters schema, and becomes the call's arguments.
- tool_choice "required": the output is held to a JSON array of one or more
  {"name": <a tool>, "parameters": <its schema>} objects, each one a call.
- tool_choice "auto" (with --enable-auto-tool-choice and --tool-call-parser): the model
  decides, and the parser takes the calls out of its text:
  - hermes: `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks (Hermes, Qwen2.5);
    what comes before them is the content;
  - llama3_json: an output that is one or more `{"name": ..., "parameters": ...}` objects
    (separated by `;`, optionally after `<|python_tag|>`; Llama 3.1 / 3.2 JSON tool calling);
  - mistral: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` (Mistral 7B v0.3,
    Mistral Small / Nemo), or `[TOOL_CALLS]name[ARGS]{...}` per call (newer tokenizers); what
    comes before is the content. The server keeps special tokens in the text for it, as vLLM;
  - pythonic: an output that is a Python list of calls, `[get_weather(city="Paris"), ...]`,
    optionally in `<|python_start|>...<|python_end|>` (Llama 3.2 / 4); arguments are literals.
  - granite: an output that is `<|tool_call|>` (Granite 3.0) or `<tool_call>` (3.1+) then a
    JSON list of `{"name", "arguments"}`, or that list alone; any other output is content;
  - phi4_mini_json: an output that is `functools[...]`, a JSON list of calls (Phi-4-mini);
  - qwen3_coder: `<tool_call><function=NAME><parameter=P>value</parameter>...</function>
    </tool_call>` blocks (Qwen3-Coder); values are raw text, typed by the tool's parameter
    schema (integer, number, boolean, object / array as JSON; without a schema, JSON if it
    reads as JSON, else text); what comes before the first block is the content.
  - glm45: `<tool_call>NAME` then `<arg_key>K</arg_key><arg_value>V</arg_value>` pairs,
    `</tool_call>` (GLM-4.5 / 4.6); values typed by the schema as qwen3_coder's;
  - deepseek_v3: `<｜tool▁calls▁begin｜>` then per call `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`,
    the arguments in a ```json fence, `<｜tool▁call▁end｜>` (DeepSeek-V3, R1-0528); deepseek_v31:
    `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{arguments}<｜tool▁call▁end｜>` (DeepSeek-V3.1); what comes
    before is the content; the markers are special tokens, kept in the text;
  - minimax_m2, seed_oss, hunyuan_a13b, xlam: tool_parsers_more.py; qwen3_xml: qwen3_coder's parser;
  - openai: GPT-OSS's harmony messages addressed `to=functions.NAME` (pagedserve/harmony.py
    reads them; it needs --reasoning-parser openai_gptoss, the default for GPT-OSS);
- tool_choice "none": plain text (the tools still reach the chat template, as in vLLM)."""

from __future__ import annotations

import ast
import functools
import json
import re
import uuid
from typing import Any, Callable, Optional

from pagedserve.entrypoints.openai import tool_parsers_more as more
from pagedserve.entrypoints.openai.call_stream import (MISTRAL_TAG, BlockFinder, Call, Glm45Call, JsonListFinder,
                                                       MarkedFinder, MarkerStream, MistralFinder, PythonicFinder,
                                                       Qwen3CoderCall, SectionStream)
from pagedserve.entrypoints.openai.json_call_stream import HERMES_START, CallScanner, HermesStream, JsonCallsStream
from pagedserve.entrypoints.openai.json_prefix import skip_space


def random_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _parameters(fn: Any) -> dict:
    return fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}


def named_schema(tools: list, name: str) -> dict:
    """The JSON schema of the named tool's arguments."""
    return _parameters(next(t.function for t in tools if t.function.name == name))


def required_schema(tools: list, parallel: bool = True) -> dict:
    """A JSON array of one or more calls (exactly one without parallel calls), each
    {"name": a tool's name, "parameters": its schema}."""
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
        {"properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": _parameters(t.function)},
         "required": ["name", "parameters"]} for t in tools]}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parse_required(text: str) -> Optional[list[Call]]:
    """The calls of a "required" output; None if it is not a complete array of calls (cut
    short by max_tokens)."""
    try:
        items = json.loads(text)
        return [Call(i["name"], json.dumps(i["parameters"], ensure_ascii=False)) for i in items]
    except (ValueError, TypeError, KeyError):
        return None


def _required_whole(text: str) -> tuple[str, list[Call]]:
    calls = parse_required(text)
    return ("", calls) if calls else (text, [])


def RequiredStream() -> SectionStream:  # noqa: N802
    """A streamed "required" output (a JSON array of {"name", "parameters"} calls): each call
    as it is generated, like the auto parsers'."""
    return SectionStream(OpeningStream(("[",), _required_whole), JsonListFinder(), _required_whole)


_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)


def parse_hermes(text: str) -> tuple[str, list[Call]]:
    """(content, calls) of a Hermes-style output. Text that is not well-formed calls stays
    content, so nothing the model wrote is lost. A call's arguments are the model's own text
    of the value, as the streaming parser sends it (json_call_stream.py)."""
    start = text.find(HERMES_START)
    if start < 0:
        return text, []
    calls = []
    try:
        for closed, open_ in _HERMES.findall(text[start:]):
            body = closed or open_
            calls.append(_scanned_call(json.loads(body), body))
    except (ValueError, TypeError, KeyError, AttributeError):
        return text, []
    return text[:start], calls


def _scanned_call(obj: dict, text: str) -> Call:
    """A JSON call object and its text: the arguments as the model wrote them, as the
    streaming parsers send them (json_call_stream.py)."""
    scanner = CallScanner()
    scanner.feed(text)
    return Call(str(obj["name"]), scanner.arguments())


def _call(obj: dict) -> Call:
    args = obj.get("arguments", obj.get("parameters", {}))
    return Call(str(obj["name"]), args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


PYTHON_TAG = "<|python_tag|>"


def parse_llama3_json(text: str) -> tuple[str, list[Call]]:
    """(content, calls) of a Llama 3 JSON tool-calling output: the whole output is calls, or
    it is all content."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].lstrip()
    if not body.startswith("{"):
        return text, []
    decoder, calls, i = json.JSONDecoder(), [], 0
    try:
        while i < len(body):
            obj, end = decoder.raw_decode(body, i)
            calls.append(_scanned_call(obj, body[i:end]))
            i = end
            while i < len(body) and body[i] in " \t\r\n;":
                i += 1
    except (ValueError, TypeError, KeyError, AttributeError):
        return text, []
    return "", calls


def parse_mistral(text: str) -> tuple[str, list[Call]]:
    """(content, calls) of a Mistral output: content, then `[TOOL_CALLS]` and the calls, as a
    JSON list (or object) or as `name[ARGS]{...}` after each tag. Each JSON value is read
    whole (a tag inside a string is text). Malformed calls: all content."""
    start = text.find(MISTRAL_TAG)
    if start < 0:
        return text, []
    calls, i, decoder = [], start, json.JSONDecoder()
    try:
        while (i := skip_space(text, i)) < len(text):
            if not text.startswith(MISTRAL_TAG, i):
                return text, []
            i = skip_space(text, i + len(MISTRAL_TAG))
            if i < len(text) and text[i] in "[{":
                items, i = decoder.raw_decode(text, i)
                calls += [_call(c) for c in (items if isinstance(items, list) else [items])]
                continue
            sep = text.find("[ARGS]", i)
            name = text[i:sep].split("[CALL_ID]")[0].strip() if sep >= 0 else ""
            if not name:
                return text, []
            args, i = decoder.raw_decode(text, skip_space(text, sep + len("[ARGS]")))
            calls.append(Call(name, json.dumps(args, ensure_ascii=False)))
    except (ValueError, TypeError, KeyError, AttributeError):
        return text, []
    return (text[:start], calls) if calls else (text, [])


PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"


def parse_pythonic(text: str) -> tuple[str, list[Call]]:
    """(content, calls) of a pythonic output: the whole output is a list of calls with
    literal keyword arguments (read with ast, nothing is evaluated), or it is all content."""
    body = text.strip()
    if body.startswith(PYTHON_START):
        body = body[len(PYTHON_START):]
        body = body[: -len(PYTHON_END)] if body.endswith(PYTHON_END) else body
        body = body.strip()
    if not body.startswith("["):
        return text, []
    try:
        tree = ast.parse(body, mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return text, []
        calls = []
        for el in tree.elts:
            if not isinstance(el, ast.Call) or not isinstance(el.func, ast.Name) or el.args:
                return text, []
            if any(kw.arg is None for kw in el.keywords):  # **kwargs
                return text, []
            args = {kw.arg: ast.literal_eval(kw.value) for kw in el.keywords}
            calls.append(Call(el.func.id, json.dumps(args, ensure_ascii=False)))
    except (SyntaxError, ValueError, TypeError, RecursionError):
        return text, []
    return "", calls


def _keyword(text: str) -> tuple[str, Any]:
    """One `kw=literal` argument of a pythonic call, as parse_pythonic reads it."""
    call = ast.parse(f"f({text})", mode="eval").body
    if not isinstance(call, ast.Call) or call.args or len(call.keywords) != 1 or call.keywords[0].arg is None:
        raise ValueError("not one keyword argument")
    return call.keywords[0].arg, ast.literal_eval(call.keywords[0].value)


class OpeningStream:
    """For outputs that are all calls or all content: content streams as it comes unless the
    output opens with one of `openers`; then it is held for `finish` to parse (the gate of a
    call_stream.SectionStream, which sends the calls as they come)."""

    def __init__(self, openers: tuple[str, ...], parse: Callable[[str], tuple[str, list[Call]]]) -> None:
        self.openers, self.parse = openers, parse
        self.text = ""
        self.calls: Optional[bool] = None  # unknown until the first visible characters

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.calls is None:
            head = self.text.lstrip()
            if not head or any(o.startswith(head) for o in self.openers):
                return ""
            self.calls = head.startswith(self.openers)
            return "" if self.calls else self.text
        return "" if self.calls else delta

    def finish(self) -> tuple[str, list[Call]]:
        """(content not yet streamed, calls)."""
        if self.calls is False:
            return "", []
        return self.parse(self.text)


def Llama3JsonStream() -> JsonCallsStream:  # noqa: N802
    return JsonCallsStream(("{", PYTHON_TAG), PYTHON_TAG)


GRANITE_TAGS = ("<|tool_call|>", "<tool_call>")


def _json_calls(body: str, text: str) -> tuple[str, list[Call]]:
    """The calls of `body`, a JSON list (or one object) of calls; all content if it is not."""
    try:
        items = json.loads(body)
        calls = [_call(i) for i in (items if isinstance(items, list) else [items])]
    except (ValueError, TypeError, KeyError, AttributeError):
        return text, []
    return ("", calls) if calls else (text, [])


def parse_granite(text: str) -> tuple[str, list[Call]]:
    """(content, calls) of a Granite output: all calls, or all content."""
    body = text.strip()
    for tag in GRANITE_TAGS:
        if body.startswith(tag):
            body = body[len(tag):].lstrip()
            break
    return _json_calls(body, text) if body.startswith("[") else (text, [])


PHI4_TAG = "functools"


def parse_phi4_mini_json(text: str) -> tuple[str, list[Call]]:
    """(content, calls) of a Phi-4-mini output: `functools[...]`, or all content."""
    body = text.strip()
    if not body.startswith(PHI4_TAG + "["):
        return text, []
    return _json_calls(body[len(PHI4_TAG):], text)


_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)  # (Qwen3-Coder, GLM-4.5)
_QC_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|\Z)", re.DOTALL)
_QC_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)


def _schema_types(tools: Optional[list], function: str) -> dict[str, set]:
    """A tool's parameter name -> its schema's JSON types (empty where it has none)."""
    for tool in tools or ():
        fn = tool.function
        if fn.name == function:
            props = (fn.parameters or {}).get("properties") or {}
            out = {}
            for name, schema in props.items():
                t = schema.get("type") if isinstance(schema, dict) else None
                out[name] = set(t) if isinstance(t, list) else ({t} if t else set())
            return out
    return {}


def _typed(value: str, types: set) -> Any:
    """A raw parameter value as its schema's type; text where it does not read as one."""
    if "string" in types:
        return value
    attempts: list[Callable[[str], Any]] = []
    if "integer" in types:
        attempts.append(int)
    if "number" in types:
        attempts.append(lambda v: int(v) if re.fullmatch(r"-?\d+", v.strip()) else float(v))
    if "boolean" in types:
        attempts.append(lambda v: {"true": True, "false": False}[v.strip().lower()])
    if "null" in types:
        attempts.append(lambda v: {"null": None, "none": None}[v.strip().lower()])
    if types & {"object", "array"} or not types:
        attempts.append(json.loads)
        if types:
            attempts.append(ast.literal_eval)
    for attempt in attempts:
        try:
            return attempt(value)
        except (ValueError, TypeError, KeyError, SyntaxError, RecursionError):
            continue
    return value


def parse_qwen3_coder(text: str, tools: Optional[list] = None) -> tuple[str, list[Call]]:
    """(content, calls) of a Qwen3-Coder output (XML-style calls). An unreadable block: all
    content, so nothing the model wrote is lost."""
    start = text.find(HERMES_START)
    if start < 0:
        return text, []
    calls = []
    for block in _TOOL_CALL_BLOCK.findall(text[start:]):
        fn = _QC_FUNCTION.search(block)
        if fn is None:
            return text, []
        name = fn.group(1).strip()
        types = _schema_types(tools, name)
        args = {}
        for param, raw in _QC_PARAMETER.findall(fn.group(2)):
            value = raw[1:] if raw.startswith("\n") else raw  # the template puts values on lines of their own
            value = value[:-1] if value.endswith("\n") else value
            args[param.strip()] = _typed(value, types.get(param.strip(), set()))
        calls.append(Call(name, json.dumps(args, ensure_ascii=False)))
    return (text[:start], calls) if calls else (text, [])


_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)(?:</arg_value>|\Z)", re.DOTALL)


def parse_glm45(text: str, tools: Optional[list] = None) -> tuple[str, list[Call]]:
    """(content, calls) of a GLM-4.5 / 4.6 output: `<tool_call>NAME` then `<arg_key>K</arg_key>
    <arg_value>V</arg_value>` pairs, `</tool_call>`; values typed by the tool's schema as
    qwen3_coder's. A block without a name: all content."""
    start = text.find(HERMES_START)
    if start < 0:
        return text, []
    calls = []
    for block in _TOOL_CALL_BLOCK.findall(text[start:]):
        name = block.split("<arg_key>", 1)[0].strip()
        if not name or "\n" in name or "<" in name:
            return text, []
        types = _schema_types(tools, name)
        args = {k.strip(): _typed(v, types.get(k.strip(), set())) for k, v in _GLM_ARG.findall(block)}
        calls.append(Call(name, json.dumps(args, ensure_ascii=False)))
    return (text[:start], calls) if calls else (text, [])


DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
DS_CALL_BEGIN = "<｜tool▁call▁begin｜>"
_DS_V3_CALL = re.compile(r"<｜tool▁call▁begin｜>(?:function)?<｜tool▁sep｜>(?P<name>[^\n<]+)\n```(?:json)?\n"
                         r"(?P<args>.*?)\n```\s*<｜tool▁call▁end｜>", re.DOTALL)
_DS_V31_CALL = re.compile(r"<｜tool▁call▁begin｜>(?P<name>[^<]+?)<｜tool▁sep｜>(?P<args>.*?)<｜tool▁call▁end｜>",
                          re.DOTALL)


def _section_calls(text: str, markers: tuple[str, ...], call_re: re.Pattern,
                   call: Callable[[re.Match, str], Call]) -> tuple[str, list[Call]]:
    """(content before the first marker, the calls `call_re` finds after it, each made by
    `call(match, arguments as compact JSON)`); arguments must read as a JSON object, else the
    whole output is content (nothing the model wrote is lost)."""
    starts = [i for i in (text.find(m) for m in markers) if i >= 0]
    if not starts:
        return text, []
    start = min(starts)
    calls = []
    for m in call_re.finditer(text, start):
        try:
            args = json.loads(m["args"])
        except ValueError:
            return text, []
        if not isinstance(args, dict):
            return text, []
        calls.append(call(m, json.dumps(args, ensure_ascii=False)))
    return (text[:start], calls) if calls else (text, [])


def _named(m: re.Match, arguments: str) -> Call:
    return Call(m["name"].strip(), arguments)


def parse_deepseek_v3(text: str) -> tuple[str, list[Call]]:
    return _section_calls(text, (DS_CALLS_BEGIN,), _DS_V3_CALL, _named)


def parse_deepseek_v31(text: str) -> tuple[str, list[Call]]:
    return _section_calls(text, (DS_CALLS_BEGIN,), _DS_V31_CALL, _named)


KIMI_SECTION_BEGIN = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")
_KIMI_CALL = re.compile(r"<\|tool_call_begin\|>\s*(?P<id>[^<\s]+:\d+)\s*<\|tool_call_argument_begin\|>\s*"
                        r"(?P<args>.*?)\s*<\|tool_call_end\|>", re.DOTALL)


def _kimi_call(m: re.Match, arguments: str) -> Call:
    return Call(_kimi_name(m), arguments, id=m["id"])


def parse_kimi_k2(text: str) -> tuple[str, list[Call]]:
    """Kimi K2's calls: a section of `<|tool_call_begin|>functions.NAME:IDX
    <|tool_call_argument_begin|>{arguments}<|tool_call_end|>` (the section marker spelled either
    way, as vLLM takes it). The id is kept: Kimi's template writes it back."""
    return _section_calls(text, KIMI_SECTION_BEGIN, _KIMI_CALL, _kimi_call)


def _marked(markers: tuple[str, ...], begin: str, head: re.Pattern, whole: re.Pattern,
            name: Callable[[re.Match], str], parse: Callable[[str], tuple[str, list[Call]]]) -> SectionStream:
    return SectionStream(MarkerStream(markers, parse), MarkedFinder(begin, head, whole, name), parse)


def _blocks(parse: Callable[[str], tuple[str, list[Call]]], call: type, tools: Optional[list]) -> SectionStream:
    """Qwen3-Coder / GLM-4.5 calls in <tool_call> blocks, values typed by the tools' schemas."""
    finder = BlockFinder(lambda start: call(start, _typed, lambda name: _schema_types(tools, name)))
    return SectionStream(MarkerStream(HERMES_START, parse), finder, parse)


_DS_V3_HEAD = re.compile(r"<｜tool▁call▁begin｜>(?:function)?<｜tool▁sep｜>(?P<name>[^\n<]+)\n```(?:json)?\n")
_DS_V31_HEAD = re.compile(r"<｜tool▁call▁begin｜>(?P<name>[^<]+?)<｜tool▁sep｜>")
_KIMI_HEAD = re.compile(r"<\|tool_call_begin\|>\s*(?P<id>[^<\s]+:\d+)\s*<\|tool_call_argument_begin\|>")


def _kimi_name(m: re.Match) -> str:
    return m["id"].rsplit(":", 1)[0].split(".", 1)[-1]  # "functions.get_weather:0" -> get_weather


# --tool-call-parser name -> (parse a whole output, make a streaming parser).
TOOL_PARSERS: dict[str, tuple[Callable[[str], tuple[str, list[Call]]], Callable[[], Any]]] = {
    "hermes": (parse_hermes, HermesStream),
    "llama3_json": (parse_llama3_json, Llama3JsonStream),
    "mistral": (parse_mistral, lambda: SectionStream(MarkerStream(MISTRAL_TAG, parse_mistral), MistralFinder(),
                                                     parse_mistral)),
    "pythonic": (parse_pythonic, lambda: SectionStream(OpeningStream(("[", PYTHON_START), parse_pythonic),
                                                       PythonicFinder(PYTHON_START, _keyword), parse_pythonic)),
    "qwen3_coder": (parse_qwen3_coder, lambda: _blocks(parse_qwen3_coder, Qwen3CoderCall, None)),
    "granite": (parse_granite, lambda: SectionStream(OpeningStream((*GRANITE_TAGS, "["), parse_granite),
                                                     JsonListFinder(GRANITE_TAGS), parse_granite)),
    "phi4_mini_json": (parse_phi4_mini_json, lambda: SectionStream(
        OpeningStream((PHI4_TAG + "[",), parse_phi4_mini_json), JsonListFinder((PHI4_TAG,)), parse_phi4_mini_json)),
    "glm45": (parse_glm45, lambda: _blocks(parse_glm45, Glm45Call, None)),
    "deepseek_v3": (parse_deepseek_v3, lambda: _marked((DS_CALLS_BEGIN,), DS_CALL_BEGIN, _DS_V3_HEAD, _DS_V3_CALL,
                                                       lambda m: m["name"].strip(), parse_deepseek_v3)),
    "deepseek_v31": (parse_deepseek_v31, lambda: _marked((DS_CALLS_BEGIN,), DS_CALL_BEGIN, _DS_V31_HEAD,
                                                         _DS_V31_CALL, lambda m: m["name"].strip(),
                                                         parse_deepseek_v31)),
    "kimi_k2": (parse_kimi_k2, lambda: _marked(KIMI_SECTION_BEGIN, "<|tool_call_begin|>", _KIMI_HEAD, _KIMI_CALL,
                                               _kimi_name, parse_kimi_k2)),
}
TOOL_PARSERS.update(more.PARSERS)  # minimax_m2, seed_oss, hunyuan_a13b, xlam (tool_parsers_more.py)
# vLLM's qwen3_xml reads Qwen3-Coder's format as qwen3_coder does (its own streaming XML reader).
TOOL_PARSERS["qwen3_xml"] = TOOL_PARSERS["qwen3_coder"]
HARMONY_TOOL_PARSER = "openai"  # GPT-OSS: calls are harmony messages, which its reasoning splitter reads
TOOL_PARSER_NAMES = (*TOOL_PARSERS, HARMONY_TOOL_PARSER)
# Parsers that type the arguments by the request's tool schemas (parser_for binds them): name ->
# (the parse bound to the tools, the tools) -> a streaming parser.
SCHEMA_AWARE: dict[str, Callable[[Callable, Optional[list]], Any]] = {
    "qwen3_coder": lambda parse, tools: _blocks(parse, Qwen3CoderCall, tools),
    "qwen3_xml": lambda parse, tools: _blocks(parse, Qwen3CoderCall, tools),
    "glm45": lambda parse, tools: _blocks(parse, Glm45Call, tools), **more.SCHEMA_AWARE}


def parser_for(name: str, tools: Optional[list]) -> tuple[Callable[[str], tuple[str, list[Call]]], Callable[[], Any]]:
    """The parser `name` for one request: (parse a whole output, make a streaming parser)."""
    parse, make = TOOL_PARSERS[name]
    if name not in SCHEMA_AWARE:
        return parse, make
    bound = functools.partial(parse, tools=tools)
    return bound, lambda: SCHEMA_AWARE[name](bound, tools)
# Parsers that need special tokens kept in the text (their markers are special tokens).
KEEPS_SPECIAL_TOKENS = {"mistral", "deepseek_v3", "deepseek_v31", "kimi_k2"}


def arguments_for_template(messages: list[dict]) -> list[dict]:
    """Assistant tool calls carry their arguments as JSON text; chat templates (Qwen2.5,
    Hermes, Llama 3.1) expect a mapping, as vLLM hands them."""
    for m in messages:
        for call in m.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except ValueError:
                    pass  # left as the client sent it
    return messages
