"""Zyphra Zamba2 (Zamba2ForCausalLM: Zamba2-1.2B / 2.7B / 7B): Mamba-2 layers (layers/mamba2.py),
each a pre-norm residual block; at config.hybrid_layer_ids a shared transformer block runs
first on [hidden state, the token embeddings] (attention, then a gated MLP, no residual inside),
and its output, through a linear map of the layer's own, is added to the Mamba layer's input
(not to its residual). The num_mem_blocks shared blocks take turns over the hybrid layers;
each invocation adds its own low-rank adapters to the block's q/k/v (use_shared_attention_adapter)
and gate/up projections, and keeps its own KV cache (its inputs differ). transformers shares the
blocks only with tie_word_embeddings; without it each hybrid layer has a block of its own, and
so here."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.hf_config import checked_layer_types
from pagedserve.model.layers.attention import PagedAttention
from pagedserve.model.layers.mamba2 import Mamba2Dims, Mamba2Mixer
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.rotary import RotaryEmbedding, make_rotary
from pagedserve.model.llama import LlamaForCausalLM, LlamaMLP

_KINDS = {"linear_attention": "Mamba", "hybrid": "shared transformer block, then Mamba"}


def check_config(cfg: Any) -> None:
    """Refuse, by field, what Zamba2ForCausalLM does not implement."""
    if getattr(cfg, "use_long_context", False):
        raise ValueError("Zamba2ForCausalLM: use_long_context (a rescaled RoPE base in some transformers versions, "
                         "none in others) is not supported.")
    if getattr(cfg, "use_shared_mlp_adapter", True) is False:
        raise ValueError("Zamba2ForCausalLM: use_shared_mlp_adapter=False is not supported (transformers and "
                         "vLLM always apply the shared MLP's adapters).")
    if cfg.use_shared_attention_adapter and cfg.num_key_value_heads != cfg.num_attention_heads:
        raise ValueError("Zamba2ForCausalLM: use_shared_attention_adapter with num_key_value_heads != "
                         "num_attention_heads (the adapters' outputs are attention_hidden_size wide) is not supported.")
    if int(cfg.attention_head_dim) * int(cfg.num_attention_heads) != 2 * cfg.hidden_size:
        raise ValueError("Zamba2ForCausalLM: attention_head_dim * num_attention_heads must be 2 * hidden_size.")


def mamba_dims(cfg: Any) -> Mamba2Dims:
    """transformers' Zamba2MambaMixer: a conv bias always, its gated norm's eps fixed at 1e-5, dt
    clamped from time_step_min up."""
    inner = int(cfg.mamba_expand * cfg.hidden_size)
    heads = int(cfg.n_mamba_heads)
    return Mamba2Dims(cfg.hidden_size, heads, inner // heads, int(cfg.mamba_ngroups), int(cfg.mamba_d_state),
                      int(cfg.mamba_d_conv), bool(cfg.add_bias_linear), True, 1e-5,
                      (float(cfg.time_step_min), math.inf), "silu")


class Zamba2MambaLayer(nn.Module):
    """h + mamba(norm(h + injected)): the shared block's output enters the norm, not the residual."""

    def __init__(self, cfg: Any, mixer: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mamba = mixer

    def forward(self, positions: torch.Tensor, h: torch.Tensor, meta: AttentionMetadata,
                injected: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = h if injected is None else h + injected
        return h + self.mamba(positions, self.input_layernorm(x), meta)


class SharedAttention(nn.Module):
    """The shared q/k/v and output projections (no biases); attention itself is per invocation."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        self.head_dim = int(cfg.attention_head_dim)
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(2 * cfg.hidden_size, q + 2 * kv, bias=False)
        self.qkv_proj.shard_offsets = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=False)


class SharedBlock(nn.Module):
    """One shared transformer block's weights (checkpoint: layers.<first user>.shared_transformer)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(2 * cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SharedAttention(cfg)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = LlamaMLP(cfg, act=cfg.hidden_act, bias=bool(getattr(cfg, "add_bias_linear", False)))


def _adapter(dim_in: int, rank: int, dim_out: int) -> nn.Sequential:
    """down then up (the checkpoint's `<i>.0` / `<i>.1`)."""
    return nn.Sequential(nn.Linear(dim_in, rank, bias=False), nn.Linear(rank, dim_out, bias=False))


class Zamba2HybridLayer(nn.Module):
    """One invocation of shared block `block`: its adapters, KV cache, output linear, and the
    Mamba layer that follows."""

    def __init__(self, cfg: Any, block: int, mixer: nn.Module) -> None:
        super().__init__()
        self.block = block
        h2, rank = 2 * cfg.hidden_size, int(getattr(cfg, "adapter_rank", 0))  # (Zamba v1: no adapters)
        heads, kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        head_dim = int(cfg.attention_head_dim)
        self.qkv_adapters = (nn.ModuleList(_adapter(h2, rank, h2) for _ in range(3))
                             if getattr(cfg, "use_shared_attention_adapter", False) else None)
        self.mlp_adapter = _adapter(cfg.hidden_size, rank, 2 * int(cfg.intermediate_size)) if rank else None
        # (head_dim / 2) ** -0.5: transformers' scale (the head's input is twice the hidden width)
        self.attn = PagedAttention(heads, kv_heads, head_dim, (head_dim / 2) ** -0.5)
        self.linear = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.mamba_decoder = Zamba2MambaLayer(cfg, mixer)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, embeds: torch.Tensor, shared: SharedBlock,
                rotary: Optional[RotaryEmbedding], meta: AttentionMetadata) -> torch.Tensor:
        x = shared.input_layernorm(torch.cat([h, embeds], dim=-1))
        sa = shared.self_attn
        qkv = sa.qkv_proj(x)
        if self.qkv_adapters is not None:
            qkv = qkv + torch.cat([a(x) for a in self.qkv_adapters], dim=-1)
        t = x.shape[0]
        q, k, v = qkv.split([sa.num_heads * sa.head_dim, sa.num_kv_heads * sa.head_dim,
                             sa.num_kv_heads * sa.head_dim], dim=-1)
        q, k = q.view(t, sa.num_heads, sa.head_dim), k.view(t, sa.num_kv_heads, sa.head_dim)
        if rotary is not None:
            q, k = rotary(positions, q, k)
        out = sa.o_proj(self.attn(q, k, v.view(t, sa.num_kv_heads, sa.head_dim), meta))
        y = shared.pre_ff_layernorm(out)
        mlp = shared.feed_forward
        gate_up = mlp.gate_up_proj(y)
        if self.mlp_adapter is not None:
            gate_up = gate_up + self.mlp_adapter(y)
        out = self.linear(mlp.act_down(gate_up))
        return self.mamba_decoder(positions, h, meta, injected=out)


class Zamba2Model(nn.Module):
    """make_mixer(cfg): each layer's Mamba mixer (Mamba-2 here; Zamba v1's, model/zamba.py)."""

    def __init__(self, cfg: Any, max_positions: int, make_mixer: Callable[[Any], nn.Module], arch: str) -> None:
        super().__init__()
        types = checked_layer_types(cfg, _KINDS, arch)
        hybrid = [i for i, kind in enumerate(types) if kind == "hybrid"]
        tied = bool(getattr(cfg, "tie_word_embeddings", True))  # (transformers ties the blocks only then)
        blocks = min(int(getattr(cfg, "num_mem_blocks", 1)), len(hybrid)) if tied else len(hybrid)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(SharedBlock(cfg) for _ in range(blocks))
        self.layers = nn.ModuleList(Zamba2HybridLayer(cfg, hybrid.index(i) % blocks, make_mixer(cfg))
                                    if kind == "hybrid" else Zamba2MambaLayer(cfg, make_mixer(cfg))
                                    for i, kind in enumerate(types))
        self.hybrid_layer_ids = hybrid
        # The layer whose checkpoint copy of each block counts (transformers keeps the first one's).
        self.block_source = hybrid[:blocks]
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        rope = getattr(cfg, "use_mem_rope", False)
        self.rotary = make_rotary(cfg, int(cfg.attention_head_dim), max_positions) if rope else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        h = embeds
        for layer in self.layers:
            if isinstance(layer, Zamba2HybridLayer):
                h = layer(positions, h, embeds, self.blocks[layer.block], self.rotary, meta)
            else:
                h = layer(positions, h, meta)
        return self.final_layernorm(h)


# Invocation i's adapters, stored inside its block's adapter lists at index i.
_ADAPTER = re.compile(r"^(self_attn\.linear_([qkv])_adapter_list|feed_forward\.gate_up_proj_adapter_list)"
                      r"\.(\d+)\.(.*)$")


class Zamba2ForCausalLM(LlamaForCausalLM):
    shared_key = "shared_transformer"  # a shared block's tensors: under each hybrid layer using it, or the first

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        check_config(cfg)

    @classmethod
    def make_mixer(cls, cfg: Any) -> nn.Module:
        return Mamba2Mixer(mamba_dims(cfg))

    def __init__(self, cfg: Any, max_positions: int) -> None:
        nn.Module.__init__(self)
        self.check_config(cfg)
        self.config = cfg
        self.model = Zamba2Model(cfg, max_positions, self.make_mixer, type(self).__name__)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: Optional[torch.Tensor] = None, deepstack: Any = None) -> torch.Tensor:
        return self.model(input_ids, positions, meta, inputs_embeds=inputs_embeds)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.attn for layer in self.model.layers if isinstance(layer, Zamba2HybridLayer)]

    def state_layers(self) -> list[nn.Module]:
        return [(layer.mamba_decoder if isinstance(layer, Zamba2HybridLayer) else layer).mamba
                for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._our_names(weights))

    def _our_names(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        hybrid, source = self.model.hybrid_layer_ids, self.model.block_source
        shared = re.compile(rf"^model\.layers\.(\d+)\.{self.shared_key}\.(.*)$")
        for name, t in weights:
            m = shared.match(name)
            if m is None:
                yield name, t
                continue
            layer, rest = int(m[1]), m[2]
            if layer not in hybrid:
                raise ValueError(f"{name}: layer {layer} is not a hybrid layer")
            a = _ADAPTER.match(rest)
            if a is None:
                if layer in source:  # (else a tied copy: the first user's counts)
                    yield f"model.blocks.{self.model.layers[layer].block}.{rest}", t
                continue
            i = int(a[3])
            if i >= len(hybrid):
                raise ValueError(f"{name}: adapter {i} of {len(hybrid)} invocations")
            if layer != source[self.model.layers[hybrid[i]].block]:
                continue  # (a tied copy, or an adapter slot of an untied block that its layer does not use)
            where = f"qkv_adapters.{'qkv'.index(a[2])}" if a[2] else "mlp_adapter"
            yield f"model.layers.{hybrid[i]}.{where}.{a[4]}", t
