"""A short soak (the pytest-sized version of `pagedserve bench soak`): concurrent streaming
clients with random disconnects against a server with a small queue and a small KV cache,
in rounds. Nothing is lost, the server's counters agree with the clients', KV usage returns
to 0 after every round, RSS stays flat, /health is 200."""

from __future__ import annotations

from server_helpers import ServerThread, make_async_llm, no_requests_left

from pagedserve.bench.soak import SoakConfig, run_soak
from pagedserve.entrypoints.openai.api_server import build_app


def test_short_soak(llama_dir):
    # 8 running, 12 waiting, 32 clients: some are turned away (503) and back off.
    llm = make_async_llm(llama_dir, max_waiting_requests=12, max_num_seqs=8, kv_cache_memory_bytes=4 << 20)
    srv = ServerThread(build_app(llm, "tiny"))
    cfg = SoakConfig(duration=9.0, rounds=3, clients=32, disconnect_frac=0.3, long_len=(100, 300),
                     max_tokens=(4, 48), drain_timeout=20.0)
    try:
        report = run_soak(srv.url, cfg, log=lambda *_: None)
        totals = report.totals()
        assert report.failures == [], report.failures
        assert totals["lost"] == 0 and totals["errored"] == 0, (totals, [r.examples for r in report.rounds])
        assert totals["completed"] > 50 and totals["aborted"] > 5 and totals["rejected"] > 0, totals
        assert all(r.kv_usage == 0 for r in report.rounds) and report.health == 200
        assert no_requests_left(llm) and not llm.errored
    finally:
        srv.stop()
        llm.shutdown()
