"""Gemma 4 (text): Gemma 3's sandwich-norm decoder with

- global (full-attention) layers of their own head width and KV head count
  (`per_layer_config`), their keys also used as values (`attention_k_eq_v`), and RoPE of the
  "proportional" kind (layers/rotary.py); sliding-window layers as Gemma 3's;
- q/k RMS norms, a weightless RMS norm on values, softmax scale 1;
- cross-layer KV sharing: the last `num_kv_shared_layers` layers compute queries only and
  attend over the cache of the last earlier layer of their type (layers/attention.py
  kv_source), so they hold no KV blocks;
- per-layer embeddings (PLE): a second token embedding, `hidden_size_per_layer_input` numbers a
  layer, mixed with a projection of the input embeddings and fed through a gate into each layer;
- an optional mixture of experts beside the dense MLP (`enable_moe_block`), its router with a
  norm, a learned input scale and a learned scale per expert;
- a learned scalar on each layer's output, plain-weight RMS norms (x * w, not Gemma's 1 + w),
  the final logits soft-capped."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.hf_config import layer_windows
from pagedserve.model.layers.attention import PagedAttention
from pagedserve.model.layers.moe import FusedMoE, select_experts
from pagedserve.model.layers.norm import ResidualNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.gemma import GemmaForCausalLM
from pagedserve.model.llama import LlamaMLP
from pagedserve.model.qwen_moe import unstack_experts


class Gemma4RMSNorm(ResidualNorm):
    """x * (mean(x^2) + eps)^-0.5 * weight, in float32, then cast; no weight with scale=False."""

    def __init__(self, dim: int, eps: float = 1e-6, scale: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if scale else None
        self.eps = eps

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            xf = xf * self.weight.float()
        return xf.to(x.dtype)


def layer_dims(cfg: Any, i: int) -> tuple[int, int]:
    """(head_dim, num_key_value_heads) of layer i: the global layers' from per_layer_config."""
    per = getattr(cfg, "per_layer_config", None)
    c = per[i] if per is not None else cfg
    return int(c.head_dim), int(c.num_key_value_heads)


def kv_sources(cfg: Any) -> list[Optional[int]]:
    """For each layer, the layer whose KV cache it reads (None: its own): the last
    `num_kv_shared_layers` layers read the last layer of their type before them."""
    n, shared = cfg.num_hidden_layers, int(getattr(cfg, "num_kv_shared_layers", 0) or 0)
    types = list(cfg.layer_types)
    first = n - shared
    out: list[Optional[int]] = [None] * n
    for i in range(first, n):
        owners = [j for j in range(first) if types[j] == types[i]]
        if not owners:
            raise ValueError(f"num_kv_shared_layers={shared}: layer {i} ({types[i]}) has no earlier layer of its "
                             "type to share keys and values with.")
        out[i] = owners[-1]
    return out


class Gemma4Attention(nn.Module):
    def __init__(self, cfg: Any, i: int, rotary: RotaryEmbedding, window: int,
                 source: Optional[PagedAttention]) -> None:
        super().__init__()
        self.head_dim, self.num_kv_heads = layer_dims(cfg, i)
        self.num_heads = cfg.num_attention_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.shared = source is not None  # queries only; keys and values are the source layer's
        self.k_eq_v = bool(getattr(cfg, "attention_k_eq_v", False)) and not window
        bias = bool(getattr(cfg, "attention_bias", False))
        shards = {"q": (0, self.q_size)}
        if not self.shared:
            shards["k"] = (self.q_size, self.kv_size)
            if not self.k_eq_v:
                shards["v"] = (self.q_size + self.kv_size, self.kv_size)
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(size for _, size in shards.values()), bias=bias)
        self.qkv_proj.shard_offsets = shards
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=bias)
        self.q_norm = Gemma4RMSNorm(self.head_dim, cfg.rms_norm_eps)
        if not self.shared:
            self.k_norm = Gemma4RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.v_norm = Gemma4RMSNorm(self.head_dim, cfg.rms_norm_eps, scale=False)
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, 1.0, window)
        self.attn.causal_only = not window  # (images attend both ways in the sliding-window layers only)
        if source is not None:
            self.attn.share_kv_of(source)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q = self.q_norm(qkv[:, : self.q_size].reshape(t, self.num_heads, self.head_dim))
        if self.shared:  # (a one-head stand-in for the keys the rotary kernel also turns)
            q, _ = self.rotary(positions, q, q.new_zeros(t, 1, self.head_dim))
            return self.o_proj(self.attn(q, None, None, meta))
        k = qkv[:, self.q_size : self.q_size + self.kv_size].reshape(t, self.num_kv_heads, self.head_dim)
        v = k if self.k_eq_v else qkv[:, self.q_size + self.kv_size :].reshape(t, self.num_kv_heads, self.head_dim)
        v = self.v_norm(v)
        q, k = self.rotary(positions, q, self.k_norm(k))
        return self.o_proj(self.attn(q, k, v, meta))


