"""Llama 4 (Scout, Maverick; the language model of Llama4ForConditionalGeneration checkpoints,
served text-only): the Llama decoder with
- chunked local attention on its RoPE layers (`attention_chunk_size`: a query sees the keys of
  its own chunk, chunks aligned to position 0; attention/backend.py first_visible) and full
  attention without RoPE on every `no_rope_layer_interval`-th layer, whose queries are scaled
  by 1 + attn_scale * log(1 + floor((position + 1) / floor_scale)) (attn_temperature_tuning);
- RoPE on interleaved pairs (run as split halves on q_proj's / k_proj's rows permuted at
  load, as for Cohere) and weightless L2 norms of q and k on the RoPE layers (use_qk_norm;
  taken before RoPE, which keeps each pair's length, so the result is the same);
- mixtures of experts on `moe_layers` (all, or every `interleave_moe_layer_step`-th): one
  expert a token by the router's top logit, its input scaled by the logit's sigmoid (not its
  output), plus a shared expert; the other layers a dense SwiGLU of intermediate_size_mlp."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.model.layers.moe import FusedMoE
from pagedserve.model.layers.rotary import RotaryEmbedding, interleaved_rope_weights
from pagedserve.model.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, _head_dim
from pagedserve.model.qwen_moe import unstack_experts


class L2Norm(nn.Module):
    """x / rms(x) over the last dim, in float32, with no weight (transformers' Llama4TextL2Norm)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Llama4MoE(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        if int(cfg.num_experts_per_tok) != 1:  # (the sigmoid scales the input, so one expert a token)
            raise ValueError(f"Llama 4 routes each token to one expert; num_experts_per_tok is "
                             f"{cfg.num_experts_per_tok}.")
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = FusedMoE(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.shared_expert = LlamaMLP(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, ids = torch.topk(self.router(x), 1, dim=-1)
        score = torch.sigmoid(top.float()).to(x.dtype)
        return self.experts(x * score, torch.ones_like(score, dtype=torch.float32), ids) + self.shared_expert(x)


class Llama4ForCausalLM(LlamaForCausalLM):
    renamed = [(".feed_forward.", ".mlp.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        rope = bool(cfg.no_rope_layers[layer_idx])
        qk_norm = rope and bool(getattr(cfg, "use_qk_norm", False))
        bias = bool(getattr(cfg, "attention_bias", False))
        opts = dict(qkv_bias=bias, o_bias=bias, qk_norm=qk_norm, norm=L2Norm)
        mlp = Llama4MoE(cfg) if layer_idx in cfg.moe_layers else LlamaMLP(cfg, cfg.intermediate_size_mlp)
        layer = LlamaDecoderLayer(cfg, rotary, opts, mlp, window)
        if not rope:
            layer.self_attn.rotary = None
            if getattr(cfg, "attn_temperature_tuning", False):
                layer.self_attn.q_position_scale = (float(cfg.attn_scale), int(cfg.floor_scale), 1)
        return layer

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        cfg, head_dim = self.config, _head_dim(self.config)
        weights = unstack_experts(weights, cfg.hidden_size, cfg.intermediate_size, hub_layout=True)
        super().load_weights(interleaved_rope_weights(weights, head_dim, head_dim))
