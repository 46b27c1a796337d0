"""More --tool-call-parser formats, read as vLLM's parsers of the same names read them (tool_calls.py
registers them):

- minimax_m2: `<minimax:tool_call>` blocks of `<invoke name="NAME"><parameter name="P">value</parameter>...
  </invoke>` (MiniMax-M2); only closed blocks and invokes count; values stripped and typed by the tool's
  schema (its type, enum, anyOf / oneOf / allOf), a value `null` / `none` / `nil` is null, a parameter the
  schema does not know stays text;
- seed_oss: `<seed:tool_call><function=NAME><parameter=P>value</parameter></function></seed:tool_call>`
  (ByteDance Seed-OSS), a `<function=` outside the tags counting too and closing tags optional; values
  typed by the schema's type name (integer, number, boolean, object as JSON, other types as Python
  literals), `null` is null, a parameter the schema does not know stays text; calls inside a closed
  `<seed:think>` block are not read;
- hunyuan_a13b: the first `<tool_calls>[...]</tool_calls>` that is JSON and not inside `<think>...</think>`:
  its `{"name", "arguments"}` items (items lacking either are skipped);
- xlam: a JSON list of `{"name", "arguments"}`: in a ```json fence, after `[TOOL_CALLS]` (to the line's end),
  in `<tool_call>...</tool_call>`, after `</think>`, or the whole output; the content is the rest of the
  text (stripped).

What comes before the calls is the content (xlam: also what follows them). Output that holds no readable
call is all content, as in vLLM. Streamed, content goes out until the calls start; minimax_m2 and seed_oss
send each parameter once it is complete (as vLLM does), hunyuan_a13b and xlam the arguments as generated;
the pieces add up to the whole-output parse (call_stream.py's rule).

Where this differs from vLLM: call ids are the server's; an output without calls is returned whole (vLLM's
hunyuan_a13b drops a "助手：" from it, and its hunyuan_a13b / xlam return only the text around a block that
is JSON but not a list); a value vLLM's typing fails on (a number "inf") stays text instead of making the
whole output content; JSON arguments are written with ensure_ascii=False."""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Callable, Optional

from pagedserve.entrypoints.openai.call_stream import (Call, CallFinder, CallState, JsonListFinder, JsonObjectCall,
                                                       MarkerStream, SectionStream, _earliest, _TypedMembers)
from pagedserve.entrypoints.openai.json_prefix import dumps, skip_space

Parse = Callable[[str], tuple[str, list[Call]]]


def _properties(tools: Optional[list], name: str, whole: bool = False) -> dict:
    """The named tool's parameter schemas ({} if it has none); `whole`: a parameters object
    without "properties" is taken as them (Seed-OSS's reading)."""
    for tool in tools or ():
        if tool.function.name == name:
            params = tool.function.parameters
            if isinstance(params, dict) and "properties" in params:
                return params["properties"] or {}
            return params if whole and isinstance(params, dict) else {}
    return {}


def _call(name: Any, args: Any) -> Call:
    """A {"name", "arguments"} item: an object's arguments as JSON text, a string's as they are."""
    if not isinstance(name, str) or not isinstance(args, (dict, str)):
        raise TypeError("not a call")
    return Call(name, args if isinstance(args, str) else dumps(args))


# ---- MiniMax-M2 ---------------------------------------------------------------------------
MINIMAX_START = "<minimax:tool_call>"
_MINIMAX_BLOCK = re.compile(r"<minimax:tool_call>(.*?)</minimax:tool_call>", re.S)
_MINIMAX_INVOKE = re.compile(r"<invoke name=(.*?)</invoke>", re.S)
_MINIMAX_PARAM = re.compile(r"<parameter name=(.*?)</parameter>", re.S)
_JSON_TYPES = ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
               (list, "array"), (dict, "object"))
_MINIMAX_ORDER = ("integer", "int", "number", "float", "boolean", "bool", "object", "array", "string", "str", "text")


