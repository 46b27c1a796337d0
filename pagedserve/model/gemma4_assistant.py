"""Gemma 4's assistant drafters (Gemma4AssistantForCausalLM: google/gemma-4-*-it-assistant), a
few Gemma 4 layers that hold no KV of their own: every layer computes queries only and
attends over the target's cache, the sliding-window layers over that of the target's last
non-shared sliding-window layer, the global ones over its last non-shared global layer's
(the layers transformers marks "store").

Drafting for a request of n tokens (the last, n - 1, just sampled: no KV yet): the input is
pre_projection(concat(the target's embedding of token n - 1, the target's final hidden state
at n - 2)), at position n - 1, over the target's keys [0, n - 1); the assistant's normed output
gives the draft's logits (its own LM head, tied to its own embedding; or the "ordered
embeddings": only the tokens of the top centroids' clusters scored) and post_projection of it
is the next draft's hidden state, with the draft's embedding, at the same position over the
same keys, the last sliding_window + 1 of them in the window layers. (transformers' candidate
generator does so, except that after a step with rejected
drafts it also lets the assistant see the target's key at n - 1, a rejected draft's: here the
keys are the accepted tokens' only.)"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.gemma4 import Gemma4DecoderLayer, Gemma4ForCausalLM, Gemma4RMSNorm, kv_sources, layer_dims
from pagedserve.model.hf_config import layer_windows
from pagedserve.model.layers.attention import PagedAttention
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaForCausalLM
from pagedserve.model.loader import build_empty, check_finite, dummy_weights, iterate_safetensors
from pagedserve.model.weights import whole_checkpoint

ARCHITECTURE = "Gemma4AssistantForCausalLM"


def is_gemma4_assistant(model_dir: str) -> bool:
    """Whether the draft model directory holds a Gemma 4 assistant (read from its config.json)."""
    import json
    import os

    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return ARCHITECTURE in (json.load(f).get("architectures") or [])
    except (OSError, ValueError):
        return False


def store_layers(target: Gemma4ForCausalLM) -> dict[str, PagedAttention]:
    """The target's last non-shared layer of each layer type, by type."""
    cfg = target.config
    out: dict[str, PagedAttention] = {}
    for layer, kind, src in zip(target.model.layers, cfg.layer_types, kv_sources(cfg)):
        if src is None:
            out[kind] = layer.self_attn.attn
    return out


