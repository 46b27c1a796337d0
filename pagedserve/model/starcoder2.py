"""StarCoder 2 (Starcoder2ForCausalLM): the Llama layer order with

- LayerNorms with biases (norm_epsilon) instead of RMSNorms, the final one too;
- biases on q/k/v, the output projection and the MLP when `use_bias` (the released models);
- a GELU (gelu_pytorch_tanh) MLP without a gate, c_fc / c_proj;
- GQA, and a sliding window on every layer when `sliding_window` is set (the attention
  backends', through hf_config.layer_windows);
- an LM head tied to the embeddings (tie_word_embeddings, true in the released models)."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from pagedserve.model.gpt_neox import LayerNormDecoderLayer
from pagedserve.model.layers.norm import LayerNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, UpDownMLP


class Starcoder2ForCausalLM(LlamaForCausalLM):
    stacked_params = [p for p in LlamaForCausalLM.stacked_params if p[2] in ("q", "k", "v")]
    renamed = [(".mlp.c_fc.", ".mlp.up_proj."), (".mlp.c_proj.", ".mlp.down_proj.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        bias = bool(getattr(cfg, "use_bias", True))
        attn = LlamaAttention(cfg, rotary, qkv_bias=bias, o_bias=bias, qk_norm=False, window=window)
        return LayerNormDecoderLayer(cfg.hidden_size, cfg.norm_epsilon, attn, UpDownMLP(cfg, bias=bias),
                                     parallel=False)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return LayerNorm(cfg.hidden_size, cfg.norm_epsilon)
