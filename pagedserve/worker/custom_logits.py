"""The loaded custom logits processors (pagedserve/logits_processor.py) on the runner's side:
each step's sampled rows turned into the BatchUpdate against the last step's, and the
processors applied where vLLM's sampler applies them."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from pagedserve.engine.request import Request
from pagedserve.logits_processor import BatchUpdate, MoveDirectionality


def batch_update(old: Sequence[str], new: Sequence[Request]) -> Optional[BatchUpdate]:
    """The changes from rows `old` (request ids) to rows `new`; None if there are none.
    Requests that came in fill the rows freed by those that left, then the end; then moves
    (swaps where both rows are held) put every request on its row. No index is both removed
    and added, and every index from len(new) on ends up empty."""
    new_ids = [r.request_id for r in new]
    if list(old) == new_ids:
        return None
    keep = set(new_ids)
    cur: list[Optional[str]] = [rid if rid in keep else None for rid in old]
    holes = [i for i, rid in enumerate(cur) if rid is None]
    holes.reverse()  # popped from the lowest
    present = set(old)
    added = []
    for req in new:
        if req.request_id in present:
            continue
        if holes:
            i = holes.pop()
        else:
            i = len(cur)
            cur.append(None)
        cur[i] = req.request_id
        prompt = None if req.prompt_is_embeds else req.prompt_token_ids
        added.append((i, req.sampling_params, prompt, req.output_token_ids))
    removed = sorted(holes)
    where = {rid: i for i, rid in enumerate(cur) if rid is not None}
    moved = []
    for i, rid in enumerate(new_ids):
        if cur[i] == rid:
            continue
        j, other = where[rid], cur[i]
        moved.append((j, i, MoveDirectionality.UNIDIRECTIONAL if other is None else MoveDirectionality.SWAP))
        cur[i], cur[j] = rid, other
        where[rid] = i
        if other is not None:
            where[other] = j
    return BatchUpdate(len(new_ids), removed, added, moved)


class CustomLogits:
    """The processors, split as vLLM's sampler runs them: those that may change a row's
    argmax before penalties and temperature, on every row; the argmax-invariant ones after
    temperature, on the rows that sample."""

    def __init__(self, classes: Sequence[type], config, device: torch.device) -> None:
        self.procs = [cls(config, device, device.type == "cuda") for cls in classes]
        invariant = [bool(p.is_argmax_invariant()) for p in self.procs]
        self.before = [p for p, inv in zip(self.procs, invariant) if not inv]
        self.after = [p for p, inv in zip(self.procs, invariant) if inv]
        self.rows: list[str] = []  # the request id of each row the processors last saw

    def update(self, reqs: Sequence[Request]) -> None:
        """Tell every processor this step's rows (called each step, rows or none)."""
        upd = batch_update(self.rows, reqs)
        for p in self.procs:
            p.update_state(upd)
        self.rows = [r.request_id for r in reqs]

    def apply_before(self, logits: torch.Tensor) -> torch.Tensor:
        for p in self.before:
            logits = p.apply(logits)
        return logits

    def apply_after(self, logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """Temperature applied to every row (greedy rows' is 1), then the processors."""
        logits = logits / temperature.unsqueeze(1)
        for p in self.after:
            logits = p.apply(logits)
        return logits
