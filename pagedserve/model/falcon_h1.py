"""TII Falcon-H1 (FalconH1ForCausalLM, 0.5B-34B): each layer runs a Mamba-2 mixer
(layers/mamba2.py) and attention side by side on the same normed input and adds their
outputs, then a SwiGLU MLP. Its muP multipliers (on the SSM's input and each section of its
input projection, the key projection, the attention's input and output, the SSM's output, the
MLP's gate and output) all act on linear maps, so they are folded into the weights as they
load; the embedding and LM-head multipliers stay scalars (the two may share one matrix)."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import nn

from pagedserve.model.granite_hybrid import BambaForCausalLM, MambaAttentionLayer
from pagedserve.model.layers.mamba2 import Mamba2Dims
from pagedserve.model.layers.rotary import RotaryEmbedding


def _dims(cfg: Any) -> Mamba2Dims:
    norm = ("norm_then_gate" if cfg.mamba_norm_before_gate else "gate_then_norm") if cfg.mamba_rms_norm else "gate"
    base = Mamba2Dims.granite(cfg)
    return Mamba2Dims(base.hidden, base.heads, int(cfg.mamba_d_head), base.groups, base.d_state, base.kernel,
                      base.proj_bias, base.conv_bias, base.eps, base.dt_limit, base.act, norm,
                      bool(getattr(cfg, "projectors_bias", False)))


class FalconH1ForCausalLM(BambaForCausalLM):  # (Bamba's names; both mixers in every layer)
    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        return MambaAttentionLayer(cfg, rotary, _dims(cfg), attention=True)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        self.model.embed_scale = float(cfg.embedding_multiplier)
        self.lm_head_multiplier = float(cfg.lm_head_multiplier)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) * self.lm_head_multiplier

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._fold_multipliers(weights))

    def _scales(self) -> dict[str, Any]:
        """Checkpoint name ending -> the factor its rows (weights and biases) are multiplied by
        (a [rows] tensor or a float); weights only where the factor scales the input."""
        cfg = self.config
        inner = int(cfg.mamba_d_head) * int(cfg.mamba_n_heads)
        gn = int(cfg.mamba_n_groups) * int(cfg.mamba_d_state)
        z, x, b, c, dt = [float(m) for m in cfg.ssm_multipliers]
        mup = torch.cat([torch.full((inner,), z), torch.full((inner,), x), torch.full((gn,), b),
                         torch.full((gn,), c), torch.full((int(cfg.mamba_n_heads),), dt)])
        gate, down = [float(m) for m in cfg.mlp_multipliers]
        attn_in, ssm_in = float(cfg.attention_in_multiplier), float(cfg.ssm_in_multiplier)
        key = float(cfg.key_multiplier)
        return {  # (name ending, factor on the weight, factor on the bias)
            "mamba.in_proj": (mup * ssm_in, mup), "mamba.out_proj": (float(cfg.ssm_out_multiplier),) * 2,
            "self_attn.q_proj": (attn_in, 1.0), "self_attn.k_proj": (attn_in * key, key),
            "self_attn.v_proj": (attn_in, 1.0), "self_attn.o_proj": (float(cfg.attention_out_multiplier),) * 2,
            "feed_forward.gate_proj": (gate, gate), "feed_forward.down_proj": (down, down)}

    def _fold_multipliers(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        scales = self._scales()
        for name, t in weights:
            module, _, kind = name.rpartition(".")
            for end, (w_scale, b_scale) in scales.items():
                if module.endswith(end) and kind in ("weight", "bias"):
                    if not t.is_floating_point():
                        raise ValueError(f"{name}: Falcon-H1's multipliers are folded into its weights, which "
                                         "needs unquantized checkpoint tensors.")
                    factor = w_scale if kind == "weight" else b_scale
                    if isinstance(factor, torch.Tensor):
                        factor = factor.to(t.dtype).view(-1, *[1] * (t.dim() - 1))
                    t = t * factor
                    break
            yield name, t