def _unquoted(text: str) -> str:
    text = text.strip()
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'" else text


def _type_names(schema: Any) -> set:
    """Every type a parameter's schema allows: its type(s), its enum values' types, those of its
    anyOf / oneOf / allOf choices; "string" where it names none."""
    if not isinstance(schema, dict):
        return {"string"}
    t = schema.get("type")
    out = {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()
    if isinstance(schema.get("enum"), list):
        out |= {next(n for k, n in _JSON_TYPES if isinstance(v, k)) for v in schema["enum"]
                if isinstance(v, (type(None), bool, int, float, str, list, dict))}
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list):
            for choice in schema[key]:
                out |= _type_names(choice)
    return out or {"string"}


def _minimax_value(raw: str, schema: Any) -> Any:
    """A MiniMax-M2 parameter value (stripped) as its schema's most specific type that reads."""
    if raw.lower() in ("null", "none", "nil"):
        return None
    types = {t.lower() for t in _type_names(schema)}
    for t in (t for t in _MINIMAX_ORDER if t in types):
        try:
            if t in ("string", "str", "text"):
                return raw
            if t in ("integer", "int"):
                return int(raw)
            if t in ("number", "float"):
                v = float(raw)
                return v if v != int(v) else int(v)
            if t in ("boolean", "bool"):
                return {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                        "off": False}[raw.strip().lower()]
            return json.loads(raw)
        except (ValueError, KeyError, OverflowError):
            continue
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_minimax_m2(text: str, tools: Optional[list] = None) -> tuple[str, list[Call]]:
    start = text.find(MINIMAX_START)
    if start < 0:
        return text, []
    calls = []
    for block in _MINIMAX_BLOCK.findall(text):
        for invoke in _MINIMAX_INVOKE.findall(block):
            head = re.match(r"[^>]+", invoke)
            if head is None:
                continue
            name = _unquoted(head.group())
            props, args = _properties(tools, name), {}
            for param in _MINIMAX_PARAM.findall(invoke):
                key, sep, raw = param.partition(">")
                if sep and key:
                    key = _unquoted(key)
                    args[key] = _minimax_value(raw.strip(), props.get(key))
            calls.append(Call(name, dumps(args)))
    return (text[:start], calls) if calls else (text, [])


# ---- Seed-OSS -----------------------------------------------------------------------------
SEED_START, SEED_FUNCTION = "<seed:tool_call>", "<function="
SEED_THINK = ("<seed:think>", "</seed:think>")
_SEED_BLOCK = re.compile(r"<seed:tool_call>(.*?)(?:</seed:tool_call>|$)", re.S)
_SEED_FUNCTION = re.compile(r"<function=(.*?)(?:</function>|\Z)", re.S)
_SEED_PARAM = re.compile(r"<parameter=(.*?)(?:</parameter>|$)", re.S)


def _seed_value(raw: str, key: str, props: dict) -> Any:
    """A Seed-OSS parameter value as its schema's type name says; text where it does not read."""
    if raw.lower() == "null":
        return None
    if key not in props:
        return raw
    spec = props[key]
    kind = str(spec["type"]).strip().lower() if isinstance(spec, dict) and "type" in spec else "string"
    if kind in ("string", "str", "text", "varchar", "char", "enum"):
        return raw
    try:
        if kind.startswith(("int", "uint", "long", "short", "unsigned")):
            return int(raw)
        if kind.startswith(("num", "float")):
            v = float(raw)
            return v if v - int(v) != 0 else int(v)
    except (ValueError, OverflowError):
        return raw
    if kind in ("boolean", "bool", "binary"):
        return raw.lower() == "true"
    if kind == "object" or kind.startswith("dict"):
        try:
            return json.loads(raw)
        except ValueError:
            pass
    try:
        value = ast.literal_eval(raw)
        dumps(value)
        return value
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return raw


