"""The GPU attention backend: Triton kernels for the KV write and for paged attention
(pagedserve/ops). Decode requests (first in the batch) go through the decode variant of
the kernel, split over key segments when the batch is too small to fill the GPU; the prefill
chunks after them through the query-block variant. A decode-only step does RoPE and the KV
write inside the decode kernel. Uses only device tensors and host
integers that a decode CUDA graph fixes (batch size), so decode steps can be captured."""

from __future__ import annotations

from typing import Optional

import torch

from pagedserve.attention.backend import AttentionBackend, AttentionMetadata
from pagedserve.ops.paged_attention import DecodeRope, decode_segments, paged_attention
from pagedserve.ops.reshape_and_cache import reshape_and_cache
from pagedserve.ops.rotary import rotary_embedding_and_cache

# Under TRITON_INTERPRET (CPU tests) there are no multiprocessors to fill; a small stand-in
# makes small decode batches take the split path, so the tests exercise it.
_INTERPRETER_SMS = 4


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self) -> None:
        self._num_sms: dict[torch.device, int] = {}

    def num_sms(self, device: torch.device) -> int:
        if device not in self._num_sms:
            self._num_sms[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                                     if device.type == "cuda" else _INTERPRETER_SMS)
        return self._num_sms[device]

    fuses_rope = True

    def write_kv(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        # Padding tokens past num_actual_tokens carry slot -1: the kernel skips them.
        reshape_and_cache(key, value, k_cache, v_cache, meta.slot_mapping)

    def write_kv_rope(self, positions, cos_sin, query, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        rotary_embedding_and_cache(positions, query, key, value, cos_sin, k_cache, v_cache, meta.slot_mapping)

    def attend_rope(self, positions, cos_sin, query, key, value, k_cache, v_cache, meta: AttentionMetadata,
                    scale, window: int = 0, softcap: float = 0.0, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decode-only steps (every CUDA-graph step): RoPE, the KV write and attention (with its
        segment merge) in one kernel per layer. Steps with prefill chunks: the RoPE + KV-write
        kernel, then attention."""
        if meta.num_decodes != meta.num_reqs or not meta.num_reqs:
            return super().attend_rope(positions, cos_sin, query, key, value, k_cache, v_cache, meta, scale,
                                       window, softcap, sinks)
        out = torch.empty_like(query)
        nd = meta.num_decodes
        segments = decode_segments(nd, k_cache.shape[2], self.num_sms(query.device))
        paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, nd, nd,
                        scale, out=out, decode=True, num_segments=segments,
                        rope=DecodeRope(positions, cos_sin, key, value, meta.slot_mapping), window=window,
                        softcap=softcap, sinks=sinks)
        return out

    def attend(self, query, k_cache, v_cache, meta: AttentionMetadata, scale, key, value, window: int = 0,
               softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
               alibi: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = torch.empty_like(query)
        nd, nr = meta.num_decodes, meta.num_reqs
        if nd:
            segments = decode_segments(nd, k_cache.shape[2], self.num_sms(query.device))
            paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                            nd, nd, scale, out=out, decode=True, num_segments=segments, window=window,
                            softcap=softcap, sinks=sinks, alibi=alibi)
        if nr > nd:
            paged_attention(query, k_cache, v_cache, meta.block_tables[nd:], meta.seq_lens[nd:],
                            meta.query_start_loc[nd:], nr - nd, meta.num_tokens - nd, scale, out=out, window=window,
                            softcap=softcap, sinks=sinks, kv_limit=meta.kv_limit, alibi=alibi)
        return out
