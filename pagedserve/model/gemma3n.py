"""Gemma 3n (text): Gemma 4's attention (q/k norms, a weightless value norm, softmax scale 1,
RoPE per layer type, sliding and global layers), cross-layer KV sharing (the last
`num_kv_shared_layers` layers read the last earlier layer of their type, the same rule as
transformers' `kv_sharing_modes`) and per-layer embeddings, in a layer of its own:

- AltUp (model/gemma3n_layers.py): the hidden state kept as `altup_num_inputs` copies, the
  extra ones projections of the embedding scaled to its RMS; each layer predicts all copies,
  runs the active one and corrects all of them; the output is the mean of the copies projected
  back (again at the first copy's RMS), normed;
- LAuReL beside the attention, the two averaged in the 1/sqrt(2) sense;
- the MLP's Gaussian top-k gate on the layers `activation_sparsity_pattern` marks;
- the per-layer input, gated by the corrected active copy, added to the copies after the first;
- the final logits soft-capped (Gemma 4's LM head)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.gemma3n_layers import Gemma3nAltUp, Gemma3nHardEmbedder, Gemma3nLaurel, Gemma3nMLP
from pagedserve.model.gemma4 import Gemma4Attention, Gemma4ForCausalLM, Gemma4Model, Gemma4RMSNorm, _rounded, \
    kv_sources
from pagedserve.model.hf_config import layer_windows
from pagedserve.model.layers.attention import PagedAttention
from pagedserve.model.layers.rotary import RotaryEmbedding


class Gemma3nDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, i: int, rotary: RotaryEmbedding, window: int,
                 source: Optional[PagedAttention]) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        h, eps, p = cfg.hidden_size, cfg.rms_norm_eps, int(cfg.hidden_size_per_layer_input)
        self.self_attn = Gemma4Attention(cfg, i, rotary, window, source)
        self.mlp = Gemma3nMLP(cfg, i)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):
            setattr(self, name, Gemma4RMSNorm(h, eps))
        self.altup = Gemma3nAltUp(cfg)
        self.laurel = Gemma3nLaurel(cfg)
        self.correct_scale = bool(getattr(cfg, "altup_correct_scale", True))
        self.act = ACT2FN[cfg.hidden_activation]
        self.per_layer_input_gate = nn.Linear(h, p, bias=False)
        self.per_layer_projection = nn.Linear(p, h, bias=False)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, per_layer_input: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """h: the AltUp copies, [copies, tokens, hidden]; returns them corrected."""
        predictions = self.altup.predict(h)
        active = predictions[self.altup.active]
        normed = self.input_layernorm(active)
        laurel = self.laurel(normed)
        attn = self.post_attention_layernorm(self.self_attn(positions, normed, meta))
        x = (active + attn + laurel) / math.sqrt(2)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        corrected = self.altup.correct(predictions, x)
        first = corrected[self.altup.active]
        if self.correct_scale:
            first = self.altup.scale_corrected_output(first)
        gate = self.act(self.per_layer_input_gate(first)) * per_layer_input
        first = self.post_per_layer_input_norm(self.per_layer_projection(gate))
        # (the copies after the first, whichever is active, as transformers adds it)
        return torch.cat([corrected[:1], corrected[1:] + first], dim=0)


def _at_magnitude(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x rescaled to the RMS `target` (its own RMS floored at sqrt(1e-5))."""
    own = torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
    return x * target / own


