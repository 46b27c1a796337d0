"""Pure-PyTorch twins of the state layers' decode kernels (ops/state_decode.py): one token for
each of B requests, whose states sit in rows `rows` of a layer's state tensor [R, ...] and are
updated there in place. `init` [B] (None: all continue) says which requests continue from
their row (non-zero) and which start from zeros (a one-token prompt in a reused row). These
are also the layers' own decode path off the Triton backend (model/layers/state_mixer.py)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

L2_EPS = 1e-6  # the q/k normalisation of Gated DeltaNet (FLA's kernels)
# Speculative decoding's kept states: (snapshot tensor [slots, ...], first slot, slots a row);
# the state of row r after token t of a verification goes to verify_slot(first, k, r, t).
Keep = tuple[torch.Tensor, int, int]


def verify_slot(first: int, k: int, rows, t: int):
    """The snapshot slot of state row(s) `rows` (ints or a tensor) after token t (< k) of a
    verification: k slots a row, from `first` (model/layers/state_mixer.py)."""
    return first + rows * k + t


def verify_ref(decode: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], cache: torch.Tensor,
               rows: torch.Tensor, init: Optional[torch.Tensor], tokens: int, keep: Optional[Keep]) -> torch.Tensor:
    """A verification of `tokens` tokens a request through a one-token decode function
    (decode(*inputs, cache, rows, init)): inputs [B * tokens, ...], request i's token t in row
    i * tokens + t; the state after each token but the last kept per `keep`. The twin of the
    decode kernels' `tokens` / `keep`. Returns the outputs laid out as the inputs."""
    b = rows.shape[0]
    outs = []
    for t in range(tokens):
        outs.append(decode(*(x.view(b, tokens, *x.shape[1:])[:, t] for x in inputs), cache, rows,
                           init if t == 0 else None))
        if keep is not None and t < tokens - 1:
            snap, first, k = keep
            snap.index_copy_(0, verify_slot(first, k, rows, t), cache.index_select(0, rows).to(snap.dtype))
    return torch.stack(outs, dim=1).flatten(0, 1)


