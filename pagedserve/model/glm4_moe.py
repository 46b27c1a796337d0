"""GLM-4.5 / 4.6 (Glm4MoeForCausalLM: GLM-4.5, 4.5-Air, 4.6): the Llama decoder with q/k/v
biases (attention_bias; o_proj has none), optional per-head q/k norms (use_qk_norm), RoPE on
the leading half of each head (partial_rotary_factor 0.5, split-halves style), and from layer
first_k_dense_replace on DeepSeek-V3's mixture of experts (sigmoid router with a correction
bias, group-limited, shared experts: model/deepseek.py). Its multi-token-prediction layers
past num_hidden_layers are skipped."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.model.deepseek import DeepseekMoE, without_mtp_layers
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaForCausalLM, LlamaMLP


class Glm4MoeForCausalLM(LlamaForCausalLM):
    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        return {"qkv_bias": bool(getattr(cfg, "attention_bias", False)), "o_bias": False,
                "qk_norm": bool(getattr(cfg, "use_qk_norm", False))}

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        if layer_idx >= int(getattr(cfg, "first_k_dense_replace", 0) or 0):
            return DeepseekMoE(cfg, sigmoid=True)
        return LlamaMLP(cfg)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(without_mtp_layers(weights, self.config.num_hidden_layers))


class SolarOpenForCausalLM(Glm4MoeForCausalLM):
    """Solar Open (upstage/Solar-Open-100B): GLM-4.5's experts (DeepSeek-V3's sigmoid router with
    a correction bias, groups, shared experts) in every layer, on Llama's attention: q/k/v biases
    when attention_bias, none on o_proj, no q/k norms, RoPE over the whole head."""

    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        return {"qkv_bias": bool(getattr(cfg, "attention_bias", False)), "o_bias": False, "qk_norm": False}

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        return DeepseekMoE(cfg, sigmoid=True)  # (no dense layers, whatever first_k_dense_replace says)

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        # Full attention whatever config.json's sliding_window says (transformers ignores it here).
        return super().make_layer(cfg, rotary, layer_idx, 0)
