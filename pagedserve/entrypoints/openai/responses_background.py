"""A background response (`background: true` on POST /v1/responses): its generation runs as a
task of its own, not the HTTP request's, so the client may leave and come back. The run keeps
every event it produced, so a stream can be followed live or resumed after a sequence number
(GET /v1/responses/{id}?stream=true&starting_after=N); cancelling the task aborts the engine
request, which frees its KV blocks."""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import AsyncIterator, Callable

TERMINAL = ("completed", "incomplete", "failed", "cancelled")


class BackgroundRun:
    """One background response's events and task. `on_response` gets each response snapshot
    the events carry (in progress, then the final one), and the final state once it ends
    without one: failed on an exception, cancelled when cancelled."""

    def __init__(self, events: AsyncIterator[str], on_response: Callable[[dict], None], snapshot: dict) -> None:
        self.events: list[tuple[int, str]] = []  # (sequence number, the SSE text)
        self.snapshot = snapshot
        self._on_response = on_response
        self._tick = asyncio.Event()  # set (and replaced) at every new event and at the end
        self.task = asyncio.create_task(self._run(events))

    @property
    def done(self) -> bool:
        return self.task.done()

    def _update(self, response: dict) -> None:
        self.snapshot = response
        self._on_response(response)

    def _wake(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    async def _run(self, events: AsyncIterator[str]) -> None:
        try:
            async with aclosing(events) as stream:
                async for sse in stream:
                    event = json.loads(sse.split("data: ", 1)[1])
                    if "response" in event:
                        self._update(event["response"])
                    self.events.append((event["sequence_number"], sse))
                    self._wake()
        except asyncio.CancelledError:
            self._update({**self.snapshot, "status": "cancelled"})
            raise
        except Exception as e:  # the engine failed under it: the response fails, the server goes on
            self._update({**self.snapshot, "status": "failed",
                          "error": {"code": "server_error", "message": f"{type(e).__name__}: {e}"}})
        finally:
            self._wake()

    async def cancel(self) -> dict:
        """Stop the generation (its engine request is aborted); the final snapshot. Cancelling
        a finished run changes nothing, as OpenAI's cancel is idempotent."""
        if not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        return self.snapshot

    async def follow(self, starting_after: int = -1) -> AsyncIterator[str]:
        """The run's events after `starting_after`, those already made and then each as it
        comes, until the run ends. Leaving early leaves the run running."""
        i = 0
        while True:
            tick = self._tick
            while i < len(self.events):
                seq, sse = self.events[i]
                i += 1
                if seq > starting_after:
                    yield sse
            if self.task.done():
                return
            await tick.wait()
