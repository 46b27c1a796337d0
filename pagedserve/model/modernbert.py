"""ModernBERT (ModernBertModel, ModernBertForSequenceClassification: answerdotai/ModernBERT-base /
-large fine-tunes, nomic-ai/modernbert-embed-base, gte-modernbert, Alibaba-NLP/gte-reranker-
modernbert-base, ...): an encoder for embeddings and classification, as transformers runs it.

- token embeddings, then a LayerNorm (no position embeddings: RoPE in every layer);
- pre-norm layers (the first without its attention norm), LayerNorms without biases unless
  `norm_bias`; a fused `Wqkv` (q | k | v, all heads each) and `Wo`; RoPE at the layer type's
  theta; every `global_attn_every_n_layers`-th layer attends to the whole prompt, the others
  (`layer_types` "sliding_attention") to the tokens within `local_attention` // 2 positions on
  either side; a GeGLU-style MLP: Wi gives input | gate, Wo(act(input) * gate);
- a final LayerNorm; a classifier's head (dense, activation, LayerNorm) and `classifier` over
  the first token or the mean of the prompt (`classifier_pooling`).

Bidirectional, so a prompt runs in one step without a KV cache (see model/bert.py)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.bert import TOKEN_TYPE_SHIFT, encoder_attention
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.weights import load_by_name


def _act(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _norm(cfg: Any) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=bool(cfg.norm_bias))


def layer_types(cfg: Any) -> list[str]:
    """Each layer's kind, as transformers' config derives it when it gives none."""
    types = getattr(cfg, "layer_types", None)
    if types:
        return list(types)
    every = int(cfg.global_attn_every_n_layers)
    return ["full_attention" if i % every == 0 else "sliding_attention" for i in range(cfg.num_hidden_layers)]


class _Attention(nn.Module):
    def __init__(self, cfg: Any, rotary: RotaryEmbedding, window: Optional[int]) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.num_heads
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=bool(cfg.attention_bias))
        self.Wo = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bool(cfg.attention_bias))
        self.rotary = rotary
        self.window = window  # keys within this many positions either side; None: all

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.Wqkv(x).view(t, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = self.rotary(positions, q, k)
        o = encoder_attention(q, k, v.contiguous(), meta, self.head_dim**-0.5, window=self.window)
        return self.Wo(o.reshape(t, -1))


class _MLP(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.Wi = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=bool(cfg.mlp_bias))
        self.Wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bool(cfg.mlp_bias))
        self.act = _act(cfg.hidden_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.act(inp) * gate)


class _Layer(nn.Module):
    def __init__(self, cfg: Any, idx: int, rotary: RotaryEmbedding, window: Optional[int]) -> None:
        super().__init__()
        self.attn_norm = nn.Identity() if idx == 0 else _norm(cfg)
        self.attn = _Attention(cfg, rotary, window)
        self.mlp_norm = _norm(cfg)
        self.mlp = _MLP(cfg)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(positions, self.attn_norm(x), meta)
        return x + self.mlp(self.mlp_norm(x))


class _Embeddings(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = _norm(cfg)


class _Head(nn.Module):
    """The classifier's: classifier(norm(act(dense(pooled))))."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bool(cfg.classifier_bias))
        self.act = _act(cfg.classifier_activation)
        self.norm = _norm(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(self.act(self.dense(x))))


class ModernBertModel(nn.Module):
    encoder_only = True
    cuda_graph_safe = False  # pooling runs prefill only; no decode graphs

    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        types = layer_types(cfg)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        positions = max(max_positions, int(cfg.max_position_embeddings))
        rotaries = {t: RotaryEmbedding(cfg, head_dim, positions, t) for t in sorted(set(types))}
        self.rotary = nn.ModuleDict(rotaries)
        half = int(cfg.local_attention) // 2  # (transformers' sliding_window)
        self.embeddings = _Embeddings(cfg)
        self.layers = nn.ModuleList(_Layer(cfg, i, rotaries[t], half if t == "sliding_attention" else None)
                                    for i, t in enumerate(types))
        self.final_norm = _norm(cfg)
        classify = any(a.endswith("ForSequenceClassification") for a in getattr(cfg, "architectures", None) or [])
        self.score: Optional[nn.Module] = _Head(cfg) if classify else None
        self.lm_head = None
        self.tie_word_embeddings = False

    def tie_weights(self) -> None:
        pass

    def attention_layers(self) -> list:
        return []  # no paged KV cache: see model/bert.py encoder_attention

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        ids = input_ids & ((1 << TOKEN_TYPE_SHIFT) - 1)  # (one token type: the runner's bits, if any, dropped)
        x = self.embeddings.norm(self.embeddings.tok_embeddings(ids))
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.final_norm(x)

    def _our_name(self, name: str) -> Optional[str]:
        """A checkpoint tensor's name here; None for what this model does not use (a masked-LM
        head and decoder)."""
        if name.startswith("model."):
            name = name[len("model."):]
        if name.startswith(("embeddings.", "layers.", "final_norm.")):
            return name
        if self.score is not None and name.startswith(("head.", "classifier.")):
            return "score." + name[len("head."):] if name.startswith("head.") else "score." + name
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_by_name(self, weights, self._our_name)
