"""dots.llm1 (Dots1ForCausalLM: rednote-hilab/dots.llm1.base / .inst): Qwen3's decoder (per-head
q/k RMSNorm before RoPE; windows on the layers layer_types marks) with DeepSeek-V3's mixture of
experts from layer first_k_dense_replace on: a float32 sigmoid router whose top k is chosen
with a correction bias (group-limited where n_group says), weights optionally renormalised
and scaled by routed_scaling_factor, plus always-on shared experts (model/deepseek.py)."""

from __future__ import annotations

from typing import Any

from torch import nn

from pagedserve.model.deepseek import DeepseekMoE
from pagedserve.model.llama import LlamaMLP
from pagedserve.model.qwen3 import Qwen3ForCausalLM


class Dots1ForCausalLM(Qwen3ForCausalLM):
    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        if layer_idx >= int(getattr(cfg, "first_k_dense_replace", 0) or 0):
            return DeepseekMoE(cfg, sigmoid=True)
        return LlamaMLP(cfg)
