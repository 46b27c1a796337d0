"""Qwen3-Next / Qwen3.5's multi-token-prediction layer as a drafter (vLLM's "mtp", also
"qwen3_next_mtp"): their checkpoints hold `mtp_num_hidden_layers` (1) extra layers under
`mtp.`, trained to predict the token after next.

At position p it reads fc(concat(pre_fc_norm_embedding(embed(token p + 1)),
pre_fc_norm_hidden(feature p))), feature p being the target's final (normed) hidden state,
then one full-attention decoder layer of the target's kind (gated attention; experts for
Qwen3-Next and Qwen3.5-MoE, a SwiGLU MLP for Qwen3.5), then `mtp.norm`. That normed output is
both what the target's LM head reads and the feature of the next draft. Norms are
zero-centred, the embedding and LM head the target's. The target's own layers may keep states
(Gated DeltaNet): the runner steps them back past rejected drafts (StateMixer._verify_rows)."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.gemma import GemmaRMSNorm
from pagedserve.model.layers.rotary import make_rotary
from pagedserve.model.llama import LlamaForCausalLM, _head_dim
from pagedserve.model.loader import _checkpoint_keys, build_empty, check_finite, dummy_weights, iterate_safetensors
from pagedserve.model.mtp_base import MtpBase
from pagedserve.model.qwen3_next import HybridDecoderLayer
from pagedserve.model.qwen_moe import unstack_experts
from pagedserve.model.weights import whole_checkpoint

PREFIX = "mtp."


def num_mtp_layers(hf_config: Any) -> int:
    """Qwen3-Next / Qwen3.5's count of MTP layers (0: none, or not such a model)."""
    return int(getattr(hf_config, "mtp_num_hidden_layers", 0) or 0)


class QwenMtpDraft(MtpBase):
    def __init__(self, cfg: Any, target: nn.Module, max_positions: int) -> None:
        super().__init__(cfg, target)
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.pre_fc_norm_embedding, self.pre_fc_norm_hidden = GemmaRMSNorm(h, eps), GemmaRMSNorm(h, eps)
        self.fc = nn.Linear(2 * h, h, bias=False)
        rotary = make_rotary(cfg, _head_dim(cfg), max_positions)
        # (vLLM builds the layer as layer 0: experts wherever the first layer would have them)
        self.layers.append(HybridDecoderLayer(cfg, rotary, False, type(target).build_mlp(cfg, 0)))
        self.norm = GemmaRMSNorm(h, eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the LM head reads, the feature of the next pass) of every row: the same."""
        embeds = self._target[0].embed_input_ids(input_ids).to(feature.dtype)
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(feature)], dim=-1))
        x, residual = self.layers[0](positions, x, None, meta)
        out = self.norm(x + residual)
        return out, out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._target[0].compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        cfg = self.config
        if getattr(cfg, "num_experts", 0):  # (stacked experts, as the target's loader takes them)
            weights = unstack_experts(weights, cfg.hidden_size, cfg.moe_intermediate_size)
        LlamaForCausalLM.load_weights(self, weights)


def load_qwen_mtp(model_dir: str, hf_config: Any, target: nn.Module, dtype: torch.dtype, device: torch.device,
                  max_positions: int, dummy: bool = False, seed: int = 0) -> QwenMtpDraft:
    """The first MTP layer of a Qwen3-Next / Qwen3.5 checkpoint (model_dir), over the target."""
    if not dummy and not any(k.startswith(PREFIX) for k in _checkpoint_keys(model_dir)):
        raise ValueError("speculative_config: the checkpoint has no MTP layer weights (mtp.*), though config.json "
                         "has mtp_num_hidden_layers; it may have been saved without them.")
    draft = build_empty(lambda: QwenMtpDraft(hf_config, target, max_positions), dtype, device)
    if dummy:
        dummy_weights(draft, seed)
    else:
        def keep(name: str) -> bool:  # (the first layer only)
            return name.startswith(PREFIX) and (not name.startswith(PREFIX + "layers.")
                                                or name.startswith(PREFIX + "layers.0."))

        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in iterate_safetensors(model_dir, dtype, device, keep=keep):
                yield name[len(PREFIX):], tensor

        with whole_checkpoint():
            draft.load_weights(renamed())
        check_finite(draft)
    return draft.eval().requires_grad_(False)