def conv_step(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
              silu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution, one token each for B requests: x [B, C], state [B, C, K-1]
    (the last inputs), weight [C, K]. Returns (out, new state)."""
    seq = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)
    out = (seq * weight).sum(dim=-1)
    out = out if bias is None else out + bias
    return (F.silu(out) if silu else out), seq[..., 1:]


def gated_delta_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule, one token for each of B requests, float32: q, k [B, H, Dk], v [B, H, Dv],
    g, beta [B, H], state [B, H, Dk, Dv]. Returns (out [B, H, Dv], new state)."""
    s = state * g.exp()[..., None, None]
    u = beta.unsqueeze(-1) * (v - torch.einsum("bhk,bhkv->bhv", k, s))
    s = s + k.unsqueeze(-1) * u.unsqueeze(-2)
    return torch.einsum("bhk,bhkv->bhv", q, s), s


def ssd_step(x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor, state: torch.Tensor,
             a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2, one token for each of B requests, float32: x [B, H, P], dt [B, H], b, c
    [B, H, N], state [B, H, N, P], a [H]. Returns (y [B, H, P] without the D skip, new state)."""
    st = state * (dt * a).exp()[..., None, None] + b.unsqueeze(-1) * (x * dt.unsqueeze(-1)).unsqueeze(-2)
    return torch.einsum("bhn,bhnp->bhp", c, st), st


def rows_step(step: Callable[..., tuple[torch.Tensor, torch.Tensor]], cache: torch.Tensor, rows: torch.Tensor,
              init: Optional[torch.Tensor], dtype: torch.dtype, *inputs: torch.Tensor) -> torch.Tensor:
    """step(*inputs, state) over the states in `rows` of `cache`, read in `dtype` (zeros where
    init is 0); the new states are written back. Returns step's output."""
    prev = cache.index_select(0, rows).to(dtype)
    if init is not None:
        prev = prev * init.view(-1, *[1] * (prev.dim() - 1)).to(dtype)
    out, new = step(*inputs, prev)
    cache.index_copy_(0, rows, new.to(cache.dtype))
    return out


def conv_decode_ref(x: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor, init: Optional[torch.Tensor],
                    weight: torch.Tensor, bias: Optional[torch.Tensor] = None, silu: bool = True) -> torch.Tensor:
    """x [B, C]; cache [R, C, K-1]; weight [C, K]. Returns out [B, C] in x's dtype."""
    return rows_step(lambda xs, s: conv_step(xs, s, weight, bias, silu), cache, rows, init, x.dtype, x)


def gated_delta_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       a_log: torch.Tensor, dt_bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A Gated DeltaNet layer's raw per-token inputs -> gated_delta_step's, float32: q, k
    [T, Hk, Dk] (L2-normalised, q scaled by Dk^-1/2, each key head repeated for the Hv / Hk
    value heads it serves), v [T, Hv, Dv], the decay g = -exp(A_log) softplus(a + dt_bias) and
    the rate beta = sigmoid(b), a and b [T, Hv]."""
    rep = v.shape[1] // q.shape[1]
    q = l2_normalize(q.float()) * q.shape[-1] ** -0.5
    k = l2_normalize(k.float())
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return q, k, v.float(), g, b.float().sigmoid()


def l2_normalize(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the normalisation FLA's kernels apply)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_delta_decode_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                           cache: torch.Tensor, rows: torch.Tensor, init: Optional[torch.Tensor],
                           a_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Raw inputs as gated_delta_inputs takes them ([B, ...]); cache [R, Hv, Dk, Dv]. Returns
    out [B, Hv, Dv] float32."""
    return rows_step(gated_delta_step, cache, rows, init, torch.float32,
                     *gated_delta_inputs(q, k, v, a, b, a_log, dt_bias))


def ssd_inputs(x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor, dt_bias: torch.Tensor,
               dt_limit: tuple[float, float], dt_softplus: bool = True) -> tuple[torch.Tensor, ...]:
    """A Mamba-2 layer's raw per-token inputs -> ssd_step's x [T, H, P], dt [T, H], b, c
    [T, H, N] (each group's repeated for its heads), float32: dt = softplus(dt + dt_bias)
    clamped to dt_limit (dt_softplus False: dt as given, MiniMax's lightning attention). b, c
    come in [T, G, N]."""
    per_group = x.shape[1] // b.shape[1]
    dt = F.softplus(dt.float() + dt_bias.float()) if dt_softplus else dt.float()
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(*dt_limit)
    b, c = (t.float().repeat_interleave(per_group, dim=1) for t in (b, c))
    return x.float(), dt, b, c


def ssd_decode_ref(x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor, cache: torch.Tensor,
                   rows: torch.Tensor, init: Optional[torch.Tensor], a_log: torch.Tensor, dt_bias: torch.Tensor,
                   dt_limit: tuple[float, float], d: Optional[torch.Tensor] = None,
                   dt_softplus: bool = True) -> torch.Tensor:
    """Raw inputs as ssd_inputs takes them ([B, ...]); cache [R, H, N, P]; d [H]: the skip
    y += d x, if given. Returns y [B, H, P] float32."""
    a = -a_log.float().exp()
    inputs = ssd_inputs(x, dt, b, c, dt_bias, dt_limit, dt_softplus)
    y = rows_step(lambda *xs: ssd_step(*xs, a), cache, rows, init, torch.float32, *inputs)
    return y if d is None else y + d.float()[:, None] * inputs[0]


def selective_step(x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor, state: torch.Tensor,
                   a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1's selective scan, one token for each of B requests, float32: x, dt [B, C], b, c
    [B, N], state [B, C, N], a [C, N] (a decay rate per channel and state). Returns (y [B, C]
    without the D skip, new state)."""
    st = state * (dt.unsqueeze(-1) * a).exp() + (dt * x).unsqueeze(-1) * b.unsqueeze(-2)
    return (st * c.unsqueeze(-2)).sum(dim=-1), st


def selective_inputs(x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                     dt_bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A Mamba-1 layer's raw per-token inputs -> selective_step's, float32: dt = softplus(dt +
    dt_bias) (dt_proj's bias)."""
    return x.float(), F.softplus(dt.float() + dt_bias.float()), b.float(), c.float()


def selective_decode_ref(x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor, cache: torch.Tensor,
                         rows: torch.Tensor, init: Optional[torch.Tensor], a_log: torch.Tensor, dt_bias: torch.Tensor,
                         d: torch.Tensor) -> torch.Tensor:
    """Raw inputs as selective_inputs takes them ([B, ...]); cache [R, C, N]; a_log [C, N]; d
    [C]: the skip y += d x. Returns y [B, C] float32."""
    a = -a_log.float().exp()
    inputs = selective_inputs(x, dt, b, c, dt_bias)
    y = rows_step(lambda *xs: selective_step(*xs, a), cache, rows, init, torch.float32, *inputs)
    return y + d.float() * inputs[0]
