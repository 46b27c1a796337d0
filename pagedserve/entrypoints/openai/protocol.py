"""Pydantic models of the OpenAI API (completions, chat, models, errors) plus vLLM's extra
sampling fields and its /tokenize and /detokenize bodies. Unknown request fields are ignored,
as OpenAI clients may send fields we do not implement."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from pagedserve.errors import ParamError
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.structured_outputs import StructuredOutputsParams


def random_id(prefix: str) -> str:
    """Request ids are random (uuid4, from os.urandom): no client can guess another's."""
    return f"{prefix}-{uuid.uuid4().hex}"


def _valid_unicode(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"): valid to the parser, but not text that the
    # tokenizer (or any UTF-8 encoder) accepts. Refuse them here, naming the field.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be valid Unicode text (found an unpaired surrogate at position {e.start})") from None
    return text


# Text that reaches the tokenizer or the output: checked for encodability.
Text = Annotated[str, AfterValidator(_valid_unicode)]


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- errors, usage, models ----------------------------------------------------------------
class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: int


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


class PromptTokenUsageInfo(OpenAIBaseModel):
    cached_tokens: Optional[int] = None


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # Prompt tokens served by the prefix cache; set when prefix caching is on (as vLLM).
    prompt_tokens_details: Optional[PromptTokenUsageInfo] = None


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedserve"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- sampling fields shared by completions and chat ---------------------------------------
# Integers that end up in int64 tensors (seeds, top-k, ...): out of range would fail inside
# the engine step instead of as a 400 (vLLM bounds seed the same way).
Int64 = Annotated[int, Field(ge=-(2 ** 63), le=2 ** 63 - 1)]


class JsonSchemaFormat(OpenAIBaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: Optional[str] = None
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: Optional[JsonSchemaFormat] = None
    # type structural_tag (vLLM's): the tagged structures and the texts that trigger them
    structures: Optional[list[dict[str, Any]]] = None
    triggers: Optional[list[str]] = None
    format: Optional[dict[str, Any]] = None  # xgrammar's newer structural-tag format


# vLLM's older per-kind request fields -> the StructuredOutputsParams field each sets.
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


def _structured(source: str, **kwargs: Any) -> StructuredOutputsParams:
    try:
        so = StructuredOutputsParams(**kwargs)
    except ParamError as e:
        raise ParamError(source, str(e).replace("structured_outputs", source, 1)) from None
    so.source = source
    return so


class SamplingFields(OpenAIBaseModel):
    """OpenAI's sampling fields and vLLM's extras. Range checks live in SamplingParams (one
    place, vLLM's messages); here only types are checked."""

    model: Optional[str] = None
    n: int = 1  # bounded by the server's --max-n
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[Int64] = None
    stop: Optional[Union[Text, list[Text]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    def usage_wanted(self, forced: bool = False) -> tuple[bool, bool]:
        """(usage in a last chunk, usage so far in every chunk), as asked in stream_options
        (`forced`: the server's --enable-force-include-usage)."""
        opts = self.stream_options
        final = forced or (opts is not None and opts.include_usage)
        return final, final and opts is not None and opts.continuous_usage_stats
    user: Optional[str] = None
    # vLLM's extras
    top_k: Optional[Int64] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Int64 = 0
    ignore_eos: bool = False
    stop_token_ids: Optional[list[Int64]] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: Optional[Int64] = None
    # vLLM's: logprob tokens as "token_id:N" (default: the server's --return-tokens-as-token-ids)
    return_tokens_as_token_ids: Optional[bool] = None
    # vLLM's: the prompt's and the reply's token ids beside the text (streamed: the prompt's in
    # the first chunk, each chunk's own); for RL rollouts that must not re-tokenize.
    return_token_ids: bool = False
    truncate_prompt_tokens: Optional[Int64] = None
    allowed_token_ids: Optional[list[Int64]] = None
    bad_words: Optional[list[Text]] = None
    cache_salt: Optional[Text] = None  # partitions the prefix cache per tenant (vLLM's field)
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs object, and
    # vLLM's older guided_* fields (at most one of them per request).
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_whitespace_pattern: Optional[str] = None
    guided_decoding_backend: Optional[str] = None
    # vLLM's beam search (completions, non-streamed): n beams, scored with length_penalty.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # vLLM's: lower is served first, under --scheduling-policy priority (else non-zero is a 400).
    priority: int = 0
    # vLLM's: arguments for the server's custom logits processors (--logits-processors), handed
    # to them as SamplingParams.extra_args.
    vllm_xargs: Optional[dict[str, Union[str, int, float, bool, list[Union[str, int, float, bool]]]]] = None
    # Fields that would change the result but are not implemented: refused (400), never
    # silently ignored (see _refuse_unsupported).
    best_of: Optional[int] = None

    @field_validator("cache_salt")
    @classmethod
    def _salt_not_empty(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v:
            raise ValueError("Parameter 'cache_salt' must be a non-empty string if provided.")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v: Optional[StreamOptions], info: ValidationInfo) -> Optional[StreamOptions]:
        if v is not None and not info.data.get("stream"):  # a field validator, so the error names the field
            raise ValueError("stream_options can only be set when stream is true")
        return v

    def _structured_outputs(self) -> Optional[StructuredOutputsParams]:
        found: list[StructuredOutputsParams] = []
        if self.structured_outputs is not None:
            found.append(StructuredOutputsParams.from_dict(self.structured_outputs))
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(_structured("response_format", json_object=True))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise ParamError("response_format", "response_format of type json_schema needs json_schema.schema.")
            found.append(_structured("response_format", json=rf.json_schema.json_schema))
        elif rf is not None and rf.type == "structural_tag":
            found.append(_structured("response_format", structural_tag=rf.model_dump(exclude_none=True)))
        for name, kind in _GUIDED_FIELDS.items():
            value = getattr(self, name)
            if value is not None:
                found.append(_structured(name, **{kind: value}, whitespace_pattern=self.guided_whitespace_pattern))
        if self.guided_decoding_backend not in (None, "auto", "xgrammar"):
            raise ParamError("guided_decoding_backend", "guided_decoding_backend: only 'xgrammar' is available, "
                             f"got {self.guided_decoding_backend!r}.")
        if len(found) > 1:
            raise ParamError(found[1].source, f"only one structured-output constraint may be given, got "
                             f"{', '.join(so.source for so in found)}.")
        return found[0] if found else None

    def beam_search_params(self, max_tokens: int) -> BeamSearchParams:
        """use_beam_search's parameters: n beams. What beam search does not honour (it keeps the
        most likely continuations, at a temperature) is a 400 naming the field."""
        ignored = {"stream": self.stream, "logprobs": getattr(self, "logprobs", None) not in (None, False),
                   "echo": getattr(self, "echo", False), "prompt_logprobs": self.prompt_logprobs is not None,
                   "stop": bool(self.stop), "stop_token_ids": bool(self.stop_token_ids),
                   "min_tokens": bool(self.min_tokens), "logit_bias": bool(self.logit_bias),
                   "bad_words": bool(self.bad_words), "allowed_token_ids": self.allowed_token_ids is not None,
                   "top_p": self.top_p not in (None, 1.0), "top_k": self.top_k not in (None, 0, -1),
                   "min_p": self.min_p not in (None, 0.0), "presence_penalty": bool(self.presence_penalty),
                   "frequency_penalty": bool(self.frequency_penalty),
                   "repetition_penalty": self.repetition_penalty not in (None, 1.0),
                   "vllm_xargs": self.vllm_xargs is not None}
        for name, given in ignored.items():
            if given:
                raise ParamError(name, f"{name} is not supported with use_beam_search.")
        so = self._structured_outputs()
        if so is not None:
            raise ParamError(so.source, f"{so.source} is not supported with use_beam_search.")
        self._refuse_unsupported()
        return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
                                temperature=self.temperature or 0.0, length_penalty=self.length_penalty,
                                include_stop_str_in_output=self.include_stop_str_in_output)

    def _refuse_unsupported(self) -> None:
        if self.best_of is not None and self.best_of != self.n:
            raise ParamError("best_of", "best_of is not supported (it may only equal n).")

    def _sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int],
                         defaults: Optional[dict[str, Any]] = None) -> SamplingParams:
        """`defaults`: the model's sampling defaults (its generation_config.json), for the
        fields this request leaves unset; max_tokens' is the engine's to apply."""
        if self.use_beam_search:  # the handlers take beam_search_params() instead
            raise ParamError("use_beam_search", "use_beam_search takes beam_search_params().")
        self._refuse_unsupported()
        bias = None
        if self.logit_bias is not None:
            try:
                bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise ParamError("logit_bias", "logit_bias keys must be token ids (integers as strings).") from None
        opt = {k: v for k, v in (defaults or {}).items() if k != "max_tokens"}
        given = dict(top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                     temperature=self.temperature, top_p=self.top_p)
        opt.update({k: v for k, v in given.items() if v is not None})
        return SamplingParams(
            n=self.n, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, max_tokens=max_tokens,
            min_tokens=self.min_tokens, logprobs=logprobs, prompt_logprobs=self.prompt_logprobs, logit_bias=bias,
            ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            truncate_prompt_tokens=self.truncate_prompt_tokens, allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words, structured_outputs=self._structured_outputs(), extra_args=self.vllm_xargs,
            **opt)


# ---- completions --------------------------------------------------------------------------
class CompletionRequest(SamplingFields):
    prompt: Optional[Union[list[int], list[list[int]], Text, list[Text]]] = None
    # vLLM's: base64 torch.save()d tensors [tokens, hidden], run before `prompt`'s prompts
    # (--enable-prompt-embeds; engine/prompt_embeds.py).
    prompt_embeds: Optional[Union[str, list[str]]] = None
    max_tokens: Optional[Int64] = 16
    logprobs: Optional[Int64] = None
    echo: bool = False
    suffix: Optional[str] = None
    add_special_tokens: bool = True  # vLLM's: False tokenizes text prompts without BOS and the like

    def check_prompts_given(self) -> None:
        if self.prompt is None and not self.prompt_embeds:
            raise ParamError("prompt", "prompt is required (or prompt_embeds).")
        if self.prompt_embeds and (self.echo or self.use_beam_search):
            raise ParamError("prompt_embeds", f"prompt_embeds cannot be used with "
                             f"{'echo' if self.echo else 'use_beam_search'}: there are no prompt tokens.")

    def to_sampling_params(self, defaults: Optional[dict[str, Any]] = None) -> SamplingParams:
        if self.suffix is not None:
            raise ParamError("suffix", "suffix is not supported.")
        params = self._sampling_params(self.max_tokens, self.logprobs, defaults)
        if self.echo and self.logprobs is not None and params.prompt_logprobs is None:
            params.prompt_logprobs = self.logprobs  # echo + logprobs reports the prompt's too
        return params


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class PromptLogprob(OpenAIBaseModel):
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# vLLM's prompt_logprobs: per prompt position, token id -> its logprob (None for the first).
PromptLogprobsJSON = list[Optional[dict[int, PromptLogprob]]]


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    prompt_logprobs: Optional[PromptLogprobsJSON] = None
    prompt_token_ids: Optional[list[int]] = None  # return_token_ids (streamed: in the first chunk)
    token_ids: Optional[list[int]] = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


# ---- chat ---------------------------------------------------------------------------------
class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: Text


class ImageURL(OpenAIBaseModel):
    url: str  # a data:image/...;base64 URL or an http(s) URL (multimodal/inputs.py load_image)
    detail: Optional[Literal["auto", "low", "high"]] = None  # accepted; LLaVA has one resolution


class ImageURLContentPart(OpenAIBaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextContentPart, ImageURLContentPart], Field(discriminator="type")]


