"""Mamba-2 (the SSD layer of IBM Granite 4.0-H and other hybrids): a selective state-space token
mixer whose memory of a request is a fixed-size state per head (layers/state_mixer.py keeps
it, one row a request). Per head, with state S [N, P] and scalar decay exp(dt * A):
    S <- exp(dt A) S + B (dt x)^T;  y = S^T C + D x,
dt = softplus(dt_raw + dt_bias) per token, x [P] the head's slice of the convolved input, B
and C [N] shared by the heads of a group. The output is gated by SiLU(z), RMS-normalised per
group, and projected back."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.layers.state_mixer import StateMixer, kept_blocks, stacked_blocks, unblock
from pagedserve.ops.state_reference import ssd_inputs
from pagedserve.ops.triton_shapes import blocks_fit

CHUNK = 64


def ssd_blocks(intra: torch.Tensor, c_decayed: torch.Tensor, b_to_end: torch.Tensor, xdt: torch.Tensor,
               end_decay: torch.Tensor, states: torch.Tensor, after: dict,
               counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
    """The block-to-block recurrence of ssd_chunks, all sequences together (intra and xdt [R,
    H, n, C, P], c_decayed [R, H, n, C, N], b_to_end [R, H, n, N, C], end_decay [R, H, n, 1, 1],
    states [R, H, N, P]; after: block -> [(request, i)] whose i-th of counts[request] kept
    states follows that block). Returns (out [R, H, n, C, P], final states, kept states). Its
    Triton form: ops/chunk_scan.ssd_blocks_triton."""
    out = torch.empty_like(intra)
    st = states
    kept = [[states[r]] * count for r, count in enumerate(counts)]
    for i in range(intra.shape[2]):
        out[:, :, i] = intra[:, :, i] + c_decayed[:, :, i] @ st
        st = end_decay[:, :, i] * st + b_to_end[:, :, i] @ xdt[:, :, i]
        for r, j in after.get(i, ()):
            kept[r][j] = st[r]
    return out, st, kept


def ssd_chunks(seqs: list[tuple[torch.Tensor, ...]], states: torch.Tensor, ats: list[int], keeps: list[list[int]],
               a: torch.Tensor, chunk: int = CHUNK, d: Optional[torch.Tensor] = None,
               blocks: Callable = ssd_blocks) -> tuple[list[torch.Tensor], torch.Tensor, list]:
    """Several sequences at once, float32 (ChunksFn): each (x [L, H, P], dt [L, H], b, c
    [L, H, N]) from position ats[r], from states [R, H, N, P]; a [H] (negative); d [H]: the
    skip y += d x, if given. Returns ([y [L, H, P]], final states, [[the state before each position of keeps[r]:
    multiples of chunk inside the sequence]]). Blocks end at absolute multiples of chunk.
    Within a block, with s_i the running sum of dt * a (exp(s_i - s_j): the decay from token j
    to token i) and S0 the state entering it:
        y_i = exp(s_i) c_i S0 + sum_{j<=i} exp(s_i - s_j) (c_i.b_j) dt_j x_j
        S_end = exp(s_last) S0 + sum_j exp(s_last - s_j) b_j (dt_j x_j)^T."""
    fronts = [at % chunk for at in ats]
    # (padding: dt = 0, so no decay and no input)
    xdt = stacked_blocks([x * dt.unsqueeze(-1) for x, dt, _, _ in seqs], chunk, fronts)
    b = stacked_blocks([s[2] for s in seqs], chunk, fronts)
    c = stacked_blocks([s[3] for s in seqs], chunk, fronts)
    s = stacked_blocks([dt * a for _, dt, _, _ in seqs], chunk, fronts).cumsum(dim=-1)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=xdt.device).tril()
    decay = (s.unsqueeze(-1) - s.unsqueeze(-2)).masked_fill(~lower, float("-inf")).exp()
    intra = ((c @ b.transpose(-1, -2)) * decay) @ xdt
    c_decayed = c * s.exp().unsqueeze(-1)
    b_to_end = (b * (s[..., -1:] - s).exp().unsqueeze(-1)).transpose(-1, -2)
    end_decay = s[..., -1].exp()[..., None, None]
    out, st, kept = blocks(intra, c_decayed, b_to_end, xdt, end_decay, states, kept_blocks(ats, keeps, fronts, chunk),
                           [len(keep) for keep in keeps])
    ys = unblock(out, [len(seq[0]) for seq in seqs], fronts)
    if d is not None:
        ys = [y + d.float()[:, None] * seq[0] for y, seq in zip(ys, seqs)]
    return ys, st, kept


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor, state: torch.Tensor,
                a: torch.Tensor, at: int = 0, keep: Sequence[int] = (),
                chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """ssd_chunks for one sequence: (y [L, H, P], final state, [kept states])."""
    outs, final, kept = ssd_chunks([(x, dt, b, c)], state.unsqueeze(0), [at], [list(keep)], a, chunk)
    return outs[0], final[0], kept[0]


class GroupGatedRMSNorm(nn.Module):
    """y * SiLU(z), then RMSNorm within each of `groups` equal slices, then the weight
    (Mamba-2's norm with the gate before it); norm_before_gate (Falcon-H1): the norm and the
    weight first, then times SiLU(z). y is rounded to z's dtype first."""

    def __init__(self, dim: int, groups: int, eps: float, norm_before_gate: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups, self.eps, self.norm_before_gate = groups, eps, norm_before_gate
        self.use_triton = False  # set by the model runner with the Triton backend

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            from pagedserve.ops.gated_norm import gated_rms_norm

            return gated_rms_norm(y, z, self.weight, y.shape[-1] // self.groups, self.eps, self.norm_before_gate)
        y = y.to(z.dtype)
        h = y.float() if self.norm_before_gate else y.float() * F.silu(z.float())
        g = h.view(*h.shape[:-1], self.groups, -1)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.norm_before_gate:
            return (self.weight.float() * g.view(h.shape) * F.silu(z.float())).to(y.dtype)
        return self.weight * g.view(h.shape).to(y.dtype)


@dataclass(frozen=True)
class Mamba2Dims:
    hidden: int
    heads: int
    head_dim: int
    groups: int
    d_state: int
    kernel: int
    proj_bias: bool
    conv_bias: bool
    eps: float
    dt_limit: tuple[float, float]
    act: str
    norm: str = "gate_then_norm"  # "norm_then_gate" (Falcon-H1), or "gate" (no norm: y * SiLU(z))
    out_bias: Optional[bool] = None  # out_proj's bias, where it differs from in_proj's

    @classmethod
    def granite(cls, cfg: Any) -> "Mamba2Dims":
        """GraniteMoeHybrid's config names."""
        heads = int(cfg.mamba_n_heads)
        head_dim = int(cfg.mamba_d_head) if str(cfg.mamba_d_head) != "auto" else int(
            cfg.mamba_expand * cfg.hidden_size) // heads
        return cls(cfg.hidden_size, heads, head_dim, int(cfg.mamba_n_groups), int(cfg.mamba_d_state),
                   int(cfg.mamba_d_conv), bool(getattr(cfg, "mamba_proj_bias", False)),
                   bool(getattr(cfg, "mamba_conv_bias", True)), float(cfg.rms_norm_eps), _dt_limit(cfg), cfg.hidden_act)

    @classmethod
    def nemotron(cls, cfg: Any) -> "Mamba2Dims":
        """NemotronH's config names."""
        return cls(cfg.hidden_size, int(cfg.mamba_num_heads), int(cfg.mamba_head_dim), int(cfg.n_groups),
                   int(cfg.ssm_state_size), int(cfg.conv_kernel), bool(getattr(cfg, "use_bias", False)),
                   bool(getattr(cfg, "use_conv_bias", True)), float(cfg.layer_norm_epsilon), _dt_limit(cfg),
                   getattr(cfg, "mamba_hidden_act", "silu"))


    @classmethod
    def mamba2(cls, cfg: Any) -> "Mamba2Dims":
        """Mamba2ForCausalLM's config names (Codestral Mamba, state-spaces/mamba2-*)."""
        return cls(cfg.hidden_size, int(cfg.num_heads), int(cfg.head_dim), int(cfg.n_groups), int(cfg.state_size),
                   int(cfg.conv_kernel), bool(getattr(cfg, "use_bias", False)),
                   bool(getattr(cfg, "use_conv_bias", True)), float(cfg.layer_norm_epsilon), _dt_limit(cfg),
                   cfg.hidden_act)


def _dt_limit(cfg: Any) -> tuple[float, float]:
    lo, hi = tuple(getattr(cfg, "time_step_limit", None) or (0.0, math.inf))
    return float(lo), float(hi)


class Mamba2Mixer(StateMixer):
    """The checkpoint's in_proj gives [z (the gate), x B C (the convolution's channels), dt]."""

    def __init__(self, dims: Mamba2Dims) -> None:
        super().__init__()
        self.heads, self.head_dim = dims.heads, dims.head_dim
        self.groups, self.d_state = dims.groups, dims.d_state
        self.inner = self.heads * self.head_dim
        if self.heads % self.groups:
            raise ValueError(f"Mamba-2 layer: {self.heads} heads do not split into {self.groups} equal groups.")
        if dims.act != "silu":
            raise ValueError(f"Mamba-2 layers here use SiLU in their convolution, not {dims.act!r}.")
        self.conv_dim = self.inner + 2 * self.groups * self.d_state
        self.kernel = dims.kernel
        self.in_proj = nn.Linear(dims.hidden, self.inner + self.conv_dim + self.heads, bias=dims.proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=dims.conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.heads))
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        if dims.norm not in ("gate_then_norm", "norm_then_gate", "gate"):
            raise ValueError(f"Mamba-2 layer: unknown norm {dims.norm!r}")
        self.norm = (GroupGatedRMSNorm(self.inner, self.groups, dims.eps, dims.norm == "norm_then_gate")
                     if dims.norm != "gate" else None)
        out_bias = dims.proj_bias if dims.out_bias is None else dims.out_bias
        self.out_proj = nn.Linear(self.inner, dims.hidden, bias=out_bias)
        self.dt_limit = dims.dt_limit

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.conv_dim, self.kernel - 1), (self.heads, self.d_state, self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        z, xbc, dt = self.in_proj(x).split([self.inner, self.conv_dim, self.heads], dim=-1)
        xbc = self.convolve(xbc, meta)
        xs, b, c = xbc.split([self.inner, self.groups * self.d_state, self.groups * self.d_state], dim=-1)
        raw = (xs.view(t, self.heads, self.head_dim), dt, b.view(t, self.groups, self.d_state),
               c.view(t, self.groups, self.d_state))
        params = dict(dt_bias=self.dt_bias, dt_limit=self.dt_limit)
        blocks = ssd_blocks
        if self.use_triton and blocks_fit(self.d_state, CHUNK):
            from pagedserve.ops.chunk_scan import ssd_blocks_triton as blocks
        y = self.over_rows(self.ssm_state, meta, raw, x.new_empty(raw[0].shape, dtype=torch.float32),
                           partial(self.kernel_or_ref("ssd_decode"), a_log=self.A_log, d=self.D, **params),
                           partial(ssd_chunks, a=-self.A_log.float().exp(), d=self.D, blocks=blocks), torch.float32,
                           self._snapshot(1), partial(ssd_inputs, **params)).view(t, self.inner)
        if self.norm is None:
            return self.out_proj((y * F.silu(z.float())).to(x.dtype))
        return self.out_proj(self.norm(y, z))
