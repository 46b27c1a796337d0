"""BLOOM (BloomForCausalLM: bloom-560m ... bloom-176b, bloomz, and their fine-tunes).

- ALiBi instead of position embeddings: each head's scores gain slope * (key position - query
  position), the paper's slopes (layers/alibi.py);
- a LayerNorm on the word embeddings (word_embeddings_layernorm) before the first layer;
- one fused `query_key_value` projection whose rows are per head [heads, 3 (q, k, v), head_dim]:
  reordered at load into our q | k | v; multi-head attention;
- pre-LayerNorm layers with biases everywhere, a GELU (tanh form) MLP dense_h_to_4h /
  dense_4h_to_h of 4 * hidden; `apply_residual_connection_post_layernorm`: the residual
  stream carries the LayerNorms' outputs instead of their inputs;
- the LM head tied to the word embeddings.

`pretraining_tp` / `slow_but_exact` (the output projection summed in slices in transformers)
change only the summation order and are not reproduced."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.gpt_neox import mha_sizes, per_head_qkv_to_fused, reorder_qkv_rows
from pagedserve.model.layers.alibi import alibi_slopes
from pagedserve.model.layers.norm import LayerNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, UpDownMLP
from pagedserve.model.weights import base_prefixed


class BloomDecoderLayer(nn.Module):
    """Attention then the MLP, each after a LayerNorm; the residual added to each is the
    LayerNorm's input, or its output with `post_norm_residual`."""

    def __init__(self, cfg: Any, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.post_norm_residual = bool(cfg.apply_residual_connection_post_layernorm)

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        """The hidden state is x + residual (x alone before the first layer), as in llama.py."""
        h = x if residual is None else x + residual
        n = self.input_layernorm(h)
        h = self.self_attn(positions, n, meta) + (n if self.post_norm_residual else h)
        n = self.post_attention_layernorm(h)
        return self.mlp(n), (n if self.post_norm_residual else h)


class BloomForCausalLM(LlamaForCausalLM):
    stacked_params = []  # (query_key_value is fused already; the MLP has no gate)
    renamed = [("transformer.", "model."), (".word_embeddings.", ".embed_tokens."),
               ("model.word_embeddings_layernorm.", "model.embed_norm."), (".h.", ".layers."),
               (".self_attention.query_key_value.", ".self_attn.qkv_proj."),
               (".self_attention.dense.", ".self_attn.o_proj."), (".mlp.dense_h_to_4h.", ".mlp.up_proj."),
               (".mlp.dense_4h_to_h.", ".mlp.down_proj."), ("model.ln_f.", "model.norm.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        attn = LlamaAttention(mha_sizes(cfg), None, qkv_bias=True, o_bias=True, qk_norm=False,
                              alibi=alibi_slopes(cfg.num_attention_heads))
        # (transformers' bloom_gelu_forward is the tanh approximation)
        mlp = UpDownMLP(cfg, act="gelu_pytorch_tanh", intermediate_size=4 * cfg.hidden_size, bias=True)
        return BloomDecoderLayer(cfg, attn, mlp)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        self.model.embed_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: Optional[torch.Tensor] = None, deepstack: Any = None) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self.model(input_ids, positions, meta, inputs_embeds=self.model.embed_norm(x))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        heads = self.config.num_attention_heads
        # (hub checkpoints, bigscience/bloom-*, name tensors without the "transformer." prefix)
        prefixed = ((base_prefixed(name), t) for name, t in weights)
        super().load_weights(reorder_qkv_rows(prefixed, ".self_attention.query_key_value.",
                                              3 * self.config.hidden_size, lambda t: per_head_qkv_to_fused(t, heads)))
