"""What the OpenAI handlers share: model-name checks, OpenAI-style errors, chat-template
rendering, server-sent events, and merging the streams of a multi-prompt request."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
from typing import Any, AsyncGenerator, Optional, Sequence, TypeVar, Union

from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from pagedserve.engine.async_engine import AsyncLLM, EngineDeadError, UnavailableError
from pagedserve.entrypoints.openai.limits import ServerLimits
from pagedserve.lora.request import LoRARequest
from pagedserve.entrypoints.openai.protocol import (ChatTemplateFields, ErrorInfo, ErrorResponse, PromptLogprob,
                                                    PromptLogprobsJSON, PromptTokenUsageInfo, UsageInfo)
from pagedserve.entrypoints.openai.tool_calls import arguments_for_template
from pagedserve.multimodal.chat_parts import split_images
from pagedserve.errors import EngineSleepingError, ParamError
from pagedserve.outputs import Logprob, PromptLogprobs
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger("pagedserve")

T = TypeVar("T")

# chat_template_kwargs may add template variables, not override apply_chat_template's own arguments.
_RESERVED_TEMPLATE_KWARGS = frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)


class OpenAIError(Exception):
    """An error with an HTTP status and OpenAI's error body."""

    def __init__(self, status_code: int, message: str, type: str, param: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.headers = headers

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.status_code))


