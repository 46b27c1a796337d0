"""Mamba (the selective state-space layer of Mamba-1, Falcon Mamba and Jamba): a token mixer
whose memory of a request is a state [C, N] per layer (layers/state_mixer.py keeps it, one row
a request). Each channel c of the convolved input x has its own step size dt_c and decays its
N state entries at their own rates A_cn:
    S_cn <- exp(dt_c A_cn) S_cn + dt_c x_c B_n;  y_c = sum_n S_cn C_n + D_c x_c,
then y is gated by SiLU(z) and projected back. Since the decay differs per entry, there is no
matrix form like Mamba-2's; prefill chunks run the recurrence token by token, all of a step's
requests (and all channels) at once."""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.state_mixer import StateMixer
from pagedserve.ops.state_reference import selective_inputs

BLOCK = 64  # tokens whose decays are computed together


def selective_scan(seqs: list[tuple[torch.Tensor, ...]], states: torch.Tensor, ats: list[int],
                   keeps: list[list[int]], a: torch.Tensor,
                   d: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], torch.Tensor, list]:
    """Several sequences at once, float32 (ChunksFn): each (x, dt [L, C], b, c [L, N]) from
    position ats[r], from states [R, C, N]; a [C, N]; d [C]: the skip y += d x. Returns ([y
    [L, C]], final states, [[the state before each position of keeps[r]]]). Shorter sequences
    are padded at the end with dt = 0, which leaves a state as it is."""
    lengths = [len(s[0]) for s in seqs]
    x, dt, b, c = (nn.utils.rnn.pad_sequence([s[i] for s in seqs], batch_first=True) for i in range(4))
    kept = [[states[r]] * len(keep) for r, keep in enumerate(keeps)]
    after: dict[int, list[tuple[int, int]]] = {}  # tokens done -> [(request, i)]
    for r, (at, keep) in enumerate(zip(ats, keeps)):
        for i, p in enumerate(keep):
            after.setdefault(p - at, []).append((r, i))
    y = torch.empty_like(x)
    s = states
    for start in range(0, x.shape[1], BLOCK):
        end = min(start + BLOCK, x.shape[1])
        decay = (dt[:, start:end, :, None] * a).exp()  # [R, l, C, N]
        inject = (dt * x)[:, start:end, :, None] * b[:, start:end, None, :]
        for t in range(start, end):
            s = decay[:, t - start] * s + inject[:, t - start]
            y[:, t] = (s * c[:, t, None, :]).sum(dim=-1)
            for r, i in after.get(t + 1, ()):
                kept[r][i] = s[r]
    if d is not None:
        y = y + d.float() * x
    return [y[r, :n] for r, n in enumerate(lengths)], s, kept


def selective_scan_one(x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor, state: torch.Tensor,
                       a: torch.Tensor, at: int = 0, keep: Sequence[int] = ()) -> tuple:
    """selective_scan for one sequence: (y [L, C], final state, [kept states])."""
    ys, final, kept = selective_scan([(x, dt, b, c)], state.unsqueeze(0), [at], [list(keep)], a)
    return ys[0], final[0], kept[0]


class Mamba1Mixer(StateMixer):
    """in_proj gives [x (the convolution's channels), z (the gate)]; x_proj gives [dt (low rank),
    B, C]. bc_norm: Falcon Mamba's weightless RMSNorm of dt, B and C ("plain"), or Jamba's with
    weights ("weighted": dt_layernorm / b_layernorm / c_layernorm)."""

    def __init__(self, hidden: int, inner: int, d_state: int, kernel: int, dt_rank: int, proj_bias: bool,
                 conv_bias: bool, bc_norm: Optional[str] = None, eps: float = 1e-6) -> None:
        super().__init__()
        self.inner, self.d_state, self.dt_rank, self.kernel = inner, d_state, dt_rank, kernel
        self.in_proj = nn.Linear(hidden, 2 * inner, bias=proj_bias)
        self.conv1d = nn.Conv1d(inner, inner, kernel, groups=inner, bias=conv_bias)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(inner, d_state))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, hidden, bias=proj_bias)
        if bc_norm not in (None, "plain", "weighted"):
            raise ValueError(f"Mamba layer: unknown bc_norm {bc_norm!r}")
        self.bc_norm, self.eps = bc_norm, eps
        if bc_norm == "weighted":
            self.dt_layernorm = RMSNorm(dt_rank, eps)
            self.b_layernorm = RMSNorm(d_state, eps)
            self.c_layernorm = RMSNorm(d_state, eps)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.inner, self.kernel - 1), (self.inner, self.d_state)

    def _norm_dt_b_c(self, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.bc_norm == "weighted":
            return self.dt_layernorm(dt), self.b_layernorm(b), self.c_layernorm(c)
        if self.bc_norm == "plain":
            return tuple(_rms(t, self.eps) for t in (dt, b, c))
        return dt, b, c

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = self.convolve(xs, meta)
        dt, b, c = self._norm_dt_b_c(*self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1))
        dt = F.linear(dt, self.dt_proj.weight)  # (its bias joins in float32, with the softplus)
        params = dict(dt_bias=self.dt_proj.bias)
        scan = selective_scan
        if self.use_triton:
            from pagedserve.ops.selective_scan import selective_scan_triton as scan
        y = self.over_rows(self.ssm_state, meta, (xs, dt, b, c), xs.new_empty(xs.shape, dtype=torch.float32),
                           partial(self.kernel_or_ref("selective_decode"), a_log=self.A_log, d=self.D, **params),
                           partial(scan, a=-self.A_log.float().exp(), d=self.D), torch.float32,
                           self._snapshot(1), partial(selective_inputs, **params))
        return self.out_proj((y * F.silu(z.float())).to(x.dtype))


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Falcon Mamba's weightless RMSNorm (float32 statistics, back in x's dtype)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
