"""The server's periodic stats line (vLLM's LoggingStatLogger; off with --disable-log-stats):
every `interval` seconds, the prompt and generation throughput since the last line, the
running and waiting requests, KV-cache usage and the prefix-cache hit rate. While idle the
line goes to the debug level, so an idle server's log stays quiet."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from pagedserve.engine.engine import LLMEngine
from pagedserve.outputs import PoolingRequestOutput, RequestOutput

logger = logging.getLogger("pagedserve")


class _Counter:
    """One request's part of the totals."""

    def __init__(self, owner: "LoggingStatLogger") -> None:
        self.owner = owner
        self.started = False

    def on_output(self, out: RequestOutput, now: float) -> None:
        if not self.started:
            self.started = True
            self.owner.prompt_tokens += out.num_prompt_tokens
        self.owner.generation_tokens += sum(len(c.token_ids) for c in out.outputs)

    def on_pooled(self, out: PoolingRequestOutput, now: float) -> None:
        self.owner.prompt_tokens += len(out.prompt_token_ids)

    def on_abort(self, now: float) -> None:
        pass


class LoggingStatLogger:
    def __init__(self, engine: LLMEngine, interval: float = 10.0) -> None:
        self.engine = engine
        self.interval = interval
        self.prompt_tokens = self.generation_tokens = 0
        self.last_time = time.monotonic()
        self.last_queries = engine.kv.prefix_queries
        self.last_hits = engine.kv.prefix_hits
        self.was_busy = False

    def new_request(self, arrival_time: float, n: int) -> _Counter:
        return _Counter(self)

    def line(self, now: float) -> tuple[str, bool]:
        """The line for the interval ending `now` (counts start again), and whether anything
        happened in it or the one before (then it is logged at info level)."""
        e, span = self.engine, max(now - self.last_time, 1e-9)
        queries, hits = e.kv.prefix_queries - self.last_queries, e.kv.prefix_hits - self.last_hits
        running, waiting = e.scheduler.num_running, e.scheduler.num_waiting
        text = (f"Avg prompt throughput: {self.prompt_tokens / span:.1f} tokens/s, "
                f"Avg generation throughput: {self.generation_tokens / span:.1f} tokens/s, "
                f"Running: {running} reqs, Waiting: {waiting} reqs, "
                f"KV cache usage: {100 * e.kv.usage():.1f}%, "
                f"Prefix cache hit rate: {100 * hits / queries if queries else 0.0:.1f}%")
        busy = bool(self.prompt_tokens or self.generation_tokens or running or waiting)
        loud = busy or self.was_busy
        self.was_busy = busy
        self.prompt_tokens = self.generation_tokens = 0
        self.last_time, self.last_queries, self.last_hits = now, e.kv.prefix_queries, e.kv.prefix_hits
        return text, loud

    def log(self, now: Optional[float] = None) -> None:
        text, loud = self.line(time.monotonic() if now is None else now)
        logger.log(logging.INFO if loud else logging.DEBUG, text)

    async def run(self) -> None:
        """Log a line every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            self.log()
