"""OLMo 1 (OlmoForCausalLM: OLMo-1B-hf, OLMo-7B-hf, OLMo-7B-0424-hf / 0724-hf): Llama's names,
attention and SwiGLU MLP, with

- LayerNorms without weight or bias (eps 1e-5 whatever the config, in float32), before
  attention, before the MLP, and the final one;
- q, k and v each clamped to [-clip_qkv, clip_qkv] after their projections when clip_qkv is
  set (OLMo-7B-0424: 8.0);
- q/k/v and o_proj biases when attention_bias; no MLP biases."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.gpt_neox import LayerNormDecoderLayer
from pagedserve.model.layers.norm import NonParametricLayerNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP

_EPS = 1e-5  # transformers' OlmoLayerNorm: fixed, not read from the config


class ClippedQKVAttention(LlamaAttention):
    """LlamaAttention with the fused q/k/v projection's output clamped to [-clip, clip]."""

    def __init__(self, *args: Any, clip: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clip = clip

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return super().attend(positions, qkv.clamp(-self.clip, self.clip), meta)


def clipped_attention(cfg: Any, rotary: Optional[RotaryEmbedding], clip: Optional[float],
                      **opts: Any) -> LlamaAttention:
    """LlamaAttention, with its q/k/v clamped to [-clip, clip] where a clip is set (OLMo's,
    MPT's and DBRX's clip_qkv)."""
    if not clip:
        return LlamaAttention(cfg, rotary, **opts)
    return ClippedQKVAttention(cfg, rotary, clip=float(clip), **opts)


class OlmoForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        bias = bool(getattr(cfg, "attention_bias", False))
        # (full attention whatever config.json's sliding_window says: transformers ignores it here)
        opts = dict(qkv_bias=bias, o_bias=bias, qk_norm=False, window=0)
        attn = clipped_attention(cfg, rotary, getattr(cfg, "clip_qkv", None), **opts)
        return LayerNormDecoderLayer(cfg.hidden_size, _EPS, attn, LlamaMLP(cfg, bias=False), parallel=False,
                                     norm=NonParametricLayerNorm)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return NonParametricLayerNorm(cfg.hidden_size, _EPS)
