"""Encoder-only models for embeddings and cross-encoder scoring: BERT, RoBERTa and XLM-RoBERTa
(all-MiniLM, bge-base/large, e5, gte, bge-m3; bge-reranker, ms-marco cross-encoders).

Bidirectional attention: every token sees its whole prompt, so a prompt must be computed in
one step (the engine turns chunked prefill and prefix caching off for these models, see
config.py) and needs no KV cache: attention runs on the step's own q/k/v, the requests of a
flat batch padded into one SDPA call. Module names follow transformers' so checkpoints load as
they are (with or without the "bert." / "roberta." prefix of the task models).

Token types (BERT cross-encoders read the second text of a pair as type 1) ride in the input
ids' high bits, TOKEN_TYPE_SHIFT and up, put there by the model runner; RoBERTa-family models
have one type."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.weights import load_by_name

TOKEN_TYPE_SHIFT = 30  # input id = token id | token type << TOKEN_TYPE_SHIFT

ENCODER_ARCHITECTURES = {
    "BertModel": ("bert", None), "RobertaModel": ("roberta", None), "XLMRobertaModel": ("roberta", None),
    "BertForSequenceClassification": ("bert", "bert"), "RobertaForSequenceClassification": ("roberta", "roberta"),
    "XLMRobertaForSequenceClassification": ("roberta", "roberta"),
    "ModernBertModel": ("modernbert", None), "ModernBertForSequenceClassification": ("modernbert", "modernbert"),
}


def is_bidirectional_decoder(hf_config: Any) -> bool:
    """A decoder checkpoint whose attention looks both ways (use_bidirectional_attention true:
    EmbeddingGemma's Gemma3TextModel), an embedding model run as encoders are."""
    return getattr(hf_config, "use_bidirectional_attention", None) is True


def encoder_class(hf_config: Any) -> type:
    """The module that runs this encoder: ModernBERT's own (model/modernbert.py), else this one's."""
    if ENCODER_ARCHITECTURES[_arch(hf_config)][0] == "modernbert":
        from pagedserve.model.modernbert import ModernBertModel

        return ModernBertModel
    return EncoderModel


def encoder_pooling_type(hf_config: Any) -> str:
    """The token(s) an encoder's head reads, the default pooling: the first (CLS), or the
    prompt's mean for ModernBERT classifiers with classifier_pooling "mean" and bidirectional
    decoders (EmbeddingGemma's own pooling; its sentence-transformers files say so too)."""
    if is_bidirectional_decoder(hf_config):
        return "MEAN"
    arch = _arch(hf_config)
    if arch == "ModernBertForSequenceClassification" and getattr(hf_config, "classifier_pooling", "cls") == "mean":
        return "MEAN"
    return "CLS"


def _act(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def position_offset(hf_config: Any) -> int:
    """RoBERTa numbers positions from padding_idx + 1 (its position table holds that many
    unused rows first); BERT from 0."""
    if is_bidirectional_decoder(hf_config):
        return 0
    family = ENCODER_ARCHITECTURES[_arch(hf_config)][0]
    return int(getattr(hf_config, "pad_token_id", 1) or 0) + 1 if family == "roberta" else 0


def _arch(hf_config: Any) -> str:
    archs = [a for a in (getattr(hf_config, "architectures", None) or []) if a in ENCODER_ARCHITECTURES]
    if not archs:
        raise ValueError(f"not an encoder-only architecture: {getattr(hf_config, 'architectures', None)}")
    return archs[0]


def encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                      scale: float, window: Optional[int] = None) -> torch.Tensor:
    """q/k/v [T, H, D] of whole prompts -> [T, H, D], each token attending to every token of
    its own prompt (window given: those at most `window` positions away, either side:
    ModernBERT's local layers). Requests are padded to the longest into one [R, H, L, D] SDPA
    call."""
    n, h, d = q.shape
    qsl = meta.query_start_loc_cpu
    lens = [qsl[i + 1] - qsl[i] for i in range(meta.num_reqs)]
    r, longest = len(lens), max(lens)
    dev = q.device
    near = None
    if window is not None:
        pos = torch.arange(longest, device=dev)
        near = (pos[:, None] - pos[None, :]).abs() <= window  # [L, L]
    if len(lens) == 1:
        o = nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                       attn_mask=near, scale=scale)
        return o.transpose(0, 1)
    idx = torch.cat([torch.arange(m, device=dev) + i * longest for i, m in enumerate(lens)])

    def padded(x: torch.Tensor) -> torch.Tensor:
        buf = x.new_zeros(r * longest, h, d)
        buf[idx] = x[: len(idx)]
        return buf.view(r, longest, h, d).transpose(1, 2)

    keep = torch.arange(longest, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
    mask = keep[:, None, None, :] if near is None else keep[:, None, None, :] & near
    o = nn.functional.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask, scale=scale)
    out = q.new_zeros(n, h, d)
    out[: len(idx)] = o.transpose(1, 2).reshape(r * longest, h, d)[idx]
    return out


