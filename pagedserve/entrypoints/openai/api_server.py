"""The OpenAI-compatible HTTP server: `build_app` (FastAPI routes, auth, errors, metrics) and
`run_server` (engine + uvicorn + graceful shutdown) behind `pagedserve serve`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from typing import Any, Awaitable, Callable, Optional, Sequence, Union

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.authentication import AuthenticationMiddleware

from pagedserve import __version__
from pagedserve.engine.async_engine import AsyncLLM, EngineDeadError, UnavailableError
from pagedserve.errors import EngineSleepingError
from pagedserve.entrypoints.openai.auth import ApiKeyBackend
from pagedserve.entrypoints.openai.dev_routes import add_dev_routes, dev_mode_from_env
from pagedserve.entrypoints.openai.body_limit import BodySizeLimitMiddleware
from pagedserve.entrypoints.openai.http_options import HttpOptions
from pagedserve.entrypoints.openai.limits import ServerLimits
from pagedserve.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                    DetokenizeResponse, ErrorResponse, ModelCard, ModelList,
                                                    TokenizeRequest, TokenizeResponse, VersionResponse)
from pagedserve.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedserve.entrypoints.openai.protocol_pooling import (ClassificationRequest, ClassificationResponse,
                                                            EmbeddingRequest, EmbeddingResponse, RerankRequest,
                                                            RerankResponse, ScoreRequest, ScoreResponse)
from pagedserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedserve.entrypoints.openai.serving_pooling import OpenAIServingPooling
from pagedserve.entrypoints.openai.serving_engine import OpenAIError, as_openai_error, load_chat_template
from pagedserve.entrypoints.openai.serving_lora import (LoadLoRAAdapterRequest, OpenAIServingLoRA,
                                                        UnloadLoRAAdapterRequest, runtime_lora_allowed)
from pagedserve.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from pagedserve.entrypoints.openai.protocol_responses import ResponsesRequest
from pagedserve.entrypoints.openai.serving_responses import OpenAIServingResponses
from pagedserve.entrypoints.openai.tool_calls import HARMONY_TOOL_PARSER, TOOL_PARSER_NAMES
from pagedserve.lora.request import LoRARequest
from pagedserve.metrics import PrometheusStatLogger
from pagedserve.reasoning import REASONING_PARSERS
from pagedserve.stat_logging import LoggingStatLogger

logger = logging.getLogger("pagedserve")

_ERRORS: dict[Union[int, str], dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 500, 503)}


def _error_response(e: BaseException) -> JSONResponse:
    err = as_openai_error(e)
    return JSONResponse(err.response().model_dump(), status_code=err.status_code, headers=err.headers)


async def _with_cancellation(request: Request, work: Awaitable[Any]) -> Any:
    """Run a handler's work, cancelling it (and so aborting its engine requests) if the
    client disconnects first; uvicorn would otherwise let it run to the end."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)
        return Response(status_code=499)  # nobody is listening any more
    return task.result()


def _respond(result: Union[BaseModel, dict, Any]) -> Response:
    if isinstance(result, Response):
        return result
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream")


def _validation_error(request: Request, exc: RequestValidationError) -> OpenAIError:
    """FastAPI's validation errors as OpenAI's 400 (not FastAPI's 422), naming the first
    field at fault; a body that is not JSON at all says so (415 for another content type)."""
    errors = list(exc.errors())
    if errors and errors[0].get("type") == "json_invalid":
        detail = (errors[0].get("ctx") or {}).get("error", "invalid JSON")
        return OpenAIError(400, f"The request body is not valid JSON: {detail}.", "BadRequestError")
    content_type = request.headers.get("content-type", "")
    if errors and tuple(errors[0].get("loc", ())) == ("body",) and "json" not in content_type.lower():
        return OpenAIError(415, f"The request body must be JSON with Content-Type: application/json (got "
                           f"{content_type or 'none'!r}).", "UnsupportedMediaTypeError")
    parts, param = [], None
    for err in errors[:10]:  # a 10^4-element list can fail 10^4 times: the first few say enough
        # Drop "body" and pydantic's union-member tags: types ("list[int]", "function-after[...]")
        # and model classes ("TokenizeCompletionRequest"); API field names are snake_case.
        loc = [str(p) for p in err.get("loc", ()) if p != "body" and not any(c in str(p) for c in "[(")
               and not (isinstance(p, str) and p[:1].isupper())]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    if len(errors) > 10:
        parts.append(f"... and {len(errors) - 10} more errors")
    return OpenAIError(400, "; ".join(parts) or "invalid request", "BadRequestError", param)


