"""StructuredOutputsParams: constrain a request's output to a JSON schema, any JSON object, a
regular expression, one of a list of strings, an EBNF grammar, or a structural tag (free text
until a trigger, then a tagged JSON block: tool calls; vLLM's names and checks;
`GuidedDecodingParams` is vLLM's older name for the same thing). The engine compiles the
constraint with xgrammar (engine/grammar.py) and masks every step's logits to the tokens
that keep the output inside it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

from pagedserve.errors import ParamError

FIELD = "structured_outputs"
_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    json: Optional[Union[str, dict]] = None  # a JSON schema (text or dict)
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None  # EBNF (GBNF) with a `root` rule
    json_object: Optional[bool] = None  # any JSON object
    disable_fallback: bool = False  # one backend here: nothing to fall back to
    disable_any_whitespace: bool = False  # JSON without free whitespace between tokens
    # Properties the schema does not name are never generated here (xgrammar's strict mode),
    # so this flag changes nothing; accepted for vLLM compatibility.
    disable_additional_properties: bool = False
    whitespace_pattern: Optional[str] = None  # not supported (xgrammar has no such option)
    # vLLM's structural tag (JSON text or an object): {"structures": [{"begin": ..., "schema": {...},
    # "end": ...}], "triggers": [...]}, or xgrammar's newer {"type": "structural_tag", "format": ...}
    structural_tag: Optional[Union[str, dict]] = None

    # The request field it came from (the server's response_format, guided_json, ...): errors
    # name it. A class attribute, not a field.
    source = FIELD

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            which = "none are" if not given else f"{len(given)} are ({', '.join(given)})"
            raise ParamError(FIELD, f"{FIELD}: exactly one kind of constraint must be given (one of "
                             f"{', '.join(_KINDS)}), but {which} specified.")
        if self.structural_tag is not None:
            self.structural_tag = _object_text(self.structural_tag, "structural_tag")
        if self.whitespace_pattern is not None:
            raise ParamError(FIELD, f"{FIELD}: whitespace_pattern is not supported.")
        if self.json is not None:
            self.json = _object_text(self.json, "json")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, str) and v):
                raise ParamError(FIELD, f"{FIELD}: {name} must be a non-empty string.")
        if self.choice is not None:
            self.choice = list(self.choice) if isinstance(self.choice, (list, tuple)) else self.choice
            if not (isinstance(self.choice, list) and self.choice and all(isinstance(c, str) and c
                                                                          for c in self.choice)):
                raise ParamError(FIELD, f"{FIELD}: choice must be a non-empty list of non-empty strings.")
        if self.json_object is not None and self.json_object is not True:
            raise ParamError(FIELD, f"{FIELD}: json_object must be true when given.")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) is not None)

    def key(self) -> tuple:
        """What the compiled grammar depends on (the compile cache's key)."""
        return (self.kind, _freeze(getattr(self, self.kind)), self.disable_any_whitespace)

    @classmethod
    def from_dict(cls, data: Any, field: str = FIELD) -> "StructuredOutputsParams":
        """From a request body's object (unknown keys are an error, not ignored)."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ParamError(field, f"{field} must be an object, got {type(data).__name__}.")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ParamError(field, f"{field}: unknown field(s) {', '.join(map(repr, unknown))}.")
        return cls(**data)


def _object_text(value: Any, name: str) -> str:
    """A JSON object given as an object or as its text, as text."""
    if isinstance(value, dict):
        return json.dumps(value)
    if not isinstance(value, str):
        raise ParamError(FIELD, f"{FIELD}: {name} must be a JSON object or its text, got {type(value).__name__}.")
    return value


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


# vLLM's name before it became StructuredOutputsParams.
GuidedDecodingParams = StructuredOutputsParams
