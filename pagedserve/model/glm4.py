"""GLM-4: the Llama attention (q/k/v biases) and MLP (gate_up fused in the checkpoint), with
RoPE on interleaved pairs of the first half of each head (partial_rotary_factor 0.5), run as
split-halves RoPE on q/k rows permuted at load (layers/rotary.py interleaved_to_halves).

- GlmForCausalLM (GLM-4-9B-chat-hf): Llama's pre-norm layer;
- Glm4ForCausalLM (GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1): a sandwich layer, RMSNorm before
  and after both attention and MLP."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.layers.norm import RMSNorm, pre_norm
from pagedserve.model.layers.rotary import RotaryEmbedding, interleaved_rope_weights
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class GlmForCausalLM(LlamaForCausalLM):
    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        return {"qkv_bias": bool(getattr(cfg, "attention_bias", False)), "o_bias": False, "qk_norm": False}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        rotary = self.model.layers[0].self_attn.rotary
        super().load_weights(interleaved_rope_weights(weights, rotary.head_dim, rotary.rotary_dim))


class Glm4DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, rotary: RotaryEmbedding, window: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, qkv_bias=bool(getattr(cfg, "attention_bias", False)),
                                        o_bias=False, qk_norm=False, window=window)
        self.mlp = LlamaMLP(cfg)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        """The hidden state is x + residual (x alone before the first layer), as in llama.py."""
        h, residual = pre_norm(self.input_layernorm, x, residual)
        a = self.post_self_attn_layernorm(self.self_attn(positions, h, meta))
        h, residual = self.post_attention_layernorm(a, residual)
        return self.post_mlp_layernorm(self.mlp(h)), residual


class Glm4ForCausalLM(GlmForCausalLM):
    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        return Glm4DecoderLayer(cfg, rotary, window)
