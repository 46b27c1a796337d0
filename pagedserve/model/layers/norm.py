"""RMSNorm computed as Hugging Face does (in float32, weight applied after casting back); on
the Triton path one fused kernel (pagedserve/ops/rms_norm.py) does the residual add too."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pagedserve.ops.reference import rms_norm_ref


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.use_triton = False  # set by the model runner with the Triton backend

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """Without residual: norm(x). With it: (norm(x + residual), x + residual), the pre-norm
        residual stream of a decoder layer in one call."""
        if self.use_triton and x.dim() == 2:  # per-head norms (Qwen3's q/k) stay on PyTorch
            from pagedserve.ops.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        return rms_norm_ref(x, self.weight, self.eps, residual)


class ResidualNorm(nn.Module):
    """A norm that also takes the residual stream, as RMSNorm does: with it,
    (norm(x + residual), x + residual). Subclasses give `normalize`."""

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is not None:
            x = x + residual
            return self.normalize(x), x
        return self.normalize(x)


def pre_norm(norm: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's input norm over the residual stream x + residual (x alone before the
    first layer): (normed, new residual)."""
    if residual is None:
        return norm(x), x
    return norm(x, residual)


class LayerNorm(ResidualNorm):
    """torch's LayerNorm (mean-centred, weight and bias) taking the residual stream as RMSNorm
    does (GPT-NeoX, Phi, StarCoder 2, GPT-2): the same computation as transformers' nn.LayerNorm,
    in the model dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.eps = eps

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def unbiased_layer_norm(hidden_size: int, eps: float) -> LayerNorm:
    """A LayerNorm with a weight and no bias (MPT's, DBRX's)."""
    return LayerNorm(hidden_size, eps, bias=False)


class LayerNorm1P(LayerNorm):
    """LayerNorm whose stored weight is an offset from 1 (weight + 1 applied: Nemotron's)."""

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, self.weight.shape, self.weight + 1.0, self.bias, self.eps)


class NonParametricLayerNorm(ResidualNorm):
    """LayerNorm without weight or bias, computed in float32 and cast back (OLMo 1's)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x.float(), (self.hidden_size,), eps=self.eps).to(x.dtype)
