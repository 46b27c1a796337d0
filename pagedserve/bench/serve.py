"""`pagedserve bench serve`: drive a running OpenAI-compatible server over HTTP with streaming
requests (bounded concurrency and/or Poisson arrivals) and report latency figures like
`vllm bench serve`: TTFT, TPOT, ITL, E2E (mean / median / p99) and throughput."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

from pagedserve.bench.common import args_record, write_json
from pagedserve.bench.datasets import BenchRequest, random_requests


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=1000, help="prompt token ids are drawn below this")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson arrivals (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--output-json", default=None)
    p.add_argument("--no-progress", action="store_true")


async def _one(client, url: str, model: str, req: BenchRequest, headers: dict) -> RequestResult:
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult(prompt_len=req.prompt_len)
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = str(msg["error"])[:200]
                    return res
                if msg.get("usage") and not msg.get("choices"):
                    res.output_tokens = msg["usage"]["completion_tokens"]
                    continue
                if msg.get("choices") and msg["choices"][0].get("text"):
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
        res.e2e = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.ok = True
    except Exception as e:  # a failed request is a figure, not a crash
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _run(ns, reqs: list[BenchRequest], model: str) -> tuple[list[RequestResult], float]:
    import httpx
    from tqdm.auto import tqdm

    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    sem = asyncio.Semaphore(ns.max_concurrency) if ns.max_concurrency else None
    rng = random.Random(ns.seed)
    bar = tqdm(total=len(reqs), desc="requests", disable=ns.no_progress, dynamic_ncols=True)
    limits = httpx.Limits(max_connections=ns.max_concurrency or len(reqs) or 1)
    async with httpx.AsyncClient(base_url=ns.base_url, timeout=ns.timeout, limits=limits) as client:
        async def task(r: BenchRequest) -> RequestResult:
            if sem is None:
                out = await _one(client, ns.endpoint, model, r, headers)
            else:
                async with sem:
                    out = await _one(client, ns.endpoint, model, r, headers)
            bar.update(1)
            return out

        start = time.perf_counter()
        tasks = []
        for r in reqs:
            tasks.append(asyncio.create_task(task(r)))
            if ns.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(ns.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return results, duration


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    s = sorted(values)
    return {"mean": statistics.fmean(s), "median": statistics.median(s), "p99": s[min(len(s) - 1, int(0.99 * len(s)))]}


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "successful_requests": len(ok), "failed_requests": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_s": _stats([r.ttft for r in ok]), "tpot_s": _stats(tpot),
        "itl_s": _stats([x for r in ok for x in r.itl]), "e2e_s": _stats([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def print_summary(s: dict) -> None:
    print("============ Serving Benchmark Result ============")
    print(f"{'Successful requests:':<40}{s['successful_requests']}")
    print(f"{'Failed requests:':<40}{s['failed_requests']}")
    print(f"{'Benchmark duration (s):':<40}{s['duration_s']:.2f}")
    print(f"{'Total input tokens:':<40}{s['total_input_tokens']}")
    print(f"{'Total generated tokens:':<40}{s['total_output_tokens']}")
    print(f"{'Request throughput (req/s):':<40}{s['request_throughput']:.2f}")
    print(f"{'Output token throughput (tok/s):':<40}{s['output_token_throughput']:.2f}")
    print(f"{'Total token throughput (tok/s):':<40}{s['total_token_throughput']:.2f}")
    for key, title in (("ttft_s", "Time to First Token"), ("tpot_s", "Time per Output Token (excl. 1st token)"),
                       ("itl_s", "Inter-token Latency"), ("e2e_s", "End-to-end Latency")):
        short = key.split("_")[0].upper()
        print(f"{'-' * 15}{title}{'-' * 15}")
        for stat in ("mean", "median", "p99"):
            print(f"{f'{stat.capitalize()} {short} (ms):':<40}{1000 * s[key][stat]:.2f}")
    for e in s["errors"]:
        print(f"error: {e}")
    print("=" * 50)


def main(ns: argparse.Namespace) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    model = ns.model
    if model is None:
        r = httpx.get(ns.base_url + "/v1/models", headers=headers, timeout=30)
        r.raise_for_status()
        model = r.json()["data"][0]["id"]
    vocab = ns.vocab_size or 1000
    reqs = random_requests(ns.num_prompts, ns.input_len, ns.output_len, vocab, ns.range_ratio, seed=ns.seed,
                           special_ids=(0,))
    results, duration = asyncio.run(_run(ns, reqs, model))
    summary = summarize(results, duration)
    print_summary(summary)
    write_json(ns.output_json, {"bench": "serve", "model": model, "base_url": ns.base_url,
                                "args": {k: v for k, v in args_record(ns).items() if k != "api_key"},
                                "results": summary})
    return 0 if summary["failed_requests"] == 0 else 1
