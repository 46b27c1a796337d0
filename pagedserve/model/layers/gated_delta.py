"""Gated DeltaNet (Qwen3-Next, Qwen3.5): linear attention whose memory of a request is a
fixed-size matrix per head (plus the last few inputs of a short causal convolution), not a
growing KV cache. Each request owns one row of a layer's state tensors (its block-table row,
AttentionMetadata.states); a prefill chunk continues from what the request's earlier chunks
left there, and a request starting at position 0 ignores whatever the row held before.

Per head, with state S [Dk, Dv], each token (q, k, v, decay g <= 0, rate beta) does
    S <- exp(g) S;  u = beta (v - S^T k);  S <- S + k u^T;  out = S^T q.
Prefill chunks run the same recurrence in blocks of `CHUNK` tokens (the WY form: a triangular
solve per block, then matrix products), decode tokens one step for the whole batch."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.layers.state_mixer import StateMixer, kept_blocks, stacked_blocks, unblock
from pagedserve.ops.state_reference import gated_delta_inputs
from pagedserve.ops.triton_shapes import blocks_fit

CHUNK = 64


def gdn_blocks(u_free: torch.Tensor, w: torch.Tensor, q_decayed: torch.Tensor, scores: torch.Tensor,
               k_to_end: torch.Tensor, end_decay: torch.Tensor, states: torch.Tensor, after: dict,
               counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
    """The block-to-block recurrence of gated_delta_chunks, all sequences together (u_free [R,
    H, n, C, Dv], w and q_decayed [R, H, n, C, Dk], scores [R, H, n, C, C], k_to_end [R, H, n,
    Dk, C], end_decay [R, H, n, 1, 1], states [R, H, Dk, Dv]; after: block -> [(request, i)]
    whose i-th of counts[request] kept states follows that block). Returns (out [R, H, n, C,
    Dv], final states, kept states). Its Triton form: ops/chunk_scan.gdn_blocks_triton."""
    out = torch.empty(*u_free.shape, dtype=u_free.dtype, device=u_free.device)
    s = states
    kept = [[states[r]] * count for r, count in enumerate(counts)]
    for b in range(u_free.shape[2]):
        u = u_free[:, :, b] - w[:, :, b] @ s
        out[:, :, b] = q_decayed[:, :, b] @ s + scores[:, :, b] @ u
        s = end_decay[:, :, b] * s + k_to_end[:, :, b] @ u
        for r, i in after.get(b, ()):
            kept[r][i] = s[r]
    return out, s, kept


def gated_delta_chunks(seqs: list[tuple[torch.Tensor, ...]], states: torch.Tensor, ats: list[int],
                       keeps: list[list[int]], chunk: int = CHUNK,
                       blocks: Callable = gdn_blocks) -> tuple[list[torch.Tensor], torch.Tensor, list]:
    """Several sequences at once, float32 (ChunksFn): each (q, k [L, H, Dk] normalised, q
    scaled; v [L, H, Dv]; g, beta [L, H]) from position ats[r], from states [R, H, Dk, Dv].
    Returns ([out [L, H, Dv]], final states [R, H, Dk, Dv], [[the state before each position of
    keeps[r]: multiples of chunk inside the sequence]]). Blocks end at absolute multiples of
    chunk (zero tokens pad the first one), so that those states are at hand.

    Within a block, with c_i the running sum of g up to token i (so exp(c_i - c_j) is the
    decay from token j to token i) and S0 the state entering the block:
        (I + A) U = beta V - beta exp(c) K S0,  A_ij = beta_i exp(c_i - c_j) k_i.k_j  (j < i)
        out_i = exp(c_i) q_i S0 + sum_{j<=i} exp(c_i - c_j) (q_i.k_j) u_j
        S_end = exp(c_last) S0 + sum_j exp(c_last - c_j) k_j u_j^T.
    U splits into a part without S0 and W S0, both solved for every block of every sequence
    at once; only the small products with S0 run block after block, all sequences together."""
    fronts = [at % chunk for at in ats]
    # (padding: k = 0, beta = 0, g = 0: a state passes through unchanged)
    q, k, v, g, beta = (stacked_blocks([s[i] for s in seqs], chunk, fronts) for i in range(5))
    dk, dv = k.shape[-1], v.shape[-1]
    c = g.cumsum(dim=-1)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # exp(c_i - c_j) on and below the diagonal, 0 above (masked before exp: no overflow)
    decay = (c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(~lower, float("-inf")).exp()
    strict = (beta.unsqueeze(-1) * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    system = strict + torch.eye(chunk, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta.unsqueeze(-1) * v, (beta * c.exp()).unsqueeze(-1) * k], dim=-1)
    u_free, w = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True).split([dv, dk], dim=-1)
    scores = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * c.exp().unsqueeze(-1)
    k_to_end = (k * (c[..., -1:] - c).exp().unsqueeze(-1)).transpose(-1, -2)
    end_decay = c[..., -1].exp()[..., None, None]  # [R, H, n, 1, 1]
    out, s, kept = blocks(u_free, w, q_decayed, scores, k_to_end, end_decay, states,
                          kept_blocks(ats, keeps, fronts, chunk), [len(keep) for keep in keeps])
    return unblock(out, [len(seq[0]) for seq in seqs], fronts), s, kept


def gated_delta_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                        state: torch.Tensor, at: int = 0, keep: Sequence[int] = (),
                        chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """gated_delta_chunks for one sequence: (out [L, H, Dv], final state, [kept states])."""
    outs, final, kept = gated_delta_chunks([(q, k, v, g, beta)], state.unsqueeze(0), [at], [list(keep)], chunk)
    return outs[0], final[0], kept[0]


class GatedRMSNorm(nn.Module):
    """RMSNorm per value head, then times SiLU(z) (transformers' Qwen3NextRMSNormGated); x is
    rounded to the gate's dtype first."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_triton = False  # set by the model runner with the Triton backend

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            from pagedserve.ops.gated_norm import gated_rms_norm

            t = x.shape[0]
            return gated_rms_norm(x.reshape(t, -1), gate.reshape(t, -1), self.weight, x.shape[-1], self.eps,
                                  norm_before_gate=True).view(gate.shape)
        x = x.to(gate.dtype)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf.to(x.dtype) * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(StateMixer):
    """The token mixer of a linear-attention layer. One fused input projection in the order
    [q, k, v (the convolution's channels), z (the output gate), b (beta), a (the decay)];
    checkpoints' in_proj_qkv / in_proj_z / in_proj_b / in_proj_a load as its shards."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.num_k_heads, self.num_v_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"linear_num_value_heads ({self.num_v_heads}) must be a multiple of "
                             f"linear_num_key_heads ({self.num_k_heads}).")
        self.head_k_dim, self.head_v_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = cfg.linear_conv_kernel_dim
        if cfg.hidden_act != "silu":
            raise ValueError(f"Gated DeltaNet layers use SiLU in their convolution; hidden_act is {cfg.hidden_act!r}.")
        hv = self.num_v_heads
        self.in_proj = nn.Linear(cfg.hidden_size, self.conv_dim + self.value_dim + 2 * hv, bias=False)
        self.in_proj.shard_offsets = {"qkv": (0, self.conv_dim), "z": (self.conv_dim, self.value_dim),
                                      "b": (self.conv_dim + self.value_dim, hv),
                                      "a": (self.conv_dim + self.value_dim + hv, hv)}
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(hv))
        self.A_log = nn.Parameter(torch.zeros(hv))
        self.norm = GatedRMSNorm(self.head_v_dim, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, cfg.hidden_size, bias=False)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        # the convolution's last K-1 inputs; the recurrent matrix of every value head
        return (self.conv_dim, self.kernel - 1), (self.num_v_heads, self.head_k_dim, self.head_v_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv, z, b, a = self.in_proj(x).split([self.conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads],
                                             dim=-1)
        mixed = self.convolve(qkv, meta)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        raw = (q.view(t, self.num_k_heads, self.head_k_dim), k.view(t, self.num_k_heads, self.head_k_dim),
               v.view(t, self.num_v_heads, self.head_v_dim), a, b)
        gates = dict(a_log=self.A_log, dt_bias=self.dt_bias)
        chunks = gated_delta_chunks
        if self.use_triton and blocks_fit(self.head_k_dim, CHUNK):
            from pagedserve.ops.chunk_scan import gdn_blocks_triton

            chunks = partial(gated_delta_chunks, blocks=gdn_blocks_triton)
        core = self.over_rows(self.ssm_state, meta, raw, x.new_empty(raw[2].shape, dtype=torch.float32),
                              partial(self.kernel_or_ref("gated_delta_decode"), **gates), chunks,
                              torch.float32, self._snapshot(1), partial(gated_delta_inputs, **gates))
        out = self.norm(core, z.view(t, self.num_v_heads, self.head_v_dim))
        return self.out_proj(out.reshape(t, self.value_dim))
