"""ERNIE 4.5 (baidu/ERNIE-4.5-0.3B-PT, ERNIE-4.5-21B-A3B-PT): the Llama decoder with biases on
every projection where `use_bias` says so, and RoPE on interleaved pairs over the whole head,
which runs here as split-halves RoPE on q/k rows permuted at load (as Cohere's and GLM's).
The MoE models (Ernie4_5_MoeForCausalLM) put experts on layers start..end every `interval`:
a softmax router whose choice (not weights) moves by a correction bias (`moe_statics`),
the top k renormalised, plus always-on shared experts."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.model.layers.moe import FusedMoE, select_grouped_experts
from pagedserve.model.layers.rotary import interleaved_rope_weights
from pagedserve.model.llama import LlamaForCausalLM, LlamaMLP, _head_dim


class Ernie4_5ForCausalLM(LlamaForCausalLM):  # noqa: N801 (transformers' name)
    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        bias = bool(getattr(cfg, "use_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": False}

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        return LlamaMLP(cfg, bias=bool(getattr(cfg, "use_bias", False)))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        head_dim = _head_dim(self.config)
        super().load_weights(interleaved_rope_weights(weights, head_dim, head_dim))


class _MoeStatics(nn.Module):
    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, num_experts, dtype=torch.float32),
                                                    requires_grad=False)


class ErnieMoE(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        e = int(getattr(cfg, "moe_num_experts", None) or cfg.num_experts)
        self.top_k = int(getattr(cfg, "moe_k", None) or cfg.num_experts_per_tok)
        self.gate = nn.Linear(cfg.hidden_size, e, bias=False, dtype=torch.float32)  # (float32, as transformers')
        self.moe_statics = _MoeStatics(e)
        self.experts = FusedMoE(e, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act)
        shared = int(getattr(cfg, "moe_num_shared_experts", 0) or 0)
        self.shared_experts = (LlamaMLP(cfg, cfg.moe_intermediate_size * shared, bias=bool(cfg.use_bias))
                               if shared else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(x.float(), self.gate.weight)
        weights, ids = select_grouped_experts(logits, self.top_k, "softmax",
                                              correction_bias=self.moe_statics.e_score_correction_bias[0],
                                              renormalize=True)
        out = self.experts(x, weights, ids)
        return out + self.shared_experts(x) if self.shared_experts is not None else out


class Ernie4_5_MoeForCausalLM(Ernie4_5ForCausalLM):  # noqa: N801 (transformers' name)
    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        start, end = int(cfg.moe_layer_start_index), int(cfg.moe_layer_end_index)
        interval = int(getattr(cfg, "moe_layer_interval", 1) or 1)
        if (layer_idx + 1) % interval == 0 and start <= layer_idx <= end:
            return ErnieMoE(cfg)
        return super().build_mlp(cfg, layer_idx)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        if getattr(cfg, "use_bias", False):  # (the MoE models' LM head has a bias with the rest)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
            self.tie_weights()