def as_openai_error(e: BaseException) -> OpenAIError:
    """Map an exception to the status a client should see: our validation errors
    (ValueError) are the client's fault; a dead engine is 503; anything else is ours."""
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, ValueError):
        return OpenAIError(400, str(e), "BadRequestError", e.param if isinstance(e, ParamError) else None)
    if isinstance(e, UnavailableError):
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
        return OpenAIError(503, str(e), "ServiceUnavailableError", headers=headers)
    if isinstance(e, EngineDeadError):
        return OpenAIError(503, str(e), "EngineDeadError")
    if isinstance(e, EngineSleepingError):
        return OpenAIError(503, str(e), "ServiceUnavailableError")
    return OpenAIError(500, f"internal server error: {type(e).__name__}: {e}", "InternalServerError")


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """--chat-template: a file path or the template itself (anything with Jinja markup)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if any(c in value for c in "{}\n"):
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template.")


# Characters JSON leaves raw but str.splitlines() (and so httpx's iter_lines) takes for line
# ends: generated text can hold them, and a client splitting lines that way would cut an event.
# Escaped, they mean the same inside a JSON string (and cannot occur outside one).
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(obj: BaseModel) -> str:
    return f"data: {obj.model_dump_json().translate(_LINE_BREAKS)}\n\n"


def sse_error(e: BaseException) -> str:
    return f"data: {json.dumps(as_openai_error(e).response().model_dump()).translate(_LINE_BREAKS)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def merge_async_iterators(*iterators: AsyncGenerator[T, None]) -> AsyncGenerator[tuple[int, T], None]:
    """Items of several async iterators as they come, tagged with the iterator's index.
    Closing or cancelling the merge closes every source (and so aborts their requests)."""
    if len(iterators) == 1:
        try:
            async for item in iterators[0]:
                yield 0, item
        finally:
            await iterators[0].aclose()
        return
    nexts = {asyncio.ensure_future(it.__anext__()): i for i, it in enumerate(iterators)}
    try:
        while nexts:
            done, _ = await asyncio.wait(nexts, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = nexts.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                nexts[asyncio.ensure_future(iterators[i].__anext__())] = i
                yield i, item
    finally:
        for task in nexts:
            task.cancel()
        await asyncio.gather(*nexts, return_exceptions=True)
        for it in iterators:
            await it.aclose()


class OpenAIServing:
    def __init__(self, async_llm: AsyncLLM, served_model_names: Sequence[str],
                 chat_template: Optional[str] = None, limits: Optional[ServerLimits] = None,
                 log_requests: bool = False, trust_request_chat_template: bool = False,
                 lora_modules: Union[Sequence[LoRARequest], dict[str, LoRARequest]] = (),
                 return_tokens_as_token_ids: bool = False, force_include_usage: bool = False,
                 max_log_len: Optional[int] = None) -> None:
        self.llm = async_llm
        self.max_log_len = max_log_len  # vLLM's --max-log-len: logged prompts cut to this many characters / ids
        self.return_tokens_as_token_ids = return_tokens_as_token_ids
        self.force_include_usage = force_include_usage  # streams end with usage, asked or not
        self.served_model_names = list(served_model_names)
        # model name -> adapter; a dict given is shared (the runtime LoRA endpoints change it)
        self.loras = lora_modules if isinstance(lora_modules, dict) else {lora.lora_name: lora for lora in lora_modules}
        self.chat_template = chat_template
        self.trust_request_chat_template = trust_request_chat_template
        self.max_model_len = async_llm.engine.config.max_model_len
        self.limits = limits or ServerLimits()
        self.log_requests = log_requests
        # usage.prompt_tokens_details.cached_tokens is reported when prefix caching is on.
        self.report_cached_tokens = async_llm.engine.config.enable_prefix_caching

    def tokens_as_ids(self, req: Any) -> bool:
        """Logprob tokens as "token_id:N": the request's choice, else the server's."""
        own = getattr(req, "return_tokens_as_token_ids", None)
        return self.return_tokens_as_token_ids if own is None else own

    def log_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        """Prompts are user data: they reach the logs only with --enable-log-requests."""
        if self.log_requests:
            n = self.max_log_len
            if n is not None:
                prompt, prompt_token_ids = (prompt[:n] if prompt is not None else None), prompt_token_ids[:n]
            logger.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s", request_id, prompt,
                        params, prompt_token_ids)

    def check_prompts(self, prompts: list, field: str, truncating: bool) -> None:
        """A request's prompts: no more than the waiting queue could ever hold at once (a retry
        would not help), and text prompts within the character limit."""
        queue = self.llm.max_waiting_requests
        if queue is not None and len(prompts) > queue:
            raise ParamError(field, f"a request may carry at most {queue} {field}s (--max-waiting-requests), "
                             f"got {len(prompts)}.")
        for p in prompts:
            if isinstance(p, str):
                self.limits.check_prompt_chars(p, field, truncating)

    def check_generates(self, model: str, priority: int = 0) -> None:
        """Completions and chat need a text-generating model (and a priority the scheduler takes:
        checked before any stream starts)."""
        task = self.llm.engine.config.pooling_task
        if task is not None:
            use = {"embed": "an embedding model: use /v1/embeddings", "classify": "a classifier: use /classify"}[task]
            raise OpenAIError(400, f"The model `{model}` is {use}.", "BadRequestError", "model")
        self.llm.engine.check_priority(priority)

    def model_name(self, requested: Optional[str]) -> str:
        """The name to answer with; 404 for a model we do not serve."""
        if requested is None or requested == "":
            return self.served_model_names[0]
        if requested not in self.served_model_names and requested not in self.loras:
            raise OpenAIError(404, f"The model `{requested}` does not exist.", "NotFoundError", "model")
        return requested

    async def render_chat(self, req: ChatTemplateFields, add_special_tokens: bool = False,
                          truncating: bool = True) -> tuple[str, list[int], list[Any]]:
        """Messages -> (prompt text, token ids, image sources) with the server's or the
        tokenizer's template; each image part is rendered as the template's placeholder.
        Unless `truncating`, a rendered prompt too long to fit the context is refused untokenized."""
        tok = self.llm.tokenizer
        template = self.chat_template
        if req.chat_template is not None:  # a template is code the server runs: only where trusted (vLLM's rule)
            if not self.trust_request_chat_template:
                raise ParamError("chat_template", "chat_template in a request is not accepted unless the server "
                                 "runs with --trust-request-chat-template.")
            template = req.chat_template
        if template is None and not getattr(tok, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; start the server with --chat-template.")
        extra = {k: v for k, v in (req.chat_template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
        messages, images = split_images([m.for_template() for m in req.messages])
        messages = arguments_for_template(messages)
        tools = getattr(req, "tools", None)  # chat completions: the template may describe them
        if tools:
            extra["tools"] = [t.model_dump(exclude_none=True) for t in tools]
        if req.documents:
            extra["documents"] = req.documents

        def render() -> tuple[str, list[int]]:
            try:
                text = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                               add_generation_prompt=req.add_generation_prompt,
                                               continue_final_message=req.continue_final_message, **extra)
            except Exception as e:  # template errors (raise_exception(), bad roles) are the input's
                raise ParamError("messages", f"could not apply the chat template: {e}") from e
            self.limits.check_prompt_chars(text, "messages", truncating)
            return text, self.llm.engine.encode(text, "messages", add_special_tokens=add_special_tokens)

        text, ids = await self.llm.run_tokenizer(render)
        return text, ids, images


def usage_info(prompt_tokens: int, completion_tokens: int, cached_tokens: Optional[int] = None) -> UsageInfo:
    details = PromptTokenUsageInfo(cached_tokens=cached_tokens) if cached_tokens is not None else None
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)


def clamp_logprob(lp: float) -> float:
    return max(lp, -9999.0)  # JSON has no -inf; vLLM's floor


def top_by_rank(step: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely entries of one position (the sampled token may rank lower)."""
    ranked = sorted(((t, lp) for t, lp in step.items() if lp.rank is not None), key=lambda e: e[1].rank)
    return ranked[:k]


def token_text(tokenizer: Any, token_id: int, lp: Optional[Logprob] = None, as_id: bool = False) -> str:
    """A logprob's token as text; `as_id` (vLLM's return_tokens_as_token_ids): "token_id:N",
    which names a token whose text alone does not (a partial UTF-8 character, say)."""
    if as_id:
        return f"token_id:{token_id}"
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id])


def prompt_logprobs_json(plps: Optional[PromptLogprobs]) -> Optional[PromptLogprobsJSON]:
    if plps is None:
        return None
    return [None if step is None else
            {t: PromptLogprob(logprob=clamp_logprob(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
             for t, lp in step.items()} for step in plps]
