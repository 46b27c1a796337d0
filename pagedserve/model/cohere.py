"""Cohere Command-R (CohereForCausalLM): attention and MLP in parallel on one normed input
(h + attn(norm(h)) + mlp(norm(h))), a mean-centred LayerNorm without bias, logits times
logit_scale, and RoPE on interleaved pairs (dims 2i, 2i + 1).

Interleaved RoPE is run as the usual split-halves RoPE on q_proj's and k_proj's rows permuted
at load (layers/rotary.py interleaved_to_halves)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.layers.norm import ResidualNorm, pre_norm
from pagedserve.model.layers.rotary import RotaryEmbedding, interleaved_rope_weights
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, _head_dim


class CohereLayerNorm(ResidualNorm):
    """(x - mean) / std * weight in float32, then cast (no bias)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf - xf.mean(-1, keepdim=True)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class CohereDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, rotary: RotaryEmbedding, window: int) -> None:
        super().__init__()
        bias = bool(getattr(cfg, "attention_bias", False))
        self.self_attn = LlamaAttention(cfg, rotary, qkv_bias=bias, o_bias=bias, qk_norm=False, window=window)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = CohereLayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        """The hidden state is x + residual (x alone before the first layer), as in llama.py."""
        h, residual = pre_norm(self.input_layernorm, x, residual)
        return self.self_attn(positions, h, meta) + self.mlp(h), residual


class CohereForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        return CohereDecoderLayer(cfg, rotary, window)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return CohereLayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        if getattr(cfg, "use_qk_norm", False):
            raise ValueError("Cohere models with use_qk_norm (per-head q/k norms, Command R+) are not supported.")
        super().__init__(cfg, max_positions)
        self.logit_scale = float(getattr(cfg, "logit_scale", 1.0))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) * self.logit_scale

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        head_dim = _head_dim(self.config)
        super().load_weights(interleaved_rope_weights(weights, head_dim, head_dim))


class Cohere2ForCausalLM(CohereForCausalLM):
    """Command R7B, Command A: Cohere's layers, sliding-window attention with RoPE on the
    layers `layer_types` marks (three of four) and no RoPE on the full-attention ones."""

    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        window = getattr(cfg, "sliding_window", None)
        for layer, t in zip(self.model.layers, getattr(cfg, "layer_types", None) or ()):
            if t != "sliding_attention" or window is None:  # (transformers: RoPE where the layer has a window)
                layer.self_attn.rotary = None
