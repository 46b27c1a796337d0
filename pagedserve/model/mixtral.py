"""Mixtral: the Mistral decoder with a sparse mixture of experts (softmax top-k routing,
weights renormalised over the chosen experts) in place of every MLP."""

from __future__ import annotations

from typing import Any

from torch import nn

from pagedserve.model.layers.moe import SparseMoeBlock
from pagedserve.model.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    renamed = [(".block_sparse_moe.", ".mlp.")]

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        return SparseMoeBlock(cfg, cfg.num_local_experts, cfg.intermediate_size, renormalize=True)
