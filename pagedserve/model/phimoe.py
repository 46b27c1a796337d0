"""Phi-3.5-MoE (PhimoeForCausalLM): Mixtral's layout with

- LayerNorms with bias (eps rms_norm_eps) before attention, before the experts, and the final one;
- q/k/v and o_proj biases when attention_bias (the released model has them), an LM head bias
  when lm_head_bias;
- a sliding window on every layer when sliding_window is set;
- the sparsemixer router: two experts, each picked as the best remaining logit, weighted by a
  softmax over only the logits within 2 * router_jitter_noise (relative) of it; the weights are
  not renormalised. Checkpoints name it block_sparse_moe.gate, experts w1 / w3 / w2 (Mixtral's);
- LongRoPE whose cos/sin are scaled by short_mscale or long_mscale instead of LongRoPE's own
  attention factor. Factors and mscale are chosen once, by max_model_len, as for Phi-3
  (layers/rotary.py): the long ones only when the engine may run past
  original_max_position_embeddings. (transformers' port keeps the short factors even then, and
  switches mscale by the longest position so far; vLLM takes the long factors past the original
  length. All agree up to the original length, the only range the tests check.)

Not supported: num_experts_per_tok other than 2 (sparsemixer picks two), RoPE types other than
default and longrope."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagedserve.model.gpt_neox import LayerNormDecoderLayer
from pagedserve.model.hf_config import rope_parameters
from pagedserve.model.layers.moe import FusedMoE
from pagedserve.model.layers.norm import LayerNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, _head_dim
from pagedserve.model.qwen_moe import unstack_experts


def sparsemixer_top2(router_logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's inference routing, in float32: for each of two rounds, the best logit not
    yet taken, weighted by its softmax over the remaining logits x with (best - x) / max(|x|,
    best) <= 2 * jitter_eps (the others masked out). Returns (weights [T, 2], expert ids [T, 2])."""
    scores = router_logits.float()
    remaining = scores
    weights, ids = [], []
    for _ in range(2):
        best, idx = remaining.max(dim=-1, keepdim=True)
        far = (best - scores) / scores.abs().clamp(min=best) > 2 * jitter_eps  # (measured on the raw scores)
        gates = torch.softmax(remaining.masked_fill(far, float("-inf")), dim=-1)
        weights.append(gates.gather(-1, idx))
        ids.append(idx)
        remaining = remaining.scatter(-1, idx, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(ids, dim=-1)


class PhimoeSparseMoe(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.jitter_eps = float(cfg.router_jitter_noise)
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = FusedMoE(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = sparsemixer_top2(self.gate(x), self.jitter_eps)
        return self.experts(x, weights, ids)


class PhimoeRotaryEmbedding(RotaryEmbedding):
    """LongRoPE with Phi-3.5-MoE's mscales: the short or long factors and their mscale, chosen
    by max_positions against original_max_position_embeddings."""

    def _compute_cpu(self) -> torch.Tensor:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = rope_parameters(self.hf_config)
        long = self.max_positions > int(params["original_max_position_embeddings"])
        kwargs = {"seq_len": int(params["original_max_position_embeddings"]) + 1} if long else {}
        inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](self.hf_config, torch.device("cpu"), **kwargs)
        mscale = float(params["long_mscale" if long else "short_mscale"])
        freqs = torch.arange(self.max_positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
        return torch.cat([freqs.cos() * mscale, freqs.sin() * mscale], -1)


class PhimoeForCausalLM(LlamaForCausalLM):
    # Hub checkpoints: block_sparse_moe.gate (Mixtral's names); transformers 5's modules: mlp.router and
    # stacked experts (unstack_experts), should a checkpoint carry those.
    renamed = [(".block_sparse_moe.", ".mlp."), (".mlp.router.", ".mlp.gate.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        bias = bool(getattr(cfg, "attention_bias", False))
        attn = LlamaAttention(cfg, rotary, qkv_bias=bias, o_bias=bias, qk_norm=False, window=window)
        return LayerNormDecoderLayer(cfg.hidden_size, cfg.rms_norm_eps, attn, PhimoeSparseMoe(cfg), parallel=False)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        if cfg.num_experts_per_tok != 2:
            raise ValueError(f"Phi-MoE with num_experts_per_tok={cfg.num_experts_per_tok} is not supported: its "
                             "sparsemixer router always picks 2 experts.")
        rope_type = rope_parameters(cfg)["rope_type"]
        if rope_type not in ("default", "longrope"):
            raise ValueError(f"Phi-MoE with rope_parameters rope_type {rope_type!r} is not supported; supported: "
                             "default, longrope.")
        super().__init__(cfg, max_positions)
        if rope_type == "longrope":
            rotary = PhimoeRotaryEmbedding(cfg, _head_dim(cfg), max_positions)
            for layer in self.model.layers:
                layer.self_attn.rotary = rotary
        if getattr(cfg, "lm_head_bias", False):
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
            self.tie_weights()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(unstack_experts(weights, self.config.hidden_size, self.config.intermediate_size))
