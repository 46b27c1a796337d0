"""Timing helpers for the GPU benchmarks: median wall or CUDA-event time, Triton's do_bench,
and back-to-back calls replayed from one CUDA graph."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_median(fn: Callable[[], None], device: str, warmup: int, iters: int) -> float:
    """Median seconds of fn, with CUDA events on the GPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_chain_ms(calls: list[Callable[[], Any]], device: str) -> float:
    """Milliseconds per call of `calls` run back to back, replayed from one CUDA graph as the
    engine's decode graphs run them (eager timing of a few-microsecond kernel measures its
    launch from Python instead: the first sweep saw every small layer at ~10 us)."""
    if device != "cuda":
        return bench_ms(lambda: [c() for c in calls], device) / len(calls)
    import triton.testing

    for c in calls:  # compiles, and cuBLAS picks its kernels, outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    ms = triton.testing.do_bench(graph.replay, warmup=5, rep=20, return_mode="median") / len(calls)
    del graph
    return ms


def bench_ms(fn: Callable[[], None], device: str, rep: int = 100) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=min(25, rep), rep=rep, return_mode="median")
    return 1000 * time_median(fn, device, 0, 1)  # CPU: the dry run, where one call checks the path


def kernel_bench_main(timings: Callable[[str, bool], dict], doc: str) -> None:
    """A kernel benchmark's command line: on the GPU, or --dry-run on CPU in Triton's
    interpreter (set before any kernel is imported); prints the timings as JSON."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ns = ap.parse_args()
    if ns.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    print(json.dumps(timings("cpu" if ns.dry_run else "cuda", ns.dry_run), indent=1))
