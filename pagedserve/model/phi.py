"""Phi (PhiForCausalLM: phi-1, phi-1.5, phi-2).

- one LayerNorm (with bias) per layer, attention and MLP in parallel on its output:
  h + attn(ln(h)) + mlp(ln(h));
- RoPE on the leading `partial_rotary_factor` of each head (0.5 in the released models);
- biases on q/k/v and on the output projection, named `dense`;
- a GELU (gelu_new) MLP without a gate, fc1 / fc2, with biases;
- a final LayerNorm `final_layernorm`, and an LM head with a bias.

Not supported: qk_layernorm (LayerNorms on q and k; no released checkpoint sets it)."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from pagedserve.model.gpt_neox import LayerNormDecoderLayer
from pagedserve.model.layers.norm import LayerNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, UpDownMLP


class PhiForCausalLM(LlamaForCausalLM):
    stacked_params = [p for p in LlamaForCausalLM.stacked_params if p[2] in ("q", "k", "v")]
    renamed = [(".self_attn.dense.", ".self_attn.o_proj."), (".mlp.fc1.", ".mlp.up_proj."),
               (".mlp.fc2.", ".mlp.down_proj."), ("model.final_layernorm.", "model.norm.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        attn = LlamaAttention(cfg, rotary, qkv_bias=True, o_bias=True, qk_norm=False, window=window)
        return LayerNormDecoderLayer(cfg.hidden_size, cfg.layer_norm_eps, attn, UpDownMLP(cfg, bias=True),
                                     parallel=True, shared_norm=True)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        if getattr(cfg, "qk_layernorm", False):
            raise ValueError("Phi with qk_layernorm (LayerNorms on q and k) is not supported.")
        super().__init__(cfg, max_positions)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)  # (Phi's head has a bias)
        self.tie_weights()
