"""Liquid LFM2 (Lfm2ForCausalLM: LFM2-350M / 700M / 1.2B / 2.6B, LFM2.5): short gated
convolutions in most layers (B * x through a depthwise causal convolution of 3 taps, times C;
its last inputs are the per-request state, layers/state_mixer.py) and GQA attention with
per-head q/k norms in the rest (config.layer_types); a SwiGLU MLP after each; the final norm
is the checkpoint's `embedding_norm`."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.hf_config import checked_layer_types
from pagedserve.model.layers.norm import RMSNorm, pre_norm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.layers.state_mixer import HybridLayers, StateMixer
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class ShortConv(StateMixer):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        h, bias = cfg.hidden_size, bool(cfg.conv_bias)
        self.hidden, self.kernel = h, int(cfg.conv_L_cache)
        self.in_proj = nn.Linear(h, 3 * h, bias=bias)
        self.conv1d = nn.Conv1d(h, h, self.kernel, groups=h, bias=bias)
        self.out_proj = nn.Linear(h, h, bias=bias)

    def state_shapes(self) -> tuple[tuple[int, ...], Optional[tuple[int, ...]]]:
        return (self.hidden, self.kernel - 1), None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b, c, v = self.in_proj(x).chunk(3, dim=-1)
        return self.out_proj(c * self.convolve(b * v, meta, silu=False))


def _mlp_size(cfg: Any) -> int:
    """LFM2's feed-forward width: 2/3 of intermediate_size, scaled and rounded up to
    block_multiple_of where block_auto_adjust_ff_dim says (as transformers' Lfm2MLP)."""
    size = int(cfg.intermediate_size)
    if getattr(cfg, "block_auto_adjust_ff_dim", False):
        size = int(2 * size / 3)
        mult = getattr(cfg, "block_ffn_dim_multiplier", None)
        if mult is not None:
            size = int(mult * size)
            m = int(cfg.block_multiple_of)
            size = m * ((size + m - 1) // m)
    return size


class Lfm2Layer(nn.Module):
    def __init__(self, cfg: Any, rotary: RotaryEmbedding, conv: bool, feed_forward: nn.Module) -> None:
        super().__init__()
        if conv:
            self.conv = ShortConv(cfg)
        else:
            self.self_attn = LlamaAttention(cfg, rotary, qkv_bias=False, o_bias=False, qk_norm=True)
        self.feed_forward = feed_forward  # (the model's build_mlp: LFM2's SwiGLU MLP, or LFM2-MoE's experts)
        self.operator_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        x, residual = pre_norm(self.operator_norm, x, residual)
        x = (self.conv if hasattr(self, "conv") else self.self_attn)(positions, x, meta)
        x, residual = self.ffn_norm(x, residual)
        return self.feed_forward(x), residual


class Lfm2ForCausalLM(HybridLayers, LlamaForCausalLM):
    state_attr = "conv"
    renamed = [(".self_attn.out_proj.", ".self_attn.o_proj."), (".q_layernorm.", ".q_norm."),
               (".k_layernorm.", ".k_norm."), (".feed_forward.w1.", ".feed_forward.gate_proj."),
               (".feed_forward.w3.", ".feed_forward.up_proj."), (".feed_forward.w2.", ".feed_forward.down_proj."),
               (".conv.conv.", ".conv.conv1d."), ("model.embedding_norm.", "model.norm.")]

    def __init__(self, cfg: Any, max_positions: int) -> None:
        if getattr(cfg, "rms_norm_eps", None) is None:  # (the q/k norms read it; LFM2 says norm_eps)
            cfg.rms_norm_eps = cfg.norm_eps
        super().__init__(cfg, max_positions)

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        types = checked_layer_types(cfg, {"conv": "short convolution", "full_attention": "attention"}, cls.__name__)
        return Lfm2Layer(cfg, rotary, types[layer_idx] == "conv", cls.build_mlp(cfg, layer_idx))

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        return LlamaMLP(cfg, _mlp_size(cfg), act="silu", bias=False)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
