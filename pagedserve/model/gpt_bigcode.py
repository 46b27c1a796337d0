"""GPT-BigCode (GPTBigCodeForCausalLM: StarCoder 1, SantaCoder, WizardCoder): GPT-2's layout
(model/gpt2.py: learned positions, LayerNorms with biases, a GELU MLP c_fc / c_proj, names under
"transformer.", the head tied to wte) with

- plain nn.Linear projections (weights [out, in]: nothing transposed);
- multi-query attention (`multi_query`, the released models): c_attn gives all query heads,
  then one key head and one value head, which every query head shares;
- without multi_query, c_attn's rows per head [heads, 3, head_dim] (as GPT-NeoX's), reordered
  at load into q | k | v;
- a gelu_pytorch_tanh MLP by default."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Iterable, Iterator

import torch

from pagedserve.model.gpt2 import GPT2LMHeadModel
from pagedserve.model.gpt_neox import per_head_qkv_to_fused


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    conv1d = False

    @classmethod
    def attn_sizes(cls, cfg: Any) -> SimpleNamespace:
        heads = cfg.num_attention_heads
        return SimpleNamespace(hidden_size=cfg.hidden_size, num_attention_heads=heads,
                               num_key_value_heads=1 if getattr(cfg, "multi_query", True) else heads,
                               head_dim=cfg.hidden_size // heads)

    def checkpoint_layout(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        heads, per_head = self.config.num_attention_heads, not getattr(self.config, "multi_query", True)
        for name, t in super().checkpoint_layout(weights):
            if name == "transformer.bias":  # an old checkpoint's causal-mask buffer
                continue
            if per_head and ".attn.c_attn." in name and name.endswith(("weight", "bias")):
                t = per_head_qkv_to_fused(t, heads)
            yield name, t
