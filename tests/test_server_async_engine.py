"""AsyncLLM: per-request async streams from the background engine thread, abort on close,
abort_all's final event, the idle wait, engine death and shutdown; the shared-engine tests
run with synchronous and with async scheduling."""

from __future__ import annotations

import asyncio

import pytest
from server_helpers import make_async_llm, no_requests_left, wait_for

from pagedserve import LLM, SamplingParams
from pagedserve.engine.async_engine import EngineDeadError


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async_scheduling"])
def llm(llama_dir, request):
    llm = make_async_llm(llama_dir, async_scheduling=request.param)
    yield llm
    llm.shutdown()


async def _collect(llm, prompt, params, rid):
    outs = [o async for o in llm.generate(prompt, params, rid)]
    return outs


def test_concurrent_streams_match_offline_engine(llm, llama_dir):
    prompts = ["The capital of France is", "def main():", {"prompt_token_ids": [5, 6, 7, 8]}]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def run():
        return await asyncio.gather(*[_collect(llm, p, params, f"r{i}") for i, p in enumerate(prompts)])

    results = asyncio.run(run())
    offline = LLM(llama_dir, max_model_len=512).generate(prompts, params, use_tqdm=False)
    for outs, ref in zip(results, offline):
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        assert len(outs) > 1  # streamed, not delivered at the end
        # Deltas: concatenated they are the whole completion.
        assert [t for o in outs for t in o.outputs[0].token_ids] == ref.outputs[0].token_ids
        assert "".join(o.outputs[0].text for o in outs) == ref.outputs[0].text
        assert outs[-1].outputs[0].finish_reason == "length"
    assert no_requests_left(llm)


def test_closing_the_stream_aborts_and_frees_blocks(llm):
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def run():
        gen = llm.generate("a long one", params, "to-close")
        await gen.__anext__()
        await gen.__anext__()
        assert llm.engine.kv.usage() > 0
        await gen.aclose()

        async def consume():
            async for _ in llm.generate("another", params, "to-cancel"):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    wait_for(lambda: no_requests_left(llm), 5, "aborted requests to be freed")


def test_idle_engine_thread_does_not_spin(llm):
    calls = []
    real = llm.engine.step
    llm.engine.step = lambda: calls.append(1) or real()
    try:
        asyncio.run(_collect(llm, "x", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), "idle"))
        n = len(calls)
        assert n >= 3
        asyncio.run(asyncio.sleep(0.3))
        assert len(calls) == n  # nothing to do: no steps
    finally:
        del llm.engine.step


def test_validation_errors_and_duplicate_ids(llm):
    async def run():
        with pytest.raises(ValueError, match="maximum context length is 512"):
            await _collect(llm, "hi", SamplingParams(max_tokens=600), "too-long")
        with pytest.raises(ValueError, match="out of vocabulary"):
            await _collect(llm, {"prompt_token_ids": [10 ** 6]}, SamplingParams(), "oov")
        first = llm.generate("x", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), "dup")
        await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await _collect(llm, "y", SamplingParams(max_tokens=2), "dup")
        rest = [o async for o in first]  # the first request is unharmed
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "length"

    asyncio.run(run())
    assert no_requests_left(llm)


def test_abort_by_id_ends_the_stream(llm):
    async def run():
        gen = llm.generate("q", SamplingParams(temperature=0, max_tokens=400, ignore_eos=True), "by-id")
        await gen.__anext__()
        llm.abort("by-id")
        return [o async for o in gen]

    rest = asyncio.run(run())
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    wait_for(lambda: no_requests_left(llm), 5, "blocks freed after abort")


def test_abort_all_ends_streams_with_an_abort_event(llm):
    params = SamplingParams(temperature=0.8, n=2, max_tokens=400, ignore_eos=True)

    async def run():
        gen = llm.generate("p", params, "all")
        first = await gen.__anext__()
        llm.abort_all()
        rest = [o async for o in gen]
        return first, rest

    first, rest = asyncio.run(run())
    assert not first.finished
    final = rest[-1]
    assert final.finished and sorted(c.index for c in final.outputs) == [0, 1]
    assert all(c.finish_reason == "abort" for c in final.outputs)
    wait_for(lambda: no_requests_left(llm), 5, "blocks freed after abort_all")


def test_step_failure_kills_the_engine_and_fails_requests(llama_dir):
    llm = make_async_llm(llama_dir)
    steps = []
    real = llm.engine.step

    def failing_step():
        steps.append(1)
        if len(steps) > 3:
            raise RuntimeError("boom")
        return real()

    llm.engine.step = failing_step

    async def run():
        params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
        results = await asyncio.gather(*[_collect(llm, "x", params, f"d{i}") for i in range(3)],
                                       return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) and "boom" in str(r) for r in results)
        assert llm.errored
        with pytest.raises(EngineDeadError):  # later requests fail fast
            await _collect(llm, "y", params, "late")

    try:
        asyncio.run(run())
    finally:
        llm.shutdown()


def test_shutdown_stops_the_thread(llama_dir):
    llm = make_async_llm(llama_dir)
    llm.shutdown()
    assert not llm._thread.is_alive()
    with pytest.raises(EngineDeadError):
        asyncio.run(_collect(llm, "x", SamplingParams(max_tokens=2), "after"))
