"""Gemma 3n's pieces beside Gemma 4's attention and per-layer embeddings (model/gemma3n.py puts
them together), each computed as transformers' modeling_gemma3n.py does:

- AltUp: the hidden state kept as `altup_num_inputs` copies; before a layer each copy is
  predicted from all of them (coefficients routed from the active copy), only the active copy
  goes through the layer, and after it every copy is corrected by the layer's innovation;
- LAuReL: a low-rank residual (left, right, norm) beside the attention;
- the MLP with a Gaussian top-k on the gate (`activation_sparsity_pattern`): the gate minus
  mean + std * Phi^-1(sparsity) over its row, through a ReLU, before the activation;
- the "hard" multimodal token embeddings (`embed_vision`, `embed_audio` of the multimodal
  checkpoint): ids past the text vocabulary embedded by tables of their own, normed, projected."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagedserve.model.gemma4 import Gemma4RMSNorm, _rounded
from pagedserve.model.llama import LlamaMLP


class Gemma3nAltUp(nn.Module):
    """Predict and correct over the copies, laid out [copies, tokens, hidden]."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        n, h = int(cfg.altup_num_inputs), cfg.hidden_size
        self.n, self.active = n, int(cfg.altup_active_idx)
        self.correct_output_scale = nn.Parameter(torch.zeros(h))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(h, n, bias=False)
        self.router_norm = Gemma4RMSNorm(h, cfg.rms_norm_eps)
        self.router_input_scale = _rounded(h**-1.0)  # (a buffer in transformers, in the model dtype)

    def modalities(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.modality_router(self.router_norm(x) * self.router_input_scale)
        return torch.tanh(routed.float()).type_as(x)

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        """Copy a: h[a] + sum over b of coef[a, b] * h[b], the coefficients per token."""
        coefs = self.prediction_coefs(self.modalities(h[self.active])).view(-1, self.n, self.n)
        # (transformers' matmul over [tokens, hidden, copies] x [tokens, copies, copies])
        mixed = torch.matmul(h.permute(1, 2, 0), coefs.transpose(1, 2)).permute(2, 0, 1)
        return (mixed + h).type_as(h)

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        """Each copy plus (1 + its routed coefficient) times the active copy's innovation."""
        coefs = self.correction_coefs(self.modalities(activated)) + 1.0  # [tokens, copies]
        innovation = activated - predictions[self.active]
        return (innovation.unsqueeze(0) * coefs.t().unsqueeze(-1) + predictions).type_as(activated)

    def scale_corrected_output(self, x: torch.Tensor) -> torch.Tensor:
        return (x.type_as(self.correct_output_scale) * self.correct_output_scale).type_as(x)


class Gemma3nLaurel(nn.Module):
    """x + norm(right(left(x))): a rank-`laurel_rank` residual."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.linear_left = nn.Linear(cfg.hidden_size, cfg.laurel_rank, bias=False)
        self.linear_right = nn.Linear(cfg.laurel_rank, cfg.hidden_size, bias=False)
        self.post_laurel_norm = Gemma4RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


def std_multiplier(sparsity: float) -> float:
    """Phi^-1(sparsity) in float32 (torch's Normal(0, 1).icdf, as transformers takes it, written
    out: the model is built on the meta device), rounded to the model dtype."""
    p = torch.tensor(sparsity, dtype=torch.float32, device="cpu")
    return _rounded(float(torch.erfinv(2 * p - 1) * math.sqrt(2)))


class Gemma3nMLP(LlamaMLP):
    """The gated MLP of layer i: its own width (`intermediate_size` is a list), and with a
    sparsity above 0 the gate's Gaussian top-k before the activation."""

    def __init__(self, cfg: Any, i: int) -> None:
        super().__init__(cfg, intermediate_size=int(cfg.intermediate_size[i]), act=cfg.hidden_activation, bias=False)
        sparsity = float(cfg.activation_sparsity_pattern[i])
        self.std_multiplier = std_multiplier(sparsity) if sparsity > 0 else None

    def act_down(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.std_multiplier is None:
            return super().act_down(gate_up)
        gate, up = gate_up.split(self.intermediate, dim=-1)
        cutoff = gate.mean(-1, keepdim=True) + gate.std(-1, keepdim=True, unbiased=False) * self.std_multiplier
        return self.down_proj(self.act(torch.relu(gate - cutoff)) * up)


class Gemma3nHardEmbedder(nn.Module):
    """The multimodal checkpoint's embeddings of the token ids in [offset, offset + size) (image
    and audio markers past the text vocabulary): a table of their own, normed, projected to the
    hidden width and normed without a weight. (Its soft-token norm serves the towers' outputs,
    which are not loaded.)"""

    def __init__(self, offset: int, size: int, width: int, eps: float, hidden_size: int) -> None:
        super().__init__()
        self.offset, self.size = offset, size
        self.embedding = nn.Embedding(size, width)
        self.hard_embedding_norm = Gemma4RMSNorm(width, eps)
        self.embedding_projection = nn.Linear(width, hidden_size, bias=False)
        self.embedding_post_projection_norm = Gemma4RMSNorm(hidden_size, eps, scale=False)

    def merge(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x with the rows of this table's ids replaced (every row computed: no host sync)."""
        hit = (input_ids >= self.offset) & (input_ids < self.offset + self.size)
        ids = torch.where(hit, input_ids - self.offset, self.size - 1)
        emb = self.embedding_post_projection_norm(self.embedding_projection(self.hard_embedding_norm(
            self.embedding(ids))))
        return torch.where(hit.unsqueeze(-1), emb.to(x.dtype), x)
