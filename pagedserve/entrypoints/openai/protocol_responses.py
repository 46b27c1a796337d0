"""The request and response objects of POST /v1/responses (OpenAI's Responses API), in the
subset pagedserve serves: text and message inputs, instructions, function tools, reasoning,
structured text formats, previous_response_id. Items and events are plain dicts shaped as
OpenAI's (the `openai` client reads them into its own types)."""

from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import Field

from pagedserve.entrypoints.openai.protocol import Int64, OpenAIBaseModel, Text


class ResponseFunctionTool(OpenAIBaseModel):
    """A function tool, flat as the Responses API has it (chat nests it under `function`)."""

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=256)
    description: Optional[Text] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ResponseNamedTool(OpenAIBaseModel):
    type: Literal["function"]
    name: str


class ResponseTextFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseTextConfig(OpenAIBaseModel):
    format: ResponseTextFormat = Field(default_factory=ResponseTextFormat)


INCLUDABLE = ("message.output_text.logprobs",)


class ResponsesRequest(OpenAIBaseModel):
    model: Optional[str] = None
    input: Union[Text, list[dict[str, Any]]]
    instructions: Optional[Text] = None
    max_output_tokens: Optional[Int64] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    tools: list[ResponseFunctionTool] = Field(default_factory=list)
    tool_choice: Union[Literal["none", "auto", "required"], ResponseNamedTool] = "auto"
    parallel_tool_calls: bool = True
    text: Optional[ResponseTextConfig] = None
    reasoning: Optional[dict[str, Any]] = None  # {"effort": ...}: passed to the chat template
    previous_response_id: Optional[str] = None
    store: bool = True
    stream: bool = False
    background: bool = False
    metadata: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    # vLLM's extras: sampling beyond OpenAI's two knobs
    seed: Optional[Int64] = None
    top_k: Optional[Int64] = None
    stop: Optional[Union[Text, list[Text]]] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    structured_outputs: Optional[dict[str, Any]] = None  # as on chat (regex, grammar, choice, ...)
    priority: int = 0  # under --scheduling-policy priority, as on chat
    # "message.output_text.logprobs": each output_text part carries its tokens' logprobs, with
    # top_logprobs alternatives each (setting top_logprobs alone asks for them too).
    include: Optional[list[str]] = None
    top_logprobs: Optional[Int64] = None
    # Not served: refused (a 400 naming the field) rather than ignored.
    conversation: Optional[Any] = None
    prompt: Optional[Any] = None
    max_tool_calls: Optional[int] = None

    def refused(self) -> Optional[str]:
        """The first field set that pagedserve does not serve."""
        for name in ("conversation", "prompt", "max_tool_calls"):
            if getattr(self, name):
                return name
        for item in self.include or ():
            if item not in INCLUDABLE:
                return "include"
        return None

    @property
    def logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ()) or self.top_logprobs is not None


def response_object(req: ResponsesRequest, response_id: str, model: str, output: list[dict], status: str,
                    usage: Optional[dict], incomplete: Optional[str] = None, created_at: Optional[int] = None,
                    error: Optional[dict] = None) -> dict[str, Any]:
    """A Response as OpenAI returns it: the request's settings echoed, `output` its items."""
    return {
        "id": response_id, "object": "response", "created_at": created_at or int(time.time()), "model": model,
        "status": status, "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "tools": [t.model_dump(exclude_none=True) for t in req.tools],
        "tool_choice": req.tool_choice if isinstance(req.tool_choice, str) else req.tool_choice.model_dump(),
        "parallel_tool_calls": req.parallel_tool_calls,
        "text": (req.text or ResponseTextConfig()).model_dump(by_alias=True, exclude_none=True),
        "reasoning": req.reasoning, "previous_response_id": req.previous_response_id, "store": req.store,
        "metadata": req.metadata or {}, "user": req.user, "background": req.background, "truncation": "disabled",
        "top_logprobs": req.top_logprobs,
        "output": output, "usage": usage,
    }


def usage_object(input_tokens: int, output_tokens: int, cached: int, reasoning_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens}
