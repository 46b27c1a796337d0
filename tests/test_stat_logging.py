"""The server's periodic stats line (pagedserve/stat_logging.py, vLLM's LoggingStatLogger):
throughput over the interval, requests running and waiting, KV-cache usage, prefix-cache hit
rate; at info level while busy (and the interval after), debug when idle."""

from __future__ import annotations

import asyncio
import logging
import re

from server_helpers import make_async_llm

from pagedserve import SamplingParams
from pagedserve.stat_logging import LoggingStatLogger


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)", line)]


def test_stats_line_counts_the_interval(llama_dir, caplog):
    llm = make_async_llm(llama_dir)
    try:
        stats = LoggingStatLogger(llm.engine)
        llm.add_stat_logger(stats)
        prompt = {"prompt_token_ids": list(range(5, 45))}

        async def run(rid):
            async for _ in llm.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True), rid):
                pass

        asyncio.run(run("a"))
        t0 = stats.last_time
        text, loud = stats.line(t0 + 2.0)  # 40 prompt and 10 generated tokens in 2 s
        assert loud and _numbers(text)[:2] == [20.0, 5.0]
        assert "Running: 0 reqs, Waiting: 0 reqs" in text and "Prefix cache hit rate: 0.0%" in text
        asyncio.run(run("b"))  # the same prompt again: its two full blocks come from the cache
        text, loud = stats.line(t0 + 4.0)
        hit = float(re.search(r"hit rate: (\d+\.\d)%", text).group(1))
        assert loud and hit > 50 and _numbers(text)[:2] == [20.0, 5.0]
        text, loud = stats.line(t0 + 6.0)  # idle, but busy the interval before: still shown
        assert loud and _numbers(text)[:2] == [0.0, 0.0]
        assert stats.line(t0 + 8.0)[1] is False  # idle twice: debug only
        with caplog.at_level(logging.INFO, logger="pagedserve"):
            stats.log(t0 + 10.0)
        assert not [r for r in caplog.records if "throughput" in r.getMessage()]
    finally:
        llm.shutdown()
