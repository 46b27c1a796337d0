"""Xiaomi MiMo-V2-Flash (MiMoV2FlashForCausalLM): a Llama-style pre-norm decoder whose layers
are full attention or sliding-window attention (layer_types); the window layers have twice the
key/value heads and a learned sink logit per head (`attention_sink_bias`), and each kind has
its own RoPE (per-layer-type rope_parameters, on the leading partial_rotary_factor of each
head). Values have heads narrower than queries and keys (v_head_dim) and are scaled by
attention_value_scale. MLPs are dense or DeepSeek-V3's sigmoid-routed experts with a
correction bias (mlp_layer_types; no shared experts). Its MTP layers (model.mtp.*) are skipped.

Each kind of layer has its own KV cache shape (the runner groups layers by it), but keys and
values share a head size within a layer: value heads are zero-padded to head_dim (o_proj's
columns with them) and attention_value_scale is folded into v_proj, both at load (so a
quantized checkpoint's attention projections, the fused q/k/v and o_proj, load dequantized;
its experts stay quantized). The cost: cached values take head_dim, not v_head_dim (192
against 128 in MiMo-V2-Flash)."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from pagedserve.model.deepseek import DeepseekMoE, without_mtp_layers
from pagedserve.model.hf_config import checked_layer_types
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, _head_dim

_LAYER_TYPES = {"full_attention": "full attention", "sliding_attention": "sliding-window attention with sinks"}
_ATTN = re.compile(r"^model\.layers\.\d+\.self_attn\.(v_proj|o_proj)\.(weight|bias)$")


def _kv_heads(cfg: Any, layer_type: str) -> int:
    return cfg.num_key_value_heads * (2 if layer_type == "sliding_attention" else 1)


class DequantizedLinear(nn.Linear):
    """An nn.Linear that a quantized checkpoint fills dequantized (the loader keeps only plain
    nn.Linear layers quantized), as the attention projections are reshaped while they load."""


class MiMoV2FlashForCausalLM(LlamaForCausalLM):
    renamed = [(".self_attn.attention_sink_bias", ".self_attn.attn.sinks"),
               (".self_attn.sinks", ".self_attn.attn.sinks")]

    def __init__(self, cfg: Any, max_positions: int) -> None:
        types = checked_layer_types(cfg, _LAYER_TYPES, "MiMo-V2-Flash")
        mlp_types = list(getattr(cfg, "mlp_layer_types", None) or [])
        if len(mlp_types) != cfg.num_hidden_layers or set(mlp_types) - {"dense", "sparse"}:
            raise ValueError(f"MiMo-V2-Flash: mlp_layer_types {mlp_types} must name 'dense' or 'sparse' for each "
                             f"of the {cfg.num_hidden_layers} layers.")
        if getattr(cfg, "add_full_attention_sink_bias", False):
            raise ValueError("MiMo-V2-Flash with add_full_attention_sink_bias=true (sinks on full-attention layers) "
                             "is not supported.")
        for name, want in (("swa_head_dim", _head_dim(cfg)), ("swa_v_head_dim", cfg.v_head_dim),
                           ("swa_num_key_value_heads", 2 * cfg.num_key_value_heads),
                           ("swa_num_attention_heads", cfg.num_attention_heads)):
            got = getattr(cfg, name, None)
            if got is not None and int(got) != want:
                raise ValueError(f"MiMo-V2-Flash with {name}={got} is not supported (transformers' port has {want}).")
        if cfg.num_attention_heads % (2 * cfg.num_key_value_heads):
            raise ValueError(f"MiMo-V2-Flash: num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
                             f"the window layers' key/value heads ({2 * cfg.num_key_value_heads}).")
        super().__init__(cfg, max_positions)
        # The window layers' own RoPE (LlamaModel made the full layers' one).
        self.model.sliding_rotary = RotaryEmbedding(cfg, _head_dim(cfg), max_positions, "sliding_attention")
        for layer, t in zip(self.model.layers, types):
            if t == "sliding_attention":
                layer.self_attn.rotary = self.model.sliding_rotary

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        layer_type = cfg.layer_types[layer_idx]
        shape = SimpleNamespace(num_attention_heads=cfg.num_attention_heads, head_dim=_head_dim(cfg),
                                num_key_value_heads=_kv_heads(cfg, layer_type), hidden_size=cfg.hidden_size,
                                rms_norm_eps=cfg.rms_norm_eps)
        bias = bool(getattr(cfg, "attention_bias", False))
        attn = LlamaAttention(shape, rotary, qkv_bias=bias, o_bias=False, qk_norm=False, window=window,
                              sinks=layer_type == "sliding_attention")
        attn.qkv_proj.__class__ = attn.o_proj.__class__ = DequantizedLinear  # (v_proj is in qkv_proj)
        mlp = DeepseekMoE(cfg, sigmoid=True) if cfg.mlp_layer_types[layer_idx] == "sparse" else LlamaMLP(cfg)
        return LlamaDecoderLayer(cfg, rotary, {}, mlp, self_attn=attn)

    def _attention_as_built(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Value heads padded to head_dim and scaled, o_proj's input columns padded to match
        (module docstring)."""
        cfg = self.config
        hd, vd, heads = _head_dim(cfg), cfg.v_head_dim, cfg.num_attention_heads
        v_scale = float(cfg.attention_value_scale) if getattr(cfg, "attention_value_scale", None) is not None else 1.0
        for name, t in weights:
            m = _ATTN.match(name)
            if m is None:
                yield name, t
                continue
            if t.element_size() < 2:  # (DequantizedLinear: the loader has dequantized them)
                raise ValueError(f"{name}: MiMo-V2-Flash's attention projections load dequantized only "
                                 f"(dtype {t.dtype}).")
            if m[1] == "o_proj":  # [hidden, heads * vd] -> [hidden, heads * hd]
                w = t.view(t.shape[0], heads, vd)
                yield name, torch.nn.functional.pad(w, (0, hd - vd)).reshape(t.shape[0], heads * hd)
                continue
            w = t.view(-1, vd, *t.shape[1:]) * v_scale  # [kv heads, vd(, hidden)] -> [kv heads, hd(, hidden)]
            yield name, torch.nn.functional.pad(w, (0, 0, 0, hd - vd) if w.dim() == 3 else (0, hd - vd)).reshape(
                -1, *t.shape[1:])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        weights = ((n, t) for n, t in weights if not n.startswith("model.mtp."))
        super().load_weights(self._attention_as_built(without_mtp_layers(weights, self.config.num_hidden_layers)))
