"""NVIDIA Nemotron-H (NemotronHForCausalLM: Nemotron-H 8B / 47B / 56B, Nemotron Nano 9B / 12B
v2): a stack of single-mixer blocks, each a pre-norm residual block holding one of a Mamba-2
layer (layers/mamba2.py), attention without any position encoding, or a gateless MLP (ReLU²),
in the order config.layer_types gives (the checkpoints' hybrid_override_pattern, "M", "*",
"-"). The mixture-of-experts blocks of Nemotron 3 ("E") are not supported."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.layers.attention import PagedAttention
from pagedserve.model.layers.mamba2 import Mamba2Dims, Mamba2Mixer
from pagedserve.model.layers.norm import RMSNorm, pre_norm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import ArceeForCausalLM, LlamaAttention, UpDownMLP

_KINDS = ("linear_attention", "full_attention", "mlp")


class NemotronHBlock(nn.Module):
    def __init__(self, cfg: Any, kind: str, dims: Optional[Mamba2Dims] = None) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        if kind == "linear_attention":
            self.mixer = Mamba2Mixer(dims or Mamba2Dims.nemotron(cfg))
        elif kind == "full_attention":
            self.mixer = LlamaAttention(cfg, None, qkv_bias=False, o_bias=False, qk_norm=False)
        else:
            self.mixer = UpDownMLP(cfg, act=cfg.mlp_hidden_act)

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        x, residual = pre_norm(self.norm, x, residual)
        return (self.mixer(x) if self.kind == "mlp" else self.mixer(positions, x, meta)), residual


class NemotronHForCausalLM(ArceeForCausalLM):  # (Arcee's: q/k/v fused, no gate to fuse with up_proj)
    renamed = [("backbone.", "model."), (".embeddings.", ".embed_tokens."), ("model.norm_f.", "model.norm.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        kinds = list(cfg.layer_types)
        if len(kinds) != cfg.num_hidden_layers or set(kinds) - set(_KINDS):
            raise ValueError(f"Nemotron-H layer_types {sorted(set(kinds))}: supported are Mamba-2 ('M'), attention "
                             "('*') and MLP ('-') blocks; mixture-of-experts blocks ('E', Nemotron 3) are not.")
        return NemotronHBlock(cfg, kinds[layer_idx])

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def attention_layers(self) -> list[PagedAttention]:
        return [b.mixer.attn for b in self.model.layers if b.kind == "full_attention"]

    def state_layers(self) -> list[Mamba2Mixer]:
        return [b.mixer for b in self.model.layers if b.kind == "linear_attention"]


class Mamba2ForCausalLM(NemotronHForCausalLM):
    """Mamba-2 language models (Codestral Mamba 7B, state-spaces/mamba2-*): Nemotron-H's Mamba-2
    block in every layer, no attention (the engine then holds no KV cache worth its name)."""

    renamed = NemotronHForCausalLM.renamed + [(".embedding.", ".embed_tokens.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        return NemotronHBlock(cfg, "linear_attention", Mamba2Dims.mamba2(cfg))
