"""DeepSeek-V2 / V3 (V2-Lite, Coder-V2, V3, R1, Kimi K2, Moonlight): the Llama decoder with
- multi-head latent attention (MLA): keys and values come from one latent per token, a
  kv_lora_rank vector c (normed) plus a qk_rope_head_dim key k_pe shared by every head. The
  paged cache holds just [c, k_pe] (one "head" of kv_lora_rank + qk_rope_head_dim, one cache
  read as keys and values), not per-head keys and values: 576 numbers a token for V3 against
  128 heads x (192 + 128). Attention runs "absorbed": each head's nope query is taken into the
  latent space through its slice of kv_b_proj (W_UK), so q . k = [q_nope W_UK, q_pe] .
  [c, k_pe]; the output, a weighted sum of latents, leaves through W_UV. Same scores and
  outputs as the expanded form transformers computes, rounded differently;
- RoPE on the rope dims only; V3 with rope_interleave and V2 always rotate interleaved pairs,
  which are taken apart into halves (q and k alike: same dot products) for our rotary;
- the softmax scale of the full q/k head (nope + rope), times YaRN's mscale(mscale_all_dim)^2;
- a mixture of experts from layer first_k_dense_replace on (every moe_layer_freq-th): the
  group-limited router (V2: softmax, best score per group; V3: sigmoid with a correction bias,
  best two per group), routed_scaling_factor, and always-on shared experts. V2 renormalises
  the top k with norm_topk_prob as vLLM and DeepSeek's code do (transformers' V2 port never does);
- the multi-token-prediction layers V3 checkpoints carry past num_hidden_layers skipped."""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.hf_config import rope_parameters
from pagedserve.model.layers.attention import PagedAttention
from pagedserve.model.layers.moe import FusedMoE, select_grouped_experts
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(cfg: Any) -> float:
    """1/sqrt(qk_nope_head_dim + qk_rope_head_dim), times mscale(mscale_all_dim)^2 under YaRN."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    params = rope_parameters(cfg)
    if params.get("rope_type", "default") != "default" and params.get("mscale_all_dim"):
        scale *= _yarn_mscale(float(params["factor"]), float(params["mscale_all_dim"])) ** 2
    return scale


class LatentUpProjection(nn.Module):
    """kv_b_proj: [heads x (nope + v), kv_lora_rank], used as two per-head matrices, never as a
    layer (so quantized checkpoints dequantize it as it loads, and no kernel replaces it)."""

    def __init__(self, num_heads: int, nope: int, v: int, rank: int) -> None:
        super().__init__()
        self.num_heads, self.nope, self.v = num_heads, nope, v
        self.weight = nn.Parameter(torch.empty(num_heads * (nope + v), rank))

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, rank], W_UV [H, v, rank]), views of the weight."""
        w = self.weight.view(self.num_heads, self.nope + self.v, -1)
        return w[:, : self.nope], w[:, self.nope :]


class MLAAttention(nn.Module):
    def __init__(self, cfg: Any, rotary: RotaryEmbedding, interleaved: bool) -> None:
        super().__init__()
        h = self.num_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        bias = bool(getattr(cfg, "attention_bias", False))
        q_out = h * (self.nope + self.rope)
        self.q_lora_rank = getattr(cfg, "q_lora_rank", None)
        if self.q_lora_rank:  # V2 / V3: a low-rank query; V2-Lite: a plain projection
            self.q_a_proj = nn.Linear(cfg.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = LatentUpProjection(h, self.nope, self.v, self.rank)
        self.o_proj = nn.Linear(h * self.v, cfg.hidden_size, bias=bias)
        if rotary.rotary_dim != self.rope:
            raise ValueError(f"qk_rope_head_dim ({self.rope}) must be the rotary dim ({rotary.rotary_dim}).")
        self.rotary, self.interleaved = rotary, interleaved
        # Every head attends to the one cached latent: MQA over [c, k_pe], values in the same cache.
        self.attn = PagedAttention(h, 1, self.rank + self.rope, mla_softmax_scale(cfg), kv_shared=True)

    def _halves(self, x: torch.Tensor) -> torch.Tensor:
        """Interleaved rotary pairs (2i, 2i + 1) moved to (i, i + rope / 2)."""
        return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1) if self.interleaved else x.contiguous()

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t, h = x.shape[0], self.num_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.view(t, h, self.nope + self.rope)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        c = self.kv_a_layernorm(c.contiguous())
        q_pe, k_pe = self.rotary(positions, self._halves(q[..., self.nope :]), self._halves(k_pe).view(t, 1, self.rope))
        w_uk, w_uv = self.kv_b_proj.absorbed()
        q_latent = torch.bmm(q[..., : self.nope].transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, rank]
        query = torch.cat([q_latent, q_pe], dim=-1)
        latent = torch.cat([c.view(t, 1, self.rank), k_pe], dim=-1)  # what the cache holds
        o = self.attn(query, latent, latent, meta).view(t, h, self.rank + self.rope)[..., : self.rank]
        o = torch.bmm(o.transpose(0, 1), w_uv.transpose(1, 2))  # [H, T, v]
        return self.o_proj(o.transpose(0, 1).reshape(t, h * self.v))


