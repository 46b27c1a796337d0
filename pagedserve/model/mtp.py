"""Multi-token-prediction layers as drafters (vLLM's speculative method "mtp", also spelled
"deepseek_mtp" / "glm4_moe_mtp" / "qwen3_next_mtp"; Qwen3-Next and Qwen3.5's layer, of another
form: model/qwen3_next_mtp.py): DeepSeek-V3 / R1, GLM-4.5 / 4.6 and GLM-4.7-Flash ship
`num_nextn_predict_layers` extra layers in their checkpoint, numbered from
num_hidden_layers on, trained to predict the token after next.

At position p such a layer reads eh_proj(concat(enorm(embed(token p + 1)), hnorm(feature p)))
(the token at position 0 masked to zeros, as vLLM does), where feature p is the target's final
(normed) hidden state; then one decoder layer of the target's own kind (latent attention and
experts for DeepSeek and GLM-4.7-Flash, GLM-4.5's layer for GLM-4.5); its output, unnormed,
is the feature of the next draft; its logits come from `shared_head` (a norm, then the
layer's own LM head, or the target's where the checkpoint has none). It drafts through the
EAGLE proposer (worker/eagle_proposer.py), as EAGLE-1 heads do. Only the first MTP layer
is used: drafts past the first chain it, as vLLM does with one layer."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.rotary import make_rotary
from pagedserve.model.llama import LlamaForCausalLM, LlamaModel, _head_dim
from pagedserve.model.loader import _checkpoint_keys, build_empty, check_finite, dummy_weights, iterate_safetensors
from pagedserve.model.mtp_base import MtpBase
from pagedserve.model.qwen3_next import Qwen3NextForCausalLM
from pagedserve.model.qwen3_next_mtp import load_qwen_mtp, num_mtp_layers
from pagedserve.model.weights import whole_checkpoint

MTP_METHODS = ("mtp", "deepseek_mtp", "glm4_moe_mtp", "qwen3_next_mtp")
# The MTP layer's own parts; every other tensor of the layer belongs to its decoder layer.
_OWN = ("embed_tokens.", "enorm.", "hnorm.", "eh_proj.", "shared_head.")


class MtpDraft(MtpBase):
    def __init__(self, cfg: Any, target: nn.Module, layer: nn.Module, own: set[str]) -> None:
        super().__init__(cfg, target)
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.enorm, self.hnorm = RMSNorm(h, eps), RMSNorm(h, eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.layers.append(layer)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(h, eps)
        self.shared_head.head = nn.Linear(h, cfg.vocab_size, bias=False) if "shared_head.head" in own else None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h) if "embed_tokens" in own else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the shared head reads, the feature of the next pass) of every row."""
        embeds = (self.embed_tokens(input_ids) if self.embed_tokens is not None
                  else self._target[0].embed_input_ids(input_ids)).to(feature.dtype)
        embeds = embeds.masked_fill((positions == 0)[:, None], 0.0)
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(feature)], dim=-1))
        x, residual = self.layers[0](positions, x, None, meta)
        out = x + residual
        return out, out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = self.shared_head.norm(hidden)
        head = self.shared_head.head
        return head(normed) if head is not None else self._target[0].compute_logits(normed)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        LlamaForCausalLM.load_weights(self, weights)


def load_mtp(model_dir: str, hf_config: Any, target: nn.Module, dtype: torch.dtype, device: torch.device,
             max_positions: int, dummy: bool = False, seed: int = 0) -> MtpDraft:
    """The first MTP layer of the target's checkpoint (model_dir), over the target."""
    if num_mtp_layers(hf_config) and isinstance(target, Qwen3NextForCausalLM):
        return load_qwen_mtp(model_dir, hf_config, target, dtype, device, max_positions, dummy, seed)
    n = int(getattr(hf_config, "num_nextn_predict_layers", 0) or 0)
    if n < 1:
        raise ValueError("speculative_config: method 'mtp' needs a model with multi-token-prediction layers "
                         "(num_nextn_predict_layers, or Qwen3-Next / Qwen3.5's mtp_num_hidden_layers, in "
                         "config.json); this one has none.")
    if not isinstance(getattr(target, "model", None), LlamaModel) or not hasattr(type(target), "make_layer"):
        raise ValueError(f"speculative_config: MTP layers of {type(target).__name__} are not supported.")
    prefix = f"model.layers.{hf_config.num_hidden_layers}."
    names = [k[len(prefix):] for k in _checkpoint_keys(model_dir) if k.startswith(prefix)] if not dummy else []
    if not names and not dummy:
        raise ValueError(f"speculative_config: the checkpoint has no MTP layer weights ({prefix}*), though "
                         "config.json has num_nextn_predict_layers; it may have been saved without them.")
    own = {part for part in ("embed_tokens", "shared_head.head") if any(k.startswith(part + ".") for k in names)}
    def make() -> MtpDraft:
        rotary = make_rotary(hf_config, _head_dim(hf_config), max_positions)
        layer = type(target).make_layer(hf_config, rotary, hf_config.num_hidden_layers, 0)
        return MtpDraft(hf_config, target, layer, own)

    draft = build_empty(make, dtype, device)
    if dummy:
        dummy_weights(draft, seed)
    else:
        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in iterate_safetensors(model_dir, dtype, device, keep=lambda k: k.startswith(prefix)):
                name = name[len(prefix):]
                yield (name if name.startswith(_OWN) else "layers.0." + name), tensor

        with whole_checkpoint():
            draft.load_weights(renamed())
        check_finite(draft)
    return draft.eval().requires_grad_(False)
