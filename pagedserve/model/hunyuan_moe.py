"""Hunyuan MoE (HunYuanMoEV1ForCausalLM: tencent/Hunyuan-A13B): the dense Hunyuan decoder
(per-head q/k RMSNorm after RoPE, NTK-alpha RoPE: llama.py's HunYuanDenseV1ForCausalLM) with
a mixture of SwiGLU experts in every layer: a float32 softmax router (`gate.wg`), the top
moe_topk (one number, or one per layer) renormalised, plus an always-on shared SwiGLU MLP
(`shared_mlp`) added. Experts and the shared MLP are intermediate_size wide, as transformers'
port has them. Options of Tencent's own config.json that the port does not implement (cross-
layer attention, other expert widths, several or no shared experts, skipped MoE layers) are
refused."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedserve.model.layers.moe import FusedMoE, select_experts
from pagedserve.model.llama import HunYuanDenseV1ForCausalLM, LlamaMLP


def _per_layer(value: Any, layer_idx: int) -> Any:
    return value[layer_idx] if isinstance(value, (list, tuple)) else value


class HunYuanMoE(nn.Module):
    """Routed experts plus the shared MLP."""

    def __init__(self, cfg: Any, layer_idx: int) -> None:
        super().__init__()
        self.top_k = int(_per_layer(cfg.moe_topk, layer_idx))
        # The router in float32, as transformers builds it (vLLM too).
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False, dtype=torch.float32)
        self.experts = FusedMoE(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.shared_mlp = LlamaMLP(cfg, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(nn.functional.linear(x.float(), self.gate.weight), self.top_k, renormalize=True)
        return self.experts(x, weights, ids) + self.shared_mlp(x)


def _check_config(cfg: Any) -> None:
    n = cfg.num_hidden_layers

    def values(name: str) -> list:
        v = getattr(cfg, name, None)
        return list(v) if isinstance(v, (list, tuple)) else [v] * n

    if not isinstance(cfg.num_experts, int):
        raise ValueError(f"Hunyuan MoE with num_experts={cfg.num_experts} (per layer) is not supported.")
    if getattr(cfg, "use_cla", False):
        raise ValueError("Hunyuan MoE with use_cla=true (cross-layer attention) is not supported.")
    if getattr(cfg, "use_qk_norm", True) is False:
        raise ValueError("Hunyuan MoE with use_qk_norm=false is not supported.")
    if getattr(cfg, "use_mixed_mlp_moe", True) is False:
        raise ValueError("Hunyuan MoE with use_mixed_mlp_moe=false (no shared MLP) is not supported.")
    if int(getattr(cfg, "moe_layer_num_skipped", 0) or 0):
        raise ValueError(f"Hunyuan MoE with moe_layer_num_skipped={cfg.moe_layer_num_skipped} is not supported.")
    if len(values("moe_topk")) != n:
        raise ValueError(f"Hunyuan MoE: config.json has {len(values('moe_topk'))} moe_topk for {n} layers.")
    if any(v is not None and int(v) != cfg.intermediate_size for v in values("moe_intermediate_size")):
        raise ValueError(f"Hunyuan MoE with moe_intermediate_size={cfg.moe_intermediate_size} other than "
                         f"intermediate_size ({cfg.intermediate_size}) is not supported.")
    if any(v is not None and int(v) != 1 for v in values("num_shared_expert")):
        raise ValueError(f"Hunyuan MoE with num_shared_expert={cfg.num_shared_expert} (other than one) is not "
                         "supported.")


class HunYuanMoEV1ForCausalLM(HunYuanDenseV1ForCausalLM):
    renamed = HunYuanDenseV1ForCausalLM.renamed + [(".mlp.gate.wg.", ".mlp.gate.")]

    def __init__(self, cfg: Any, max_positions: int) -> None:
        _check_config(cfg)
        # transformers' port attends over the whole context whatever config.json's sliding_window
        # says: so do the layers, and the KV cache manager (which reads the config's windows).
        cfg.sliding_window = None
        super().__init__(cfg, max_positions)

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        return HunYuanMoE(cfg, layer_idx)
