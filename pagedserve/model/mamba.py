"""Mamba-1 language models: MambaForCausalLM (state-spaces/mamba-*, the Mamba Codestral
predecessors) and FalconMambaForCausalLM (Falcon Mamba 7B, which RMS-normalises dt, B and C
without weights): every layer a pre-norm residual block around a Mamba-1 mixer
(layers/mamba1.py), no attention."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from pagedserve.model.layers.mamba1 import Mamba1Mixer
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.nemotron_h import Mamba2ForCausalLM, NemotronHBlock


def mamba1_mixer(cfg: Any, bc_norm: Optional[str] = None, eps: Optional[float] = None,
                 inner: Optional[int] = None) -> Mamba1Mixer:
    """A Mamba-1 mixer from transformers' Mamba / FalconMamba / Jamba config names."""
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
    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        if config.hidden_act != "silu":
            raise ValueError(f"Mamba layers here use SiLU in their convolution, not {config.hidden_act!r}.")
        super().__init__(config, *args, **kwargs)

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        return NemotronHBlock(cfg, "linear_attention", mixer=mamba1_mixer(cfg))


class FalconMambaForCausalLM(MambaForCausalLM):
    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        return NemotronHBlock(cfg, "linear_attention", mixer=mamba1_mixer(cfg, "plain", float(cfg.mixer_rms_eps)))
