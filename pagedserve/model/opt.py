"""OPT (OPTForCausalLM: OPT 125M to 66B, and their fine-tunes).

- learned absolute positions `embed_positions`, looked up at position + 2 (the table has two
  rows more than max_position_embeddings), added to the token embeddings; no RoPE;
- separate q/k/v projections, multi-head, biases everywhere when `enable_bias` (all released
  models); the output projection `out_proj`;
- `do_layer_norm_before` (all but 350M): pre-LayerNorm layers (self_attn_layer_norm,
  final_layer_norm) and a final LayerNorm; without it (350M), post-LayerNorm layers
  (norm(h + attn(h)), then norm(a + mlp(a))) and no final norm;
- a ReLU MLP fc1 / fc2 of ffn_dim, without a gate;
- token embeddings of `word_embed_proj_dim` (350M: 512 for a hidden size of 1024), brought to
  the hidden size by `project_in` and back by `project_out` before the LM head; the head tied
  to the embeddings; hub checkpoints may name tensors "decoder." without the "model." prefix.

Not supported: layer_norm_elementwise_affine false (LayerNorms without weights)."""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.gpt_neox import LayerNormDecoderLayer, mha_sizes
from pagedserve.model.layers.norm import LayerNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, UpDownMLP

_POSITION_OFFSET = 2  # OPT's learned positions start at row 2 (fairseq's padding rows)


class PostLayerNormDecoderLayer(LayerNormDecoderLayer):
    """Each LayerNorm after its residual add (OPT-350M): a = ln1(h + attn(h)), then
    ln2(a + mlp(a)); the layer's output is whole (no residual passed on)."""

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        h = x if residual is None else x + residual
        a = self.input_layernorm(h + self.self_attn(positions, h, meta))
        return self.post_attention_layernorm(a + self.mlp(a)), None


class OPTFinal(nn.Module):
    """The decoder's end in place of LlamaModel's final norm: the residual add, the final
    LayerNorm (pre-norm models), project_out (when word_embed_proj_dim differs from hidden)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        pre_norm = cfg.do_layer_norm_before and not getattr(cfg, "_remove_final_layer_norm", False)
        self.ln = LayerNorm(cfg.hidden_size) if pre_norm else None
        proj = cfg.word_embed_proj_dim != cfg.hidden_size
        self.project_out = nn.Linear(cfg.hidden_size, cfg.word_embed_proj_dim, bias=False) if proj else None

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = x if residual is None else x + residual
        out = h if self.ln is None else self.ln(h)
        return (out if self.project_out is None else self.project_out(out)), h


class OPTForCausalLM(LlamaForCausalLM):
    stacked_params = [p for p in LlamaForCausalLM.stacked_params if p[2] in ("q", "k", "v")]
    # (the decoder's final_layer_norm first: the layers' own carry the same name)
    renamed = [("model.decoder.final_layer_norm.", "model.norm.ln."),
               (".final_layer_norm.", ".post_attention_layernorm."), (".self_attn_layer_norm.", ".input_layernorm."),
               (".self_attn.out_proj.", ".self_attn.o_proj."), (".fc1.", ".mlp.up_proj."), (".fc2.", ".mlp.down_proj."),
               ("model.decoder.project_out.", "model.norm.project_out."), ("model.decoder.", "model.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        bias = bool(cfg.enable_bias)
        attn = LlamaAttention(mha_sizes(cfg), None, qkv_bias=bias, o_bias=bias, qk_norm=False, window=window)
        mlp = UpDownMLP(cfg, act=cfg.activation_function, intermediate_size=cfg.ffn_dim, bias=bias)
        layer = LayerNormDecoderLayer if cfg.do_layer_norm_before else PostLayerNormDecoderLayer
        return layer(cfg.hidden_size, 1e-5, attn, mlp, parallel=False)  # (nn.LayerNorm's default eps)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return OPTFinal(cfg)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        if not getattr(cfg, "layer_norm_elementwise_affine", True):
            raise ValueError("OPT with layer_norm_elementwise_affine false (LayerNorms without weights) "
                             "is not supported.")
        super().__init__(cfg, max_positions)
        model, proj_dim = self.model, cfg.word_embed_proj_dim
        model.embed_tokens = nn.Embedding(cfg.vocab_size, proj_dim)
        model.embed_positions = nn.Embedding(cfg.max_position_embeddings + _POSITION_OFFSET, cfg.hidden_size)
        model.project_in = nn.Linear(proj_dim, cfg.hidden_size, bias=False) if proj_dim != cfg.hidden_size else None
        self.lm_head = nn.Linear(proj_dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: Optional[torch.Tensor] = None, deepstack: Any = None) -> torch.Tensor:
        """inputs_embeds, as transformers takes them, are of word_embed_proj_dim (before project_in)."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.model.project_in is not None:
            x = self.model.project_in(x)
        x = x + self.model.embed_positions(positions + _POSITION_OFFSET)
        return self.model(input_ids, positions, meta, inputs_embeds=x)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._with_model_prefix(weights))

    @staticmethod
    def _with_model_prefix(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in weights:
            yield ("model." + name if name.startswith("decoder.") else name), t
