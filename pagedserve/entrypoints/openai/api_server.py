"""The OpenAI-compatible HTTP server: `build_app` (FastAPI routes, auth, errors, metrics) and
`run_server` (engine + uvicorn + graceful shutdown) behind `pagedserve serve`."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import signal
from typing import Any, Awaitable, Optional, Sequence, Union

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedserve import __version__
from pagedserve.engine.async_engine import AsyncLLM
from pagedserve.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                    DetokenizeResponse, ErrorResponse, ModelCard, ModelList,
                                                    TokenizeRequest, TokenizeResponse, VersionResponse)
from pagedserve.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedserve.entrypoints.openai.serving_engine import OpenAIError, as_openai_error, load_chat_template
from pagedserve.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from pagedserve.metrics import PrometheusStatLogger

logger = logging.getLogger("pagedserve")

_ERRORS: dict[Union[int, str], dict[str, Any]] = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


def _error_response(e: BaseException) -> JSONResponse:
    err = as_openai_error(e)
    return JSONResponse(err.response().model_dump(), status_code=err.status_code)


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


def _respond(result: Union[BaseModel, Any]) -> Response:
    if isinstance(result, Response):
        return result
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    return StreamingResponse(result, media_type="text/event-stream")


def _api_key_dependency(api_key: str) -> Any:
    expected = api_key.encode()
    bearer = HTTPBearer(auto_error=False)

    async def check(creds: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        # compare_digest: the time taken must not reveal how much of a guess was right.
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), expected):
            raise OpenAIError(401, "Unauthorized: a valid API key is required (Authorization: Bearer <key>).",
                              "AuthenticationError")

    return Depends(check)


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", param


def build_app(async_llm: AsyncLLM, served_model_name: Union[str, Sequence[str]], api_key: Optional[str] = None,
              chat_template: Optional[str] = None) -> FastAPI:
    """A FastAPI app serving `async_llm` under `served_model_name` (the first of several
    names is the one responses and metrics carry). With `api_key`, /v1/* needs
    `Authorization: Bearer <api_key>`; /health, /metrics, /version, /tokenize stay open."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    if not names:
        raise ValueError("served_model_name must name at least one model.")
    stats = PrometheusStatLogger(async_llm.engine, names[0])  # its own registry: one per app
    async_llm.add_stat_logger(stats)
    completion = OpenAIServingCompletion(async_llm, names)
    chat = OpenAIServingChat(async_llm, names, chat_template)
    tokenization = OpenAIServingTokenization(async_llm, names, chat_template)
    config = async_llm.engine.config

    app = FastAPI(title="pagedserve", version=__version__)
    app.state.async_llm = async_llm
    app.state.metrics = stats

    v1 = APIRouter(prefix="/v1", dependencies=[_api_key_dependency(api_key)] if api_key else [])

    @v1.get("/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=n, root=config.model, max_model_len=config.max_model_len) for n in names])

    @v1.post("/completions", responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return _respond(await _with_cancellation(request, completion.create(body)))

    @v1.post("/chat/completions", responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return _respond(await _with_cancellation(request, chat.create(body)))

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if async_llm.errored else 200)

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
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)  # 400 like OpenAI and vLLM, not FastAPI's 422
        return _error_response(OpenAIError(400, message, "BadRequestError", param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(exc.status_code, "HTTPError")
        return _error_response(OpenAIError(exc.status_code, str(exc.detail), kind))

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        return _error_response(exc)  # OpenAIError as is, ValueError 400, EngineDeadError 503, else 500

    for exc_type in (OpenAIError, ValueError, Exception):
        app.add_exception_handler(exc_type, on_error)
    return app


class _GracefulServer(uvicorn.Server):
    """uvicorn stops accepting and waits for open responses on SIGTERM/SIGINT; we also end
    the in-flight requests (after `grace` seconds) so every stream gets its final event."""

    def __init__(self, config: uvicorn.Config, async_llm: AsyncLLM, grace: float) -> None:
        super().__init__(config)
        self.async_llm = async_llm
        self.grace = grace
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first and self._loop is not None:
            logger.info("shutting down: in-flight requests end in %.1f s", self.grace)
            self._loop.call_soon_threadsafe(self._loop.call_later, self.grace, self.async_llm.abort_all)


def run_server(args: argparse.Namespace) -> int:
    """`pagedserve serve`: build the engine, serve until SIGTERM/SIGINT, exit 0."""
    from pagedserve.entrypoints.cli import engine_args_from

    if not args.model:
        raise ValueError("serve needs a MODEL_DIR (a local Hugging Face model directory).")
    chat_template = load_chat_template(args.chat_template)
    api_key = args.api_key or os.environ.get("PAGEDSERVE_API_KEY") or None
    async_llm = AsyncLLM.from_engine_args(engine_args_from(args, args.model))
    app = build_app(async_llm, args.served_model_name or [args.model], api_key=api_key, chat_template=chat_template)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + 5)
    server = _GracefulServer(config, async_llm, args.shutdown_timeout)
    # uvicorn re-raises the signal it caught once it has shut down, to reach the handlers
    # that were there before; make those no-ops so a graceful stop exits with status 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        async_llm.shutdown()
    return 0 if server.started else 1
