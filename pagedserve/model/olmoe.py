"""OLMoE (OlmoeForCausalLM: AI2's OLMoE-1B-7B): Llama's pre-norm layers with RMSNorm over the
whole q and k projections (all heads at once, as OLMo 2) and top-k experts in every layer
(softmax weights renormalised where norm_topk_prob says)."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.model.layers.moe import SparseMoeBlock
from pagedserve.model.llama import LlamaForCausalLM
from pagedserve.model.qwen_moe import unstack_experts


class OlmoeForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: Any, max_positions: int) -> None:
        if getattr(cfg, "clip_qkv", None) is not None:
            raise ValueError(f"OLMoE with clip_qkv={cfg.clip_qkv} (q, k and v clamped) is not supported.")
        super().__init__(cfg, max_positions)

    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        bias = bool(getattr(cfg, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": True, "qk_norm_whole": True}

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        return SparseMoeBlock(cfg, cfg.num_experts, cfg.intermediate_size, renormalize=bool(cfg.norm_topk_prob))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(unstack_experts(weights, self.config.hidden_size, self.config.intermediate_size))
