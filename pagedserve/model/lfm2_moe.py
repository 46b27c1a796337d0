"""Liquid LFM2-MoE (Lfm2MoeForCausalLM: LFM2-8B-A1B): LFM2's short-convolution and attention
layers (lfm2.py), a SwiGLU MLP of intermediate_size in the first num_dense_layers layers (LFM2's
width adjustment not applied), SwiGLU experts in the rest. The router: sigmoid scores, the top
k chosen on scores + expert_bias (use_expert_bias; the bias moves the choice, not the weights),
weights renormalised over the k (norm_topk_prob, with transformers' 1e-6) and scaled by
routed_scaling_factor. Checkpoints name each expert's w1 / w3 / w2 (Mixtral's names) or stack
them (transformers 5's gate_up_proj / down_proj)."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.model.layers.moe import FusedMoE
from pagedserve.model.lfm2 import Lfm2ForCausalLM
from pagedserve.model.llama import LlamaMLP
from pagedserve.model.qwen_moe import unstack_experts


class SigmoidRoutedMoE(nn.Module):
    """LFM2-MoE's experts and router (float32 scores; transformers' in the model dtype, the
    same in float32)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.top_k, self.renormalize = int(cfg.num_experts_per_tok), bool(cfg.norm_topk_prob)
        self.scale = float(cfg.routed_scaling_factor)
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.expert_bias = (nn.Parameter(torch.zeros(cfg.num_experts, dtype=torch.float32), requires_grad=False)
                            if cfg.use_expert_bias else None)
        self.experts = FusedMoE(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, "silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(self.gate(x).float())
        choice = scores if self.expert_bias is None else scores + self.expert_bias
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
        return self.experts(x, weights * self.scale, ids)


class Lfm2MoeForCausalLM(Lfm2ForCausalLM):
    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        if layer_idx < int(cfg.num_dense_layers):
            return LlamaMLP(cfg, cfg.intermediate_size, act="silu", bias=False)
        return SigmoidRoutedMoE(cfg)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        cfg = self.config
        super().load_weights(unstack_experts(weights, cfg.hidden_size, cfg.moe_intermediate_size))