class MaskedEmbedding(nn.Module):
    """The ordered embeddings (use_ordered_embeddings): the hidden state picks its top
    `centroid_intermediate_top_k` of `num_centroids` clusters of the vocabulary (token_ordering
    lists each cluster's tokens), only their tokens are scored by the LM head, the others get
    the lowest of those scores minus 1."""

    def __init__(self, cfg: Any, hidden: int, vocab: int) -> None:
        super().__init__()
        self.top_k, self.clusters = int(cfg.centroid_intermediate_top_k), int(cfg.num_centroids)
        self.centroids = nn.Linear(hidden, self.clusters, bias=False)
        self.register_buffer("token_ordering", torch.zeros(vocab, dtype=torch.long))

    def forward(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        t = hidden.shape[0]
        top = self.centroids(hidden).topk(self.top_k, dim=-1).indices  # [T, top_k]
        ids = self.token_ordering.view(self.clusters, -1)[top].reshape(t, -1)  # [T, top_k * cluster size]
        scores = torch.einsum("th,tkh->tk", hidden, lm_head_weight[ids])
        # (transformers fills with the whole batch's lowest score - 1: per row here, the same argmax and
        # the same order within each row's scored tokens)
        out = (scores.min(dim=-1, keepdim=True).values - 1.0).expand(t, lm_head_weight.shape[0]).clone()
        return out.scatter_(1, ids, scores)


class Gemma4Assistant(nn.Module):
    version = 1  # (worker/eagle_proposer.py: the target's features are its final hidden states as they are)
    renamed: list[tuple[str, str]] = []
    stacked_params = LlamaForCausalLM.stacked_params

    def __init__(self, cfg: Any, target: Gemma4ForCausalLM, max_positions: int) -> None:
        super().__init__()
        tc = cfg.get_text_config()
        for name in ("hidden_size_per_layer_input", "enable_moe_block", "use_double_wide_mlp"):
            if getattr(tc, name, None):
                raise ValueError(f"speculative_config: a Gemma 4 assistant with {name} is not supported.")
        n = int(tc.num_hidden_layers)
        if int(getattr(tc, "num_kv_shared_layers", 0) or 0) != n:
            raise ValueError("speculative_config: every layer of a Gemma 4 assistant must share the target's KV "
                             f"(num_kv_shared_layers={tc.num_kv_shared_layers} of {n}).")
        backbone = int(cfg.backbone_hidden_size)
        if backbone != int(target.config.hidden_size):
            raise ValueError(f"speculative_config: the assistant was made for a hidden size of {backbone}, the "
                             f"target's is {target.config.hidden_size}.")
        if int(tc.vocab_size) != int(target.config.vocab_size):
            raise ValueError(f"speculative_config: the assistant's vocab_size ({tc.vocab_size}) is not the "
                             f"target's ({target.config.vocab_size}).")
        self.config = tc
        self.backbone = backbone
        stores = store_layers(target)
        types = list(tc.layer_types)
        rotaries: dict[str, RotaryEmbedding] = {}
        layers = []
        for i, (kind, window) in enumerate(zip(types, layer_windows(tc))):
            src = stores.get(kind)
            dims = layer_dims(tc, i)
            if src is None or (src.head_dim, src.num_kv_heads) != dims:
                raise ValueError(f"speculative_config: the assistant's layer {i} ({kind}, heads of {dims[0]}, "
                                 f"{dims[1]} KV heads) has no target layer of that kind and shape to read.")
            if kind not in rotaries:
                rotaries[kind] = RotaryEmbedding(tc, dims[0], max_positions, kind)
            # (a window layer reads the last window + 1 keys: transformers' mask for the assistant is
            # |q - k| <= window, flipped to count back from the last key)
            layers.append(Gemma4DecoderLayer(tc, i, rotaries[kind], window + 1 if window else 0, src))
        self.layers = nn.ModuleList(layers)
        h = int(tc.hidden_size)
        self.norm = Gemma4RMSNorm(h, tc.rms_norm_eps)
        self.embed_tokens = nn.Embedding(int(tc.vocab_size), h)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = nn.Linear(h, int(tc.vocab_size), bias=False)
        self.tie_weights()
        self.pre_projection = nn.Linear(2 * backbone, h, bias=False)
        self.post_projection = nn.Linear(h, backbone, bias=False)
        self.masked_embedding = MaskedEmbedding(cfg, h, int(tc.vocab_size)) if cfg.use_ordered_embeddings else None
        self._target = (target,)  # not a submodule: its weights are the target's

    def tie_weights(self) -> None:
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def feature_size(self) -> int:
        """The width of the features it reads and gives (the target's hidden size)."""
        return self.backbone

    def attention_layers(self) -> list[PagedAttention]:
        return []  # (no cache of its own)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the normed output the LM head reads, the next draft's feature) of every row."""
        embeds = self._target[0].embed_input_ids(input_ids).to(feature.dtype)
        x = self.pre_projection(torch.cat([embeds, feature], dim=-1))
        for layer in self.layers:
            x = layer(positions, x, None, meta)
        normed = self.norm(x)
        return normed, self.post_projection(normed)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.masked_embedding is not None:
            return self.masked_embedding(hidden, self.lm_head.weight)
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def named() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = name.removeprefix("model.")
                if name == "masked_embedding.token_ordering":
                    with torch.no_grad():
                        self.masked_embedding.token_ordering.copy_(tensor.to(torch.long))
                    continue
                yield name, tensor

        LlamaForCausalLM.load_weights(self, named())


def load_gemma4_assistant(model_dir: str, target: Any, dtype: torch.dtype, device: torch.device,
                          max_positions: int, dummy: bool = False, seed: int = 0) -> Gemma4Assistant:
    from transformers import AutoConfig

    if not isinstance(target, Gemma4ForCausalLM):
        raise ValueError(f"speculative_config: a Gemma 4 assistant drafts for Gemma 4; the target is "
                         f"{type(target).__name__}.")
    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    head = build_empty(lambda: Gemma4Assistant(cfg, target, max_positions), dtype, device)
    head.tie_weights()  # (to_empty gave the two their own storage)
    if dummy:
        dummy_weights(head, seed)
    else:
        with whole_checkpoint():
            head.load_weights(iterate_safetensors(model_dir, dtype, device))
        check_finite(head)
    return head.eval().requires_grad_(False)
