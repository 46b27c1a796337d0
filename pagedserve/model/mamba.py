"""Models on Mamba-1 mixers (layers/mamba1.py): MambaForCausalLM (state-spaces/mamba-*) and
FalconMambaForCausalLM (Falcon Mamba 7B, which RMS-normalises dt, B and C without weights),
every layer a pre-norm residual block around the mixer and no attention; and the hybrid
JambaForCausalLM."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagedserve.model.granite_hybrid import MAMBA_OR_ATTENTION, MambaAttentionLayer
from pagedserve.model.hf_config import checked_layer_types
from pagedserve.model.layers.mamba1 import Mamba1Mixer
from pagedserve.model.layers.moe import SparseMoeBlock
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.layers.state_mixer import HybridLayers
from pagedserve.model.llama import LlamaForCausalLM
from pagedserve.model.nemotron_h import Mamba2ForCausalLM, NemotronHBlock
from pagedserve.model.qwen_moe import unstack_experts


def mamba1_mixer(cfg: Any, bc_norm: Optional[str] = None, eps: Optional[float] = None,
                 inner: Optional[int] = None) -> Mamba1Mixer:
    """A Mamba-1 mixer from transformers' Mamba / FalconMamba / Jamba config names."""
    if cfg.hidden_act != "silu":  # (all three apply hidden_act after the convolution)
        raise ValueError(f"Mamba layers here use SiLU after their convolution, not hidden_act={cfg.hidden_act!r}.")
    d_state = int(getattr(cfg, "state_size", None) or cfg.mamba_d_state)
    kernel = int(getattr(cfg, "conv_kernel", None) or cfg.mamba_d_conv)
    inner = inner or int(cfg.intermediate_size)
    rank = getattr(cfg, "time_step_rank", None) or getattr(cfg, "mamba_dt_rank", None)
    if rank is None or rank == "auto":
        rank = -(-cfg.hidden_size // 16)
    proj_bias = bool(getattr(cfg, "use_bias", getattr(cfg, "mamba_proj_bias", False)))
    conv_bias = bool(getattr(cfg, "use_conv_bias", getattr(cfg, "mamba_conv_bias", True)))
    return Mamba1Mixer(cfg.hidden_size, inner, d_state, kernel, int(rank), proj_bias, conv_bias, bc_norm,
                       eps if eps is not None else 1e-6)


class MambaForCausalLM(Mamba2ForCausalLM):
    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        return NemotronHBlock(cfg, "linear_attention", mixer=mamba1_mixer(cfg))


class FalconMambaForCausalLM(MambaForCausalLM):
    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        return NemotronHBlock(cfg, "linear_attention", mixer=mamba1_mixer(cfg, "plain", float(cfg.mixer_rms_eps)))


class JambaForCausalLM(HybridLayers, LlamaForCausalLM):
    """AI21 Jamba (Jamba v0.1, 1.5 and 1.7 Mini / Large): Mamba-1 layers with weighted RMS norms
    on dt, B and C, and attention layers without position encoding (config.layer_types), each
    followed by a SwiGLU MLP or, every expert_layer_period layers, top-k experts whose softmax
    weights are not renormalised."""

    state_attr = "mamba"
    renamed = [("model.final_layernorm.", "model.norm."), (".feed_forward.router.", ".feed_forward.gate.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        mamba = checked_layer_types(cfg, MAMBA_OR_ATTENTION, cls.__name__)[layer_idx] == "linear_attention"
        experts = int(cfg.layers_num_experts[layer_idx])
        ffn = SparseMoeBlock(cfg, experts, cfg.intermediate_size, renormalize=False) if experts > 1 else None
        mixer = mamba1_mixer(cfg, "weighted", float(cfg.rms_norm_eps), inner=int(cfg.mamba_expand * cfg.hidden_size))
        return MambaAttentionLayer(cfg, None, mixer if mamba else None, not mamba, feed_forward=ffn)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(unstack_experts(weights, self.config.hidden_size, self.config.intermediate_size))
