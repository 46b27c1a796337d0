"""EAGLE draft heads (vLLM's speculative methods "eagle" and "eagle3"): one or a few decoder
layers that draft the target's next tokens from its hidden states.

EAGLE-1 (Li et al. 2024; checkpoints such as yuhuili/EAGLE-LLaMA3-Instruct-8B): at position
p the head reads fc(concat(embed(token p+1), feature p)), where feature p is the target's
final (normed) hidden state at p; its first layer has no input norm; the layers' output (the
residual stream, no final norm) goes to the target's LM head, and is the feature of the next
draft pass.

EAGLE-3 (Li et al. 2025; e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B): the feature is
fc(concat of the hidden states entering three target layers: by default 2, L // 2 and L - 3);
the first layer's attention reads concat(input_layernorm(embed), hidden_norm(feature)), with
the feature as its residual; a final norm, then the head's own LM head over a smaller draft
vocabulary (`d2t` maps draft ids to target ids: target = draft + d2t[draft]). Its output
before the final norm is the feature of the next pass. Heads may read another number of
target layers, and carry vLLM's variants: `norm_before_fc` (an RMSNorm `input_norm` over
the concatenated states), `fc_norm` (one per target layer), `norm_output` (the normed
output as the next feature). Heads saved by `speculators` are read by
model/speculators.py.

Both share the target's token embeddings unless the checkpoint has its own, and EAGLE-1 the
target's LM head unless the checkpoint has one."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.layers.attention import PagedAttention
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.rotary import make_rotary
from pagedserve.model.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel, _head_dim
from pagedserve.model.loader import _checkpoint_keys, build_empty, check_finite, dummy_weights, iterate_safetensors
from pagedserve.model.weights import whole_checkpoint

EAGLE_METHODS = ("eagle", "eagle3")


def aux_layer_ids(draft_cfg: Any, num_target_layers: int) -> tuple[int, ...]:
    """The target layers whose input hidden states EAGLE-3 reads: the checkpoint's
    `eagle_aux_hidden_state_layer_ids` (top level or in `eagle_config`), else vLLM's default
    three (2, L // 2, L - 3)."""
    ids = getattr(draft_cfg, "eagle_aux_hidden_state_layer_ids", None) or _eagle_field(
        draft_cfg, "eagle_aux_hidden_state_layer_ids")
    if ids is None:
        ids = (2, num_target_layers // 2, num_target_layers - 3)
    ids = tuple(int(i) for i in ids)
    if not ids or not all(0 <= i < num_target_layers for i in ids):
        raise ValueError(f"speculative_config: EAGLE-3 reads target layers in [0, {num_target_layers}), "
                         f"got {list(ids)}.")
    return ids


def _eagle_field(cfg: Any, name: str, default: Any = None) -> Any:
    """A head setting from its `eagle_config` object, else from the top level."""
    eagle = getattr(cfg, "eagle_config", None) or {}
    return eagle.get(name, getattr(cfg, name, default))


class Eagle3Layer(LlamaDecoderLayer):
    """EAGLE-3's first layer: attention over [normed embeddings, normed feature] (2 x hidden
    inputs), the feature as the residual stream."""

    def __init__(self, cfg: Any, rotary: Any) -> None:
        bias = bool(getattr(cfg, "attention_bias", False))
        super().__init__(cfg, rotary, {"qkv_bias": bias, "o_bias": bias, "qk_norm": False}, LlamaMLP(cfg))
        attn = self.self_attn
        old = attn.qkv_proj
        attn.qkv_proj = nn.Linear(2 * cfg.hidden_size, old.out_features, bias=old.bias is not None)
        attn.qkv_proj.shard_offsets = old.shard_offsets
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_before_residual = bool(getattr(cfg, "norm_before_residual", False))

    def forward_eagle(self, positions: torch.Tensor, embeds: torch.Tensor, feature: torch.Tensor,
                      meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.hidden_norm(feature)
        residual = normed if self.norm_before_residual else feature
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class EagleDraft(nn.Module):
    """The head over a target model (whose embeddings, and for EAGLE-1 LM head, it may share:
    held outside this module's parameters)."""

    stacked_params = LlamaForCausalLM.stacked_params
    renamed: list[tuple[str, str]] = []
    tie_word_embeddings = False
    cuda_graph_safe = False  # its passes run eagerly (they take the feature beside the tokens)

    def __init__(self, cfg: Any, target: nn.Module, version: int, max_positions: int,
                 own: set[str], fc_bias: bool, num_aux: int = 3) -> None:
        super().__init__()
        self.config, self.version = cfg, version
        hidden = cfg.hidden_size
        rotary = make_rotary(cfg, _head_dim(cfg), max_positions)
        n = int(cfg.num_hidden_layers)
        bias = bool(getattr(cfg, "attention_bias", False))
        options = {"qkv_bias": bias, "o_bias": bias, "qk_norm": False}
        if version == 1:
            self.fc = nn.Linear(2 * hidden, hidden, bias=fc_bias)
            layers = [LlamaDecoderLayer(cfg, rotary, options, LlamaMLP(cfg)) for _ in range(n)]
            layers[0].input_layernorm = nn.Identity()  # EAGLE-1 reads fc's output unnormed
            self.norm = None
        else:
            target_hidden = int(getattr(cfg, "target_hidden_size", None) or hidden)
            eps = cfg.rms_norm_eps
            # Variants (vLLM's, from speculators heads): one norm over the concatenated hidden
            # states before fc, or one per target layer; the normed output as the next feature.
            self.input_norm = RMSNorm(num_aux * target_hidden, eps) if _eagle_field(cfg, "norm_before_fc") else None
            self.fc_norm = (nn.ModuleList(RMSNorm(target_hidden, eps) for _ in range(num_aux))
                            if getattr(cfg, "fc_norm", False) else None)
            self.norm_output = bool(getattr(cfg, "norm_output", False))
            self.fc = nn.Linear(num_aux * target_hidden, hidden, bias=fc_bias)
            layers = [Eagle3Layer(cfg, rotary)] + [LlamaDecoderLayer(cfg, rotary, options, LlamaMLP(cfg))
                                                   for _ in range(n - 1)]
            self.norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(layers)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, hidden) if "embed_tokens" in own else None
        draft_vocab = int(getattr(cfg, "draft_vocab_size", None) or cfg.vocab_size)
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False) if "lm_head" in own or version == 3 else None
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long) if "d2t" in own else None)
        # The target id of each draft-vocabulary logit (set_target_ids, once d2t is loaded).
        self.register_buffer("target_ids", None, persistent=False)
        self._target = (target,)  # not a submodule: its weights are the target's

    @property
    def vocab_size(self) -> int:
        """The target's vocabulary (logits come back over it)."""
        return int(self._target[0].config.vocab_size)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            return self.embed_tokens(input_ids)
        return self._target[0].embed_input_ids(input_ids)

    def combine(self, features: torch.Tensor) -> torch.Tensor:
        """The target's features as the first pass reads them (EAGLE-3: fc of the three
        layers' hidden states; EAGLE-1: the final hidden states as they are)."""
        if self.version == 1:
            return features
        if self.input_norm is not None:
            features = self.input_norm(features)
        if self.fc_norm is not None:
            parts = features.chunk(len(self.fc_norm), dim=-1)
            features = torch.cat([norm(p) for norm, p in zip(self.fc_norm, parts)], dim=-1)
        return self.fc(features)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the LM head reads, the feature of the next pass) of every row."""
        embeds = self.embed(input_ids).to(feature.dtype)
        if self.version == 1:
            x, residual = self.fc(torch.cat([embeds, feature], dim=-1)), None
            layers = self.layers
        else:
            x, residual = self.layers[0].forward_eagle(positions, embeds, feature, meta)
            layers = self.layers[1:]
        for layer in layers:
            x, residual = layer(positions, x, residual, meta)
        if self.norm is None:
            out = x + residual
            return out, out
        normed, pre = self.norm(x, residual)
        return normed, normed if self.norm_output else pre

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the target's vocabulary (draft-vocabulary heads: -inf elsewhere)."""
        if self.lm_head is None:
            return self._target[0].compute_logits(hidden)
        logits = self.lm_head(hidden)
        if self.target_ids is None:
            return logits
        full = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        full[:, self.target_ids] = logits
        return full

    def set_target_ids(self) -> None:
        """A draft-vocabulary head's logit j is target token j + d2t[j] (j without d2t)."""
        if self.lm_head is None or (self.d2t is None and self.lm_head.out_features == self.vocab_size):
            return
        ids = torch.arange(self.lm_head.out_features, device=self.lm_head.weight.device)
        self.target_ids = ids if self.d2t is None else ids + self.d2t

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def named() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = name.removeprefix("model.").replace("midlayer.", "layers.0.")
                if name == "t2d" or (name.startswith("embed_tokens.") and self.embed_tokens is None):
                    continue
                if self.version == 1 and name.startswith("layers.0.input_layernorm."):
                    continue  # (some EAGLE-1 checkpoints keep the norm the head does not use)
                if name == "d2t":
                    with torch.no_grad():
                        self.d2t.copy_(tensor.to(torch.long))
                    continue
                yield name, tensor

        LlamaForCausalLM.load_weights(self, named())


