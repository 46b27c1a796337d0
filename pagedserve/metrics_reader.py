"""LLM.get_metrics(): a snapshot of the offline engine's Prometheus metrics (metrics.py) as
vLLM's `vllm.v1.metrics.reader` objects, and what feeds them from the offline loop."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Union

from prometheus_client import CollectorRegistry

from pagedserve.outputs import CompletionOutput, RequestOutput


@dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    value: int


@dataclass
class Gauge(Metric):
    value: float


@dataclass
class Histogram(Metric):
    count: int
    sum: float
    buckets: dict[str, int] = field(default_factory=dict)  # upper bound ("le") -> cumulative count


def snapshot(registry: CollectorRegistry, prefix: str) -> list[Metric]:
    """Every metric named with `prefix`, one object per label set."""
    out: list[Metric] = []
    for fam in registry.collect():
        if not fam.name.startswith(prefix):
            continue
        if fam.type in ("counter", "gauge"):
            kind = Counter if fam.type == "counter" else Gauge
            for s in fam.samples:
                if fam.type == "counter" and not s.name.endswith("_total"):
                    continue  # (a counter's _created timestamp)
                value: Union[int, float] = int(s.value) if fam.type == "counter" else float(s.value)
                out.append(kind(fam.name, dict(s.labels), value))
        elif fam.type == "histogram":
            by_labels: dict[tuple, Histogram] = {}
            for s in fam.samples:
                labels = {k: v for k, v in s.labels.items() if k != "le"}
                h = by_labels.setdefault(tuple(sorted(labels.items())), Histogram(fam.name, labels, 0, 0.0))
                if s.name.endswith("_bucket"):
                    h.buckets[s.labels["le"]] = int(s.value)
                elif s.name.endswith("_count"):
                    h.count = int(s.value)
                elif s.name.endswith("_sum"):
                    h.sum = float(s.value)
            out.extend(by_labels.values())
    return out


class DeltaFeed:
    """One request's cumulative outputs turned into the deltas a stat tracker counts (new
    tokens, and each sample's finish once)."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self.sent: dict[int, int] = {}
        self.finished: set[int] = set()

    def feed(self, out: RequestOutput, now: float) -> None:
        deltas = []
        for c in out.outputs:
            new = c.token_ids[self.sent.get(c.index, 0):]
            self.sent[c.index] = len(c.token_ids)
            reason = c.finish_reason if c.index not in self.finished else None
            if reason is not None:
                self.finished.add(c.index)
            deltas.append(CompletionOutput(c.index, "", list(new), finish_reason=reason))
        self.tracker.on_output(dataclasses.replace(out, outputs=deltas), now)