def _seed_raw(raw: str, closed: bool) -> str:
    """A parameter's text less the newline either side (an unclosed one's last line break also
    goes, as vLLM's pattern ending in `$` leaves it)."""
    if not closed and raw.endswith("\n"):
        raw = raw[:-1]
    raw = raw[1:] if raw.startswith("\n") else raw
    return raw[:-1] if raw.endswith("\n") else raw


def _seed_split(text: str) -> int:
    """Where Seed-OSS's calls may start: after a closed thinking block, else anywhere."""
    i = text.find(SEED_THINK[0])
    j = text.find(SEED_THINK[1])
    return j + len(SEED_THINK[1]) if i >= 0 and j >= 0 else 0


def parse_seed_oss(text: str, tools: Optional[list] = None) -> tuple[str, list[Call]]:
    if SEED_FUNCTION not in text:
        return text, []
    at = _seed_split(text)
    rest = text[at:]
    blocks = [m.group(1) for m in _SEED_BLOCK.finditer(rest)] or [rest]
    calls = []
    for block in blocks:
        for fn in _SEED_FUNCTION.findall(block):
            name, sep, params = fn.partition(">")
            if not sep:
                return text, []
            props, args = _properties(tools, name, whole=True), {}
            for m in _SEED_PARAM.finditer(params):
                key, sep, raw = m.group(1).partition(">")
                if not sep:
                    return text, []
                args[key] = _seed_value(_seed_raw(raw, m.group(0).endswith("</parameter>")), key, props)
            calls.append(Call(name, dumps(args)))
    if not calls:
        return text, []
    start = rest.find(SEED_START)
    return text[:at + (start if start >= 0 else rest.find(SEED_FUNCTION))], calls


# ---- streaming MiniMax-M2 and Seed-OSS: each parameter once complete, as vLLM streams them ---
class _XmlCall:
    """A call named up to the first ">" after its opening, then parameters `param` KEY `>` value
    up to one of `param_ends` (the first of which is the closing tag), until one of `ends`;
    `value(name, key, raw, closer)` types each."""

    def __init__(self, start: int, param: str, param_ends: tuple[str, ...], ends: tuple[str, ...],
                 name: Callable[[str], str], value: Callable[[str, str, str, str], Any]) -> None:
        self.start, self.param, self.param_ends, self.ends = start, param, param_ends, ends
        self.name, self.value = name, value
        self.state, self.members, self.pos = CallState(), _TypedMembers(), 0

    def update(self, body: str) -> CallState:
        st = self.state
        if st.name is None:
            j = body.find(">", self.start)
            if j < 0:
                return st
            st.name, st.args, self.pos = self.name(body[self.start:j]), "{", j + 1
        while True:
            i, mark = _earliest(body, self.pos, (self.param, *self.ends))
            if i < 0:
                return st
            if mark != self.param:
                st.args, st.end = self.members.settled + "}", i + len(mark)
                return st
            j = body.find(">", i)
            end, closer = _earliest(body, j + 1, self.param_ends) if j >= 0 else (-1, "")
            if end < 0:
                return st
            key = body[i + len(self.param):j]
            self.members.add(*self.value(st.name, key, body[j + 1:end], closer))
            st.args = self.members.settled
            self.pos = end + len(closer) if closer == self.param_ends[0] else end


class _XmlFinder(CallFinder):
    def __init__(self, opening: str, make: Callable[[int], _XmlCall]) -> None:
        super().__init__()
        self.opening, self.make = opening, make

    def next_call(self, body: str, at: int) -> Optional[int]:
        i = body.find(self.opening, at)
        return None if i < 0 else i + len(self.opening)

    def new_call(self, start: int) -> _XmlCall:
        return self.make(start)


