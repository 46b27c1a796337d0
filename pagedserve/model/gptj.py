"""GPT-J (GPTJForCausalLM: GPT-J 6B and its fine-tunes).

- one LayerNorm (with bias) per layer, attention and MLP in parallel on its output:
  h + attn(ln_1(h)) + mlp(ln_1(h)) (model/gpt_neox.py's layer with shared_norm);
- RoPE on the leading `rotary_dim` dims of each head (64 of 256 in GPT-J 6B; all of it when
  unset), rotating interleaved pairs (2i, 2i + 1): run as split-halves RoPE on q_proj's and
  k_proj's rows permuted at load (layers/rotary.py interleaved_rope_weights);
- q/k/v and out_proj without biases; a GELU (gelu_new) MLP fc_in / fc_out of n_inner (default
  4 * hidden) with biases; a final LayerNorm ln_f;
- an untied LM head with a bias."""

from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagedserve.model.gpt_neox import LayerNormDecoderLayer, mha_sizes
from pagedserve.model.layers.norm import LayerNorm
from pagedserve.model.layers.rotary import RotaryEmbedding, interleaved_rope_weights
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, UpDownMLP


def _rotary_dim(cfg: Any) -> int:
    return cfg.rotary_dim or cfg.hidden_size // cfg.num_attention_heads


class GPTJForCausalLM(LlamaForCausalLM):
    stacked_params = [p for p in LlamaForCausalLM.stacked_params if p[2] in ("q", "k", "v")]
    renamed = [("transformer.", "model."), (".wte.", ".embed_tokens."), (".h.", ".layers."),
               (".ln_1.", ".input_layernorm."), (".attn.", ".self_attn."),
               (".self_attn.out_proj.", ".self_attn.o_proj."), (".mlp.fc_in.", ".mlp.up_proj."),
               (".mlp.fc_out.", ".mlp.down_proj."), ("model.ln_f.", "model.norm.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        attn = LlamaAttention(mha_sizes(cfg), rotary, qkv_bias=False, o_bias=False, qk_norm=False, window=window)
        mlp = UpDownMLP(cfg, act=cfg.activation_function, intermediate_size=cfg.n_inner or 4 * cfg.hidden_size,
                        bias=True)
        return LayerNormDecoderLayer(cfg.hidden_size, cfg.layer_norm_epsilon, attn, mlp, parallel=True,
                                     shared_norm=True)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        # RoPE's partial rotary factor from rotary_dim, on a copy (the config itself stays as read)
        cfg = copy.copy(cfg)
        cfg.partial_rotary_factor = _rotary_dim(cfg) / (cfg.hidden_size // cfg.num_attention_heads)
        super().__init__(cfg, max_positions)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)  # (GPT-J's head has a bias)
        self.tie_weights()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        kept = ((n, t) for n, t in weights if not n.endswith((".attn.bias", ".attn.masked_bias")))  # (mask buffers)
        super().load_weights(interleaved_rope_weights(kept, head_dim, _rotary_dim(self.config)))
