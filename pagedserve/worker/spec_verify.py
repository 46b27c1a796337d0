"""Verifying speculative drafts (engine/ngram.py) against the model's own distributions.

Greedy requests: a draft stands while it equals the model's argmax at its position.
Sampled requests (temperature > 0): speculative sampling with a deterministic draft. Draft
d at a position whose target distribution is q is accepted with probability q(d); at the
first rejection the token is drawn from q with d taken out (renormalised); if every draft
stands, the position after them is drawn from its q as usual. Each emitted token is then
distributed exactly as without speculation (Leviathan et al. 2023, Chen et al. 2023, with the
draft distribution one-hot)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pagedserve.worker.device_io import DeviceToHost, to_device
from pagedserve.worker.sampler import Sampler, SamplingBatch, inverse_cdf


def rejection_sample(probs: torch.Tensor, drafts: torch.Tensor, u_accept: torch.Tensor,
                     u_resample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [R, V] (each row a distribution), drafts [R] -> (accepted [R] bool, the token to
    emit instead where rejected [R])."""
    p_draft = probs.gather(1, drafts.unsqueeze(1)).squeeze(1)
    accepted = u_accept < p_draft
    residual = probs.scatter(1, drafts.unsqueeze(1), 0.0)
    return accepted, inverse_cdf(residual, u_resample)


@dataclass
class SampledDrafts:
    """The device results of one step's sampled speculative rows, on their way to the host."""

    requests: list  # the ScheduledRequests, in row order
    accepted: torch.Tensor  # [rows] bool
    resampled: torch.Tensor  # [rows]


def verify_sampled(sampler: Sampler, logits: torch.Tensor, rows: list[int], batch: SamplingBatch,
                   scheduled: list, d2h: DeviceToHost) -> Optional[SampledDrafts]:
    """Queue the checks of sampled requests' drafts: `rows` index their draft positions in
    `logits` (k rows per request, in `scheduled` order), `batch` is built for those rows."""
    if not rows:
        return None
    dev = logits.device
    probs = sampler.probabilities(logits[to_device(rows, torch.long, dev)], batch)
    drafts = to_device([t for s in scheduled for t in s.drafts], torch.long, dev)
    u_accept = sampler.uniforms(batch, len(rows), dev)
    u_resample = sampler.uniforms(batch, len(rows), dev)
    accepted, resampled = rejection_sample(probs, drafts, u_accept, u_resample)
    return SampledDrafts(scheduled, d2h(accepted), d2h(resampled))


def settle(drafts: list[int], picks: list[int], accepted: Optional[list[bool]] = None) -> tuple[list[int], int]:
    """(confirmed drafts, the token after them). Greedy (accepted None): picks are the model's
    choices at the k draft positions and the next; a draft stands while it equals its pick.
    Sampled: accepted[j] says whether draft j stands, picks[j] is the token drawn in its place
    if not, picks[k] the token after all k."""
    k = len(drafts)
    ok = 0
    if accepted is None:
        while ok < k and drafts[ok] == picks[ok]:
            ok += 1
    else:
        while ok < k and accepted[ok]:
            ok += 1
    return drafts[:ok], picks[ok]