def eagle_version(method: str, draft_cfg: Any) -> int:
    archs = " ".join(getattr(draft_cfg, "architectures", None) or [])
    if method == "eagle3" or "Eagle3" in archs:
        return 3
    return 1


def load_eagle(model_dir: str, draft_cfg: Any, method: str, target: nn.Module, dtype: torch.dtype,
               device: torch.device, max_positions: int, dummy: bool = False, seed: int = 0) -> EagleDraft:
    """The head of `model_dir` over `target`; for EAGLE-3 the target is set to return the
    hidden states its head reads (LlamaModel.aux_layers)."""
    version = eagle_version(method, draft_cfg)
    base = getattr(target, "model", None)
    if not isinstance(base, LlamaModel) or not hasattr(target, "embed_input_ids"):
        raise ValueError(f"speculative_config: EAGLE heads draft for Llama-family decoders; the target is "
                         f"{type(target).__name__}.")
    if version == 3 and type(base).forward is not LlamaModel.forward:
        raise ValueError(f"speculative_config: EAGLE-3 reads hidden states {type(target).__name__} does not give.")
    target_cfg = target.config
    target_hidden = int(getattr(draft_cfg, "target_hidden_size", None) or draft_cfg.hidden_size)
    if target_hidden != target_cfg.hidden_size:
        raise ValueError(f"speculative_config: the EAGLE head was made for a hidden size of {target_hidden}, the "
                         f"target's is {target_cfg.hidden_size}.")
    if version == 1 and draft_cfg.hidden_size != target_cfg.hidden_size:
        raise ValueError("speculative_config: an EAGLE-1 head has the target's hidden size.")
    if int(draft_cfg.vocab_size) != int(target_cfg.vocab_size):
        raise ValueError(f"speculative_config: the EAGLE head's vocab_size ({draft_cfg.vocab_size}) is not the "
                         f"target's ({target_cfg.vocab_size}).")
    aux = aux_layer_ids(draft_cfg, len(base.layers)) if version == 3 else ()
    names = set(_checkpoint_keys(model_dir))
    own = {part for part in ("embed_tokens", "lm_head", "d2t")
           if any(n.removeprefix("model.").startswith(part) for n in names)}
    head = build_empty(lambda: EagleDraft(draft_cfg, target, version, max_positions, own, "fc.bias" in names,
                                          len(aux)), dtype, device)
    if dummy:  # vLLM's load_format="dummy" covers the head too
        dummy_weights(head, seed)
        if head.d2t is not None:
            head.d2t.zero_()
    else:
        with whole_checkpoint():
            head.load_weights(iterate_safetensors(model_dir, dtype, device))
        check_finite(head)
    head.set_target_ids()
    if version == 3:
        base.aux_layers = aux
    return head.eval().requires_grad_(False)
