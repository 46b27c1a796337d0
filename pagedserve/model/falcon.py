"""Falcon (FalconForCausalLM: Falcon 7B / 40B / 180B, Falcon 2 11B in transformers' format).

- one fused `query_key_value` projection, its rows laid out by variant and reordered at load
  into our q | k | v:
  - `new_decoder_architecture` (40B, 180B, Falcon 2): per key/value group [num_kv_heads,
    heads / num_kv_heads queries + 1 key + 1 value, head_dim] (grouped-query attention);
  - `multi_query` (7B): all query heads, then one key head and one value head (our layout);
  - neither: per head [heads, 3 (q, k, v), head_dim], multi-head;
- RoPE over the whole head; no biases unless `bias` (projections and MLP alike);
- `parallel_attn` (and always with the new architecture): h + attn(ln(h)) + mlp(ln'(h)), where
  ln' is ln_mlp with two norms (new architecture, num_ln_in_parallel_attn 2: 40B, 180B) and
  the same input_layernorm otherwise (7B, Falcon 2); without it, sequential as GPT-2's;
- LayerNorms with biases, a GELU MLP dense_h_to_4h / dense_4h_to_h of ffn_hidden_size;
- the LM head tied to the embeddings (tie_word_embeddings, true by default);
- `alibi` (Falcon-RW): ALiBi instead of RoPE, with transformers' slopes, which it rounds to
  bfloat16 and divides by sqrt(head_dim) with the scores (its bias on absolute positions is
  rounded to bfloat16 too: exact for the slopes of 8 heads or fewer within 256 positions, a
  rounding of the position term beyond; here the bias is computed in float32)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagedserve.model.gpt_neox import LayerNormDecoderLayer, grouped_qkv_to_fused, reorder_qkv_rows
from pagedserve.model.layers.alibi import alibi_slopes
from pagedserve.model.layers.norm import LayerNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, UpDownMLP


def falcon_kv_heads(cfg: Any) -> int:
    """Key/value heads as transformers' FalconAttention has them."""
    if cfg.new_decoder_architecture:
        return cfg.num_kv_heads
    return 1 if cfg.multi_query else cfg.num_attention_heads


def two_norms(cfg: Any) -> bool:
    """ln_attn and ln_mlp (transformers' default for the new architecture: 2)."""
    return bool(cfg.new_decoder_architecture) and (cfg.num_ln_in_parallel_attn or 2) == 2


class FalconForCausalLM(LlamaForCausalLM):
    stacked_params = []  # (query_key_value is fused already; the MLP has no gate)
    renamed = [("transformer.", "model."), (".word_embeddings.", ".embed_tokens."), (".h.", ".layers."),
               (".self_attention.query_key_value.", ".self_attn.qkv_proj."),
               (".self_attention.dense.", ".self_attn.o_proj."), (".mlp.dense_h_to_4h.", ".mlp.up_proj."),
               (".mlp.dense_4h_to_h.", ".mlp.down_proj."), (".ln_attn.", ".input_layernorm."),
               (".ln_mlp.", ".post_attention_layernorm."), ("model.ln_f.", "model.norm.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        heads = cfg.num_attention_heads
        sizes = SimpleNamespace(hidden_size=cfg.hidden_size, num_attention_heads=heads,
                                num_key_value_heads=falcon_kv_heads(cfg), head_dim=cfg.hidden_size // heads)
        alibi = None
        if cfg.alibi:  # (transformers: slopes in bfloat16, then (scores + bias) / sqrt(head_dim))
            alibi = [float(torch.tensor(x, device="cpu").bfloat16()) * sizes.head_dim**-0.5
                     for x in alibi_slopes(heads)]
        attn = LlamaAttention(sizes, None if cfg.alibi else rotary, qkv_bias=cfg.bias, o_bias=cfg.bias, qk_norm=False,
                              window=window, alibi=alibi)
        mlp = UpDownMLP(cfg, act=cfg.activation, intermediate_size=cfg.ffn_hidden_size, bias=cfg.bias)
        parallel = bool(cfg.parallel_attn or cfg.new_decoder_architecture)
        return LayerNormDecoderLayer(cfg.hidden_size, cfg.layer_norm_epsilon, attn, mlp, parallel=parallel,
                                     shared_norm=parallel and not two_norms(cfg))

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        kv = falcon_kv_heads(cfg)
        if cfg.new_decoder_architecture:
            groups, q_per_group = kv, heads // kv
        elif not cfg.multi_query:
            groups, q_per_group = heads, 1
        else:  # (q | k | v already)
            return super().load_weights(weights)
        super().load_weights(reorder_qkv_rows(weights, ".self_attention.query_key_value.",
                                              (heads + 2 * kv) * head_dim,
                                              lambda t: grouped_qkv_to_fused(t, groups, q_per_group)))
