"""Nemotron (NemotronForCausalLM: Nemotron-4, Minitron, Nemotron-Mini): Llama's layer order and
names with

- LayerNorm1P norms (LayerNorms with bias whose weight is stored as an offset from 1), the
  final one too;
- an MLP without a gate, down(relu(up(x))²) (hidden_act relu2), biases when `mlp_bias`;
- RoPE on the leading `partial_rotary_factor` of each head (0.5 by default);
- biases on q/k/v and o_proj when `attention_bias`; GQA; an untied LM head."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from pagedserve.model.gpt_neox import LayerNormDecoderLayer
from pagedserve.model.layers.norm import LayerNorm1P
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, UpDownMLP


class NemotronForCausalLM(LlamaForCausalLM):
    stacked_params = [p for p in LlamaForCausalLM.stacked_params if p[2] in ("q", "k", "v")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        bias = bool(cfg.attention_bias)
        attn = LlamaAttention(cfg, rotary, qkv_bias=bias, o_bias=bias, qk_norm=False, window=window)
        return LayerNormDecoderLayer(cfg.hidden_size, cfg.norm_eps, attn, UpDownMLP(cfg, bias=bool(cfg.mlp_bias)),
                                     parallel=False, norm=LayerNorm1P)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return LayerNorm1P(cfg.hidden_size, cfg.norm_eps)
