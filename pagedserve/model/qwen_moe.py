"""Qwen2-MoE and Qwen3-MoE: the Qwen2 / Qwen3 decoders with a sparse mixture of experts in the
layers the config makes sparse (every decoder_sparse_step-th, minus mlp_only_layers); top-k
weights renormalised only with norm_topk_prob. Qwen2-MoE adds an always-on shared expert."""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from pagedserve.model.layers.moe import SparseMoeBlock
from pagedserve.model.llama import LlamaMLP
from pagedserve.model.qwen2 import Qwen2ForCausalLM
from pagedserve.model.qwen3 import Qwen3ForCausalLM


def _is_sparse(cfg: Any, layer_idx: int) -> bool:
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return (layer_idx not in (getattr(cfg, "mlp_only_layers", None) or [])
            and cfg.num_experts > 0 and (layer_idx + 1) % step == 0)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        if not _is_sparse(cfg, layer_idx):
            return LlamaMLP(cfg)
        shared = LlamaMLP(cfg, cfg.shared_expert_intermediate_size)
        return SparseMoeBlock(cfg, cfg.num_experts, cfg.moe_intermediate_size,
                              renormalize=bool(cfg.norm_topk_prob), shared_expert=shared)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        if not _is_sparse(cfg, layer_idx):
            return LlamaMLP(cfg)
        # (Qwen3-VL-MoE's decoder has no norm_topk_prob: it always renormalises.)
        return SparseMoeBlock(cfg, cfg.num_experts, cfg.moe_intermediate_size,
                              renormalize=bool(getattr(cfg, "norm_topk_prob", True)))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(unstack_experts(weights, self.config.hidden_size, self.config.moe_intermediate_size))


_STACKED = re.compile(
    r"^(?P<prefix>.*\.(?:mlp|block_sparse_moe|feed_forward|layers\.\d+)\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


def unstack_experts(weights: Iterable[tuple[str, torch.Tensor]], hidden: int,
                    inter: int, hub_layout: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Experts stacked in one tensor per projection (Qwen3-VL-MoE) -> the per-expert
    '...experts.<e>.gate_proj.weight' [I, hidden] names; other tensors unchanged. Hub
    checkpoints hold gate_up_proj [E, hidden, 2I] (gate then up along the last dim) and
    down_proj [E, I, hidden]; transformers 5 saves its modules' [E, 2I, hidden] / [E, hidden, I].
    As transformers does, a tensor already in the module's shape is taken as it is, unless
    `hub_layout` (Llama 4, whose modules hold the hub's layout): then always transposed."""
    for name, t in weights:
        m = _STACKED.match(name)
        if m is None:
            yield name, t
            continue
        prefix, gate_up = m["prefix"], m["proj"] == "gate_up_proj"
        module_shape = (2 * inter, hidden) if gate_up else (hidden, inter)
        if tuple(t.shape[1:]) == module_shape and not (hub_layout and module_shape[0] == module_shape[1]):
            per_expert = list(t)
        elif tuple(t.shape[1:]) == module_shape[::-1]:
            per_expert = [w.t() for w in t]
        else:
            raise ValueError(f"{name}: shape {tuple(t.shape)} fits neither [E, {module_shape[0]}, {module_shape[1]}] "
                             "nor its transpose")
        for e, w in enumerate(per_expert):
            if gate_up:
                yield f"{prefix}.{e}.gate_proj.weight", w[:inter]
                yield f"{prefix}.{e}.up_proj.weight", w[inter:]
            else:
                yield f"{prefix}.{e}.down_proj.weight", w
