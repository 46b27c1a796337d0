"""OLMo 2 (Olmo2ForCausalLM): the Llama attention and MLP in a post-norm layer (no norm
before attention or the MLP; RMSNorm on each of their outputs before it joins the residual
stream), and RMSNorm over the whole q and k projections (all heads at once) before RoPE.
OLMo 3 (Olmo3ForCausalLM): the same layers, sliding-window attention on the layers its
`layer_types` marks (three of four), and RoPE parameters per layer type (YaRN on the
full-attention layers of the long-context models).
EXAONE 4.0 (Exaone4ForCausalLM): the same post-norm layers with q/k norms per head; with a
sliding window, its full-attention layers (one of four) use no RoPE."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.hf_config import rope_is_per_layer_type
from pagedserve.model.layers.rotary import RotaryEmbedding, make_rotary
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, _head_dim


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, rotary: RotaryEmbedding, window: int, qk_norm_whole: bool = True,
                 mlp: Optional[nn.Module] = None) -> None:
        super().__init__()
        bias = bool(getattr(cfg, "attention_bias", False))
        self.self_attn = LlamaAttention(cfg, rotary, qkv_bias=bias, o_bias=bias, qk_norm=True, window=window,
                                        qk_norm_whole=qk_norm_whole)
        self.mlp = mlp if mlp is not None else LlamaMLP(cfg)  # (FlexOlmo: experts)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        """The hidden state is x + residual (x alone before the first layer), as in llama.py."""
        h = x if residual is None else x + residual
        h = h + self.post_attention_layernorm(self.self_attn(positions, h, meta))
        return self.post_feedforward_layernorm(self.mlp(h)), h


class Olmo2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        return Olmo2DecoderLayer(cfg, rotary, window)


class Olmo3ForCausalLM(Olmo2ForCausalLM):
    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__(cfg, max_positions)  # (layer_windows reads the windows from layer_types)
        if rope_is_per_layer_type(cfg):
            types = list(cfg.layer_types)
            rotaries = {t: make_rotary(cfg, _head_dim(cfg), max_positions, t) for t in sorted(set(types))}
            for layer, t in zip(self.model.layers, types):
                layer.self_attn.rotary = rotaries[t]


def exaone_global_nope(cfg: Any, layers: nn.ModuleList) -> None:
    """EXAONE 4.0 / K-EXAONE with a sliding window: their full-attention layers use no RoPE."""
    types = getattr(cfg, "layer_types", None)
    if getattr(cfg, "sliding_window", None) and types:
        for layer, t in zip(layers, types):
            if t != "sliding_attention":
                layer.self_attn.rotary = None


class Exaone4ForCausalLM(Olmo2ForCausalLM):
    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        return Olmo2DecoderLayer(cfg, rotary, window, qk_norm_whole=False)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        exaone_global_nope(cfg, self.model.layers)
