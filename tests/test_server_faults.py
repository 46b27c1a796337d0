"""Faults end to end: `pagedserve serve` in a subprocess whose model step is made to fail
(the PAGEDSERVE_TEST_FAIL_STEP_AFTER test hook). In-flight requests fail with a 5xx (streams:
an error event, then [DONE]), the server stops answering 200 on /health, and the process exits
non-zero on its own, so a supervisor restarts it. The prompt never reaches the log."""

from __future__ import annotations

import asyncio
import json

import httpx

from pagedserve.bench.soak import start_server
from pagedserve.engine.fault_injection import ENV_VAR

SECRET = "PROMPT-TEXT-d41d8c"


async def _long_requests(url: str) -> tuple[list[str], httpx.Response]:
    body = {"prompt": f"{SECRET} tell me more", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        async def streamed() -> list[str]:
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                return [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]

        return await asyncio.gather(streamed(), c.post("/v1/completions", json=body))


def test_engine_failure_fails_requests_and_exits_nonzero(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "12")  # a few steps work, then every step raises
    log = tmp_path / "server.log"
    proc, url = start_server(llama_dir, ["--max-model-len", "256"], str(log), timeout=120)
    try:
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "fine", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200  # before the failure the server serves
        events, plain = asyncio.run(_long_requests(url))
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert 500 <= err["code"] < 600 and "injected model step failure" in err["message"]
        assert 1 < len(events) < 200  # some tokens went out before the failure
        assert 500 <= plain.status_code < 600 and plain.json()["error"]["code"] == plain.status_code
        try:  # never healthy again: 503 until the server has gone
            assert httpx.get(f"{url}/health", timeout=5).status_code == 503
        except httpx.TransportError:
            pass
        assert proc.wait(30) != 0  # exits by itself, non-zero: no hang
        text = log.read_text()
        assert "the engine failed" in text and "injected model step failure" in text
        assert SECRET not in text  # no prompt text without --enable-log-requests, even in tracebacks
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