class _SelfAttention(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = (p(x).view(t, self.num_heads, self.head_dim) for p in (self.query, self.key, self.value))
        return encoder_attention(q, k, v, meta, self.head_dim ** -0.5).reshape(t, -1)


class _DenseNorm(nn.Module):
    """dense, then LayerNorm over (output + residual): BERT's post-norm sublayer output."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        setattr(self, "self", _SelfAttention(cfg))  # transformers' name: attention.self.query
        self.output = _DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.output(getattr(self, "self")(x, meta), x)


class _Intermediate(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _act(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        a = self.attention(x, meta)
        return self.output(self.intermediate(a), a)


class _Encoder(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))


class _Embeddings(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(max(int(getattr(cfg, "type_vocab_size", 1) or 1), 1),
                                                  cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, offset: int) -> torch.Tensor:
        types = input_ids >> TOKEN_TYPE_SHIFT
        ids = input_ids & ((1 << TOKEN_TYPE_SHIFT) - 1)
        x = self.word_embeddings(ids) + self.position_embeddings(positions + offset) + self.token_type_embeddings(types)
        return self.LayerNorm(x)


class _ClassificationHead(nn.Module):
    """The head on the first token: dense, tanh, out_proj. RoBERTa's classifier is exactly
    this; BERT's pooler (dense + tanh) and classifier are the same two layers."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x)))


class EncoderModel(nn.Module):
    """BERT / RoBERTa / XLM-RoBERTa encoder; with a *ForSequenceClassification checkpoint, its
    head as `score` (applied by the model runner to the pooled first token)."""

    encoder_only = True
    cuda_graph_safe = False  # pooling runs prefill only; no decode graphs

    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        arch = _arch(cfg)
        family, head = ENCODER_ARCHITECTURES[arch]
        self.offset = position_offset(cfg)
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.head = head  # whose checkpoint names the classification head has
        self.score: Optional[nn.Module] = _ClassificationHead(cfg) if head is not None else None
        self.lm_head = None
        self.tie_word_embeddings = False
        self.prefix = f"{family}."  # the task checkpoints' prefix of the encoder's tensors

    def tie_weights(self) -> None:
        pass

    def attention_layers(self) -> list:
        return []  # no paged KV cache: see encoder_attention

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embeddings(input_ids, positions, self.offset)
        for layer in self.encoder.layer:
            x = layer(x, meta)
        return x

    def _our_name(self, name: str) -> Optional[str]:
        """A checkpoint tensor's parameter name here; None for what this model does not use
        (an MLM head, an unused pooler, position-id buffers)."""
        if name.startswith(self.prefix):
            name = name[len(self.prefix):]
        if name.startswith(("embeddings.", "encoder.")):
            return None if name.endswith(("position_ids", "token_type_ids")) else name
        if self.head == "bert":  # pooler.dense -> dense, classifier -> out_proj
            if name.startswith("pooler.dense."):
                return "score.dense." + name[len("pooler.dense."):]
            if name.startswith("classifier."):
                return "score.out_proj." + name[len("classifier."):]
        if self.head == "roberta" and name.startswith("classifier."):
            return "score." + name[len("classifier."):]
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_by_name(self, weights, self._our_name)
