"""FlexOlmo (FlexOlmoForCausalLM: allenai/FlexOlmo-7x7B-1T and its kin): OLMo 2's post-norm
layers (olmo2.py: RMSNorm over the whole q and k projections, each sublayer's output normed
before it joins the residual stream) with OLMoE's experts in place of the MLP: a softmax
router over all experts, the top k, renormalised where norm_topk_prob says (the RMSNorm after
the experts all but undoes that per-token scale: only its eps tells them apart)."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.model.layers.moe import SparseMoeBlock
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.olmo2 import Olmo2DecoderLayer, Olmo2ForCausalLM
from pagedserve.model.qwen_moe import unstack_experts


class FlexOlmoForCausalLM(Olmo2ForCausalLM):
    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        experts = SparseMoeBlock(cfg, cfg.num_experts, cfg.intermediate_size, renormalize=bool(cfg.norm_topk_prob))
        return Olmo2DecoderLayer(cfg, rotary, window, mlp=experts)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(unstack_experts(weights, self.config.hidden_size, self.config.intermediate_size))
