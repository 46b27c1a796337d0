"""vLLM's development endpoints, which reshape a running server: POST /reset_prefix_cache,
POST /sleep?level=N, POST /wake_up?tags=..., GET /is_sleeping, POST /collective_rpc, and
for weight updates between steps POST /pause?mode=abort|wait|keep&clear_cache=true, POST
/resume, GET /is_paused (AsyncLLM.pause_generation), GET /get_world_size. Off
unless PAGEDSERVE_SERVER_DEV_MODE=1 (vLLM's VLLM_SERVER_DEV_MODE=1 is honoured too), and
behind the API key (auth.py)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, Optional

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from pagedserve.engine.async_engine import AsyncLLM
from pagedserve.entrypoints.openai.serving_engine import OpenAIError

DEV_PATHS = ("/reset_prefix_cache", "/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/pause", "/resume",
             "/is_paused", "/get_world_size")
_ENV = ("PAGEDSERVE_SERVER_DEV_MODE", "VLLM_SERVER_DEV_MODE")


def dev_mode_from_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes") for k in _ENV)


class CollectiveRpcRequest(BaseModel):
    method: str = Field(description="a worker method's name (worker/worker.py)")
    timeout: Optional[float] = Field(default=None, gt=0)
    args: list = Field(default_factory=list)
    kwargs: dict = Field(default_factory=dict)


def _conflict(e: RuntimeError) -> OpenAIError:
    """The engine's refusals (requests still running, already asleep): the request's fault,
    but no malformed field of it, so 409."""
    return OpenAIError(409, str(e), "ConflictError")


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def add_dev_routes(app: FastAPI, async_llm: AsyncLLM) -> None:
    async def on_engine(fn: Any, timeout: Optional[float] = None) -> Any:
        try:
            return await asyncio.wait_for(async_llm.call_engine(fn), timeout)
        except asyncio.TimeoutError:
            raise OpenAIError(504, f"the engine did not answer within {timeout} s.", "TimeoutError") from None
        except RuntimeError as e:
            if type(e) is RuntimeError:  # the engine's own refusals; its failures are subclasses
                raise _conflict(e) from None
            raise

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        if not await on_engine(lambda engine: engine.kv.reset_prefix_cache()):
            raise OpenAIError(409, "the prefix cache cannot be reset while requests hold its blocks.", "ConflictError")
        return Response(status_code=200)

    @app.post("/sleep")
    async def sleep(level: int = Query(1)) -> Response:
        await on_engine(lambda engine: engine.sleep(level))
        return Response(status_code=200)

    @app.post("/wake_up")
    async def wake_up(tags: Optional[list[str]] = Query(None)) -> Response:
        await on_engine(lambda engine: engine.wake_up(tags))
        return Response(status_code=200)

    @app.get("/is_sleeping")
    async def is_sleeping() -> JSONResponse:
        return JSONResponse({"is_sleeping": await on_engine(lambda engine: engine.is_sleeping())})

    @app.post("/pause")
    async def pause(mode: Optional[str] = Query(None), clear_cache: bool = Query(True),
                    wait_for_inflight_requests: bool = Query(False)) -> Response:
        """vLLM's; its older wait_for_inflight_requests=true means mode "wait"."""
        await async_llm.pause_generation(mode or ("wait" if wait_for_inflight_requests else "abort"), clear_cache)
        return Response(status_code=200)

    @app.post("/resume")
    async def resume() -> Response:
        await async_llm.resume_generation()
        return Response(status_code=200)

    @app.get("/get_world_size")
    async def get_world_size(include_dp: bool = Query(True)) -> JSONResponse:
        """vLLM's (RL libraries size their weight transfer by it): one device, so 1."""
        return JSONResponse({"world_size": 1})

    @app.get("/is_paused")
    async def is_paused() -> JSONResponse:
        return JSONResponse({"is_paused": async_llm.paused})

    @app.post("/collective_rpc")
    async def collective_rpc(body: CollectiveRpcRequest) -> JSONResponse:
        results = await on_engine(lambda engine: engine.collective_rpc(body.method, body.timeout, tuple(body.args),
                                                                         body.kwargs), body.timeout)
        return JSONResponse({"results": [_jsonable(r) for r in results]})
