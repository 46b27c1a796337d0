"""Overload: requests beyond the running batch wait in a bounded queue; beyond the bound the
server answers 503 with Retry-After and queues nothing. KV pressure: preemption under load
keeps greedy outputs identical to unloaded runs, through the server."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from server_helpers import ServerThread, make_async_llm, metric, no_requests_left, scrape, wait_for

from pagedserve import SamplingParams
from pagedserve.config import EngineArgs
from pagedserve.engine.async_engine import UnavailableError
from pagedserve.entrypoints.openai.api_server import build_app
from pagedserve.worker.kv_sizing import block_bytes

MODEL = "tiny"


def _events(lines) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


def _unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    err = r.json()["error"]
    assert err["type"] == "ServiceUnavailableError" and err["code"] == 503 and "--max-waiting-requests" in err["message"]


def test_waiting_queue_is_bounded(llama_dir):
    llm = make_async_llm(llama_dir, max_waiting_requests=2, max_num_seqs=1, max_model_len=2048)
    srv = ServerThread(build_app(llm, MODEL))
    url = f"{srv.url}/v1/completions"
    body = {"prompt": "queued", "ignore_eos": True, "stream": True, "temperature": 0}
    try:
        with httpx.stream("POST", url, json={**body, "max_tokens": 2000}) as running, \
                httpx.stream("POST", url, json={**body, "max_tokens": 5}) as waiting1, \
                httpx.stream("POST", url, json={**body, "max_tokens": 5}) as waiting2:
            assert running.status_code == waiting1.status_code == waiting2.status_code == 200
            wait_for(lambda: llm.engine.scheduler.num_running == 1 and llm.num_waiting == 2, 10, "a full queue")
            # Full: every kind of new request is refused at once, streamed ones before any stream starts.
            _unavailable(httpx.post(url, json={"prompt": "no room", "max_tokens": 2}))
            _unavailable(httpx.post(url, json={**body, "max_tokens": 2}))
            _unavailable(httpx.post(f"{srv.url}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "no room"}], "max_tokens": 2}))
            # More prompts than the queue could ever hold: a 400, retrying would not help.
            r = httpx.post(url, json={"prompt": ["a", "b", "c"], "max_tokens": 2})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
            # The bound holds where requests are queued too (what a request racing past the check meets).
            with pytest.raises(UnavailableError):
                asyncio.run(llm.generate("x", SamplingParams(max_tokens=1), "direct").__anext__())
            assert llm.engine.scheduler.num_waiting == 2 and llm.engine.get_num_unfinished_requests() == 3
            running.close()  # its client leaves: it is aborted, and the two that waited run to the end
            for r in (waiting1, waiting2):
                events = _events(r.iter_lines())
                assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        wait_for(lambda: no_requests_left(llm), 10, "the queue to drain")
        after = scrape(srv.url)
        assert metric(after, "pagedserve:request_success_total", finished_reason="length") == 2
        assert metric(after, "pagedserve:request_success_total", finished_reason="abort") == 1
        r = httpx.post(url, json={"prompt": ["room", "again"], "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        # Places are reserved before a response starts; one never used is given back when dropped.
        reservation = llm.reserve(2)
        _unavailable(httpx.post(url, json={"prompt": "x", "max_tokens": 1}))
        del reservation
        assert llm.num_waiting == 0 and httpx.post(url, json={"prompt": "x", "max_tokens": 1}).status_code == 200
    finally:
        srv.stop()
        llm.shutdown()


def test_preemption_under_kv_pressure_keeps_greedy_outputs(llama_dir):
    num_blocks = 12  # 192 tokens: one request fits, six at once do not
    cfg = EngineArgs(model=llama_dir).create_engine_config()
    hf = cfg.hf_config
    per_block = block_bytes(hf.num_hidden_layers, cfg.block_size, hf.num_key_value_heads,
                            hf.hidden_size // hf.num_attention_heads, cfg.dtype)
    llm = make_async_llm(llama_dir, kv_cache_memory_bytes=num_blocks * per_block, max_num_seqs=8)
    assert llm.engine.kv.num_blocks == num_blocks
    srv = ServerThread(build_app(llm, MODEL))
    prompts = [f"tenant {i} says" for i in range(6)]

    def body(p: str) -> dict:
        return {"prompt": p, "max_tokens": 60, "ignore_eos": True, "temperature": 0}

    async def loaded() -> list[str]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            rs = await asyncio.gather(*[c.post("/v1/completions", json=body(p)) for p in prompts])
        return [r.json()["choices"][0]["text"] for r in rs]

    try:
        alone = []
        for p in prompts:  # one at a time: no preemption
            alone.append(httpx.post(f"{srv.url}/v1/completions", json=body(p), timeout=60).json()["choices"][0]["text"])
        assert metric(scrape(srv.url), "pagedserve:num_preemptions_total") == 0
        together = asyncio.run(loaded())
        assert metric(scrape(srv.url), "pagedserve:num_preemptions_total") > 0
        assert together == alone
        assert no_requests_left(llm)
    finally:
        srv.stop()
        llm.shutdown()
