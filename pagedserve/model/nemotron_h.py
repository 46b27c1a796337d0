"""NVIDIA Nemotron-H (NemotronHForCausalLM: Nemotron-H 8B / 47B / 56B, Nemotron Nano 9B / 12B
v2, Nemotron 3 Nano): a stack of single-mixer blocks, each a pre-norm residual block holding
one of a Mamba-2 layer (layers/mamba2.py), attention without any position encoding, a gateless
MLP (ReLU²), or (Nemotron 3) a mixture of gateless experts with DeepSeek-V3's grouped sigmoid
router, always-on shared experts and optionally a latent projection around the routed ones,
in the order config.layer_types gives (the checkpoints' hybrid_override_pattern, "M", "*",
"-", "E")."""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.hf_config import checked_layer_types
from pagedserve.model.layers.attention import PagedAttention
from pagedserve.model.layers.mamba2 import Mamba2Dims, Mamba2Mixer
from pagedserve.model.layers.moe import run_experts, select_grouped_experts
from pagedserve.model.layers.norm import RMSNorm, pre_norm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import ArceeForCausalLM, LlamaAttention, UpDownMLP

_KINDS = {"linear_attention": "Mamba-2, 'M'", "full_attention": "attention, '*'", "mlp": "MLP, '-'",
          "moe": "experts, 'E'"}


class UpDownExperts(nn.Module):
    """E gateless experts, down(act(up(x))) each (up_proj [E, I, H], down_proj [E, H, I]), on
    the PyTorch expert path (no fused kernel: decode steps then run without CUDA graphs)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, act: str) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        linear = nn.functional.linear
        return run_experts(x, weights, ids, self.num_experts,
                           lambda e, rows: linear(self.act(linear(rows, self.up_proj[e])), self.down_proj[e]))


class NemotronMoE(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        e = int(cfg.n_routed_experts)
        self.top_k, self.groups, self.topk_groups = cfg.num_experts_per_tok, int(cfg.n_group), int(cfg.topk_group)
        self.renormalize, self.scale = bool(cfg.norm_topk_prob), float(cfg.routed_scaling_factor)
        self.gate = nn.Linear(cfg.hidden_size, e, bias=False, dtype=torch.float32)  # (float32, as transformers)
        self.gate.e_score_correction_bias = nn.Parameter(torch.zeros(e, dtype=torch.float32), requires_grad=False)
        latent = getattr(cfg, "moe_latent_size", None)
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.fc1_latent_proj = nn.Linear(cfg.hidden_size, latent, bias=bias) if latent else None
        self.fc2_latent_proj = nn.Linear(latent, cfg.hidden_size, bias=bias) if latent else None
        self.experts = UpDownExperts(e, latent or cfg.hidden_size, cfg.moe_intermediate_size, cfg.mlp_hidden_act)
        self.shared_experts = UpDownMLP(cfg, act=cfg.mlp_hidden_act,
                                        intermediate_size=cfg.moe_shared_expert_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_grouped_experts(nn.functional.linear(x.float(), self.gate.weight), self.top_k,
                                              "sigmoid", self.groups, self.topk_groups,
                                              self.gate.e_score_correction_bias, self.renormalize, self.scale)
        h = self.fc1_latent_proj(x) if self.fc1_latent_proj is not None else x
        h = self.experts(h, weights, ids)
        if self.fc2_latent_proj is not None:
            h = self.fc2_latent_proj(h)
        return h + self.shared_experts(x)


_EXPERT = re.compile(r"^(?P<prefix>.*\.mixer\.experts)\.(?P<e>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")


class NemotronHBlock(nn.Module):
    """A pre-norm residual block around one mixer; `mixer` overrides the state layer (a Mamba-1
    one: model/mamba.py)."""

    def __init__(self, cfg: Any, kind: str, dims: Optional[Mamba2Dims] = None,
                 mixer: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        if mixer is not None:
            self.mixer = mixer
        elif kind == "linear_attention":
            self.mixer = Mamba2Mixer(dims or Mamba2Dims.nemotron(cfg))
        elif kind == "full_attention":
            self.mixer = LlamaAttention(cfg, None, qkv_bias=False, o_bias=False, qk_norm=False)
        elif kind == "moe":
            self.mixer = NemotronMoE(cfg)
        else:
            self.mixer = UpDownMLP(cfg, act=cfg.mlp_hidden_act)

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        x, residual = pre_norm(self.norm, x, residual)
        return (self.mixer(x) if self.kind in ("mlp", "moe") else self.mixer(positions, x, meta)), residual


class NemotronHForCausalLM(ArceeForCausalLM):  # (Arcee's: q/k/v fused, no gate to fuse with up_proj)
    renamed = [("backbone.", "model."), (".embeddings.", ".embed_tokens."), ("model.norm_f.", "model.norm.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        return NemotronHBlock(cfg, checked_layer_types(cfg, _KINDS, cls.__name__)[layer_idx])

    @property
    def cuda_graph_safe(self) -> bool:
        return not any(isinstance(m, UpDownExperts) for m in self.modules())  # (their path syncs with the host)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._stack_experts(weights))

    def _stack_experts(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Hub checkpoints hold each expert's up_proj / down_proj apart; ours are stacked."""
        pending: dict[str, dict[int, torch.Tensor]] = {}
        for name, t in weights:
            m = _EXPERT.match(name)
            if m is None:
                yield name, t
                continue
            key = f"{m['prefix']}.{m['proj']}"
            got = pending.setdefault(key, {})
            got[int(m["e"])] = t
            if len(got) == self.config.n_routed_experts:
                yield key, torch.stack([got[e] for e in range(len(got))])
                del pending[key]
        if pending:
            raise ValueError(f"checkpoint experts incomplete: {sorted(pending)}")

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
