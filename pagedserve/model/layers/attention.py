"""The attention layer a model holds: owns its slice of the KV cache, delegates to a backend."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import nn

from pagedserve.attention.backend import AttentionBackend, AttentionMetadata


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, window: int = 0,
                 softcap: float = 0.0, sinks: bool = False, kv_shared: bool = False,
                 alibi_slopes: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads}).")
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.window = int(window or 0)  # > 0: a sliding-window layer, each query sees its last `window` keys
        self.softcap = float(softcap or 0.0)  # > 0: Gemma 2's attention logit softcap
        # GPT-OSS's learned sinks: a logit per head in the softmax's denominator, held in float32
        # (the checkpoint's values cast once; the kernels take float32).
        self.sinks = nn.Parameter(torch.empty(num_heads, dtype=torch.float32), requires_grad=False) if sinks else None
        # ALiBi (BLOOM, MPT, Falcon-RW): a slope per head; scores gain slope * (key position -
        # query position). Computed, not loaded: a float32 buffer rebuilt on the model's device.
        self._alibi_values = None if alibi_slopes is None else [float(x) for x in alibi_slopes]
        if self._alibi_values is not None and len(self._alibi_values) != num_heads:
            raise ValueError(f"{len(self._alibi_values)} ALiBi slopes for {num_heads} attention heads.")
        self.register_buffer("alibi", self._alibi_tensor(), persistent=False)
        # One cache for keys and values (MLA: the cached latent is the key, its leading dims the
        # value): the model runner binds v_cache to k_cache and forward's v is k.
        self.kv_shared = kv_shared
        self.backend: Optional[AttentionBackend] = None  # bound by the model runner
        # An FP8 cache holds k / k_scale and v / v_scale (the checkpoint's calibrated per-layer
        # scales, model/kv_scales.py; 1: none). Attention folds them outside the kernels:
        # q . (k_scale * k8) is k_scale * (q . k8), so the softmax scale takes k_scale, and the
        # output, a weighted sum of values, is v_scale times that of the stored values.
        self.k_scale = self.v_scale = 1.0
        self.k_cache: Optional[torch.Tensor] = None  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.v_cache: Optional[torch.Tensor] = None
        # A bidirectional pooling model's layer (EmbeddingGemma): whole prompts, no cache.
        self.bidirectional = False
        # Gemma 4's global layers: causal even where the step's images attend both ways
        # (AttentionMetadata.kv_limit, which the sliding-window layers follow).
        self.causal_only = False
        # Cross-layer KV sharing (Gemma 4's last layers): a layer with a kv_source has no cache
        # of its own; it attends over its source's, whose keys and values for this step's
        # tokens the source keeps (keep_kv) as it writes them. Only the source is a cache layer.
        self._kv_source: tuple = ()  # (a tuple: the source is not a submodule of this layer)
        self.keep_kv = False
        self.kept_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def _alibi_tensor(self) -> Optional[torch.Tensor]:
        if self._alibi_values is None:
            return None
        with torch.device("cpu"):  # also when the model is being built on the meta device
            return torch.tensor(self._alibi_values, dtype=torch.float32)

    def rebuild_buffers(self, device: torch.device) -> None:
        if self._alibi_values is not None:
            self.alibi = self._alibi_tensor().to(device)

    @property
    def kv_source(self) -> Optional["PagedAttention"]:
        return self._kv_source[0] if self._kv_source else None

    def share_kv_of(self, source: "PagedAttention") -> None:
        """Attend over `source`'s cache from now on (it keeps each step's keys and values)."""
        self._kv_source = (source,)
        source.keep_kv = True

    @property
    def fuses_rope(self) -> bool:
        return self.backend is not None and self.backend.fuses_rope

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hk, D] -> [T, Hq * D]. rope: (positions, cos_sin) when
        q and k are still to be rotated, by the backend's KV write (needs fuses_rope)."""
        if self.bidirectional:
            return self._attend_whole_prompts(q, k, v, meta)
        if self.causal_only and meta.kv_limit is not None:
            meta = dataclasses.replace(meta, kv_limit=None)
        if self.kv_source is not None:
            return self._attend_shared(q, meta)
        assert self.backend is not None and self.k_cache is not None, "KV cache not bound"
        scale, scaled = self.scale, self.k_scale != 1.0 or self.v_scale != 1.0
        if scaled:  # (RoPE is linear: rotating k / k_scale is rotating k, then dividing)
            k, v, scale = k / self.k_scale, v / self.v_scale, scale * self.k_scale
        if self.keep_kv:  # (as written: rotated, so never with the RoPE fused into the write)
            assert rope is None, "a KV source rotates its keys before the write"
            self.kept_kv = (k, v)
        if rope is not None:
            assert self.alibi is None, "ALiBi layers have no RoPE"
            o = self.backend.attend_rope(rope[0], rope[1], q, k, v, self.k_cache, self.v_cache, meta, scale,
                                         self.window, self.softcap, self.sinks)
        else:
            self.backend.write_kv(k, v, self.k_cache, self.v_cache, meta)
            o = self.backend.attend(q, self.k_cache, self.v_cache, meta, scale, k, v, self.window,
                                    self.softcap, self.sinks, self.alibi)
        if scaled and self.v_scale != 1.0:
            o = o * self.v_scale
        return o.reshape(o.shape[0], -1)

    def _attend_whole_prompts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              meta: AttentionMetadata) -> torch.Tensor:
        """Each prompt whole in this step, every token seeing all of its prompt's (a window
        layer: those less than `window` away, either side, as transformers' bidirectional
        Gemma 3), on the step's own keys and values (model/bert.py's encoder_attention)."""
        from pagedserve.model.bert import encoder_attention

        assert self.softcap == 0 and self.sinks is None and self.alibi is None, "not on the encoder path"
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        o = encoder_attention(q, k.contiguous(), v.contiguous(), meta, self.scale,
                              window=self.window - 1 if self.window > 0 else None)
        return o.reshape(o.shape[0], -1)

    def _attend_shared(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        src = self.kv_source
        assert src.backend is not None and src.k_cache is not None, "KV cache not bound"
        # (decode rows read the cache alone: a drafter attending over the target's, model/gemma4_assistant.py)
        assert src.kept_kv is not None or meta.num_decodes == meta.num_reqs, "KV source not run"
        k, v = src.kept_kv if src.kept_kv is not None else (None, None)
        o = src.backend.attend(q, src.k_cache, src.v_cache, meta, self.scale * src.k_scale, k, v, self.window,
                               self.softcap, self.sinks, self.alibi)
        if src.v_scale != 1.0:
            o = o * src.v_scale
        return o.reshape(o.shape[0], -1)
