"""GPT-2 (GPT2LMHeadModel; also the layout GPT-BigCode builds on, model/gpt_bigcode.py).

- learned absolute position embeddings `wpe`, added to the token embeddings from `positions`
  (no RoPE); max_model_len stays within n_positions (config.py reads max_position_embeddings);
- Conv1D projections, their weights stored transposed ([in, out]): transposed at load;
- one fused `c_attn` (q | k | v, each all heads), multi-head attention; the softmax scale
  head_dim ** -0.5 unless `scale_attn_weights` is false (1), divided by layer index + 1 with
  `scale_attn_by_inverse_layer_idx`;
- pre-LayerNorm layers with biases (ln_1, ln_2, ln_f), a GELU (gelu_new) MLP c_fc / c_proj of
  width n_inner (default 4 * hidden);
- the LM head tied to `wte`; hub checkpoints may name tensors without the "transformer." prefix.

Not supported: add_cross_attention (encoder-decoder use)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.gpt_neox import LayerNormDecoderLayer, mha_sizes
from pagedserve.model.layers.norm import LayerNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, UpDownMLP
from pagedserve.model.weights import base_prefixed

_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


class GPT2LMHeadModel(LlamaForCausalLM):
    stacked_params = []  # (c_attn is fused q | k | v already; the MLP has no gate)
    renamed = [("transformer.", "model."), (".wte.", ".embed_tokens."), (".wpe.", ".embed_positions."),
               (".h.", ".layers."), (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
               (".attn.c_attn.", ".self_attn.qkv_proj."), (".attn.c_proj.", ".self_attn.o_proj."),
               (".mlp.c_fc.", ".mlp.up_proj."), (".mlp.c_proj.", ".mlp.down_proj."), ("model.ln_f.", "model.norm.")]
    conv1d = True  # projection weights stored [in, out]

    @classmethod
    def attn_sizes(cls, cfg: Any) -> SimpleNamespace:
        return mha_sizes(cfg)

    @classmethod
    def attn_scale(cls, cfg: Any, layer_idx: int) -> float:
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        scale = head_dim**-0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        return scale

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        attn = LlamaAttention(cls.attn_sizes(cfg), None, qkv_bias=True, o_bias=True, qk_norm=False, window=window,
                              scale=cls.attn_scale(cfg, layer_idx))  # (rotary None: positions are learned)
        mlp = UpDownMLP(cfg, act=cfg.activation_function, intermediate_size=cfg.n_inner or 4 * cfg.hidden_size,
                        bias=True)
        return LayerNormDecoderLayer(cfg.hidden_size, cfg.layer_norm_epsilon, attn, mlp, parallel=False)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError(f"{type(self).__name__} with add_cross_attention (encoder-decoder use) is not supported.")
        super().__init__(cfg, max_positions)
        self.model.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: Optional[torch.Tensor] = None, deepstack: Any = None) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self.model(input_ids, positions, meta, inputs_embeds=x + self.model.embed_positions(positions))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self.checkpoint_layout(weights))

    def checkpoint_layout(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Names with the "transformer." prefix, Conv1D weights as [out, in]; the old causal-mask
        buffers dropped."""
        for name, t in weights:
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            name = base_prefixed(name)
            if self.conv1d and name.endswith(_CONV1D):
                t = t.t()
            yield name, t
