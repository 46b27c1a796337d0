"""K-EXAONE (ExaoneMoeForCausalLM: LGAI-EXAONE/K-EXAONE-236B-A23B): EXAONE 4.0's attention (per-head
q/k RMSNorms before RoPE, no biases; with a sliding window, windows on the layers layer_types
marks and no RoPE on the full-attention ones) in Llama's pre-norm layers, and per
mlp_layer_types a dense SwiGLU MLP or DeepSeek-V3's mixture of experts: a float32 sigmoid router
moved by e_score_correction_bias, group-limited (n_group, topk_group), top-k weights
renormalised when norm_topk_prob and scaled by routed_scaling_factor, plus always-on shared
experts (num_shared_experts x moe_intermediate_size wide). Its MTP weights (mtp.*) are skipped."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.model.deepseek import DeepseekMoE, without_mtp_layers
from pagedserve.model.llama import LlamaForCausalLM, LlamaMLP
from pagedserve.model.olmo2 import exaone_global_nope
from pagedserve.model.qwen_moe import unstack_experts


def _deepseek_names(cfg: Any) -> SimpleNamespace:
    """The config under the names DeepseekMoE reads."""
    return SimpleNamespace(
        n_routed_experts=cfg.num_experts, n_shared_experts=cfg.num_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
        hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size, hidden_act=cfg.hidden_act)


class ExaoneMoeForCausalLM(LlamaForCausalLM):
    renamed = [(".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction_bias")]

    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        return {"qkv_bias": False, "o_bias": False, "qk_norm": True}

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        types = list(cfg.mlp_layer_types or [])
        if len(types) != cfg.num_hidden_layers or set(types) - {"dense", "sparse"}:
            raise ValueError(f"K-EXAONE: mlp_layer_types {types} must name 'dense' or 'sparse' for each of the "
                             f"{cfg.num_hidden_layers} layers.")
        return DeepseekMoE(_deepseek_names(cfg), sigmoid=True) if types[layer_idx] == "sparse" else LlamaMLP(cfg)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        exaone_global_nope(cfg, self.model.layers)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        cfg = self.config
        weights = ((n, t) for n, t in weights if not n.startswith(("mtp.", "model.mtp.")))
        super().load_weights(unstack_experts(without_mtp_layers(weights, cfg.num_hidden_layers), cfg.hidden_size,
                                             cfg.moe_intermediate_size))
