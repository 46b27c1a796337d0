"""Zyphra Zamba v1 (ZambaForCausalLM: Zamba-7B-v1): Zamba2's layout (model/zamba2.py) with one
shared transformer block (`shared_transf`; no adapters, no position encoding, a SwiGLU-style
gate/up MLP) and Mamba-1 layers whose channels split into n_mamba_heads heads, each with its own
x_proj / dt_proj (its own dt, B and C). Each head runs as a Mamba-1 mixer of its own
(layers/mamba1.py) on its slice of the channels, and the layer adds their output projections."""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.layers.mamba1 import Mamba1Mixer
from pagedserve.model.zamba2 import Zamba2ForCausalLM, Zamba2HybridLayer


class MambaHeads(nn.Module):
    """Zamba's multi-head Mamba-1: head h is a Mamba-1 mixer over channels [h * d, (h + 1) * d)
    (its in_proj rows for those channels and their gates, its out_proj columns; the layer's
    out_proj bias on head 0 alone), so the heads' outputs add up to the layer's."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        inner = int(cfg.mamba_expand * cfg.hidden_size)
        n = int(cfg.n_mamba_heads)
        self.head_dim = inner // n
        self.heads = nn.ModuleList(
            Mamba1Mixer(cfg.hidden_size, self.head_dim, int(cfg.mamba_d_state), int(cfg.mamba_d_conv),
                        int(cfg.mamba_dt_rank), bool(cfg.mamba_proj_bias), bool(cfg.mamba_conv_bias))
            for _ in range(n))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        out = self.heads[0](positions, x, meta)
        for head in self.heads[1:]:
            out = out + head(positions, x, meta)
        return out

    def split(self, part: str, t: torch.Tensor) -> list[torch.Tensor]:
        """The checkpoint's tensor `part` (of transformers' ZambaMambaMixer) as each head's."""
        n, d = len(self.heads), self.head_dim
        if part in ("in_proj.weight", "in_proj.bias"):
            # rows interleave the channels and their gates (x_0, z_0, x_1, z_1, ...): each head
            # takes its channels' x rows, then their z rows (Mamba1Mixer's [x, z])
            pairs = t.reshape(n, d, 2, *t.shape[1:])
            return [torch.cat([p[:, 0], p[:, 1]]) for p in pairs]
        if part == "out_proj.weight":
            return list(t.reshape(t.shape[0], n, d).unbind(1))
        if part == "out_proj.bias":
            return [t] + [torch.zeros_like(t)] * (n - 1)
        if part.startswith("conv1d."):
            return list(t.reshape(n, d, *t.shape[1:]).unbind(0))
        return list(t.unbind(0))  # (x_proj_weight, dt_proj_weight / _bias, A_log, D: [heads, ...])


# transformers' per-head names -> Mamba1Mixer's
_HEAD_NAMES = {"x_proj_weight": "x_proj.weight", "dt_proj_weight": "dt_proj.weight", "dt_proj_bias": "dt_proj.bias"}
_MAMBA = re.compile(r"^(model\.layers\.(\d+)\.(?:mamba_decoder\.)?mamba)\.(.*)$")


class ZambaForCausalLM(Zamba2ForCausalLM):
    shared_key = "shared_transf"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.hidden_mamba_act != "silu":
            raise ValueError(f"ZambaForCausalLM: hidden_mamba_act={cfg.hidden_mamba_act!r} is not supported (SiLU).")
        if int(cfg.attention_hidden_size) != 2 * cfg.hidden_size:
            raise ValueError("ZambaForCausalLM: attention_hidden_size must be 2 * hidden_size (the shared block "
                             "takes [hidden, embeddings]).")

    @classmethod
    def make_mixer(cls, cfg: Any) -> nn.Module:
        return MambaHeads(cfg)

    def state_layers(self) -> list[Mamba1Mixer]:
        return [head for mixer in super().state_layers() for head in mixer.heads]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._split_heads(weights))

    def _split_heads(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in weights:
            m = _MAMBA.match(name)
            if m is None:
                yield name, t
                continue
            layer = self.model.layers[int(m[2])]
            mixer = (layer.mamba_decoder if isinstance(layer, Zamba2HybridLayer) else layer).mamba
            part = _HEAD_NAMES.get(m[3], m[3])
            for h, piece in enumerate(mixer.split(part, t)):
                yield f"{m[1]}.heads.{h}.{part}", piece.contiguous()
