"""Prometheus metrics with vLLM's names (prefix `pagedserve:`, or vLLM's own `vllm:` with
metrics_prefix="vllm"), in a registry of their own so that several servers in one process do
not collide.

Engine state (queue lengths, KV usage, preemptions, prefix-cache counters) is read when
scraped, by a custom collector; per-request counters and latency histograms are fed by
AsyncLLM as outputs arrive (this object is its StatLogger)."""

from __future__ import annotations

from typing import Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagedserve.engine.engine import LLMEngine
from pagedserve.outputs import PoolingRequestOutput, RequestOutput


# vLLM's bucket boundaries.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0]
_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0]


def _1_2_5_buckets(limit: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(float(m * scale))
        scale *= 10


class _EngineStateCollector(Collector):
    """Gauges and counters that the engine already keeps, read at scrape time."""

    def __init__(self, engine: LLMEngine, model_name: str, prefix: str) -> None:
        self.engine = engine
        self.prefix = prefix
        self.labels = {"model_name": model_name}

    def _family(self, cls: type, name: str, doc: str, value: float) -> Metric:
        fam = cls(self.prefix + name, doc, labels=list(self.labels))
        fam.add_metric(list(self.labels.values()), value)
        return fam

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        yield self._family(GaugeMetricFamily, "num_requests_running", "Requests in the running batch.",
                           e.scheduler.num_running)
        yield self._family(GaugeMetricFamily, "num_requests_waiting", "Requests waiting to be scheduled.",
                           e.scheduler.num_waiting)
        yield self._family(GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                           e.kv.usage())
        yield self._family(CounterMetricFamily, "num_preemptions", "Preemptions (requests evicted to recompute).",
                           e.scheduler.num_preemptions)
        yield self._family(CounterMetricFamily, "prefix_cache_queries", "Tokens looked up in the prefix cache.",
                           e.kv.prefix_queries)
        yield self._family(CounterMetricFamily, "prefix_cache_hits", "Tokens found in the prefix cache.",
                           e.kv.prefix_hits)
        # vLLM's cache_config_info: the KV cache's settings as labels (value 1), for dashboards
        # that show capacity (num_gpu_blocks x block_size tokens).
        c = e.config
        info = {"block_size": c.block_size, "num_gpu_blocks": e.kv.num_blocks,
                "cache_dtype": "fp8" if c.kv_dtype != c.dtype else "auto",
                "enable_prefix_caching": c.enable_prefix_caching,
                "gpu_memory_utilization": c.gpu_memory_utilization}
        fam = GaugeMetricFamily(self.prefix + "cache_config_info", "The KV cache's settings.",
                                labels=[*self.labels, *info])
        fam.add_metric([*self.labels.values(), *(str(v) for v in info.values())], 1)
        yield fam
        if e.scheduler.proposer is not None:  # speculative decoding (vLLM's names)
            yield self._family(CounterMetricFamily, "spec_decode_num_draft_tokens", "Draft tokens proposed.",
                               e.scheduler.num_draft_tokens)
            yield self._family(CounterMetricFamily, "spec_decode_num_accepted_tokens",
                               "Draft tokens the model confirmed.", e.scheduler.num_accepted_tokens)
            yield self._family(CounterMetricFamily, "spec_decode_num_drafts",
                               "Steps a request ran drafts in.", e.scheduler.num_drafts)
            # Acceptance by position in a step's drafts: how far drafts go on standing.
            fam = CounterMetricFamily(self.prefix + "spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens the model confirmed, by position in the step's drafts.",
                                      labels=[*self.labels, "position"])
            for pos, n in enumerate(e.scheduler.accepted_per_pos):
                fam.add_metric([*self.labels.values(), str(pos)], n)
            yield fam


class _RequestTracker:
    """One request's timestamps; reports to the shared metrics."""

    def __init__(self, m: "PrometheusStatLogger", arrival_time: float, n: int) -> None:
        self.m = m
        self.arrival_time = arrival_time
        self.n = n
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None
        self.scheduled_time: Optional[float] = None
        self.num_prompt = self.num_generated = 0
        self.num_finished = 0
        self.done = False

    def on_output(self, out: RequestOutput, now: float) -> None:
        if self.done:
            return
        m = self.m
        new_tokens = sum(len(c.token_ids) for c in out.outputs)
        self.num_generated += new_tokens
        if self.first_token_time is None:
            self.num_prompt = out.num_prompt_tokens
            m.prompt_tokens.inc(self.num_prompt)
            if out.metrics is not None and out.metrics.first_scheduled_time is not None:
                self.scheduled_time = out.metrics.first_scheduled_time
                m.queue_time.observe(max(0.0, out.metrics.first_scheduled_time - out.metrics.arrival_time))
        if new_tokens:
            m.generation_tokens.inc(new_tokens)
            if self.first_token_time is None:
                self.first_token_time = now
                m.ttft.observe(now - self.arrival_time)
            elif self.last_token_time is not None:
                m.itl.observe(now - self.last_token_time)
            self.last_token_time = now
        for c in out.outputs:
            if c.finish_reason is not None:
                self.num_finished += 1
                m.success.labels(m.model_name, c.finish_reason).inc()
        if out.finished:
            self._phases()
            self._end(now)

    def _phases(self) -> None:
        """A finished request's sizes and phase times (vLLM's request_* histograms)."""
        m = self.m
        m.request_prompt_tokens.observe(self.num_prompt)
        m.request_generation_tokens.observe(self.num_generated)
        m.request_params_n.observe(self.n)
        first, last, start = self.first_token_time, self.last_token_time, self.scheduled_time
        if first is None or last is None:
            return
        m.decode_time.observe(last - first)
        if self.num_generated > 1:
            m.tpot.observe((last - first) / (self.num_generated - 1))
        if start is not None:
            m.prefill_time.observe(max(0.0, first - start))
            m.inference_time.observe(max(0.0, last - start))

    def on_pooled(self, out: PoolingRequestOutput, now: float) -> None:
        """A pooling request's one result (embedding, classification): its prompt tokens, a
        success with reason "stop", its queue time and latency."""
        if self.done:
            return
        m = self.m
        m.prompt_tokens.inc(len(out.prompt_token_ids))
        m.success.labels(m.model_name, "stop").inc()
        self.num_finished = 1
        self._end(now)

    def on_abort(self, now: float) -> None:
        if not self.done:
            self.m.success.labels(self.m.model_name, "abort").inc(max(0, self.n - self.num_finished))
            self._end(now)

    def _end(self, now: float) -> None:
        self.done = True
        self.m.e2e.observe(now - self.arrival_time)


class PrometheusStatLogger:
    def __init__(self, engine: LLMEngine, model_name: str, registry: Optional[CollectorRegistry] = None) -> None:
        self.model_name = model_name
        self.prefix = engine.config.metrics_prefix + ":"
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(_EngineStateCollector(engine, model_name, self.prefix))
        # process_resident_memory_bytes and friends (Linux), as vLLM's default registry has:
        # what a soak watches for leaks.
        ProcessCollector(registry=self.registry)
        r, labels, prefix = self.registry, ["model_name"], self.prefix

        def counter(name: str, doc: str) -> Counter:
            return Counter(prefix + name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(prefix + name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.success = Counter(prefix + "request_success", "Finished requests (per sample), by finish reason.",
                               labels + ["finished_reason"], registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive outputs.", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time from arrival to first scheduling.",
                                    _LATENCY_BUCKETS)
        tokens = _1_2_5_buckets(engine.config.max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens of finished requests.", tokens)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Generated tokens of finished requests (all samples).", tokens)
        self.request_params_n = histogram("request_params_n", "The n of finished requests.", [1, 2, 5, 10, 20])
        self.prefill_time = histogram("request_prefill_time_seconds", "First scheduling to first token.",
                                      _LATENCY_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "First token to last token.", _LATENCY_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds", "First scheduling to last token.",
                                        _LATENCY_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Mean time between a finished request's output tokens.", _ITL_BUCKETS)

    def new_request(self, arrival_time: float, n: int) -> _RequestTracker:
        return _RequestTracker(self, arrival_time, n)
