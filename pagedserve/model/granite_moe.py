"""IBM Granite 3.0 / 3.1 MoE (GraniteMoeForCausalLM: 1B-A400M, 3B-A800M): the Llama decoder
with Granite's four scalars (granite.py) and a top-k mixture of SwiGLU experts in place of the
MLP. Its router takes the top k logits, then a softmax over just those (the same weights as a
softmax over all experts renormalised over the top k). Checkpoints stack the experts in
`block_sparse_moe.input_linear` [E, 2I, H] / `output_linear` [E, H, I] with the router in
`router.layer`, as Granite 4.0's; the layer and its loading are granite_hybrid.py's (an
attention layer, no Mamba). GraniteMoeSharedForCausalLM adds an always-on SwiGLU `shared_mlp`
(shared_intermediate_size) next to the experts, as Granite 4.0's layers have."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.model.granite import GraniteForCausalLM
from pagedserve.model.granite_hybrid import GraniteHybridLayer, GraniteMoeHybridForCausalLM
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.qwen_moe import unstack_experts


class GraniteMoeForCausalLM(GraniteForCausalLM):
    renamed = GraniteMoeHybridForCausalLM.renamed  # (shared_mlp's fused projections: the Shared form)

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        return GraniteHybridLayer(cfg, rotary, mamba=False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        cfg = self.config
        hub_named = GraniteMoeHybridForCausalLM._hub_names(weights)
        super().load_weights(unstack_experts(hub_named, cfg.hidden_size, cfg.intermediate_size))


class GraniteMoeSharedForCausalLM(GraniteMoeForCausalLM):
    pass
