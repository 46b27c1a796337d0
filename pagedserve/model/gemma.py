"""Gemma, Gemma 2 and Gemma 3 (text): the Llama attention and gated MLP with Gemma's changes.

- RMSNorm scales by (1 + weight), in float32 before the cast back;
- embeddings are multiplied by sqrt(hidden_size), rounded to the model dtype;
- GeGLU (tanh-approximated GELU) in the MLP;
- Gemma 2 / 3: norms after attention and around the MLP ("sandwich"), softmax scale
  query_pre_attn_scalar ** -0.5, sliding-window layers per layer_types;
- Gemma 2: attention and final logits soft-capped (cap * tanh(x / cap));
- Gemma 3: q/k norms, and RoPE parameters per layer type (local and global layers)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.hf_config import layer_windows, rope_is_per_layer_type
from pagedserve.model.layers.norm import ResidualNorm, pre_norm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, _head_dim


class GemmaRMSNorm(ResidualNorm):
    """x / rms(x) * (1 + weight), all in float32, then cast (transformers' GemmaRMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, rotary: RotaryEmbedding, attn_options: dict, window: int, sandwich: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, window=window, **attn_options)
        act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
        self.mlp = LlamaMLP(cfg, act=act)
        self.sandwich = sandwich
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if sandwich:
            self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        """The hidden state is x + residual (x alone before the first layer), as in llama.py."""
        x, residual = pre_norm(self.input_layernorm, x, residual)
        x = self.self_attn(positions, x, meta)
        if not self.sandwich:  # Gemma 1: Llama's pre-norm layer
            x, residual = self.post_attention_layernorm(x, residual)
            return self.mlp(x), residual
        x, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(x), residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaModel(nn.Module):
    def __init__(self, cfg: Any, max_positions: int, attn_options: dict, sandwich: bool) -> None:
        super().__init__()
        n = cfg.num_hidden_layers
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n)
        per_type = rope_is_per_layer_type(cfg)
        rotaries = {t: RotaryEmbedding(cfg, _head_dim(cfg), max_positions, t if per_type else None)
                    for t in (sorted(set(types)) if per_type else ["full_attention"])}
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(cfg, rotaries[t if per_type else "full_attention"], attn_options, w, sandwich)
            for t, w in zip(types, layer_windows(cfg)))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # sqrt(hidden) rounded to the model dtype (the default dtype while the loader builds
        # the model), as transformers rounds it; a Python float, so a captured graph holds it.
        self.normalizer = float(torch.tensor(cfg.hidden_size**0.5, dtype=torch.get_default_dtype(), device="cpu"))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """inputs_embeds: scaled token embeddings with image rows replaced (unscaled, as in
        transformers' Gemma 3), instead of those of input_ids."""
        x = self.embed_tokens(input_ids) * self.normalizer if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class GemmaForCausalLM(LlamaForCausalLM):
    sandwich = False  # Gemma 2 / 3's extra norms

    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        bias = bool(getattr(cfg, "attention_bias", False))
        opts = {"qkv_bias": bias, "o_bias": bias, "qk_norm": False, "norm": GemmaRMSNorm}
        scalar = getattr(cfg, "query_pre_attn_scalar", None)
        if scalar:
            opts["scale"] = float(scalar) ** -0.5
        opts["softcap"] = float(getattr(cfg, "attn_logit_softcapping", None) or 0.0)
        return opts

    def __init__(self, cfg: Any, max_positions: int) -> None:
        nn.Module.__init__(self)
        self.config = cfg
        self.model = GemmaModel(cfg, max_positions, self.attn_options(cfg), self.sandwich)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.final_softcap = float(getattr(cfg, "final_logit_softcapping", None) or 0.0)
        self.tie_weights()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids) * self.model.normalizer

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_softcap > 0:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


class Gemma2ForCausalLM(GemmaForCausalLM):
    sandwich = True


class Gemma3ForCausalLM(GemmaForCausalLM):
    sandwich = True

    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        # EmbeddingGemma (Gemma3TextModel, use_bidirectional_attention): every token sees its whole
        # prompt (a sliding layer: the tokens less than a window away, either side), each prompt
        # in one step, with no KV cache (PagedAttention.bidirectional).
        self.bidirectional = getattr(cfg, "use_bidirectional_attention", None) is True
        for layer in self.model.layers:
            layer.self_attn.attn.bidirectional = self.bidirectional

    def attention_layers(self) -> list:
        return [] if self.bidirectional else super().attention_layers()

    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        return {**super().attn_options(cfg), "qk_norm": True}