class ThinkingGate(MarkerStream):
    """A MarkerStream whose markers do not count inside a thinking block (`think`: its tags): while
    one is open all is content; once it closes, markers count after it."""

    def __init__(self, markers: tuple[str, ...], parse: Parse, think: tuple[str, str]) -> None:
        super().__init__(markers, parse)
        self.think = think

    def floor(self) -> Optional[int]:
        i = self.text.find(self.think[0])
        if i < 0:
            return 0
        j = self.text.find(self.think[1], i)
        return None if j < 0 else j + len(self.think[1])


def minimax_m2_stream(parse: Parse, tools: Optional[list]) -> SectionStream:
    def value(name: str, key: str, raw: str, closer: str) -> tuple[str, Any]:
        key = _unquoted(key)
        return key, _minimax_value(raw.strip(), _properties(tools, name).get(key))

    def make(start: int) -> _XmlCall:
        return _XmlCall(start, "<parameter name=", ("</parameter>",), ("</invoke>",), _unquoted, value)

    return SectionStream(MarkerStream(MINIMAX_START, parse), _XmlFinder("<invoke name=", make), parse)


def seed_oss_stream(parse: Parse, tools: Optional[list]) -> SectionStream:
    def value(name: str, key: str, raw: str, closer: str) -> tuple[str, Any]:
        return key, _seed_value(_seed_raw(raw, closer == "</parameter>"), key, _properties(tools, name, whole=True))

    def make(start: int) -> _XmlCall:
        ends = ("</function>", "</seed:tool_call>")
        return _XmlCall(start, "<parameter=", ("</parameter>", *ends), ends, lambda n: n, value)

    gate = ThinkingGate((SEED_START, SEED_FUNCTION), parse, SEED_THINK)
    return SectionStream(gate, _XmlFinder(SEED_FUNCTION, make), parse)


# ---- Hunyuan-A13B -------------------------------------------------------------------------
HUNYUAN_START = "<tool_calls>"
_HUNYUAN_BLOCK = re.compile(r"<tool_calls>(.*?)</tool_calls>", re.S)
_THINK = re.compile(r"<think>.*?</think>", re.S)


def _items(data: Any) -> list[Call]:
    """The calls of a JSON list's {"name", "arguments"} items (others skipped); [] if not a list."""
    if not isinstance(data, list):
        return []
    return [_call(i["name"], i["arguments"]) for i in data if isinstance(i, dict) and "name" in i
            and "arguments" in i]


class _ArgumentsCall(JsonObjectCall):
    """A call object named only once its arguments start (an item without them is skipped)."""

    def update(self, body: str) -> CallState:
        st = super().update(body)
        if self.scanner.args_start is None:
            st.name = None
        return st


class ItemsFinder(JsonListFinder):
    """JsonListFinder for a list (not one object) whose items without arguments are skipped
    (Hunyuan, xLAM)."""

    def next_call(self, body: str, at: int) -> Optional[int]:
        if at == 0:  # a list, not one object
            i = skip_space(body, 0)
            tag = next((t for t in self.tags if body.startswith(t, i)), "")
            i = skip_space(body, i + len(tag))
            if i < len(body) and body[i] != "[":
                return None
        return super().next_call(body, at)

    def new_call(self, start: int) -> JsonObjectCall:
        return _ArgumentsCall(start)

    def update(self, body: str) -> list[CallState]:
        states = super().update(body)
        open_ = [states[-1]] if states and states[-1].end is None else []
        self.done = [s for s in self.done if s.name is not None]
        return self.done + open_


def parse_hunyuan_a13b(text: str) -> tuple[str, list[Call]]:
    thinking = [m.span() for m in _THINK.finditer(text)]
    for m in _HUNYUAN_BLOCK.finditer(text):
        if any(a < m.start() and m.end() < b for a, b in thinking):
            continue
        try:
            data = json.loads(m.group(1))
        except ValueError:
            continue
        try:
            calls = _items(data)
        except TypeError:
            return text, []
        content = text[:m.start()]
        return (content if content.strip() else "", calls) if calls else (text, [])
    return text, []


