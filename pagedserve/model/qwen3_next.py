"""Qwen3-Next and Qwen3.5 (dense and MoE): hybrid decoders where most layers mix tokens with
Gated DeltaNet linear attention (layers/gated_delta.py, a fixed-size state per request) and
every few layers (config.layer_types) use full attention over the paged KV cache, with an
output gate, per-head q/k norms and RoPE on part of each head. Norms are zero-centred
(x * (1 + weight)). Qwen3-Next and Qwen3.5-MoE put a mixture of experts with a gated shared
expert in the MLP; Qwen3.5 (dense) a plain SwiGLU MLP."""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.gemma import GemmaRMSNorm
from pagedserve.model.hf_config import checked_layer_types
from pagedserve.model.layers.gated_delta import GatedDeltaNet
from pagedserve.model.layers.moe import SparseMoeBlock
from pagedserve.model.layers.norm import pre_norm
from pagedserve.model.layers.state_mixer import HybridLayers
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from pagedserve.model.qwen_moe import _is_sparse, unstack_experts


class HybridDecoderLayer(nn.Module):
    """A pre-norm decoder layer whose token mixer is either Gated DeltaNet (`linear_attn`) or
    gated full attention (`self_attn`), as the checkpoints name them."""

    def __init__(self, cfg: Any, rotary: RotaryEmbedding, linear: bool, mlp: nn.Module) -> None:
        super().__init__()
        if linear:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            bias = bool(getattr(cfg, "attention_bias", False))
            self.self_attn = LlamaAttention(cfg, rotary, qkv_bias=bias, o_bias=bias, qk_norm=True,
                                            norm=GemmaRMSNorm, output_gate=True)
        self.mlp = mlp
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if hasattr(self, "linear_attn") else self.self_attn

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        x, residual = pre_norm(self.input_layernorm, x, residual)
        x = self.mixer(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


_TYPES = {"linear_attention": "Gated DeltaNet", "full_attention": "attention"}


# Qwen3-Next's fused input projections group q, k, v, z (and b, a) by key head; ours (and
# Qwen3.5's separate projections) lay each out whole: all q heads, all k heads, ...
_NEXT_PROJ = re.compile(r"^(?P<prefix>.*\.linear_attn)\.in_proj_(?P<kind>qkvz|ba)\.weight$")


class Qwen3NextForCausalLM(HybridLayers, LlamaForCausalLM):
    stacked_params = LlamaForCausalLM.stacked_params + [
        (".in_proj_qkv.", ".in_proj.", "qkv"),
        (".in_proj_z.", ".in_proj.", "z"),
        (".in_proj_b.", ".in_proj.", "b"),
        (".in_proj_a.", ".in_proj.", "a"),
    ]

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        if not getattr(cfg, "num_experts", 0) or not _is_sparse(cfg, layer_idx):
            return LlamaMLP(cfg)
        shared = LlamaMLP(cfg, cfg.shared_expert_intermediate_size)
        return SparseMoeBlock(cfg, cfg.num_experts, cfg.moe_intermediate_size,
                              renormalize=bool(getattr(cfg, "norm_topk_prob", True)), shared_expert=shared)

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        linear = checked_layer_types(cfg, _TYPES, cls.__name__)[layer_idx] == "linear_attention"
        return HybridDecoderLayer(cfg, rotary, linear, cls.build_mlp(cfg, layer_idx))

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        cfg = self.config
        weights = (w for w in weights if not w[0].startswith("mtp."))  # the multi-token-prediction head
        if getattr(cfg, "num_experts", 0):
            weights = unstack_experts(weights, cfg.hidden_size, cfg.moe_intermediate_size)
        super().load_weights(self._split_next_projections(weights))

    def _split_next_projections(self, weights: Iterable[tuple[str, torch.Tensor]]
                                ) -> Iterator[tuple[str, torch.Tensor]]:
        """Qwen3-Next's in_proj_qkvz / in_proj_ba, grouped by key head, as Qwen3.5's
        in_proj_qkv / in_proj_z / in_proj_b / in_proj_a."""
        cfg = self.config
        hk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
        rep = cfg.linear_num_value_heads // hk
        for name, t in weights:
            m = _NEXT_PROJ.match(name)
            if m is None:
                yield name, t
                continue
            prefix = m["prefix"]
            if m["kind"] == "qkvz":
                q, k, v, z = t.reshape(hk, 2 * dk + 2 * rep * dv, -1).split([dk, dk, rep * dv, rep * dv], dim=1)
                whole = [x.reshape(-1, t.shape[-1]) for x in (q, k, v, z)]
                yield f"{prefix}.in_proj_qkv.weight", torch.cat(whole[:3])
                yield f"{prefix}.in_proj_z.weight", whole[3]
            else:
                b, a = t.reshape(hk, 2 * rep, -1).split([rep, rep], dim=1)
                yield f"{prefix}.in_proj_b.weight", b.reshape(-1, t.shape[-1])
                yield f"{prefix}.in_proj_a.weight", a.reshape(-1, t.shape[-1])


class Qwen3_5ForCausalLM(Qwen3NextForCausalLM):
    """Qwen3.5 dense: Qwen3-Next's layers with a SwiGLU MLP in every layer."""

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        return LlamaMLP(cfg)


class Qwen3_5MoeForCausalLM(Qwen3NextForCausalLM):
    """Qwen3.5-MoE: experts (top-k always renormalised) and a gated shared expert in every layer."""

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        shared = LlamaMLP(cfg, cfg.shared_expert_intermediate_size)
        return SparseMoeBlock(cfg, cfg.num_experts, cfg.moe_intermediate_size, renormalize=True,
                              shared_expert=shared)
