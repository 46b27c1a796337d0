"""DBRX (DbrxForCausalLM: databricks/dbrx-base, dbrx-instruct), as transformers runs it:

- pre-LayerNorm layers without biases (norm_1, norm_2, norm_f; eps 1e-5, not in the config),
  no linear biases, an untied LM head;
- one fused `Wqkv` (q | k | v, each all heads: our layout) clamped to [-clip_qkv, clip_qkv]
  when `attn_config.clip_qkv` is set; GQA with `attn_config.kv_n_heads`;
- in every layer a mixture of GLU experts: a softmax router (`router.layer`), the top
  `moe_top_k` weights divided by their `moe_normalize_expert_weights`-norm (1: renormalised
  to sum to 1; None: kept). The checkpoint stores each layer's experts fused in three
  [E * ffn_hidden_size, d_model] tensors: w1 (gate) and v1 (up) hold each expert's rows, w2
  each expert's down projection transposed; split per expert at load.

RoPE's base: `attn_config.rope_theta` where the config has it (500000 in the released
models: what DBRX was trained with, and what vLLM reads). transformers 5 leaves it out of
`rope_parameters` and runs these checkpoints at the default 10000."""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from pagedserve.model.gpt_neox import LayerNormDecoderLayer
from pagedserve.model.hf_config import config_section, rope_parameters
from pagedserve.model.layers.moe import FusedMoE, select_experts
from pagedserve.model.layers.norm import unbiased_layer_norm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaForCausalLM
from pagedserve.model.olmo import clipped_attention

_EPS = 1e-5  # transformers' nn.LayerNorm default: DBRX's config has no eps
_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.ffn\.experts)\.mlp\.(?P<w>w1|v1|w2)$")


class DbrxMoE(nn.Module):
    """Softmax router, top k, the k weights divided by their p-norm (p = normalize_p, or kept
    as they are for None); the experts on FusedMoE."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        f = config_section(cfg, "ffn_config")
        self.top_k = int(f.moe_top_k)
        self.normalize_p: Optional[float] = getattr(f, "moe_normalize_expert_weights", 1.0)
        act = (getattr(f, "ffn_act_fn", None) or {}).get("name", "silu")
        self.router = nn.Linear(cfg.hidden_size, f.moe_num_experts, bias=False)
        self.experts = FusedMoE(f.moe_num_experts, cfg.hidden_size, f.ffn_hidden_size, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.router(x), self.top_k, renormalize=False)
        if self.normalize_p is not None:
            weights = weights / torch.linalg.vector_norm(weights, ord=self.normalize_p, dim=-1, keepdim=True)
        return self.experts(x, weights, ids)


def split_fused_experts(weights: Iterable[tuple[str, torch.Tensor]], num_experts: int,
                        inter: int) -> Iterator[tuple[str, torch.Tensor]]:
    """DBRX's fused w1 / v1 / w2 [E * I, H] -> per-expert gate_proj / up_proj [I, H] and
    down_proj [H, I] (w2 holds each expert's down projection transposed); others unchanged."""
    names = {"w1": "gate_proj", "v1": "up_proj", "w2": "down_proj"}
    for name, t in weights:
        m = _FUSED_EXPERTS.match(name)
        if m is None:
            yield name, t
            continue
        if t.shape[0] != num_experts * inter:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not hold {num_experts} experts of {inter} rows")
        for e, w in enumerate(t.reshape(num_experts, inter, -1)):
            yield f"{m['prefix']}.{e}.{names[m['w']]}.weight", (w.t() if m["w"] == "w2" else w)


class DbrxForCausalLM(LlamaForCausalLM):
    stacked_params = []  # (Wqkv is fused q | k | v already; the experts are FusedMoE's)
    renamed = [("transformer.", "model."), (".wte.", ".embed_tokens."), (".blocks.", ".layers."),
               (".norm_attn_norm.norm_1.", ".input_layernorm."),
               (".norm_attn_norm.norm_2.", ".post_attention_layernorm."),
               (".norm_attn_norm.attn.Wqkv.", ".self_attn.qkv_proj."),
               (".norm_attn_norm.attn.out_proj.", ".self_attn.o_proj."),
               (".ffn.router.layer.", ".mlp.router."), (".ffn.", ".mlp."), ("model.norm_f.", "model.norm.")]

    def __init__(self, cfg: Any, max_positions: int) -> None:
        theta = getattr(config_section(cfg, "attn_config"), "rope_theta", None)
        if theta is not None:  # (see the module's docstring)
            cfg.rope_parameters = {**rope_parameters(cfg), "rope_theta": float(theta)}
        super().__init__(cfg, max_positions)

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        opts = dict(qkv_bias=False, o_bias=False, qk_norm=False, window=window)
        attn = clipped_attention(cfg, rotary, getattr(config_section(cfg, "attn_config"), "clip_qkv", None), **opts)
        return LayerNormDecoderLayer(cfg.hidden_size, _EPS, attn, DbrxMoE(cfg), parallel=False,
                                     norm=unbiased_layer_norm)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return unbiased_layer_norm(cfg.hidden_size, _EPS)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        f = config_section(self.config, "ffn_config")
        super().load_weights(split_fused_experts(weights, f.moe_num_experts, f.ffn_hidden_size))
