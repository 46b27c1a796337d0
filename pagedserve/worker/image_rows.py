"""A step's per-row inputs that images change: M-RoPE positions (Qwen-VL) and the keys each
row sees where an image's tokens attend to each other both ways (Gemma 3)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from pagedserve.engine.scheduler import ScheduledRequest
from pagedserve.worker.encoder_cache import EncoderCache


def rope_positions(order: list[ScheduledRequest], qsl: list[int], positions: np.ndarray,
                   cache: EncoderCache) -> Optional[np.ndarray]:
    """Rewrite the positions of requests with images for M-RoPE (multimodal/qwen2_vl.py):
    prompt tokens take theirs, later tokens their index plus the request's delta. Returns
    the [3, T] positions when a row is an image token (the three components differ)."""
    spans = []
    for i, s in enumerate(order):
        req = s.request
        if not req.mm_features:
            continue
        rope = cache.rope_positions(req)
        if rope is None:
            return None  # a model with plain positions
        pos3, delta = rope
        a, b = qsl[i], qsl[i + 1]
        idx = np.arange(s.start, s.start + b - a)
        inside = idx < pos3.shape[1]
        p3 = np.where(inside, pos3[:, np.minimum(idx, pos3.shape[1] - 1)], idx + delta)
        positions[a:b] = p3[0]
        if (p3[1:] != p3[0]).any():
            spans.append((a, b, p3))
    if not spans:
        return None
    full = np.tile(positions, (3, 1))
    for a, b, p3 in spans:
        full[:, a:b] = p3
    return full


def image_kv_limits(order: list[ScheduledRequest], qsl: list[int]) -> Optional[np.ndarray]:
    """Keys each row sees when the step computes image tokens that attend to their whole
    image (their chunk reaches the image's end: Scheduler.whole_images); None if none."""
    limit = None
    for i, s in enumerate(order):
        for f in s.request.mm_features:
            lo, hi = max(s.start, f.offset), min(s.end, f.offset + f.length)
            if lo >= hi:
                continue
            if s.end < f.offset + f.length:
                raise RuntimeError("a prefill chunk ends inside an image that attends both ways")
            if limit is None:  # causal for every row first
                limit = np.concatenate([np.arange(o.start + 1, o.start + 1 + qsl[j + 1] - qsl[j])
                                        for j, o in enumerate(order)])
            limit[qsl[i] + lo - s.start:qsl[i] + hi - s.start] = f.offset + f.length
    return limit
