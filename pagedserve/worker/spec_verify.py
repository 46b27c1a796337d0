"""Verifying speculative drafts (engine/ngram.py, worker/draft_model.py) against the model's
own distributions.

Greedy requests: a draft stands while it equals the model's argmax at its position.
Sampled requests (temperature > 0): speculative sampling (Leviathan et al. 2023, Chen et al.
2023). Draft d, drawn from the draft distribution r, at a position whose target distribution
is q is accepted with probability min(1, q(d) / r(d)); at the first rejection the token is
drawn from max(0, q - r) (renormalised); if every draft stands, the position after them is
drawn from its q as usual. Each emitted token is then distributed exactly as without
speculation. An n-gram draft is deterministic: r is one-hot, so d is accepted with
probability q(d) and the residual is q with d taken out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pagedserve.worker.device_io import DeviceToHost, to_device
from pagedserve.worker.sampler import Sampler, SamplingBatch, inverse_cdf


def rejection_sample(probs: torch.Tensor, drafts: torch.Tensor, u_accept: torch.Tensor,
                     u_resample: torch.Tensor, draft_probs: Optional[torch.Tensor] = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [R, V] (each row the target's distribution q), drafts [R] drawn from draft_probs
    [R, V] (the draft's r; None: one-hot, a deterministic draft) -> (accepted [R] bool, the
    token to emit instead where rejected [R])."""
    q_d = probs.gather(1, drafts.unsqueeze(1)).squeeze(1)
    if draft_probs is None:
        accepted = u_accept < q_d
        residual = probs.scatter(1, drafts.unsqueeze(1), 0.0)
    else:
        r_d = draft_probs.gather(1, drafts.unsqueeze(1)).squeeze(1)
        accepted = u_accept * r_d < q_d  # u < q(d) / r(d), without dividing
        residual = (probs - draft_probs).clamp_(min=0.0)  # has mass wherever a rejection can happen
    return accepted, inverse_cdf(residual, u_resample)


@dataclass
class SampledDrafts:
    """The device results of one step's sampled speculative rows, on their way to the host."""

    requests: list  # the ScheduledRequests, in row order
    accepted: torch.Tensor  # [rows] bool
    resampled: torch.Tensor  # [rows]
    rows: list[int]  # their rows in the step's logits
    emitted: torch.Tensor  # [rows] on the device: the draft where it stands, else its replacement


def verify_sampled(sampler: Sampler, logits: torch.Tensor, rows: list[int], batch: SamplingBatch,
                   scheduled: list, d2h: DeviceToHost,
                   draft_probs: Optional[torch.Tensor] = None) -> Optional[SampledDrafts]:
    """Queue the checks of sampled requests' drafts: `rows` index their draft positions in
    `logits` (k rows per request, in `scheduled` order), `batch` is built for those rows.
    draft_probs: [rows, V] the distributions the drafts were drawn from (None: one-hot)."""
    if not rows:
        return None
    dev = logits.device
    probs = sampler.probabilities(logits[to_device(rows, torch.long, dev)], batch)
    drafts = to_device([t for s in scheduled for t in s.drafts], torch.long, dev)
    u_accept = sampler.uniforms(batch, len(rows), dev)
    u_resample = sampler.uniforms(batch, len(rows), dev)
    accepted, resampled = rejection_sample(probs, drafts, u_accept, u_resample, draft_probs)
    return SampledDrafts(scheduled, d2h(accepted), d2h(resampled), rows, torch.where(accepted, drafts, resampled))


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