class DeepseekMoE(nn.Module):
    """Routed experts (group-limited router) plus always-on shared experts."""

    def __init__(self, cfg: Any, sigmoid: bool) -> None:
        super().__init__()
        e = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.scoring = "sigmoid" if sigmoid else "softmax"
        if sigmoid and getattr(cfg, "scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"config.json scoring_func {cfg.scoring_func!r}: DeepSeek-V3 routers score by sigmoid.")
        self.num_groups = int(getattr(cfg, "n_group", None) or 1)
        self.topk_groups = int(getattr(cfg, "topk_group", None) or self.num_groups)
        grouped = sigmoid or getattr(cfg, "topk_method", "greedy") == "group_limited_greedy"
        if not grouped:
            self.num_groups = self.topk_groups = 1
        if e % self.num_groups:
            raise ValueError(f"n_routed_experts ({e}) must be a multiple of n_group ({self.num_groups}).")
        self.renormalize = bool(getattr(cfg, "norm_topk_prob", False))
        self.scale = float(getattr(cfg, "routed_scaling_factor", 1.0) or 1.0)
        # The router runs in float32 (transformers keeps its weight so).
        self.gate = nn.Linear(cfg.hidden_size, e, bias=False, dtype=torch.float32)
        if sigmoid:
            self.gate.e_score_correction_bias = nn.Parameter(torch.zeros(e, dtype=torch.float32),
                                                             requires_grad=False)
        self.experts = FusedMoE(e, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act)
        shared = int(getattr(cfg, "n_shared_experts", 0) or 0)
        self.shared_experts = LlamaMLP(cfg, cfg.moe_intermediate_size * shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(x.float(), self.gate.weight)
        weights, ids = select_grouped_experts(logits, self.top_k, self.scoring, self.num_groups, self.topk_groups,
                                              getattr(self.gate, "e_score_correction_bias", None), self.renormalize,
                                              self.scale)
        out = self.experts(x, weights, ids)
        return out + self.shared_experts(x) if self.shared_experts is not None else out


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def without_mtp_layers(weights: Iterable[tuple[str, torch.Tensor]],
                       num_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint less its multi-token-prediction layers (DeepSeek-V3, GLM-4.5: numbered
    from num_hidden_layers on), which only a speculative decoder would use."""
    for name, tensor in weights:
        m = _LAYER.match(name)
        if m is None or int(m[1]) < num_layers:
            yield name, tensor


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    sigmoid_router = False
    # q_proj stays a projection of its own (no fused qkv); gate and up fuse as in Llama.
    stacked_params = [p for p in LlamaForCausalLM.stacked_params if p[2] in ("gate", "up")]

    @classmethod
    def interleaved_rope(cls, cfg: Any) -> bool:
        return True  # V2 rotates consecutive pairs (as complex numbers)

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        freq = int(getattr(cfg, "moe_layer_freq", 1) or 1)
        sparse = (getattr(cfg, "n_routed_experts", None) and layer_idx >= int(cfg.first_k_dense_replace or 0)
                  and layer_idx % freq == 0)
        return DeepseekMoE(cfg, cls.sigmoid_router) if sparse else LlamaMLP(cfg)

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        attn = MLAAttention(cfg, rotary, cls.interleaved_rope(cfg))
        return LlamaDecoderLayer(cfg, rotary, {}, cls.build_mlp(cfg, layer_idx), self_attn=attn)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        cfg.head_dim = cfg.qk_rope_head_dim  # the shared rotary covers the rope dims (as transformers sets it)
        super().__init__(cfg, max_positions)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(without_mtp_layers(weights, self.config.num_hidden_layers))


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    sigmoid_router = True

    @classmethod
    def interleaved_rope(cls, cfg: Any) -> bool:
        return bool(getattr(cfg, "rope_interleave", True))


class Glm4MoeLiteForCausalLM(DeepseekV3ForCausalLM):
    """GLM-4.7-Flash (Glm4MoeLiteForCausalLM): DeepSeek-V3's latent attention and grouped,
    sigmoid-routed experts, the dense and sparse layers named one by one in
    `mlp_layer_types`."""

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        types = list(getattr(cfg, "mlp_layer_types", None) or [])
        if len(types) != cfg.num_hidden_layers:
            raise ValueError(f"config.json has {len(types)} mlp_layer_types for {cfg.num_hidden_layers} layers.")
        sparse = layer_idx >= len(types) or types[layer_idx] == "sparse"  # (past them: its MTP layer, with experts)
        return DeepseekMoE(cfg, cls.sigmoid_router) if sparse else LlamaMLP(cfg)
