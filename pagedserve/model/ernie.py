"""ERNIE 4.5 dense models (Ernie4_5ForCausalLM, e.g. baidu/ERNIE-4.5-0.3B-PT): the Llama
decoder with biases on every projection where `use_bias` says so, and RoPE on interleaved
pairs over the whole head, which runs here as split-halves RoPE on q/k rows permuted at load
(as Cohere's and GLM's)."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.model.layers.rotary import interleaved_rope_weights
from pagedserve.model.llama import LlamaForCausalLM, LlamaMLP, _head_dim


class Ernie4_5ForCausalLM(LlamaForCausalLM):  # noqa: N801 (transformers' name)
    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        bias = bool(getattr(cfg, "use_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": False}

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        return LlamaMLP(cfg, bias=bool(getattr(cfg, "use_bias", False)))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        head_dim = _head_dim(self.config)
        super().load_weights(interleaved_rope_weights(weights, head_dim, head_dim))