class Gemma3nModel(Gemma4Model):
    """Gemma 4's per-layer inputs (`per_layer_inputs`, the same parameter names) around layers
    that carry AltUp copies."""

    def __init__(self, cfg: Any, max_positions: int) -> None:
        nn.Module.__init__(self)
        n, h, p = cfg.num_hidden_layers, cfg.hidden_size, int(cfg.hidden_size_per_layer_input)
        types = list(cfg.layer_types)
        rotaries = {t: RotaryEmbedding(cfg, int(cfg.head_dim), max_positions, t) for t in sorted(set(types))}
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.normalizer = _rounded(h**0.5)
        sources = kv_sources(cfg)
        layers: list[Gemma3nDecoderLayer] = []
        for i, (t, w, src) in enumerate(zip(types, layer_windows(cfg), sources)):
            layers.append(Gemma3nDecoderLayer(cfg, i, rotaries[t], w,
                                              None if src is None else layers[src].self_attn.attn))
        self.layers = nn.ModuleList(layers)
        self.first_shared = next((i for i, src in enumerate(sources) if src is not None), n)
        self.norm = Gemma4RMSNorm(h, cfg.rms_norm_eps)
        self.per_layer = p
        self.vocab_per_layer = int(cfg.vocab_size_per_layer_input)
        self.embed_tokens_per_layer = nn.Embedding(self.vocab_per_layer, n * p)
        self.per_layer_embed_scale = _rounded(p**0.5)
        self.per_layer_model_projection = nn.Linear(h, n * p, bias=False)
        self.per_layer_projection_norm = Gemma4RMSNorm(p, cfg.rms_norm_eps)
        # (buffers in transformers' Gemma 3n, cast to the model dtype: 1/sqrt(2) taken in float32 first)
        self.per_layer_projection_scale = _rounded(h**-0.5)
        self.per_layer_input_scale = _rounded(float(torch.rsqrt(torch.tensor(2.0, device="cpu"))))
        copies = int(cfg.altup_num_inputs)
        self.altup_projections = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(1, copies))
        self.altup_unembed_projections = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(1, copies))
        # The multimodal checkpoint's marker tokens past the text vocabulary (registry.py).
        # (named as the checkpoint has them: model.embed_vision, model.embed_audio)
        hard = getattr(cfg, "hard_token_embeddings", None) or {}
        self.hard_tables = tuple(f"embed_{kind}" for kind in hard)
        for kind, spec in hard.items():
            setattr(self, f"embed_{kind}", Gemma3nHardEmbedder(*spec, h))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.normalizer
        for name in self.hard_tables:
            x = getattr(self, name).merge(input_ids, x)
        return x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        # Ids past the per-layer table take row 0's per-layer embedding, as transformers does.
        ids = input_ids.masked_fill(input_ids >= self.vocab_per_layer, 0)
        per_layer = self.per_layer_inputs(ids, x)
        target = torch.mean(x**2, dim=-1, keepdim=True) ** 0.5
        h = torch.stack([x, *(_at_magnitude(proj(x), target) for proj in self.altup_projections)])
        full = None
        for i, layer in enumerate(self.layers):
            if i == self.first_shared and meta.needed is not None:
                # The KV-sharing layers write no KV: only the rows whose outputs are read go on
                # (Gemma4Model's kv_sharing_fast_prefill; the others keep the earlier state).
                full, rows = h, meta.needed.rows
                h, positions, meta, per_layer = h[:, rows], positions[rows], meta.needed.meta, per_layer[rows]
            h = layer(positions, h, per_layer[:, i], meta)
        if full is not None:
            h = full.index_copy(1, rows, h)
        target = torch.mean(h[0] ** 2, dim=-1, keepdim=True) ** 0.5
        out = torch.stack([h[0], *(_at_magnitude(proj(h[k + 1]), target)
                                   for k, proj in enumerate(self.altup_unembed_projections))])
        return self.norm(out.mean(0))


def check_config(cfg: Any) -> None:
    """Refuse, by field, what this model does not implement."""
    n = int(cfg.num_hidden_layers)
    copies, active = int(cfg.altup_num_inputs), int(cfg.altup_active_idx)
    if copies < 1 or not 0 <= active < copies:
        raise ValueError(f"Gemma 3n with altup_active_idx={active} and altup_num_inputs={copies}: the active "
                         "copy must be one of the copies.")
    if not int(getattr(cfg, "hidden_size_per_layer_input", 0) or 0):
        raise ValueError("Gemma 3n without per-layer inputs (hidden_size_per_layer_input=0) is not supported.")
    pattern = list(cfg.activation_sparsity_pattern)
    if len(pattern) != n or any(not 0.0 <= float(s) < 1.0 for s in pattern):
        raise ValueError(f"Gemma 3n's activation_sparsity_pattern {pattern}: one value in [0, 1) a layer is "
                         "supported.")
    shared = int(getattr(cfg, "num_kv_shared_layers", 0) or 0)
    if not 0 <= shared < n:
        raise ValueError(f"Gemma 3n with num_kv_shared_layers={shared} of {n} layers: some earlier layer must "
                         "hold the keys and values.")


class Gemma3nForCausalLM(Gemma4ForCausalLM):
    """Gemma 4's LM head (scaled embeddings, soft-capped logits), weight loading (the KV-sharing
    layers' k/v weights skipped) and KV-sharing fast prefill, over Gemma3nModel."""

    def __init__(self, cfg: Any, max_positions: int) -> None:
        nn.Module.__init__(self)
        check_config(cfg)
        self.config = cfg
        self.model = Gemma3nModel(cfg, max_positions)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.final_softcap = float(getattr(cfg, "final_logit_softcapping", None) or 0.0)
        self.tie_weights()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)
