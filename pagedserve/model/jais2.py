"""JAIS 2 (Jais2ForCausalLM: inceptionai/Jais-2-8B-Chat): the Llama decoder on LayerNorms with
biases (eps `layer_norm_eps`), a gateless ReLU² MLP down(relu(up(x))²) with biases (`mlp_bias`),
q/k/v and output biases (`attention_bias`), RoPE."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from pagedserve.model.gpt_neox import LayerNormDecoderLayer
from pagedserve.model.layers.norm import LayerNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, UpDownMLP


class Jais2ForCausalLM(LlamaForCausalLM):
    stacked_params = [p for p in LlamaForCausalLM.stacked_params if p[2] not in ("gate", "up")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        attn = LlamaAttention(cfg, rotary, window=window, **cls.attn_options(cfg))
        return LayerNormDecoderLayer(cfg.hidden_size, cfg.layer_norm_eps, attn, UpDownMLP(cfg), parallel=False)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
