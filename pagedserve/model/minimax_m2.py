"""MiniMax-M2 (MiniMaxM2ForCausalLM: MiniMax-M2, M2.1): the Llama decoder, no biases, RMSNorm
over the whole q and k projections (all heads at once, before RoPE), RoPE on the leading
`rotary_dim` dims of each head, and a mixture of SwiGLU experts in every layer: a sigmoid
router whose top k is chosen with a correction bias (`e_score_correction_bias`, which moves
the choice, not the weights), weights renormalised over the k. Checkpoints name the block
`block_sparse_moe` with Mixtral's per-expert w1 / w3 / w2. Multi-token-prediction layers past
num_hidden_layers are skipped."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.model.deepseek import without_mtp_layers
from pagedserve.model.layers.moe import FusedMoE, select_grouped_experts
from pagedserve.model.llama import LlamaForCausalLM


class SigmoidBiasedMoE(nn.Module):
    """Experts chosen by sigmoid(router) + correction bias, weighted by sigmoid(router)
    renormalised over the top k. The router runs in float32 (vLLM's choice; transformers'
    in the model dtype, the same in float32)."""

    def __init__(self, cfg: Any, num_experts: int, intermediate_size: int) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, num_experts, bias=False, dtype=torch.float32)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                    requires_grad=False)
        self.experts = FusedMoE(num_experts, cfg.hidden_size, intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(x.float(), self.gate.weight)
        weights, ids = select_grouped_experts(logits, self.top_k, "sigmoid",
                                              correction_bias=self.e_score_correction_bias, renormalize=True)
        return self.experts(x, weights, ids)


class MiniMaxM2ForCausalLM(LlamaForCausalLM):
    renamed = [(".block_sparse_moe.", ".mlp.")]

    def __init__(self, cfg: Any, max_positions: int) -> None:
        # Options of MiniMax's own config.json that transformers' port (always per-layer q/k
        # norms over all heads, a biased sigmoid router) does not take: refused unless they agree.
        if getattr(cfg, "use_qk_norm", True) is False:
            raise ValueError("MiniMax-M2 with use_qk_norm=false is not supported.")
        if getattr(cfg, "qk_norm_type", "per_layer") != "per_layer":
            raise ValueError(f"MiniMax-M2 with qk_norm_type={cfg.qk_norm_type!r} is not supported; "
                             "supported: 'per_layer'.")
        if getattr(cfg, "scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"MiniMax-M2 with scoring_func={cfg.scoring_func!r} is not supported; "
                             "supported: 'sigmoid'.")
        if getattr(cfg, "use_routing_bias", True) is False:
            raise ValueError("MiniMax-M2 with use_routing_bias=false is not supported.")
        if 0 in (getattr(cfg, "attn_type_list", None) or []):
            raise ValueError("MiniMax-M2 with attn_type_list naming lightning-attention layers (0) is not supported.")
        # transformers' port attends over the whole context whatever config.json's sliding_window
        # says: so do the layers, and the KV cache manager (which reads the config's windows).
        cfg.sliding_window = None
        super().__init__(cfg, max_positions)

    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        return {"qkv_bias": False, "o_bias": False, "qk_norm": True, "qk_norm_whole": True}

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        return SigmoidBiasedMoE(cfg, cfg.num_local_experts, cfg.intermediate_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(without_mtp_layers(weights, self.config.num_hidden_layers))