class Gemma4Router(nn.Module):
    """Softmax routing over norm(x) * scale / sqrt(hidden); the top k renormalised, then each
    multiplied by its expert's learned scale."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.top_k = int(cfg.top_k_experts)
        self.norm = Gemma4RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, scale=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
        self.root = cfg.hidden_size**-0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.proj(self.norm(x) * self.scale * self.root)
        weights, ids = select_experts(logits, self.top_k, renormalize=True)
        return weights * self.per_expert_scale[ids].float(), ids


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, i: int, rotary: RotaryEmbedding, window: int,
                 source: Optional[PagedAttention]) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Gemma4Attention(cfg, i, rotary, window, source)
        wide = bool(getattr(cfg, "use_double_wide_mlp", False)) and source is not None
        self.mlp = LlamaMLP(cfg, intermediate_size=cfg.intermediate_size * (2 if wide else 1),
                            act=cfg.hidden_activation, bias=False)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, Gemma4RMSNorm(h, eps))
        self.router: Optional[Gemma4Router] = None
        if getattr(cfg, "enable_moe_block", False):
            self.router = Gemma4Router(cfg)
            self.experts = FusedMoE(cfg.num_experts, h, cfg.moe_intermediate_size, cfg.hidden_activation)
            self.post_feedforward_layernorm_1 = Gemma4RMSNorm(h, eps)
            self.post_feedforward_layernorm_2 = Gemma4RMSNorm(h, eps)
            self.pre_feedforward_layernorm_2 = Gemma4RMSNorm(h, eps)
        self.per_layer = int(getattr(cfg, "hidden_size_per_layer_input", 0) or 0)
        if self.per_layer:
            from transformers.activations import ACT2FN

            self.act = ACT2FN[cfg.hidden_activation]
            self.per_layer_input_gate = nn.Linear(h, self.per_layer, bias=False)
            self.per_layer_projection = nn.Linear(self.per_layer, h, bias=False)
            self.post_per_layer_input_norm = Gemma4RMSNorm(h, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1))

    def forward(self, positions: torch.Tensor, h: torch.Tensor, per_layer_input: Optional[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """h: the hidden state (the residual stream itself: each layer's output is scaled)."""
        h = h + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(h), meta))
        x = self.mlp(self.pre_feedforward_layernorm(h))
        if self.router is not None:  # experts beside the MLP, both on the layer's residual stream
            weights, ids = self.router(h)
            moe = self.experts(self.pre_feedforward_layernorm_2(h), weights, ids)
            x = self.post_feedforward_layernorm_1(x) + self.post_feedforward_layernorm_2(moe)
        h = h + self.post_feedforward_layernorm(x)
        if per_layer_input is not None:
            gate = self.act(self.per_layer_input_gate(h)) * per_layer_input
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        return h * self.layer_scalar


def _rounded(value: float) -> float:
    """A scale rounded to the model dtype (the default dtype while the loader builds the
    model), as transformers' scaled embeddings hold it; a Python float for captured graphs."""
    return float(torch.tensor(value, dtype=torch.get_default_dtype(), device="cpu"))


