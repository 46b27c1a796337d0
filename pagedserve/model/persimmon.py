"""Persimmon (PersimmonForCausalLM: adept/persimmon-8b-base / -chat), as transformers runs it:

- pre-LayerNorm layers with biases (the final one `final_layernorm`), sequential residual;
- one fused `query_key_value` with bias whose rows are per head [heads, 3 (q, k, v), head_dim]
  (GPT-NeoX's layout: reordered at load into our q | k | v); multi-head attention;
- `qk_layernorm`: one LayerNorm (weight and bias) over head_dim shared by all query heads, one
  by all key heads, before RoPE;
- RoPE on the leading partial_rotary_factor of each head (0.5);
- a gateless MLP (dense_h_to_4h, dense_4h_to_h) with biases and ReLU² (`hidden_act`); an
  untied LM head without bias."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagedserve.model.gpt_neox import LayerNormDecoderLayer, mha_sizes, per_head_qkv_to_fused, reorder_qkv_rows
from pagedserve.model.layers.norm import LayerNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, UpDownMLP


class PersimmonForCausalLM(LlamaForCausalLM):
    stacked_params = []  # (the checkpoint's qkv is fused already; its MLP has no gate)
    renamed = [(".self_attn.query_key_value.", ".self_attn.qkv_proj."), (".self_attn.dense.", ".self_attn.o_proj."),
               (".self_attn.q_layernorm.", ".self_attn.q_norm."), (".self_attn.k_layernorm.", ".self_attn.k_norm."),
               (".mlp.dense_h_to_4h.", ".mlp.up_proj."), (".mlp.dense_4h_to_h.", ".mlp.down_proj."),
               ("model.final_layernorm.", "model.norm.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        # (LlamaAttention reads its q/k norms' eps as rms_norm_eps: Persimmon's layer_norm_eps)
        sizes = SimpleNamespace(**vars(mha_sizes(cfg)), rms_norm_eps=cfg.layer_norm_eps)
        attn = LlamaAttention(sizes, rotary, qkv_bias=True, o_bias=True, qk_norm=bool(cfg.qk_layernorm),
                              window=window, norm=LayerNorm)
        return LayerNormDecoderLayer(cfg.hidden_size, cfg.layer_norm_eps, attn, UpDownMLP(cfg, bias=True),
                                     parallel=False)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        heads = self.config.num_attention_heads
        super().load_weights(reorder_qkv_rows(weights, ".self_attn.query_key_value.", 3 * self.config.hidden_size,
                                              lambda t: per_head_qkv_to_fused(t, heads)))
