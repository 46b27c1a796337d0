"""GPT-OSS (openai/gpt-oss-20b, -120b): the Llama decoder with
- attention sinks: a learned logit per head in each softmax's denominator (every backend);
- q/k/v/o biases, alternating sliding-window (128) and full layers, YaRN RoPE;
- a mixture of experts on every layer: a router with a bias, the top k logits softmaxed,
  experts with biases and a clamped SwiGLU ((up + 1) * gate * sigmoid(1.702 gate), gate
  clamped at 7, up to [-7, 7]); the checkpoint interleaves gate and up columns
  ([E, H, 2I]: gate at even columns), which load as our [gate rows | up rows];
- RMSNorm with the weight applied before the cast back (one rounding);
- experts in MXFP4 in the released checkpoints (layers/mxfp4.py): kept so on the Triton
  backend, dequantized elsewhere."""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from pagedserve.model.layers import mxfp4
from pagedserve.model.layers.moe import FusedMoE, select_topk_softmax
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaForCausalLM


class GptOssRMSNorm(RMSNorm):
    """transformers' GptOssRMSNorm: (weight * x / rms(x)) in float32, then cast. The Triton
    path keeps the shared kernel (Llama's rounding: the normalised row cast, then the weight)."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if self.use_triton and x.dim() == 2:
            return super().forward(x, residual)
        if residual is not None:
            x = x + residual
            return self.forward(x), x
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class GptOssMoE(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=True)
        self.experts = FusedMoE(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, "swigluoai", bias=True,
                                act_params=(float(cfg.swiglu_alpha), float(cfg.swiglu_limit)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_topk_softmax(self.router(x), self.top_k)
        return self.experts(x, weights, ids)


# A layer's stacked expert tensors: gate_up_proj / down_proj (bf16, [E, K, N]), their biases
# ([E, N]), or MXFP4 blocks and scales ([E, N, K/32, 16], [E, N, K/32]).
_STACKED = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)(?P<kind>|_bias|_blocks|_scales)$")


def _per_expert(prefix: str, proj: str, kind: str, rows: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """[E, N, ...] tensors as FusedMoE's per-expert names; gate_up's rows interleave gate (even)
    and up (odd)."""
    for e in range(rows.shape[0]):
        if proj == "down_proj":
            yield f"{prefix}.{e}.down_proj.{kind}", rows[e]
        else:
            yield f"{prefix}.{e}.gate_proj.{kind}", rows[e, 0::2]
            yield f"{prefix}.{e}.up_proj.{kind}", rows[e, 1::2]


def expert_weights(weights: Iterable[tuple[str, torch.Tensor]], packed: bool,
                   dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """GPT-OSS's stacked expert tensors as per-expert ones (other names pass through). MXFP4
    blocks wait for their scales: `packed`, they stay MXFP4 in the kernel's layout (FusedMoE
    to_mxfp4), else they are dequantized to dtype."""
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        m = _STACKED.match(name)
        if m is None:
            yield name, tensor
            continue
        prefix, proj, kind = m["prefix"], m["proj"], m["kind"]
        if kind == "":
            yield from _per_expert(prefix, proj, "weight", tensor.transpose(1, 2))
        elif kind == "_bias":
            yield from _per_expert(prefix, proj, "bias", tensor)
        else:
            parts = pending.setdefault((prefix, proj), {})
            parts[kind] = tensor
            if len(parts) < 2:
                continue
            del pending[(prefix, proj)]
            blocks, scales = parts["_blocks"], parts["_scales"]
            if packed:
                words, scale = mxfp4.packed(blocks, scales, f"{prefix}.{proj}")
                yield from _per_expert(prefix, proj, "weight", words)
                yield from _per_expert(prefix, proj, "weight_scale", scale)
            else:
                yield from _per_expert(prefix, proj, "weight", mxfp4.dequantize(blocks, scales, dtype, name))
    if pending:
        (prefix, proj), parts = next(iter(pending.items()))
        raise ValueError(f"{prefix}.{proj}{next(iter(parts))} has no matching "
                         f"{'_scales' if '_blocks' in parts else '_blocks'} tensor in the checkpoint")


class GptOssForCausalLM(LlamaForCausalLM):
    mxfp4_experts = True  # takes checkpoints with quant_method "mxfp4" (model/loader.py)
    renamed = [(".self_attn.sinks", ".self_attn.attn.sinks")]

    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        return {**super().attn_options(cfg), "sinks": True}

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        return GptOssMoE(cfg)

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        layer = super().make_layer(cfg, rotary, layer_idx, window)
        layer.input_layernorm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        layer.post_attention_layernorm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        return layer

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        packed = any(m.fp4 for m in self.modules() if isinstance(m, FusedMoE))
        super().load_weights(expert_weights(weights, packed, self.model.embed_tokens.weight.dtype))
