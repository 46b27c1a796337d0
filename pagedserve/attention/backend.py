"""The attention backend interface and the per-step metadata every backend reads.

A step is one flat batch of tokens from many requests, decode requests (one query token)
first, then prefill chunks. Each request's keys/values live in the paged cache, reached
through its row of `block_tables`; the step's own new K/V are written there first, by
`slot_mapping` (slot = block_id * block_size + offset, -1 = skip)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

import torch


FP8_KV = torch.float8_e4m3fn
FP8_KV_MAX = 448.0  # e4m3's largest finite value: K/V beyond it saturate (scale 1, as vLLM's default)


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """K/V as the cache stores them: FP8 saturates instead of overflowing to NaN."""
    if cache_dtype == FP8_KV:
        return x.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(cache_dtype)
    return x.to(cache_dtype)


def first_visible(pos, window: int):
    """The first key a query at position `pos` (an int or a tensor) sees: window > 0, the
    last `window` keys (sliding window); window < 0, those of its chunk of -window positions,
    chunks aligned to position 0 (chunked local attention, Llama 4); 0, all of them."""
    if window > 0:
        return pos - window + 1
    if window < 0:
        return pos - pos % -window
    return pos * 0


@dataclass
class StateRows:
    """Which row of the recurrent-state tensors (linear-attention layers: model/layers/gated_delta.py)
    each request of a step owns, and whether it continues from that row (it has computed tokens
    before this step) or starts from zeros."""

    rows: torch.Tensor  # [num_reqs] int64
    init: torch.Tensor  # [num_reqs] of the step's dtype: 1 continues, 0 starts fresh
    rows_cpu: list[int]  # host copies; empty in a CUDA graph's metadata
    init_cpu: list[bool]
    # Prefix caching (engine/state_cache.py): request index -> [(position inside its prefill
    # chunk, snapshot slot)]: the state before that position is saved there.
    keep: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    # Speculative decoding: the `verify` requests after the decode rows check drafts (their
    # last token, then the drafts). Their tokens run one at a time and the state after each
    # but the last is kept (StateMixer.verify_slots), so that the runner can step a request
    # back to its last accepted token.
    verify: int = 0

    def first_all_continue(self, n: int) -> bool:
        """Whether the host knows that the first n requests all continue their states."""
        return len(self.init_cpu) >= n and all(self.init_cpu[:n])


@dataclass
class AttentionMetadata:
    num_tokens: int  # tokens in the flat batch (padding included, for CUDA graphs)
    num_actual_tokens: int  # real tokens; those after them are padding with slot -1
    num_reqs: int
    num_decodes: int  # the first num_decodes requests have exactly one query token
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [num_reqs] int32: context length after this step
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    max_query_len: int
    max_seq_len: int
    # Host copies, for backends that loop over requests.
    seq_lens_cpu: list[int]
    query_start_loc_cpu: list[int]
    block_size: int
    # [num_tokens] int32: keys each query token sees, where some see past themselves (tokens of
    # one image attend to each other both ways: Gemma 3); None: causal, its position + 1.
    # Only prefill chunks carry such rows, and a chunk never ends inside such an image.
    kv_limit: Optional[torch.Tensor] = None
    # Models with linear-attention layers: each request's state row; None in a profiling pass
    # (every request then starts from zeros and nothing is kept).
    states: Optional[StateRows] = None
    # The rows whose outputs are read (sampled, logprobs), with the metadata of those rows alone
    # as one-token queries over their requests' caches: layers past which only those rows
    # matter run on them alone (Gemma 4's KV-sharing layers: kv_sharing_fast_prefill).
    needed: Optional["NeededRows"] = None

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


@dataclass
class NeededRows:
    rows: torch.Tensor  # [R] int64, ascending
    meta: AttentionMetadata  # R one-token queries: each row at its position over its request's keys


class AttentionBackend(ABC):
    """Writes a step's new K/V into the paged cache and attends over it."""

    name: str = "base"
    fuses_rope: bool = False  # has write_kv_rope: RoPE and the KV write in one kernel

    def write_kv_rope(
        self, positions: torch.Tensor, cos_sin: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
        value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    ) -> None:
        """RoPE on query and key (in place), then write_kv of the rotated key; only backends
        with fuses_rope."""
        raise NotImplementedError

    def attend_rope(
        self, positions: torch.Tensor, cos_sin: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
        value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        window: int = 0, softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """write_kv_rope, then attend (only backends with fuses_rope). A backend may do all of
        it in fewer kernels; query and key are then left unrotated."""
        self.write_kv_rope(positions, cos_sin, query, key, value, k_cache, v_cache, meta)
        return self.attend(query, k_cache, v_cache, meta, scale, key, value, window, softcap, sinks)

    @abstractmethod
    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """key/value: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size,
        num_kv_heads, head_dim]."""

    @abstractmethod
    def attend(
        self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
        scale: float, key: torch.Tensor, value: torch.Tensor, window: int = 0, softcap: float = 0.0,
        sinks: Optional[torch.Tensor] = None, alibi: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """query: [num_tokens, num_heads, head_dim] -> output of the same shape. Causal within
        each request; GQA by num_heads // num_kv_heads. `key`/`value` are the step's new K/V
        (already in the cache), which a backend may use directly for fresh prefills.
        window > 0: a query sees only the last `window` keys, itself included (sliding-window
        layers); softcap > 0: scores become softcap * tanh(score / softcap) (Gemma 2);
        sinks [num_heads] float32 (GPT-OSS): one more logit per head in each softmax's
        denominator, with no value; alibi [num_heads] float32 (BLOOM, MPT): each score gains
        slope[h] * (key position - query position), after the scale and any softcap."""


def get_attention_backend(name: str) -> AttentionBackend:
    if name == "torch":
        from pagedserve.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "cpu":
        from pagedserve.attention.torch_backend import CpuAttentionBackend

        return CpuAttentionBackend()
    if name == "triton":
        from pagedserve.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose 'torch', 'cpu' or 'triton'.")
