"""Running a pagedserve app on a free localhost port in a background thread, and reading
its Prometheus metrics, for the server tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Callable, Iterator, Optional

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.config import EngineArgs
from pagedserve.engine.async_engine import AsyncLLM


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> until stop()."""

    def __init__(self, app: Any, make_server: Callable[[uvicorn.Config], uvicorn.Server] = uvicorn.Server) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = make_server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "the server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting: {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def serving(model_dir: str, model_name: str = "tiny-llama", engine_kwargs: Optional[dict] = None,
            **build_kwargs: Any) -> Iterator[ServerThread]:
    """A fresh AsyncLLM on `model_dir` (EngineArgs: engine_kwargs), served by
    build_app(**build_kwargs) on a free port until the block ends; the engine is `.llm`."""
    from pagedserve.entrypoints.openai.api_server import build_app

    llm = make_async_llm(model_dir, **(engine_kwargs or {}))
    srv = ServerThread(build_app(llm, model_name, **build_kwargs))
    srv.llm = llm
    try:
        yield srv
    finally:
        srv.stop()
        llm.shutdown()


@contextlib.contextmanager
def openai_client(srv: ServerThread) -> Iterator[Any]:
    import openai

    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def make_async_llm(model_dir: str, max_waiting_requests: Optional[int] = None, **kwargs: Any) -> AsyncLLM:
    kwargs = {"max_model_len": 512, "seed": 0, **kwargs}
    return AsyncLLM.from_engine_args(EngineArgs(model=model_dir, **kwargs), max_waiting_requests=max_waiting_requests)


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """GET /metrics -> {(sample name, labels): value}."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def no_requests_left(llm: AsyncLLM) -> bool:
    e = llm.engine
    return e.kv.usage() == 0 and not e.has_unfinished_requests() and not e.output_processor.states
