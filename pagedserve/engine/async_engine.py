"""AsyncLLM: the LLMEngine step loop in a background thread, one asyncio stream per request.

Threading model. The engine is touched by one thread only (`pagedserve-engine`). The event
loop talks to it through an inbox of commands (add / abort / abort-all) under a condition
variable; the engine thread drains the inbox before every step and sleeps on the condition
when it has nothing to do. Outputs go back per step with `loop.call_soon_threadsafe` into
per-request asyncio queues. Tokenization runs on the caller's side (a tokenizer thread),
never on the engine thread, and the engine receives token ids."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Callable, Optional, Protocol, TypeVar, Union

from pagedserve.config import EngineArgs
from pagedserve.engine.engine import LLMEngine, PromptType, refuse_truncated_images
from pagedserve.errors import EngineSleepingError
from pagedserve.lora.request import LoRARequest
from pagedserve.outputs import CompletionOutput, PoolingRequestOutput, RequestOutput
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("pagedserve")

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop failed (or was shut down); no request can be served any more."""


class UnavailableError(RuntimeError):
    """The request cannot be taken now (the waiting queue is full, or the server is
    draining); nothing was queued. `retry_after`: seconds after which a retry may succeed."""

    def __init__(self, message: str, retry_after: Optional[int] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestStatsTracker(Protocol):
    def on_output(self, output: RequestOutput, now: float) -> None: ...

    def on_pooled(self, output: PoolingRequestOutput, now: float) -> None: ...

    def on_abort(self, now: float) -> None: ...


class StatLogger(Protocol):
    """Receives every request's outputs (on the event loop), e.g. for Prometheus metrics."""

    def new_request(self, arrival_time: float, n: int) -> RequestStatsTracker: ...


class Reservation:
    """Room for `n` requests in the waiting queue, taken before a response starts, so that a
    stream is never refused after its 200 has gone out. Each generate() given it uses one
    unit; release() returns the rest, as does garbage collection (a stream that never started)."""

    def __init__(self, llm: "AsyncLLM", n: int) -> None:
        self._llm = llm
        self.left = n

    def take(self) -> bool:  # under the engine's lock
        if self.left <= 0:
            return False
        self.left -= 1
        self._llm._reserved -= 1
        return True

    def release(self) -> None:
        with self._llm._cond:
            self._llm._reserved -= self.left
            self.left = 0

    def __del__(self) -> None:
        if self.left:
            try:
                self.release()
            except Exception:  # at interpreter exit the engine may be half torn down
                pass


_ABORTED = object()  # queue item: abort() / abort_all() ended this request
_Item = Union[RequestOutput, BaseException, object]


@dataclass(eq=False)
class _Stream:
    request_id: str
    loop: asyncio.AbstractEventLoop
    trackers: list[RequestStatsTracker]
    queue: "asyncio.Queue[_Item]" = field(default_factory=asyncio.Queue)


@dataclass
class _Add:
    stream: _Stream
    prompt: dict
    params: SamplingParams
    arrival_time: float
    cache_salt: Optional[str]
    lora_request: Optional[LoRARequest] = None
    priority: int = 0


@dataclass
class _Abort:
    request_id: str
    stream: Optional[_Stream] = None  # set by the stream's own reader when it goes away


class _AbortAll:
    pass


PAUSE_MODES = ("abort", "wait", "keep")


@dataclass
class _Pause:
    """Stop stepping (pause_generation): "abort" ends the requests in flight first; "keep"
    leaves them queued, to go on after resume_generation."""
    mode: str
    clear_cache: bool
    loop: asyncio.AbstractEventLoop
    future: "asyncio.Future[Any]"


@dataclass
class _Call:
    """Run fn(engine) on the engine thread, between steps (sleep, wake_up, collective_rpc)."""
    fn: Callable[[LLMEngine], Any]
    loop: asyncio.AbstractEventLoop
    future: "asyncio.Future[Any]"


def _settle(future: "asyncio.Future[Any]", result: Any, error: Optional[BaseException]) -> None:
    if not future.done():  # its caller may have gone (cancelled)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _answer(call: Union[_Call, _Pause], result: Any, error: Optional[BaseException]) -> None:
    """From the engine thread: settle the caller's future on its loop (gone: nobody waits)."""
    try:
        call.loop.call_soon_threadsafe(_settle, call.future, result, error)
    except RuntimeError:  # that loop is closed
        pass


def _deliver(items: list[tuple[_Stream, _Item]], now: float) -> None:
    """On the event loop: hand a step's outputs to their streams."""
    for stream, item in items:
        if isinstance(item, (RequestOutput, PoolingRequestOutput)):
            for t in stream.trackers:
                try:
                    if isinstance(item, RequestOutput):
                        t.on_output(item, now)
                    else:
                        t.on_pooled(item, now)
                except Exception:  # statistics must never stall a stream
                    logger.exception("stat logger failed")
        stream.queue.put_nowait(item)


class AsyncLLM:
    """`max_waiting_requests` bounds the requests queued in the engine and not yet running
    (None: unbounded); beyond it new requests fail at once with UnavailableError."""

    def __init__(self, engine: LLMEngine, stat_loggers: Optional[list[StatLogger]] = None,
                 max_waiting_requests: Optional[int] = None) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be at least 1, got {max_waiting_requests}.")
        self.engine = engine
        self.stat_loggers: list[StatLogger] = list(stat_loggers or [])
        self.max_waiting_requests = max_waiting_requests
        # Re-entrant: a Reservation may be collected (and released) while its thread holds it.
        self._cond = threading.Condition(threading.RLock())
        self._inbox: list[Union[_Add, _Abort, _AbortAll]] = []
        self._streams: dict[str, _Stream] = {}  # owned by the engine thread
        self._dead: Optional[BaseException] = None
        self._stopping = False
        self._draining = False
        # Queue length, under _cond: requests the engine held as waiting after its last step
        # (plus those it took from the inbox since), adds still in the inbox, reservations.
        self._engine_waiting = 0
        self._inbox_adds = 0
        self._reserved = 0
        self._failure_callbacks: list[Callable[[BaseException], None]] = []
        # One thread: tokenizer calls stay serialised among themselves and off the loop.
        self._tokenizer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pagedserve-tokenizer")
        # Structured-output grammars compile apart: a big JSON schema can take seconds, and
        # must not hold up every other request's tokenization.
        self._grammar_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pagedserve-grammar")
        self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, stat_loggers: Optional[list[StatLogger]] = None,
                         max_waiting_requests: Optional[int] = None) -> "AsyncLLM":
        return cls(LLMEngine.from_engine_args(args), stat_loggers, max_waiting_requests)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def errored(self) -> bool:
        return self._dead is not None

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def num_waiting(self) -> int:
        """Requests queued and not yet running (including adds the engine has not seen and
        reserved places)."""
        with self._cond:
            return self._engine_waiting + self._inbox_adds + self._reserved

    def add_failure_callback(self, callback: Callable[[BaseException], None]) -> None:
        """Called once, on the engine thread, with the exception that killed the engine loop
        (not on an orderly shutdown)."""
        self._failure_callbacks.append(callback)

    def stop_accepting(self) -> None:
        """Draining for shutdown: new requests fail with UnavailableError; in-flight ones go on."""
        self._draining = True

    def reserve(self, num_requests: int = 1) -> Reservation:
        """Places for `num_requests` in the waiting queue, or UnavailableError (503) now, all
        or nothing. Pass the reservation to generate(); release() what is left unused."""
        self._check_alive()
        with self._cond:
            self._check_room(num_requests)
            self._reserved += num_requests
            return Reservation(self, num_requests)

    def _check_room(self, num_requests: int) -> None:  # holds _cond
        limit = self.max_waiting_requests
        if limit is not None and self._engine_waiting + self._inbox_adds + self._reserved + num_requests > limit:
            raise UnavailableError(f"the server is overloaded: {limit} requests are already waiting "
                                   "(--max-waiting-requests); retry later.", retry_after=1)

    def add_stat_logger(self, stat_logger: StatLogger) -> None:
        self.stat_loggers.append(stat_logger)

    # ---- API side (event loop) ------------------------------------------------------------
    async def run_tokenizer(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run tokenizer work (encoding, chat templates) off the event loop and the engine."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_pool, lambda: fn(*args, **kwargs))

    async def preprocess(self, prompt: PromptType, params: Union[SamplingParams, PoolingParams]) -> dict:
        """Tokenize and validate a prompt; returns {"prompt_token_ids", "prompt"}. Raises
        ValueError for a request that can never run, EngineDeadError when the engine is gone."""
        self._check_alive()
        features: list = []
        if self.engine.mm_processor is not None or (isinstance(prompt, dict) and (
                prompt.get("multi_modal_data") is not None or "prompt_embeds" in prompt or "mm_features" in prompt)):
            # (images are decoded off the event loop; a text prompt's placeholders are checked)
            text, ids, features = await self.run_tokenizer(self.engine.process_inputs, prompt)
            refuse_truncated_images(features, params)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = self.engine.process_prompt(prompt)
        else:
            text, ids = await self.run_tokenizer(self.engine.process_prompt, prompt)
        types = None
        if isinstance(params, PoolingParams):  # both read only fixed config: safe off the engine thread
            self.engine.validate_pooling(ids, params)
            types = self.engine.token_types(prompt, len(ids))
        else:
            self.engine.validate(ids, params)
        if isinstance(params, SamplingParams) and params.structured_outputs is not None:  # a 400, before any stream
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._grammar_pool, self.engine.compile_grammar, params)
        keep = self.engine.truncation(params)
        if keep is not None and len(ids) > keep:
            ids, text = ids[-keep:], None  # the text no longer matches
            types = types[-keep:] if types is not None else None
        out = {"prompt_token_ids": ids, "prompt": text}
        if features:
            out["mm_features"] = features
        if types is not None:
            out["token_type_ids"] = types
        return out

    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str, *,
                       arrival_time: Optional[float] = None, cache_salt: Optional[str] = None,
                       reservation: Optional[Reservation] = None,
                       lora_request: Optional[LoRARequest] = None,
                       priority: int = 0) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs as deltas (new text/tokens/logprobs per output; with
        n > 1 only the samples that changed). Closing the iterator or cancelling the task
        consuming it aborts the request at once and frees its KV blocks. Without a
        `reservation` holding a place, a full waiting queue raises UnavailableError."""
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.engine.check_priority(priority)
        tokens_prompt = await self.preprocess(prompt, params)
        params = params.clone()
        params.output_kind = RequestOutputKind.DELTA
        loop = asyncio.get_running_loop()
        stream = _Stream(request_id, loop, [s.new_request(arrival_time, params.n) for s in self.stat_loggers])
        self._enqueue(_Add(stream, tokens_prompt, params, arrival_time, cache_salt, lora_request, priority),
                      reservation)
        done = False
        finished_seqs: set[int] = set()
        try:
            while not done:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True  # the engine side has already dropped this request
                    raise item
                if item is _ABORTED:
                    done = True
                    for t in stream.trackers:
                        t.on_abort(time.monotonic())
                    embeds = any(f.precomputed for f in tokens_prompt.get("mm_features", ()))
                    ids = tokens_prompt["prompt_token_ids"]
                    yield RequestOutput(request_id, tokens_prompt["prompt"], None if embeds else ids,
                                        [CompletionOutput(i, "", [], finish_reason="abort")
                                         for i in range(params.n) if i not in finished_seqs], finished=True,
                                        num_prompt_embeds=len(ids) if embeds else 0)
                    return
                assert isinstance(item, RequestOutput)
                finished_seqs.update(c.index for c in item.outputs if c.finish_reason is not None)
                done = item.finished
                yield item
        finally:
            if not done:  # the consumer went away (disconnect, cancel, close)
                self._post(_Abort(request_id, stream))
                for t in stream.trackers:
                    t.on_abort(time.monotonic())

    def _enqueue(self, add: "_Add", reservation: Optional[Reservation]) -> None:
        with self._cond:
            self._check_alive()
            if reservation is None or not reservation.take():
                self._check_room(1)
            self._inbox.append(add)
            self._inbox_adds += 1
            self._cond.notify()

    async def encode(self, prompt: PromptType, params: PoolingParams, request_id: str, *,
                     arrival_time: Optional[float] = None, reservation: Optional[Reservation] = None,
                     priority: int = 0) -> PoolingRequestOutput:
        """A pooling request (embedding, classification): its result once its prompt is computed.
        Cancelling the awaiting task aborts it and frees its KV blocks."""
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.engine.check_priority(priority)
        tokens_prompt = await self.preprocess(prompt, params)
        stream = _Stream(request_id, asyncio.get_running_loop(), [s.new_request(arrival_time, 1)
                                                                  for s in self.stat_loggers])
        self._enqueue(_Add(stream, tokens_prompt, params.clone(), arrival_time, None, priority=priority), reservation)
        done = False
        try:
            item = await stream.queue.get()
            done = True
            if isinstance(item, BaseException):
                raise item
            if item is _ABORTED:
                raise UnavailableError("the request was aborted: the server is shutting down.", retry_after=1)
            return item
        finally:
            if not done or item is _ABORTED:
                for t in stream.trackers:
                    t.on_abort(time.monotonic())
            if not done:
                self._post(_Abort(request_id, stream))

    def abort(self, request_id: str) -> None:
        """Abort a request by id; its stream ends with a final output, finish_reason "abort"."""
        self._post(_Abort(request_id))

    def abort_all(self) -> None:
        """End every in-flight request now; each stream gets a final output with
        finish_reason "abort" (used by graceful shutdown)."""
        self._post(_AbortAll())

    async def call_engine(self, fn: Callable[[LLMEngine], T]) -> T:
        """fn(engine) on the engine thread, between two steps; its result or its exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._cond:  # checked under the lock: a dying loop takes the inbox under it too
            self._check_alive()
            self._inbox.append(_Call(fn, loop, future))
            self._cond.notify()
        return await future

    async def pause_generation(self, mode: str = "abort", clear_cache: bool = True) -> None:
        """vLLM's: stop generating, for a weight update between steps. mode "abort": requests in
        flight end now (finish_reason "abort"); "wait": no new request starts and this returns
        once the running ones have finished; "keep": they stay, frozen, and go on after
        resume_generation(). clear_cache: the prefix cache is emptied, and (keep) the frozen
        requests recompute their tokens on resume, so every KV entry comes from the new
        weights. Requests that arrive while paused wait in the queue."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}.")
        if mode == "wait":
            def stop_admitting(engine: LLMEngine) -> int:
                engine.scheduler.admitting = False
                return engine.scheduler.num_running

            try:
                while await self.call_engine(stop_admitting):
                    await asyncio.sleep(0.01)
            except BaseException:  # (the caller went away, say): admit again, nothing paused
                with self._cond:
                    loop = asyncio.get_running_loop()
                    self._inbox.append(_Call(lambda e: setattr(e.scheduler, "admitting", True), loop,
                                             loop.create_future()))
                    self._cond.notify()
                raise
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            self._check_alive()
            self._inbox.append(_Pause(mode, clear_cache, loop, future))
            self._cond.notify()
        await future

    async def resume_generation(self) -> None:
        def resume(engine: LLMEngine) -> None:
            engine.paused = False

        await self.call_engine(resume)

    @property
    def paused(self) -> bool:
        return self.engine.paused

    async def check_health(self) -> None:
        self._check_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still in flight fail with EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._tokenizer_pool.shutdown(wait=False)
        self._grammar_pool.shutdown(wait=False)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running ({self._dead})")
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")
        if self._draining:
            raise UnavailableError("the server is shutting down and takes no new requests.")

    def _post(self, cmd: Union[_Abort, _AbortAll]) -> None:
        with self._cond:
            self._inbox.append(cmd)
            self._cond.notify()

    # ---- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._inbox and not self._stopping and (
                        engine.paused or not engine.has_unfinished_requests()):
                    self._cond.wait()
                if self._stopping:
                    break
                cmds, self._inbox = self._inbox, []
                self._engine_waiting += self._inbox_adds  # still waiting, now in the engine's hands
                self._inbox_adds = 0
            try:
                outbox: list[tuple[_Stream, _Item]] = []
                for cmd in cmds:
                    self._apply(cmd, outbox)
                if engine.has_unfinished_requests() and not engine.paused:
                    self._route(engine.step(), outbox)
                with self._cond:
                    self._engine_waiting = engine.scheduler.num_waiting
                self._send(outbox)
            except Exception as e:  # the engine's state can no longer be trusted
                logger.exception("pagedserve engine loop failed; every in-flight request fails")
                self._fail_all(EngineDeadError(f"the engine loop failed: {type(e).__name__}: {e}"), e)
                for callback in self._failure_callbacks:
                    try:
                        callback(e)
                    except Exception:
                        logger.exception("engine failure callback failed")
                return
        self._fail_all(EngineDeadError("the engine was shut down"), None)

    def _route(self, outputs: list, outbox: list[tuple[_Stream, _Item]]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                if out.finished:
                    del self._streams[out.request_id]
                outbox.append((stream, out))

    def _pause(self, cmd: _Pause, outbox: list[tuple[_Stream, _Item]]) -> None:
        engine = self.engine
        self._route(engine.flush(), outbox)  # the step in flight lands: nothing runs after this
        if cmd.mode == "abort":
            self._apply(_AbortAll(), outbox)
        if cmd.clear_cache:
            engine.recompute_all()
        engine.scheduler.admitting = True
        self.engine.paused = True
        _answer(cmd, None, None)

    def _apply(self, cmd: Union[_Add, _Abort, _AbortAll, _Call, _Pause], outbox: list[tuple[_Stream, _Item]]) -> None:
        if isinstance(cmd, _Pause):
            self._pause(cmd, outbox)
        elif isinstance(cmd, _Call):
            try:
                result, error = cmd.fn(self.engine), None
            except Exception as e:  # the caller's to handle; the engine goes on
                result, error = None, e
            _answer(cmd, result, error)
        elif isinstance(cmd, _Add):
            rid = cmd.stream.request_id
            try:
                if rid in self._streams:
                    raise ValueError(f"request_id {rid!r} is already in use.")
                self.engine.add_request(rid, cmd.prompt, cmd.params, cmd.arrival_time, cmd.cache_salt,
                                        cmd.lora_request, cmd.priority)
            except (ValueError, EngineSleepingError) as e:
                outbox.append((cmd.stream, e))
                return
            self._streams[rid] = cmd.stream
        elif isinstance(cmd, _Abort):
            stream = self._streams.get(cmd.request_id)
            if stream is not None and (cmd.stream is None or cmd.stream is stream):
                del self._streams[cmd.request_id]
                self.engine.abort_request(cmd.request_id)
                if cmd.stream is None:  # aborted by id: tell whoever reads the stream
                    outbox.append((stream, _ABORTED))
        else:
            self.engine.abort_request(list(self._streams))
            outbox.extend((s, _ABORTED) for s in self._streams.values())
            self._streams.clear()

    def _send(self, outbox: list[tuple[_Stream, _Item]]) -> None:
        """One wake-up per event loop per step, not one per output."""
        if not outbox:
            return
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, _Item]]] = {}
        for stream, item in outbox:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items, now)
            except RuntimeError:  # that loop is closed: nobody is left to read these
                for stream, _ in items:
                    if self._streams.get(stream.request_id) is stream:
                        del self._streams[stream.request_id]
                        self.engine.abort_request(stream.request_id)

    def _fail_all(self, err: EngineDeadError, cause: Optional[BaseException]) -> None:
        with self._cond:
            self._dead = err
            cmds, self._inbox = self._inbox, []
        streams = list(self._streams.values()) + [c.stream for c in cmds if isinstance(c, _Add)]
        for c in cmds:
            if isinstance(c, (_Call, _Pause)):
                _answer(c, None, EngineDeadError(str(err)))
        self._streams.clear()
        outbox: list[tuple[_Stream, _Item]] = []
        for s in streams:
            e = EngineDeadError(str(err))
            e.__cause__ = cause
            outbox.append((s, e))
        try:
            self._send(outbox)
        except Exception:  # never let the last act of a dying thread raise
            logger.exception("could not notify requests of the engine failure")