def default_reasoning_parser(model: str) -> Optional[str]:
    """The reasoning parser a model is served with when none is named: openai_gptoss for
    GPT-OSS (as vLLM, whose chat always reads GPT-OSS's replies as harmony), else None."""
    try:
        with open(os.path.join(model, "config.json")) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return "openai_gptoss" if model_type == "gpt_oss" else None


def build_app(async_llm: AsyncLLM, served_model_name: Union[str, Sequence[str]], api_key: Optional[str] = None,
              chat_template: Optional[str] = None, limits: Optional[ServerLimits] = None,
              enable_log_requests: bool = False, tool_call_parser: Optional[str] = None,
              trust_request_chat_template: bool = False, reasoning_parser: Optional[str] = None,
              lora_modules: Sequence[LoRARequest] = (), allow_runtime_lora: bool = False,
              http: Optional[HttpOptions] = None, return_tokens_as_token_ids: bool = False,
              enable_force_include_usage: bool = False, dev_mode: Optional[bool] = None,
              max_log_len: Optional[int] = None, response_role: str = "assistant") -> FastAPI:
    """A FastAPI app serving `async_llm` under `served_model_name` (the first of several
    names is the one responses and metrics carry). With `api_key`, /v1/* needs
    `Authorization: Bearer <api_key>`; /health, /metrics, /version, /tokenize stay open.
    `limits` bound what a request may ask for; prompts are logged only with
    `enable_log_requests`. `tool_call_parser` (tool_calls.TOOL_PARSER_NAMES) enables tool_choice "auto";
    `trust_request_chat_template` lets a request bring its own chat template;
    `reasoning_parser` ("qwen3", "glm45", "deepseek_r1", "openai_gptoss"; default: the engine's) puts a
    `<think>` block (GPT-OSS: the analysis channel) in reasoning_content. `lora_modules`:
    adapters served under their own names (the engine needs enable_lora); `allow_runtime_lora`
    adds vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (serving_lora.py). `http`:
    CORS, X-Request-Id headers, the docs pages (http_options.py; default: CORS open to all, as vLLM's).
    `return_tokens_as_token_ids`: logprob tokens as "token_id:N" unless a request says otherwise;
    `enable_force_include_usage`: every stream ends with a usage chunk, asked for or not.
    `dev_mode` (default: $PAGEDSERVE_SERVER_DEV_MODE): vLLM's /sleep, /wake_up, /is_sleeping,
    /reset_prefix_cache and /collective_rpc (dev_routes.py)."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    if not names:
        raise ValueError("served_model_name must name at least one model.")
    config = async_llm.engine.config
    limits = (limits or ServerLimits()).resolve(async_llm.tokenizer, config.max_model_len)
    stats = PrometheusStatLogger(async_llm.engine, names[0])  # its own registry: one per app
    async_llm.add_stat_logger(stats)
    loras = {lora.lora_name: lora for lora in lora_modules}  # shared by every endpoint
    clash = set(loras) & set(names)
    if clash:
        raise ValueError(f"LoRA module name {sorted(clash)[0]!r} is also the model's name.")
    serving = dict(limits=limits, log_requests=enable_log_requests, max_log_len=max_log_len,
                   trust_request_chat_template=trust_request_chat_template, lora_modules=loras,
                   return_tokens_as_token_ids=return_tokens_as_token_ids,
                   force_include_usage=enable_force_include_usage)
    completion = OpenAIServingCompletion(async_llm, names, **serving)
    if tool_call_parser is not None and tool_call_parser not in TOOL_PARSER_NAMES:
        raise ValueError(f"unknown tool call parser {tool_call_parser!r}; choose from {', '.join(TOOL_PARSER_NAMES)}.")
    reasoning_parser = reasoning_parser or config.reasoning_parser
    if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {reasoning_parser!r}; choose from {', '.join(REASONING_PARSERS)}.")
    if tool_call_parser == HARMONY_TOOL_PARSER and reasoning_parser != "openai_gptoss":
        raise ValueError("the openai tool call parser reads GPT-OSS's harmony messages: it needs the "
                         "openai_gptoss reasoning parser.")
    chat = OpenAIServingChat(async_llm, names, chat_template, tool_parser=tool_call_parser,
                             reasoning_parser=reasoning_parser, response_role=response_role, **serving)
    responses = OpenAIServingResponses(chat)
    tokenization = OpenAIServingTokenization(async_llm, names, chat_template, **serving)
    pooling = OpenAIServingPooling(async_llm, names, **serving)

    http = http or HttpOptions()
    app = FastAPI(title="pagedserve", version=__version__, **http.fastapi_kwargs())
    app.state.async_llm = async_llm
    app.state.metrics = stats
    app.state.limits = limits
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=limits.max_request_body_bytes)
    if api_key:  # outermost: a stranger learns nothing, not even the body limit
        app.add_middleware(AuthenticationMiddleware, backend=ApiKeyBackend(api_key), on_error=lambda _, exc:
                           _error_response(OpenAIError(401, str(exc), "AuthenticationError")))
    http.add_middleware(app)

    v1 = APIRouter(prefix="/v1")

    @v1.get("/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=n, root=config.model, max_model_len=config.max_model_len) for n in names]
                         + [ModelCard(id=lora.lora_name, root=lora.lora_path, parent=names[0],
                                      max_model_len=config.max_model_len) for lora in list(loras.values())])

    @v1.post("/completions", responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return _respond(await _with_cancellation(request, completion.create(body)))

    @v1.post("/embeddings", response_model=EmbeddingResponse, responses=_ERRORS)
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return _respond(await _with_cancellation(request, pooling.embed(body)))

    @v1.post("/classify", response_model=ClassificationResponse, responses=_ERRORS)
    async def classify(body: ClassificationRequest, request: Request) -> Response:
        return _respond(await _with_cancellation(request, pooling.classify(body)))

    @v1.post("/chat/completions", responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return _respond(await _with_cancellation(request, chat.create(body)))

    @v1.post("/responses", responses=_ERRORS)
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        return _respond(await _with_cancellation(request, responses.create(body)))

    @v1.get("/responses/{response_id}", responses=_ERRORS)
    async def get_response(response_id: str, stream: bool = False, starting_after: Optional[int] = None) -> Response:
        if stream:  # a background response's events, resumed after `starting_after`
            return _respond(responses.follow(response_id, starting_after))
        return JSONResponse(responses.get(response_id))

    @v1.post("/responses/{response_id}/cancel", responses=_ERRORS)
    async def cancel_response(response_id: str) -> Response:
        return JSONResponse(await responses.cancel(response_id))

    @v1.delete("/responses/{response_id}", responses=_ERRORS)
    async def delete_response(response_id: str) -> Response:
        return JSONResponse(await responses.delete(response_id))

    if allow_runtime_lora:
        lora_admin = OpenAIServingLoRA(async_llm, names, loras)

        @v1.post("/load_lora_adapter", responses=_ERRORS)
        async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
            return Response(await lora_admin.load(body), media_type="text/plain")

        @v1.post("/unload_lora_adapter", responses=_ERRORS)
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
            return Response(await lora_admin.unload(body), media_type="text/plain")

    app.include_router(v1)

    # vLLM's paths for classification, scoring and reranking, beside /v1 (behind the API key
    # here too: they run the model).
    @app.post("/classify", response_model=ClassificationResponse, responses=_ERRORS)
    async def classify_vllm_path(body: ClassificationRequest, request: Request) -> Response:
        return _respond(await _with_cancellation(request, pooling.classify(body)))

    for path in ("/score", "/v1/score"):
        @app.post(path, response_model=ScoreResponse, responses=_ERRORS)
        async def score(body: ScoreRequest, request: Request) -> Response:
            return _respond(await _with_cancellation(request, pooling.score(body)))

    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        @app.post(path, response_model=RerankResponse, responses=_ERRORS)
        async def rerank(body: RerankRequest, request: Request) -> Response:
            return _respond(await _with_cancellation(request, pooling.rerank(body)))

    @app.get("/health")
    async def health() -> Response:
        # 503 once the engine has failed, and while draining for shutdown (stop routing here).
        return Response(status_code=503 if async_llm.errored or async_llm.draining else 200)

    @app.api_route("/ping", methods=["GET", "POST"], include_in_schema=False)
    async def ping() -> Response:  # SageMaker's health check: /health's answer
        return await health()

    @app.post("/invocations", responses=_ERRORS)
    async def invocations(request: Request) -> Response:
        """SageMaker's one entry point: the body's shape picks the endpoint (vLLM's order)."""
        try:
            body = await request.json()
        except ValueError:
            raise OpenAIError(400, "The request body could not be parsed as JSON.", "BadRequestError") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "The request body must be a JSON object.", "BadRequestError")
        for field, kind, handle in (("messages", ChatCompletionRequest, chat.create),
                                    ("prompt", CompletionRequest, completion.create),
                                    ("prompt_embeds", CompletionRequest, completion.create),
                                    ("input", EmbeddingRequest, pooling.embed)):
            if field in body:
                try:
                    parsed = kind.model_validate(body)
                except ValidationError as e:
                    raise RequestValidationError(e.errors()) from None
                return _respond(await _with_cancellation(request, handle(parsed)))
        raise OpenAIError(400, "/invocations takes a chat (messages), completion (prompt) or embedding (input) "
                          "request.", "BadRequestError")

    if dev_mode if dev_mode is not None else dev_mode_from_env():
        add_dev_routes(app, async_llm)

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await tokenization.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await tokenization.detokenize(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(stats.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(request, exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
                413: "RequestTooLargeError"}.get(exc.status_code, "HTTPError")
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            message = "The request body could not be parsed as JSON (it must be valid UTF-8 JSON)."
        return _error_response(OpenAIError(exc.status_code, message, kind))

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        err = as_openai_error(exc)  # OpenAIError as is, ValueError 400, unavailable 503, else 500
        if err.status_code >= 500 and not isinstance(exc, (OpenAIError, EngineDeadError, UnavailableError,
                                                            EngineSleepingError)):
            logger.error("internal error serving %s %s: %s: %s", request.method, request.url.path,
                         type(exc).__name__, exc, exc_info=exc)
        return _error_response(err)

    # Expected failures get handlers of their own: a handler for Exception alone runs in
    # starlette's ServerErrorMiddleware, which re-raises (a traceback per request) afterwards.
    for exc_type in (OpenAIError, ValueError, EngineDeadError, UnavailableError, EngineSleepingError, Exception):
        app.add_exception_handler(exc_type, on_error)
    return app


class _GracefulServer(uvicorn.Server):
    """uvicorn stops accepting and waits for open responses on SIGTERM/SIGINT; we also refuse
    new requests at once (503) and end the in-flight ones (after `grace` seconds) so every
    stream gets its final event. If the engine dies, the server shuts down the same way
    (streams have had their error events) and `engine_failed` is set: the process exits
    non-zero so that a supervisor restarts it."""

    def __init__(self, config: uvicorn.Config, async_llm: AsyncLLM, grace: float,
                 background: Sequence[Callable[[], Awaitable[None]]] = ()) -> None:
        super().__init__(config)
        self.async_llm = async_llm
        self.grace = grace
        self.background = background  # coroutines run beside the server (the stats line)
        self.engine_failed = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        async_llm.add_failure_callback(self._on_engine_failure)

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(run()) for run in self.background]
        try:
            await super().serve(sockets)
        finally:
            for task in tasks:
                task.cancel()

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = not self.should_exit
        self.async_llm.stop_accepting()
        super().handle_exit(sig, frame)
        if first and self._loop is not None:
            logger.info("shutting down: in-flight requests end in %.1f s", self.grace)
            self._loop.call_soon_threadsafe(self._loop.call_later, self.grace, self.async_llm.abort_all)

    def _on_engine_failure(self, exc: BaseException) -> None:  # on the engine thread
        self.engine_failed = True
        logger.critical("the engine failed (%s: %s); the server shuts down", type(exc).__name__, exc)
        if self._loop is not None:  # queued after the streams' error events, so they go out first
            self._loop.call_soon_threadsafe(setattr, self, "should_exit", True)
        else:
            self.should_exit = True


DEMO_MODEL_NAME = "pagedserve-demo"


def parse_lora_modules(specs: Sequence[str]) -> list[LoRARequest]:
    """vLLM's --lora-modules: 'name=path' or '{"name": ..., "path": ...}'; ids 1, 2, ..."""
    out: list[LoRARequest] = []
    for spec in specs:
        if spec.lstrip().startswith("{"):
            try:
                d = json.loads(spec)
                name, path = d["name"], d["path"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"--lora-modules: {spec!r} is not {{\"name\": ..., \"path\": ...}}") from None
        else:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules: {spec!r} is not name=path.")
        if any(lora.lora_name == name for lora in out):
            raise ValueError(f"--lora-modules: the name {name!r} is given twice.")
        out.append(LoRARequest(name, len(out) + 1, path))
    return out


def run_server(args: argparse.Namespace) -> int:
    """`pagedserve serve`: build the engine, serve until SIGTERM/SIGINT, exit 0."""
    from pagedserve.entrypoints.cli import engine_args_from

    if not args.model:  # no model given: the built-in demo model, under a short name
        from pagedserve.demo import resolve_model

        args.model = resolve_model(None)
        args.served_model_name = args.served_model_name or [DEMO_MODEL_NAME]
    chat_template = load_chat_template(args.chat_template)
    api_key = args.api_key or os.environ.get("PAGEDSERVE_API_KEY") or None
    limits = ServerLimits.from_args(args)
    http = HttpOptions.from_args(args)  # checked before the engine loads
    loras = parse_lora_modules(args.lora_modules or [])
    if loras and not args.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora.")
    engine_args = engine_args_from(args, args.model)
    engine_args.reasoning_parser = engine_args.reasoning_parser or default_reasoning_parser(args.model)
    if loras:  # the served adapters stay loaded whether or not a request uses them
        engine_args.max_cpu_loras = max(engine_args.max_cpu_loras or engine_args.max_loras, len(loras))
    async_llm = AsyncLLM.from_engine_args(engine_args, max_waiting_requests=limits.max_waiting_requests)
    try:
        for lora in loras:  # read and checked now: a bad adapter stops the server from starting
            async_llm.engine.check_lora(lora)
    except ValueError:
        async_llm.shutdown()
        raise
    app = build_app(async_llm, args.served_model_name or [args.model], api_key=api_key, chat_template=chat_template,
                    limits=limits, enable_log_requests=args.enable_log_requests, max_log_len=args.max_log_len,
                    response_role=args.response_role,
                    tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
                    trust_request_chat_template=args.trust_request_chat_template, lora_modules=loras,
                    allow_runtime_lora=runtime_lora_allowed(), http=http,
                    return_tokens_as_token_ids=args.return_tokens_as_token_ids,
                    enable_force_include_usage=args.enable_force_include_usage)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + 5, **http.uvicorn_kwargs())
    stats = None if args.disable_log_stats else LoggingStatLogger(async_llm.engine)
    if stats is not None:
        async_llm.add_stat_logger(stats)
    server = _GracefulServer(config, async_llm, args.shutdown_timeout, [stats.run] if stats is not None else [])
    # uvicorn re-raises the signal it caught once it has shut down, to reach the handlers
    # that were there before; make those no-ops so a graceful stop exits with status 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        async_llm.shutdown()
    if server.engine_failed:
        logger.error("exiting with status 1: the engine failed")
        return 1
    return 0 if server.started else 1
