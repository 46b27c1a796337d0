"""IBM Granite 3.x (GraniteForCausalLM): the Llama decoder with four scalars from config.json:
embeddings times embedding_multiplier, each attention and MLP output times
residual_multiplier before it joins the residual stream, attention_multiplier as the softmax
scale (not head_dim ** -0.5), and logits divided by logits_scaling."""

from __future__ import annotations

from typing import Any

import torch

from pagedserve.model.llama import LlamaForCausalLM


class GraniteForCausalLM(LlamaForCausalLM):
    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        return {**super().attn_options(cfg), "scale": float(cfg.attention_multiplier)}

    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        self.model.embed_scale = float(cfg.embedding_multiplier)
        for layer in self.model.layers:
            layer.residual_multiplier = float(cfg.residual_multiplier)
        self.logits_scaling = float(cfg.logits_scaling)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) / self.logits_scaling
