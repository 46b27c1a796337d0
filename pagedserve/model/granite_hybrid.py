"""IBM Granite 4.0 (GraniteMoeHybridForCausalLM): Mamba-2 layers (layers/mamba2.py) and
attention layers (config.layer_types), each followed by a shared SwiGLU MLP plus, where the
model has experts, a top-k mixture of experts; Granite's four scalars (embedding, residual and
attention multipliers, logits scaling) as in granite.py. The H models' attention has no
position encoding (position_embedding_type "nope"); the dense micro model is all attention
with RoPE. Also its forerunner Bamba (BambaForCausalLM): Mamba-2 and RoPE attention layers,
each followed by a SwiGLU MLP, no scalars."""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.hf_config import checked_layer_types
from pagedserve.model.layers.mamba2 import Mamba2Dims, Mamba2Mixer
from pagedserve.model.layers.moe import SparseMoeBlock
from pagedserve.model.layers.norm import RMSNorm, pre_norm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.layers.state_mixer import HybridLayers
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from pagedserve.model.qwen_moe import unstack_experts


MAMBA_OR_ATTENTION = {"linear_attention": "Mamba-2", "full_attention": "attention"}


class GraniteHybridLayer(nn.Module):
    def __init__(self, cfg: Any, rotary: Optional[RotaryEmbedding], mamba: bool) -> None:
        super().__init__()
        if mamba:
            self.mamba = Mamba2Mixer(Mamba2Dims.granite(cfg))
        else:
            bias = bool(getattr(cfg, "attention_bias", False))
            self.self_attn = LlamaAttention(cfg, rotary, qkv_bias=bias, o_bias=bias, qk_norm=False,
                                            scale=float(cfg.attention_multiplier))
        shared = int(getattr(cfg, "shared_intermediate_size", 0) or 0)  # 0: none (Granite 3 MoE)
        self.shared_mlp = LlamaMLP(cfg, shared) if shared else None
        experts = int(getattr(cfg, "num_local_experts", 0) or 0)
        self.block_sparse_moe = (SparseMoeBlock(cfg, experts, cfg.intermediate_size, renormalize=True)
                                 if experts else None)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.residual_multiplier = float(cfg.residual_multiplier)

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        x, residual = pre_norm(self.input_layernorm, x, residual)
        mixer = self.mamba if hasattr(self, "mamba") else self.self_attn
        x = mixer(positions, x, meta) * self.residual_multiplier
        x, residual = self.post_attention_layernorm(x, residual)
        out = self.shared_mlp(x) if self.shared_mlp is not None else None
        if self.block_sparse_moe is not None:
            moe = self.block_sparse_moe(x)
            out = moe if out is None else out + moe
        return out * self.residual_multiplier, residual


# Hub checkpoints stack the experts as block_sparse_moe.input_linear.weight [E, 2I, H] (gate rows,
# then up) and output_linear.weight [E, H, I]; transformers 5 saves them as experts.gate_up_proj /
# experts.down_proj, and the router as router.weight (hub: router.layer.weight).
_HUB_NAMES = [(re.compile(r"\.block_sparse_moe\.input_linear\.weight$"), ".block_sparse_moe.experts.gate_up_proj"),
              (re.compile(r"\.block_sparse_moe\.output_linear\.weight$"), ".block_sparse_moe.experts.down_proj"),
              (re.compile(r"\.block_sparse_moe\.router(\.layer)?\.weight$"), ".block_sparse_moe.gate.weight")]


class GraniteMoeHybridForCausalLM(HybridLayers, LlamaForCausalLM):
    state_attr = "mamba"
    renamed = [(".shared_mlp.input_linear.", ".shared_mlp.gate_up_proj."),
               (".shared_mlp.output_linear.", ".shared_mlp.down_proj.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        mamba = checked_layer_types(cfg, MAMBA_OR_ATTENTION, cls.__name__)[layer_idx] == "linear_attention"
        rope = getattr(cfg, "position_embedding_type", None) == "rope"
        return GraniteHybridLayer(cfg, rotary if rope else None, mamba)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        self.model.embed_scale = float(cfg.embedding_multiplier)
        self.logits_scaling = float(cfg.logits_scaling)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) / self.logits_scaling

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        cfg = self.config
        super().load_weights(unstack_experts(self._hub_names(weights), cfg.hidden_size, cfg.intermediate_size))

    @staticmethod
    def _hub_names(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in weights:
            for pattern, ours in _HUB_NAMES:
                name = pattern.sub(ours, name)
            yield name, t


class MambaAttentionLayer(nn.Module):
    """A pre-norm layer with a state mixer (`mamba`: Mamba-2, or Jamba's Mamba-1), attention
    (`self_attn`; RoPE unless rotary is None), or both side by side on the same normed input,
    their outputs added (Falcon-H1); then a SwiGLU MLP, or the `feed_forward` given (Jamba's
    experts). Bamba's, Falcon-H1's and Jamba's."""

    def __init__(self, cfg: Any, rotary: Optional[RotaryEmbedding], mamba: Optional[Mamba2Dims | nn.Module],
                 attention: bool, feed_forward: Optional[nn.Module] = None) -> None:
        super().__init__()
        if mamba is not None:
            self.mamba = Mamba2Mixer(mamba) if isinstance(mamba, Mamba2Dims) else mamba
        if attention:
            bias = bool(getattr(cfg, "attention_bias", False))
            self.self_attn = LlamaAttention(cfg, rotary, qkv_bias=bias, o_bias=bias, qk_norm=False)
        self.mixers = [m for m in (getattr(self, "mamba", None), getattr(self, "self_attn", None)) if m is not None]
        self.feed_forward = feed_forward if feed_forward is not None else LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        x, residual = pre_norm(self.input_layernorm, x, residual)
        out = self.mixers[0](positions, x, meta)
        for mixer in self.mixers[1:]:
            out = out + mixer(positions, x, meta)
        x, residual = self.pre_ff_layernorm(out, residual)
        return self.feed_forward(x), residual


class BambaForCausalLM(HybridLayers, LlamaForCausalLM):
    """IBM Bamba: Mamba-2 or RoPE attention (partial where the config says) in each layer."""

    state_attr = "mamba"
    renamed = [("model.final_layernorm.", "model.norm.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        mamba = checked_layer_types(cfg, MAMBA_OR_ATTENTION, cls.__name__)[layer_idx] == "linear_attention"
        return MambaAttentionLayer(cfg, rotary, Mamba2Dims.granite(cfg) if mamba else None, not mamba)