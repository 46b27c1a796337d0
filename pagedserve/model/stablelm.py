"""StableLM (StableLmForCausalLM: StableLM-3B-4E1T, StableLM 2 1.6B / 12B, StableLM Zephyr).

- Llama's names and gated SiLU MLP, with LayerNorms (with bias) in place of RMSNorms, the
  final one too;
- RoPE on the leading `partial_rotary_factor` of each head (0.25 in the released models);
- q/k/v biases when `use_qkv_bias` (StableLM 2 1.6B); the output projection without;
- `qk_layernorm` (StableLM 2 12B): a LayerNorm without bias for each query head and each key
  head apart, before RoPE (PerHeadLayerNorm: their weights stacked, one call for all heads);
- `use_parallel_residual` (StableLM 2 12B): h + attn(ln(h)) + mlp(ln(h)) on one LayerNorm;
  otherwise sequential, as Llama's layer."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from pagedserve.model.gpt_neox import LayerNormDecoderLayer
from pagedserve.model.layers.norm import LayerNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class PerHeadLayerNorm(nn.Module):
    """A LayerNorm (weight, no bias) of its own for each head of x [tokens, heads, head_dim];
    named norms.<head>.weight as in the checkpoint."""

    def __init__(self, heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.norms = nn.ModuleList(LayerNorm(head_dim, eps, bias=False) for _ in range(heads))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.stack([n.weight for n in self.norms])  # [heads, head_dim]
        return nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps) * weight


class StableLmForCausalLM(LlamaForCausalLM):
    renamed = [(".self_attn.q_layernorm.", ".self_attn.q_norm."), (".self_attn.k_layernorm.", ".self_attn.k_norm.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        attn = LlamaAttention(cfg, rotary, qkv_bias=bool(cfg.use_qkv_bias), o_bias=False, qk_norm=False,
                              window=window)
        if cfg.qk_layernorm:  # (per head: set after, LlamaAttention's norms being one for all heads)
            attn.q_norm = PerHeadLayerNorm(attn.num_heads, attn.head_dim, cfg.layer_norm_eps)
            attn.k_norm = PerHeadLayerNorm(attn.num_kv_heads, attn.head_dim, cfg.layer_norm_eps)
        parallel = bool(cfg.use_parallel_residual)
        return LayerNormDecoderLayer(cfg.hidden_size, cfg.layer_norm_eps, attn, LlamaMLP(cfg), parallel=parallel,
                                     shared_norm=parallel)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
