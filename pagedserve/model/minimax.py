"""MiniMax-Text-01 / MiniMax-M1 (MiniMaxForCausalLM): lightning attention layers (linear
attention with a fixed decay per head, a state per request) and softmax attention layers in
config.layer_types' order, each followed by top-k experts. Each layer normalises the stream
first and adds its mixer's output to the normalised stream, both scaled
(`*_alpha_factor` / `*_beta_factor`): a post-norm layer without a raw residual stream."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.hf_config import checked_layer_types
from pagedserve.model.layers.mamba2 import CHUNK, ssd_blocks, ssd_chunks
from pagedserve.model.layers.moe import SparseMoeBlock
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.layers.state_mixer import StateMixer
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM
from pagedserve.ops.triton_shapes import blocks_fit

_KINDS = {"linear_attention": "lightning attention", "full_attention": "attention"}
# Buffers transformers saves with the lightning layers, all derived from the slope rate.
_DERIVED = (".query_decay", ".key_decay", ".diagonal_decay")


class LightningAttention(StateMixer):
    """Per head, with state S [D, D] and decay exp(-slope): S <- exp(-slope) S + k v^T;
    out = q S, for q, k, v = SiLU(qkv_proj(x)). Then an RMSNorm over all heads, a sigmoid
    output gate and out_proj. Mamba-2's scan and decode step with dt = 1, A = -slope
    (layers/mamba2.py, and their Triton kernels on that backend)."""

    def __init__(self, cfg: Any, layer_idx: int) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"lightning attention here applies SiLU to q, k and v, not {cfg.hidden_act!r}.")
        self.heads = int(cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        inner = self.heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * inner, bias=False)
        self.output_gate = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.out_proj = nn.Linear(inner, cfg.hidden_size, bias=False)
        self.norm = RMSNorm(inner, 1e-6)  # (transformers' default eps, not the config's)
        base = 1 / (2 ** (8 / self.heads))
        factor = 1 - layer_idx / (cfg.num_hidden_layers - 1 + 1e-5) + 1e-5
        self.register_buffer("slope_rate", base ** (torch.arange(self.heads) + 1.0) * factor, persistent=False)

    def state_shapes(self) -> tuple[None, tuple[int, ...]]:
        return None, (self.heads, self.head_dim, self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = (u.float() for u in F.silu(self.qkv_proj(x)).view(t, self.heads, 3 * self.head_dim).split(
            self.head_dim, dim=-1))
        a = -self.slope_rate.float()
        blocks = ssd_blocks
        if self.use_triton and blocks_fit(self.head_dim, CHUNK):
            from pagedserve.ops.chunk_scan import ssd_blocks_triton as blocks
        # (decode: Mamba-2's step with dt = 1 as given, A = -exp(log(slope)), B = k, C = q, x = v)
        decode = partial(self.kernel_or_ref("ssd_decode"), a_log=self.slope_rate.float().log(),
                         dt_bias=self.slope_rate, dt_limit=(0.0, math.inf), dt_softplus=False)
        core = self.over_rows(self.ssm_state, meta, (v, torch.ones_like(q[..., 0]), k, q), torch.empty_like(v),
                              decode, partial(ssd_chunks, a=a, blocks=blocks), torch.float32, self._snapshot(1))
        out = self.norm(core.view(t, -1).to(x.dtype)) * torch.sigmoid(self.output_gate(x))
        return self.out_proj(out)


class MiniMaxLayer(nn.Module):
    def __init__(self, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, lightning: bool) -> None:
        super().__init__()
        if lightning:
            self.self_attn = LightningAttention(cfg, layer_idx)
            kind = "linear_attn"
        else:
            self.self_attn = LlamaAttention(cfg, rotary, qkv_bias=False, o_bias=False, qk_norm=False)
            kind = "full_attn"
        self.attn_scales = (float(getattr(cfg, f"{kind}_alpha_factor")), float(getattr(cfg, f"{kind}_beta_factor")))
        self.mlp_scales = (float(cfg.mlp_alpha_factor), float(cfg.mlp_beta_factor))
        self.block_sparse_moe = SparseMoeBlock(cfg, cfg.num_local_experts, cfg.intermediate_size, renormalize=True)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        """The stream is x + residual (x alone before the first layer), as in llama.py; this
        layer's residual part is its normalised stream, scaled."""
        h = self.input_layernorm(x if residual is None else x + residual)
        h = h * self.attn_scales[0] + self.self_attn(positions, h, meta) * self.attn_scales[1]
        h = self.post_attention_layernorm(h)
        return self.block_sparse_moe(h) * self.mlp_scales[1], h * self.mlp_scales[0]


class MiniMaxForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        lightning = checked_layer_types(cfg, _KINDS, cls.__name__)[layer_idx] == "linear_attention"
        return MiniMaxLayer(cfg, rotary, layer_idx, lightning)

    def attention_layers(self) -> list[nn.Module]:
        return [layer.self_attn.attn for layer in self.model.layers if not isinstance(layer.self_attn, StateMixer)]

    def state_layers(self) -> list[StateMixer]:
        return [layer.self_attn for layer in self.model.layers if isinstance(layer.self_attn, StateMixer)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._own_slopes(weights))

    def _own_slopes(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        """A saved slope rate replaces the computed one (as transformers loads it); the decays
        derived from it are recomputed from it, not read."""
        for name, t in weights:
            if name.endswith(".slope_rate"):
                self.get_submodule(name.rsplit(".", 1)[0]).slope_rate.copy_(t.reshape(-1))
            elif not name.endswith(_DERIVED):
                yield name, t
