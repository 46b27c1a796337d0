"""Image embeddings for a step's prefill chunks: the vision encoder runs on an image the
first time a chunk covers any of its placeholders, and its output stays, keyed by the
image's hash, until no request holding that image remains (chunked prefill, preemption and
n > 1 siblings reuse it; an image served from the prefix cache is never encoded)."""

from __future__ import annotations

import bisect
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pagedserve.engine.scheduler import ScheduledRequest
from pagedserve.worker.device_io import to_device


def profile_images(encoder: nn.Module, config: Any) -> list:
    """The images of the vision encoder's worst step, for the memory profile. A step encodes
    every new image its prompt chunks touch, in one pass: max_num_batched_tokens placeholders
    touch at most ceil((n - 1) / k) + 1 images of k placeholders each (cut at both ends), and
    no more than the batch's requests may carry (Gemma 3's pan-and-scan: each image and its
    crops). Copies of the model's largest image(s)."""
    largest = encoder.profile_features(config.max_model_len)
    per_copy = max(1, sum(f.num_embeds for f in largest))
    n = config.max_num_batched_tokens
    copies = -(-(n - 1) // per_copy) + 1
    per_image = getattr(encoder, "images_per_image", 1)
    copies = min(copies, config.max_num_seqs * max(1, config.max_images_per_prompt) * per_image)
    return largest * copies


class EncoderCache:
    def __init__(self, encoder: Optional[nn.Module], device: torch.device, dtype: torch.dtype) -> None:
        self.encoder = encoder
        self.device = device
        self.dtype = dtype
        self.embeddings: dict[str, torch.Tensor] = {}  # image hash -> [tokens, hidden]
        self.users: dict[str, set[str]] = {}  # image hash -> request ids holding it
        self.held: dict[str, list[str]] = {}  # request id -> its image hashes
        self.positions: dict[str, Optional[tuple[np.ndarray, int]]] = {}  # request id -> its M-RoPE positions

    def step_rows(self, order: Sequence[ScheduledRequest],
                  qsl: Sequence[int]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(flat rows, their embeddings) of the step's image placeholders, or None."""
        spans = []  # (flat row, feature, first and last+1 placeholder index)
        for i, s in enumerate(order):
            for f in s.request.mm_features:
                lo, hi = max(s.start, f.offset), min(s.end, f.offset + f.length)
                if lo < hi:
                    spans.append((qsl[i] + lo - s.start, f, lo - f.offset, hi - f.offset))
                    self._hold(s.request.request_id, f.hash)
        if not spans:
            return None
        self._encode([f for _, f, _, _ in spans if f.hash not in self.embeddings])
        rows: list[int] = []
        values = []
        for r, f, a, b in spans:
            if f.embed_rows is None:
                rows += range(r, r + b - a)
                values.append(self.embeddings[f.hash][a:b])
            else:  # only some of the span's positions take rows (in order)
                lo, hi = bisect.bisect_left(f.embed_rows, a), bisect.bisect_left(f.embed_rows, b)
                rows += (r + p - a for p in f.embed_rows[lo:hi])
                values.append(self.embeddings[f.hash][lo:hi])
        if not rows:
            return None
        return to_device(rows, torch.long, self.device), torch.cat(values)

    def _hold(self, rid: str, h: str) -> None:
        users = self.users.setdefault(h, set())
        if rid not in users:
            users.add(rid)
            self.held.setdefault(rid, []).append(h)

    def _encode(self, features: list) -> None:
        """Run the encoder over the images not cached yet."""
        todo = list({f.hash: f for f in features}.values())
        for f in [f for f in todo if f.precomputed]:  # prompt embeddings: the rows are given
            self.embeddings[f.hash] = f.pixel_values.to(self.device, self.dtype)
        todo = [f for f in todo if not f.precomputed]
        if not todo:
            return
        for f, emb in zip(todo, self.encoder.encode(todo)):
            if emb.shape[0] != f.num_embeds:
                raise RuntimeError(f"the vision encoder gave {emb.shape[0]} embeddings for an image with "
                                   f"{f.num_embeds} placeholders")
            self.embeddings[f.hash] = emb

    def rope_positions(self, req) -> Optional[tuple[np.ndarray, int]]:
        """M-RoPE positions of a request with images ([3, prompt] and the delta of the tokens
        after it; model/layers/rotary.py), None for a model with plain positions. Computed
        once a request and kept until its release."""
        if self.encoder is None:  # a text model taking prompt embeddings
            return None
        if req.request_id not in self.positions:
            self.positions[req.request_id] = self.encoder.rope_positions(req.num_prompt_tokens, req.mm_features)
        return self.positions[req.request_id]

    def release(self, rid: str) -> None:
        self.positions.pop(rid, None)
        for h in self.held.pop(rid, ()):
            users = self.users.get(h)
            if users is not None:
                users.discard(rid)
                if not users:
                    del self.users[h]
                    self.embeddings.pop(h, None)
