"""OLMoE (OlmoeForCausalLM: AI2's OLMoE-1B-7B): Llama's pre-norm layers with RMSNorm over the
whole q and k projections (all heads at once, as OLMo 2) and top-k experts in every layer
(softmax weights renormalised where norm_topk_prob says); with `clip_qkv`, the normed q and k
and the projected v clamped to [-clip_qkv, clip_qkv] (as transformers does)."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.layers.moe import SparseMoeBlock
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from pagedserve.model.qwen_moe import unstack_experts


class NormedClippedAttention(LlamaAttention):
    """q and k normed over all heads, then clamped to [-clip, clip] with v (OLMoE's clip_qkv;
    OLMo 1 clamps before any norm: model/olmo.py)."""

    def __init__(self, *args: Any, clip: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clip = clip

    def _attend(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, t: int) -> torch.Tensor:
        c = self.clip
        q, k = self.q_norm(q).clamp(-c, c), self.k_norm(k).clamp(-c, c)
        return self._attend_heads(positions, q, k, v.clamp(-c, c), meta, t)


class OlmoeForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        clip = getattr(cfg, "clip_qkv", None)
        if clip is None:
            return super().make_layer(cfg, rotary, layer_idx, window)
        attn = NormedClippedAttention(cfg, rotary, window=window, clip=float(clip), **cls.attn_options(cfg))
        return LlamaDecoderLayer(cfg, rotary, cls.attn_options(cfg), cls.build_mlp(cfg, layer_idx), window,
                                 self_attn=attn)

    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        bias = bool(getattr(cfg, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": True, "qk_norm_whole": True}

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        return SparseMoeBlock(cfg, cfg.num_experts, cfg.intermediate_size, renormalize=bool(cfg.norm_topk_prob))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(unstack_experts(weights, self.config.hidden_size, self.config.intermediate_size))
