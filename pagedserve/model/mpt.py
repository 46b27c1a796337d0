"""MPT (MptForCausalLM: mpt-7b, mpt-7b-instruct / chat / storywriter, mpt-30b), as transformers
runs it:

- ALiBi instead of position embeddings, MPT's slopes (layers/alibi.py) for
  `attn_config.alibi_bias_max` (transformers always takes 8, every published MPT's value; the
  original code and vLLM read the config, as here);
- one fused `Wqkv` (q | k | v, each all heads: our layout), its output clamped to
  [-clip_qkv, clip_qkv] when `attn_config.clip_qkv` is set; multi-head attention; the softmax
  scale `attn_config.softmax_scale`, else head_dim ** -0.5;
- pre-LayerNorm layers (norm_1, norm_2, norm_f) without biases, no linear biases, an exact
  GELU MLP up_proj / down_proj of expansion_ratio * d_model;
- the LM head tied to the embeddings.

Refused, as transformers' MPT does not run them: `attn_config.alibi` false (learned position
embeddings), `qk_ln`, `prefix_lm`, multi-query `attn_type`, `no_bias` false and `logit_scale`."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagedserve.model.gpt_neox import LayerNormDecoderLayer, mha_sizes
from pagedserve.model.hf_config import config_section
from pagedserve.model.layers.alibi import mpt_alibi_slopes
from pagedserve.model.layers.norm import unbiased_layer_norm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaForCausalLM, UpDownMLP
from pagedserve.model.olmo import clipped_attention


class MptForCausalLM(LlamaForCausalLM):
    stacked_params = []  # (Wqkv is fused q | k | v already; the MLP has no gate)
    renamed = [("transformer.", "model."), (".wte.", ".embed_tokens."), (".blocks.", ".layers."),
               (".norm_1.", ".input_layernorm."), (".norm_2.", ".post_attention_layernorm."),
               (".attn.Wqkv.", ".self_attn.qkv_proj."), (".attn.out_proj.", ".self_attn.o_proj."),
               (".ffn.up_proj.", ".mlp.up_proj."), (".ffn.down_proj.", ".mlp.down_proj."),
               ("model.norm_f.", "model.norm.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        a = config_section(cfg, "attn_config")
        heads = cfg.n_heads
        opts = dict(qkv_bias=False, o_bias=False, qk_norm=False, scale=getattr(a, "softmax_scale", None),
                    alibi=mpt_alibi_slopes(heads, float(getattr(a, "alibi_bias_max", 8))))
        attn = clipped_attention(mha_sizes(cfg), None, getattr(a, "clip_qkv", None), **opts)
        mlp = UpDownMLP(cfg, act="gelu", intermediate_size=int(cfg.expansion_ratio * cfg.hidden_size), bias=False)
        return LayerNormDecoderLayer(cfg.hidden_size, cfg.layer_norm_epsilon, attn, mlp, parallel=False,
                                     norm=unbiased_layer_norm)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return unbiased_layer_norm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        a = config_section(cfg, "attn_config")
        refused = [("attn_config.alibi false (learned position embeddings)", not getattr(a, "alibi", True)),
                   ("attn_config.qk_ln", getattr(a, "qk_ln", False)),
                   ("attn_config.prefix_lm", getattr(a, "prefix_lm", False)),
                   (f"attn_config.attn_type {getattr(a, 'attn_type', None)!r}",
                    getattr(a, "attn_type", "multihead_attention") != "multihead_attention"),
                   ("no_bias false (biased linear layers and norms)", not getattr(cfg, "no_bias", True)),
                   (f"logit_scale {getattr(cfg, 'logit_scale', None)!r}",
                    getattr(cfg, "logit_scale", None) is not None)]
        for what, bad in refused:
            if bad:
                raise ValueError(f"MptForCausalLM with {what} is not supported (transformers' MPT does not run it).")
        super().__init__(cfg, max_positions)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((n, t) for n, t in weights if not n.endswith(".attn.bias"))
