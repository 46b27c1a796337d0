"""`pagedserve bench soak`: hundreds of concurrent streaming clients against a server for a
bounded time, in rounds, then checks that nothing was lost or leaked.

Clients mix short and long prompts (token ids and chat), greedy and sampled; a share of
them disconnect at a random moment (before the response, mid-stream). Every request ends in
exactly one outcome: completed (finish_reason and [DONE]), errored (an error event or a 4xx/5xx
status), rejected (503: the queue was full; the client backs off), aborted (the client left),
or lost (anything else: a stream cut without [DONE], a transport error nobody asked for).
After each round, once the engine is idle: KV usage, queue lengths and the server's RSS
(Prometheus `process_resident_memory_bytes`). At the end the checks: nothing lost, the
server's own finish counters agree with the clients', KV usage 0 after every round, RSS flat
across rounds (the first is warm-up), /health 200. Exit status 1 if any check fails.

Without --base-url it starts `pagedserve serve` itself (on a tiny random model unless
--model is given) and finally stops it with SIGTERM, which must exit 0."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

OUTCOMES = ("completed", "errored", "rejected", "aborted", "lost")


@dataclass
class SoakConfig:
    duration: float = 180.0  # seconds of load in all, split over the rounds
    rounds: int = 3
    clients: int = 200
    disconnect_frac: float = 0.2
    long_frac: float = 0.25
    chat_frac: float = 0.2
    short_len: tuple[int, int] = (4, 32)  # prompt tokens
    long_len: tuple[int, int] = (200, 400)
    max_tokens: tuple[int, int] = (4, 64)
    vocab: int = 1000  # prompt token ids are drawn below this
    rss_tolerance_mib: float = 16.0  # growth allowed after the warm-up round
    drain_timeout: float = 60.0
    request_timeout: float = 120.0
    seed: int = 0


@dataclass
class RoundReport:
    index: int
    seconds: float
    outcomes: dict[str, int]
    server_finished: dict[str, float]  # request_success_total delta by finished_reason
    kv_usage: float
    running: float
    waiting: float
    rss_bytes: Optional[float]
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few details of lost / errored requests


@dataclass
class SoakReport:
    config: dict
    rounds: list[RoundReport]
    health: int = 0
    exit_code: Optional[int] = None  # of a server this run started and stopped
    failures: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, int]:
        return {k: sum(r.outcomes[k] for r in self.rounds) for k in OUTCOMES}


# ---- one client request -------------------------------------------------------------------
async def _stream(client: Any, path: str, body: dict) -> tuple[str, str]:
    """Send one streaming request and read it to the end: (outcome, detail)."""
    import httpx

    finish, error, done, events = None, None, False, -1  # events: -1 until the headers are in
    try:
        async with client.stream("POST", path, json=body) as r:
            events = 0
            if r.status_code != 200:
                text = (await r.aread())[:200].decode(errors="replace")
                return ("rejected" if r.status_code == 503 else "errored"), f"HTTP {r.status_code}: {text}"
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                events += 1
                if data == "[DONE]":
                    done = True
                    break
                try:
                    msg = json.loads(data)
                except ValueError:
                    return "lost", f"malformed event: {data[:120]!r}"
                if "error" in msg:
                    error = str(msg["error"])[:200]
                for ch in msg.get("choices", []):
                    finish = ch.get("finish_reason") or finish
    except httpx.TransportError as e:
        where = "before the response headers" if events < 0 else f"after {events} events"
        return "lost", f"{type(e).__name__} {where}: {e!r} {e.__context__!r}"
    if done and error is not None:
        return "errored", error
    if done and finish in ("length", "stop"):
        return "completed", ""
    return "lost", f"stream ended: done={done} finish_reason={finish!r} error={error!r}"


def _request(rng: random.Random, cfg: SoakConfig, model: str) -> tuple[str, dict]:
    lo, hi = cfg.long_len if rng.random() < cfg.long_frac else cfg.short_len
    n = rng.randint(lo, hi)
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(*cfg.max_tokens), "stream": True,
                            "ignore_eos": True}
    if rng.random() < 0.5:
        body["temperature"] = 0.0
    else:
        body.update(temperature=0.8, seed=rng.randrange(2 ** 31))
    if rng.random() < cfg.chat_frac:
        words = " ".join(f"w{rng.randrange(cfg.vocab)}" for _ in range(max(1, n // 4)))
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": words}]}
    return "/v1/completions", {**body, "prompt": [rng.randrange(1, cfg.vocab) for _ in range(n)]}


async def _client(client: Any, cfg: SoakConfig, model: str, rng: random.Random, deadline: float,
                  counts: dict[str, int], examples: dict[str, list[str]]) -> None:
    while time.monotonic() < deadline:
        path, body = _request(rng, cfg, model)
        try:
            if rng.random() < cfg.disconnect_frac:
                # Leave at a random moment: before the headers, or anywhere in the stream.
                try:
                    outcome, detail = await asyncio.wait_for(_stream(client, path, body), rng.uniform(0.0, 1.5))
                except asyncio.TimeoutError:
                    outcome, detail = "aborted", ""
            else:
                outcome, detail = await _stream(client, path, body)
        except Exception as e:  # whatever it was, it is a request that did not end properly
            outcome, detail = "lost", f"{type(e).__name__}: {e}"
        counts[outcome] += 1
        if outcome in ("lost", "errored") and len(examples.setdefault(outcome, [])) < 3:
            examples[outcome].append(detail)
        if outcome == "rejected":
            await asyncio.sleep(rng.uniform(0.05, 0.3))  # back off, as Retry-After asks


# ---- the server's side ----------------------------------------------------------------------
def _scrape(client: Any) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _metric(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def _finished_by_reason(samples: dict[tuple[str, frozenset], float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), v in samples.items():
        if name == "pagedserve:request_success_total":
            reason = dict(labels).get("finished_reason", "?")
            out[reason] = out.get(reason, 0.0) + v
    return out


def _wait_idle(client: Any, timeout: float) -> dict[tuple[str, frozenset], float]:
    """Poll /metrics until nothing runs, waits or holds KV blocks (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        s = _scrape(client)
        idle = all(_metric(s, f"pagedserve:{m}") == 0
                   for m in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"))
        if idle or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


async def _round(base_url: str, cfg: SoakConfig, model: str, headers: dict, index: int,
                 seconds: float) -> tuple[dict[str, int], dict[str, list[str]], float]:
    import httpx

    counts = {k: 0 for k in OUTCOMES}
    examples: dict[str, list[str]] = {}
    # Idle connections expire well before the server's keep-alive timeout (uvicorn: 5 s): else a
    # request sent as the server closes an idle connection is lost in transit (the HTTP/1.1
    # keep-alive race, which no server can prevent).
    limits = httpx.Limits(max_connections=cfg.clients, max_keepalive_connections=cfg.clients, keepalive_expiry=2.0)
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(cfg.request_timeout, connect=30.0)) as client:
        deadline = start + seconds
        await asyncio.gather(*[_client(client, cfg, model, random.Random(cfg.seed * 100003 + index * 1009 + i),
                                       deadline, counts, examples) for i in range(cfg.clients)])
    return counts, examples, time.monotonic() - start


def run_soak(base_url: str, cfg: SoakConfig, model: Optional[str] = None, api_key: Optional[str] = None,
             log: Any = print) -> SoakReport:
    """Run the rounds against a server and check the results (see the module docstring)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report = SoakReport(config=asdict(cfg), rounds=[])
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:
        if model is None:
            model = http.get("/v1/models").json()["data"][0]["id"]
        before = _scrape(http)
        for i in range(cfg.rounds):
            counts, examples, seconds = asyncio.run(_round(base_url, cfg, model, headers, i, cfg.duration / cfg.rounds))
            after = _wait_idle(http, cfg.drain_timeout)
            prev, cur = _finished_by_reason(before), _finished_by_reason(after)
            rss = after.get(("process_resident_memory_bytes", frozenset()))
            r = RoundReport(i, seconds, counts, {k: cur[k] - prev.get(k, 0.0) for k in cur},
                            _metric(after, "pagedserve:kv_cache_usage_perc"),
                            _metric(after, "pagedserve:num_requests_running"),
                            _metric(after, "pagedserve:num_requests_waiting"), rss, examples)
            report.rounds.append(r)
            log(f"round {i}: {seconds:.1f}s {counts} server finished {r.server_finished} kv={r.kv_usage} "
                f"running={r.running} waiting={r.waiting} rss={'?' if rss is None else f'{rss / 2**20:.1f} MiB'}")
            before = after
        report.health = http.get("/health").status_code
    report.failures = check(report, cfg)
    return report


def check(report: SoakReport, cfg: SoakConfig) -> list[str]:
    failures = []
    for r in report.rounds:
        c, s = r.outcomes, r.server_finished
        if c["lost"]:
            failures.append(f"round {r.index}: {c['lost']} requests lost, e.g. {r.examples.get('lost')}")
        if r.kv_usage != 0 or r.running != 0 or r.waiting != 0:
            failures.append(f"round {r.index}: engine not idle afterwards (kv={r.kv_usage}, running={r.running}, "
                            f"waiting={r.waiting})")
        # Every completion the clients saw was counted by the server once; the server may also
        # have finished requests whose clients left just before the end.
        finished = s.get("length", 0) + s.get("stop", 0)
        if not c["completed"] <= finished <= c["completed"] + c["aborted"]:
            failures.append(f"round {r.index}: server finished {finished} requests, clients completed "
                            f"{c['completed']} and left {c['aborted']}")
        if s.get("abort", 0) > c["aborted"]:
            failures.append(f"round {r.index}: server aborted {s.get('abort')} requests, clients left only "
                            f"{c['aborted']}")
        if c["completed"] == 0:
            failures.append(f"round {r.index}: no request completed")
    rss = [r.rss_bytes for r in report.rounds]
    if len(rss) >= 3 and all(x is not None for x in rss):
        growth = (rss[-1] - min(rss[1:])) / 2**20  # round 0 warms up caches and allocator pools
        if growth > cfg.rss_tolerance_mib:
            failures.append(f"RSS grew by {growth:.1f} MiB after warm-up (tolerance {cfg.rss_tolerance_mib} MiB): "
                            f"{[round(x / 2**20, 1) for x in rss]}")
    if report.health != 200:
        failures.append(f"/health answered {report.health}")
    if report.exit_code not in (None, 0):
        failures.append(f"the server exited with status {report.exit_code} on SIGTERM")
    return failures


# ---- a server of our own --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, args: list[str], log_path: str, timeout: float = 180.0) -> tuple[subprocess.Popen,
                                                                                                    str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", model_dir, "--host", "127.0.0.1",
           "--port", str(port), "--uvicorn-log-level", "warning", *args]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={"OMP_NUM_THREADS": "1", **os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not come up in {timeout:.0f}s; see {log_path}")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


# ---- CLI ------------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    d = SoakConfig()
    p.add_argument("--base-url", default=None, help="a running server (default: start one)")
    p.add_argument("--model", default=None, help="model directory for the server this run starts (default: a "
                   "tiny random model); with --base-url, the served model name")
    p.add_argument("--api-key", default=None)
    p.add_argument("--server-args", default="--max-model-len 1024 --max-num-seqs 64 --kv-cache-memory-bytes "
                   "67108864", help="extra `pagedserve serve` flags for the server this run starts")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of load in all (split over rounds)")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--clients", type=int, default=d.clients, help="concurrent streaming clients")
    p.add_argument("--disconnect-frac", type=float, default=d.disconnect_frac)
    p.add_argument("--long-frac", type=float, default=d.long_frac)
    p.add_argument("--rss-tolerance-mib", type=float, default=d.rss_tolerance_mib)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output-json", default=None)


def main(ns: argparse.Namespace) -> int:
    cfg = SoakConfig(duration=ns.duration, rounds=ns.rounds, clients=ns.clients, disconnect_frac=ns.disconnect_frac,
                     long_frac=ns.long_frac, rss_tolerance_mib=ns.rss_tolerance_mib, seed=ns.seed)
    proc = None
    with tempfile.TemporaryDirectory(prefix="pagedserve-soak-") as tmp:
        url, served = ns.base_url, ns.model if ns.base_url else None
        if url is None:
            model_dir = ns.model
            if model_dir is None:
                from pagedserve.model.random_model import build_random_model

                model_dir = os.path.join(tmp, "model")
                build_random_model(model_dir, "LlamaForCausalLM", max_position_embeddings=2048)
            log_path = os.path.join(tmp, "server.log")
            proc, url = start_server(model_dir, ns.server_args.split(), log_path)
            print(f"started `pagedserve serve` (pid {proc.pid}) at {url}")
        try:
            report = run_soak(url, cfg, served, ns.api_key)
        finally:
            if proc is not None:
                code = stop_server(proc)
        if proc is not None:
            report.exit_code = code
            report.failures = check(report, cfg)
            if report.failures:
                with open(log_path) as f:
                    print("---- server log (tail) ----\n" + f.read()[-3000:])
    totals = report.totals()
    rss = [None if r.rss_bytes is None else round(r.rss_bytes / 2**20, 1) for r in report.rounds]
    print(f"soak: {cfg.duration:.0f}s, {cfg.rounds} rounds, {cfg.clients} clients: {totals}")
    print(f"RSS per round (MiB): {rss}; KV usage after each round: {[r.kv_usage for r in report.rounds]}; "
          f"/health {report.health}" + ("" if report.exit_code is None else f"; server exit {report.exit_code}"))
    if len(rss) >= 2 and None not in rss:
        later = sum(sum(r.outcomes.values()) for r in report.rounds[1:])
        growth = (report.rounds[-1].rss_bytes - report.rounds[1].rss_bytes) / 2**20
        print(f"RSS change after warm-up: {growth:+.1f} MiB over {later} requests "
              f"({growth * 2**20 / max(1, later):+.0f} bytes per request)")
    print("PASS" if not report.failures else "FAIL:\n  " + "\n  ".join(report.failures))
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(asdict(report), f, indent=1)
    return 0 if not report.failures else 1
