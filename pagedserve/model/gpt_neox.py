"""GPT-NeoX (GPTNeoXForCausalLM: Pythia, GPT-NeoX-20B, and their fine-tunes).

- LayerNorms with biases (before attention, before the MLP, and the final one);
- one fused `query_key_value` projection whose rows are per head [heads, 3 (q, k, v), head_dim]:
  reordered at load into our fused q | k | v (all queries, then keys, then values);
- RoPE on the leading `rotary_pct` of each head (transformers reads it into
  rope_parameters["partial_rotary_factor"]; 0.25 in Pythia); multi-head attention only;
- `use_parallel_residual` True: h + attn(ln1(h)) + mlp(ln2(h)) (both norms of the same h);
  False: h' = h + attn(ln1(h)), then h' + mlp(ln2(h'));
- biases on every projection, a GELU MLP (dense_h_to_4h, dense_4h_to_h) without a gate;
- an untied output head `embed_out`."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.layers.norm import LayerNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, UpDownMLP


def mha_sizes(cfg: Any) -> SimpleNamespace:
    """The attention sizes of a multi-head model (every head its own k and v): LlamaAttention
    reads these, not a num_key_value_heads the config may carry without the model using it."""
    heads = cfg.num_attention_heads
    return SimpleNamespace(hidden_size=cfg.hidden_size, num_attention_heads=heads, num_key_value_heads=heads,
                           head_dim=cfg.hidden_size // heads)


def grouped_qkv_to_fused(t: torch.Tensor, groups: int, q_per_group: int) -> torch.Tensor:
    """Rows [groups, q_per_group + 2, head_dim] (each key/value group's query heads, then its key
    head, then its value head: Falcon's new decoder architecture) -> our q | k | v."""
    rest = t.shape[1:]
    g = t.reshape(groups, q_per_group + 2, t.shape[0] // (groups * (q_per_group + 2)), *rest)
    return torch.cat([g[:, :q_per_group].reshape(-1, *rest), g[:, -2].reshape(-1, *rest), g[:, -1].reshape(-1, *rest)])


def per_head_qkv_to_fused(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows [heads, 3, head_dim] (each head's q, k, v together) -> [3, heads, head_dim]."""
    return grouped_qkv_to_fused(t, heads, 1)


def reorder_qkv_rows(weights: Iterable[tuple[str, torch.Tensor]], piece: str, rows: int,
                     reorder: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint's tensors, those of the fused qkv projection named by `piece` with their
    `rows` rows reordered (weights, biases, and per-row quantization scales and zeros alike)."""
    for name, t in weights:
        rowwise = name.endswith(("weight", "bias", "weight_scale", "weight_zero"))
        if piece in name and rowwise and t.dim() >= 1 and t.shape[0] == rows:
            t = reorder(t)
        yield name, t


class LayerNormDecoderLayer(nn.Module):
    """Attention and an MLP, each after a LayerNorm with bias: GPT-NeoX's layer, and in its
    sequential form StarCoder 2's and GPT-2's. shared_norm (parallel only): one LayerNorm whose
    output both read (Phi, Falcon 7B)."""

    def __init__(self, hidden_size: int, eps: float, self_attn: nn.Module, mlp: nn.Module, parallel: bool,
                 shared_norm: bool = False, norm: Callable[[int, float], nn.Module] = LayerNorm) -> None:
        super().__init__()
        if shared_norm and not parallel:
            raise ValueError("a LayerNorm shared by attention and MLP needs them in parallel")
        self.self_attn = self_attn  # (positions, x, meta) -> x
        self.mlp = mlp
        self.input_layernorm = norm(hidden_size, eps)  # (norm: LayerNorm, or a variant of it)
        self.post_attention_layernorm = None if shared_norm else norm(hidden_size, eps)
        self.parallel = parallel

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        """The hidden state is x + residual (x alone before the first layer), as in llama.py."""
        h = x if residual is None else x + residual
        n = self.input_layernorm(h)
        attn = self.self_attn(positions, n, meta)
        if self.parallel:
            return attn + self.mlp(n if self.post_attention_layernorm is None else self.post_attention_layernorm(h)), h
        h = h + attn
        return self.mlp(self.post_attention_layernorm(h)), h


class GPTNeoXForCausalLM(LlamaForCausalLM):
    stacked_params = []  # (the checkpoint's qkv is fused already; its MLP has no gate)
    renamed = [("gpt_neox.", "model."), (".embed_in.", ".embed_tokens."),
               (".attention.query_key_value.", ".self_attn.qkv_proj."), (".attention.dense.", ".self_attn.o_proj."),
               (".mlp.dense_h_to_4h.", ".mlp.up_proj."), (".mlp.dense_4h_to_h.", ".mlp.down_proj."),
               (".final_layer_norm.", ".norm."), ("embed_out.", "lm_head.")]

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        bias = bool(getattr(cfg, "attention_bias", True))
        attn = LlamaAttention(mha_sizes(cfg), rotary, qkv_bias=bias, o_bias=bias, qk_norm=False, window=window)
        return LayerNormDecoderLayer(cfg.hidden_size, cfg.layer_norm_eps, attn, UpDownMLP(cfg, bias=True),
                                     parallel=bool(getattr(cfg, "use_parallel_residual", True)))

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._fused_qkv_order(weights))

    def _fused_qkv_order(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        heads = self.config.num_attention_heads
        # (old checkpoints' causal-mask buffers dropped)
        kept = ((n, t) for n, t in weights if not n.endswith((".attention.bias", ".attention.masked_bias")))
        return reorder_qkv_rows(kept, ".attention.query_key_value.", 3 * self.config.hidden_size,
                                lambda t: per_head_qkv_to_fused(t, heads))