# OpenAI's roles; anything else is refused rather than handed to the chat template.
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(BaseModel):
    # Extra keys (tool_calls, ...) pass through to the chat template.
    model_config = ConfigDict(extra="allow")

    role: Role
    content: Optional[Union[Text, list[ContentPart]]] = None
    name: Optional[Text] = None

    def for_template(self) -> dict[str, Any]:
        """The message as a dict; a list of parts stays a list only where it holds an image
        (multimodal/chat_parts.py split_images), else it is joined: templates want strings."""
        msg = self.model_dump(exclude_none=True)
        if isinstance(self.content, list) and not any(p.type == "image_url" for p in self.content):
            msg["content"] = "".join(p.text for p in self.content)
        elif self.content is None:
            msg["content"] = ""
        if msg["role"] == "assistant" and "thinking" not in msg:
            # An earlier turn's reasoning, sent back as vLLM's reasoning_content (or reasoning):
            # GPT-OSS's template reads it as `thinking` (the analysis a tool call needs). Recent
            # transformers does the same; the versions we admit (>= 4.51, 5.0) do not.
            thought = msg.get("reasoning_content", msg.get("reasoning"))
            if isinstance(thought, str):
                msg["thinking"] = thought
        return msg


class ChatTemplateFields(OpenAIBaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    # vLLM's: documents for a retrieval-augmented template (Command-R's, Granite's), each a
    # dict such as {"title": ..., "text": ...}
    documents: Optional[list[dict[str, str]]] = None

    @field_validator("continue_final_message")
    @classmethod
    def _one_of(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("add_generation_prompt"):
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true.")
        return v


class FunctionDefinition(OpenAIBaseModel):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: Optional[Text] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema
    strict: Optional[bool] = None


class Tool(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    max_tokens: Optional[Int64] = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: Optional[Int64] = None
    logprobs: bool = False
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None  # OpenAI's range
    tools: Optional[list[Tool]] = None
    # Unset: "auto" with tools, "none" without (OpenAI's and vLLM's default).
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None  # False: "required" makes exactly one call
    # vLLM's: True adds the tokenizer's special tokens (BOS) to the rendered chat, which most
    # templates already write themselves.
    add_special_tokens: bool = False
    # vLLM's chat echo: a reply continuing the last message (an assistant's, with
    # continue_final_message) starts with that message's text.
    echo: bool = False
    # Not implemented, refused rather than ignored: OpenAI's deprecated functions API.
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None

    @property
    def echoed(self) -> str:
        """echo's text: the last message's, when it is the assistant's (the reply's role)."""
        last = self.messages[-1]
        if not self.echo or last.role != "assistant":
            return ""
        return last.for_template()["content"] if isinstance(last.for_template()["content"], str) else ""

    @property
    def tool_mode(self) -> str:
        """none | auto | required | named."""
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if self.tools else "none")
        return "named" if isinstance(choice, NamedToolChoice) else choice

    def _tool_constraint(self) -> Optional[StructuredOutputsParams]:
        """The structured-output constraint that tool_choice "required" or a named function puts
        on the output (None for "none" and "auto")."""
        from pagedserve.entrypoints.openai.tool_calls import named_schema, required_schema

        mode = self.tool_mode
        if mode in ("none", "auto"):
            return None
        if not self.tools:
            raise ParamError("tool_choice", f"tool_choice {mode!r} needs tools.")
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ParamError("tools", "tools: function names must be unique.")
        if mode == "named" and self.tool_choice.function.name not in names:
            raise ParamError("tool_choice", f"tool_choice names {self.tool_choice.function.name!r}, which is not "
                             "one of the tools.")
        schema = named_schema(self.tools, self.tool_choice.function.name) if mode == "named" \
            else required_schema(self.tools, parallel=self.parallel_tool_calls is not False)
        # Compact JSON (no free whitespace): the arguments are for a program to read.
        return _structured("tools", json=schema, disable_any_whitespace=True)

    def chat_beam_search_params(self, max_tokens_left: int) -> BeamSearchParams:
        """use_beam_search on chat: plain replies only (no tools); max_tokens defaults to the
        room the rendered prompt leaves."""
        if self.tool_mode != "none":
            raise ParamError("tools", "tools are not supported with use_beam_search.")
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                raise ParamError(name, f"{name} is not supported; use tools and tool_choice.")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.beam_search_params(max_tokens if max_tokens is not None else max_tokens_left)

    def to_sampling_params(self, defaults: Optional[dict[str, Any]] = None) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs", "when using top_logprobs, logprobs must be set to true.")
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                raise ParamError(name, f"{name} (OpenAI's deprecated functions API) is not supported; use tools and "
                                 "tool_choice.")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        params = self._sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, defaults)
        constraint = self._tool_constraint()
        if constraint is not None:
            if params.structured_outputs is not None:
                raise ParamError("tool_choice", f"tool_choice {self.tool_mode!r} constrains the output itself; it "
                                 f"cannot be combined with {params.structured_outputs.source}.")
            params.structured_outputs = params.guided_decoding = constraint
        return params


class ChatCompletionLogProb(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIBaseModel):
    content: Optional[list[ChatCompletionLogProbsContent]] = None


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(OpenAIBaseModel):
    role: str = "assistant"  # (--response-role; a continued final message keeps its own role)
    content: Optional[str] = None
    reasoning_content: Optional[str] = None  # with --reasoning-parser (vLLM's field)
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    token_ids: Optional[list[int]] = None  # return_token_ids


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Optional[UsageInfo] = None
    prompt_logprobs: Optional[PromptLogprobsJSON] = None
    prompt_token_ids: Optional[list[int]] = None  # return_token_ids


class DeltaFunctionCall(OpenAIBaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(OpenAIBaseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None


class DeltaMessage(OpenAIBaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    token_ids: Optional[list[int]] = None  # return_token_ids: this chunk's


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None
    prompt_token_ids: Optional[list[int]] = None  # return_token_ids: in the first chunk


# ---- tokenize / detokenize (vLLM's shapes) ------------------------------------------------
class TokenizeCompletionRequest(OpenAIBaseModel):
    model: Optional[str] = None
    prompt: Text
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(ChatTemplateFields):
    model: Optional[str] = None
    tools: Optional[list[Tool]] = None  # counted as the chat request would render them
    add_special_tokens: bool = False  # the template already places special tokens
    return_token_strs: bool = False


TokenizeRequest = Union[TokenizeCompletionRequest, TokenizeChatRequest]


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(OpenAIBaseModel):
    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


class VersionResponse(OpenAIBaseModel):
    version: str
