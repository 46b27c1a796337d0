"""Qwen2-MoE and Qwen3-MoE: the Qwen2 / Qwen3 decoders with a sparse mixture of experts in the
layers the config makes sparse (every decoder_sparse_step-th, minus mlp_only_layers); top-k
weights renormalised only with norm_topk_prob. Qwen2-MoE adds an always-on shared expert."""

from __future__ import annotations

from typing import Any

from torch import nn

from pagedserve.model.layers.moe import SparseMoeBlock
from pagedserve.model.llama import LlamaMLP
from pagedserve.model.qwen2 import Qwen2ForCausalLM
from pagedserve.model.qwen3 import Qwen3ForCausalLM


def _is_sparse(cfg: Any, layer_idx: int) -> bool:
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return (layer_idx not in (getattr(cfg, "mlp_only_layers", None) or [])
            and cfg.num_experts > 0 and (layer_idx + 1) % step == 0)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        if not _is_sparse(cfg, layer_idx):
            return LlamaMLP(cfg)
        shared = LlamaMLP(cfg, cfg.shared_expert_intermediate_size)
        return SparseMoeBlock(cfg, cfg.num_experts, cfg.moe_intermediate_size,
                              renormalize=bool(cfg.norm_topk_prob), shared_expert=shared)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        if not _is_sparse(cfg, layer_idx):
            return LlamaMLP(cfg)
        return SparseMoeBlock(cfg, cfg.num_experts, cfg.moe_intermediate_size, renormalize=bool(cfg.norm_topk_prob))