class Gemma4Model(nn.Module):
    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__()
        n, h = cfg.num_hidden_layers, cfg.hidden_size
        types = list(cfg.layer_types)
        dims = {t: layer_dims(cfg, types.index(t))[0] for t in set(types)}
        rotaries = {t: RotaryEmbedding(cfg, dims[t], max_positions, t) for t in sorted(set(types))}
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.normalizer = _rounded(h**0.5)
        layers: list[Gemma4DecoderLayer] = []
        for i, (t, w, src) in enumerate(zip(types, layer_windows(cfg), kv_sources(cfg))):
            layers.append(Gemma4DecoderLayer(cfg, i, rotaries[t], w,
                                             None if src is None else layers[src].self_attn.attn))
        self.layers = nn.ModuleList(layers)
        sources = kv_sources(cfg)
        self.first_shared = next((i for i, src in enumerate(sources) if src is not None), len(sources))
        self.norm = Gemma4RMSNorm(h, cfg.rms_norm_eps)
        self.per_layer = int(getattr(cfg, "hidden_size_per_layer_input", 0) or 0)
        if self.per_layer:
            p = self.per_layer
            self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, n * p)
            self.per_layer_embed_scale = _rounded(p**0.5)
            self.per_layer_model_projection = nn.Linear(h, n * p, bias=False)
            self.per_layer_projection_norm = Gemma4RMSNorm(p, cfg.rms_norm_eps)
            # (Python floats in transformers' Gemma 4; Gemma 3n's round them to the model dtype)
            self.per_layer_projection_scale, self.per_layer_input_scale = h**-0.5, 2**-0.5
        # Image / video / audio placeholders take the pad token's per-layer embedding.
        self.pad_token_id = int(getattr(cfg, "pad_token_id", None) or 0)
        self.placeholders = list(getattr(cfg, "multimodal_token_ids", None) or [])

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[T, layers, per-layer width]: the token's own per-layer embedding and a projection
        of its input embedding (normed), averaged in the 1/sqrt(2) sense."""
        n, p = len(self.layers), self.per_layer
        own = (self.embed_tokens_per_layer(input_ids) * self.per_layer_embed_scale).view(-1, n, p)
        mixed = (self.per_layer_model_projection(x) * self.per_layer_projection_scale).view(-1, n, p)
        return (self.per_layer_projection_norm(mixed) + own) * self.per_layer_input_scale

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.embed_tokens(input_ids) * self.normalizer if inputs_embeds is None else inputs_embeds
        per_layer = None
        if self.per_layer:
            ids = input_ids
            if self.placeholders:  # (as transformers' Gemma4Model, whatever fills those rows)
                # Comparisons with Python ints: no id tensor copied to the device each step (a
                # copy a CUDA graph capture would refuse).
                hit = input_ids == self.placeholders[0]
                for t in self.placeholders[1:]:
                    hit |= input_ids == t
                ids = input_ids.masked_fill(hit, self.pad_token_id)
            per_layer = self.per_layer_inputs(ids, h)
        full = None
        for i, layer in enumerate(self.layers):
            if i == self.first_shared and meta.needed is not None:
                # The rest of the layers read earlier layers' KV and write none: only the rows
                # whose outputs are read go on (the others' hidden states are left as they are).
                full, rows = h, meta.needed.rows
                h, positions, meta = h[rows], positions[rows], meta.needed.meta
                per_layer = None if per_layer is None else per_layer[rows]
            h = layer(positions, h, None if per_layer is None else per_layer[:, i], meta)
        if full is not None:
            h = full.index_copy(0, rows, h)
        return self.norm(h)


class Gemma4ForCausalLM(GemmaForCausalLM):
    """Gemma's scaled embeddings (embed_input_ids) and soft-capped logits (compute_logits) over
    Gemma4Model."""

    skips_unread_rows = True  # (Gemma4Model: the KV-sharing layers on the rows read alone)

    def __init__(self, cfg: Any, max_positions: int) -> None:
        nn.Module.__init__(self)
        if getattr(cfg, "use_bidirectional_attention", None) == "all":
            raise ValueError("Gemma 4 with use_bidirectional_attention='all' (an encoder) is not supported.")
        self.config = cfg
        self.model = Gemma4Model(cfg, max_positions)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.final_softcap = float(getattr(cfg, "final_logit_softcapping", None) or 0.0)
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: Optional[torch.Tensor] = None, deepstack: Any = None) -> torch.Tensor:
        return self.model(input_ids, positions, meta, inputs_embeds=inputs_embeds)

    def attention_layers(self) -> list[PagedAttention]:
        """The layers holding KV caches (those sharing another's hold none)."""
        return [layer.self_attn.attn for layer in self.model.layers if layer.self_attn.attn.kv_source is None]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        cfg = self.config
        # Layers sharing KV may still carry k/v projections and norms in a checkpoint (transformers
        # ignores them too).
        unused = tuple(f"model.layers.{i}.self_attn.{part}." for i, src in enumerate(kv_sources(cfg))
                       if src is not None for part in ("k_proj", "v_proj", "k_norm", "v_norm"))
        kept = ((name, t) for name, t in weights if not name.startswith(unused))
        if getattr(cfg, "enable_moe_block", False):
            kept = unstack_experts(kept, cfg.hidden_size, cfg.moe_intermediate_size)
        super().load_weights(kept)