def hunyuan_a13b_stream() -> SectionStream:
    gate = ThinkingGate((HUNYUAN_START,), parse_hunyuan_a13b, ("<think>", "</think>"))
    return SectionStream(gate, ItemsFinder((HUNYUAN_START,)), parse_hunyuan_a13b)


# ---- xLAM ---------------------------------------------------------------------------------
XLAM_MARKERS = ("```", "[TOOL_CALLS]", "<tool_call>")
_XLAM_BLOCKS = (re.compile(r"```(?:json)?\s*([\s\S]*?)```"), re.compile(r"\[TOOL_CALLS\]([\s\S]*?)(?=\n|$)"),
                re.compile(r"<tool_call>([\s\S]*?)</tool_call>"))


def _json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _xlam_split(text: str) -> tuple[str, Optional[str]]:
    """(content, the calls' JSON text or None) as vLLM's xLAM parser finds them."""
    think = text.find("</think>")
    if think >= 0:
        after = text[think + len("</think>"):].strip()
        content = text[:think + len("</think>")].strip()
        if _json(after):
            return content, after
        for block in _XLAM_BLOCKS:
            found = next((s for s in block.findall(after) if _json(s)), None)
            if found is not None:
                return content, found
    for block in _XLAM_BLOCKS:
        found = next((s for s in block.findall(text) if _json(s)), None)
        if found is not None:
            return block.sub("", text).strip(), found
    if text.strip().startswith("[") and _json(text):
        return "", text
    return text, None


def parse_xlam(text: str) -> tuple[str, list[Call]]:
    content, body = _xlam_split(text)
    if body is None:
        return text, []
    try:
        calls = _items(json.loads(body))
    except TypeError:
        return text, []
    return (content, calls) if calls else (text, [])


class XlamGate(MarkerStream):
    """xLAM's calls open with a fence, [TOOL_CALLS] or <tool_call>, or are all the output (or all
    after `</think>`) when that opens with "[": blank text there is held until it is known which."""

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.in_calls:
            return ""
        think = self.text.find("</think>")
        base = think + len("</think>") if think >= 0 else 0
        if self.sent <= base:
            head = self.text[base:].lstrip()
            if not head or len(head) < 12 and "[TOOL_CALLS]".startswith(head) or head.startswith("[") \
                    and not head.startswith("[TOOL_CALLS]"):
                out, self.sent = self.text[self.sent:base], base
                self.in_calls = bool(head) and not "[TOOL_CALLS]".startswith(head)  # the list: `sent` stays
                return out
        return self.scan()

    def scan(self) -> str:
        """As MarkerStream's, but blank text is held until more follows (the content is stripped)."""
        out = super().scan()
        held = len(out) - len(out.rstrip())
        self.sent -= held
        return out[:len(out) - held]


def xlam_stream() -> SectionStream:
    return SectionStream(XlamGate(XLAM_MARKERS, parse_xlam), ItemsFinder(("```json", *XLAM_MARKERS)), parse_xlam)


# --tool-call-parser name -> (parse a whole output, make a streaming parser); schema-aware ones
# (their parse takes tools=) -> (parse, tools) -> a streaming parser.
PARSERS: dict[str, tuple[Callable, Callable[[], Any]]] = {
    "minimax_m2": (parse_minimax_m2, lambda: minimax_m2_stream(parse_minimax_m2, None)),
    "seed_oss": (parse_seed_oss, lambda: seed_oss_stream(parse_seed_oss, None)),
    "hunyuan_a13b": (parse_hunyuan_a13b, hunyuan_a13b_stream),
    "xlam": (parse_xlam, xlam_stream),
}
SCHEMA_AWARE: dict[str, Callable[[Parse, Optional[list]], SectionStream]] = {
    "minimax_m2": minimax_m2_stream, "seed_oss": seed_oss_stream}
