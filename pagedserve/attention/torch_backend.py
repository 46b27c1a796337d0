"""Pure-PyTorch paged attention: the reference every other backend is tested against, and
the backend that runs on CPU. Decode requests are attended in one batched call over their
gathered blocks; prefill chunks one request at a time."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pagedserve.attention.backend import FP8_KV, AttentionBackend, AttentionMetadata, first_visible, to_cache_dtype


def _expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """[kvh, L, D] -> [kvh * group, L, D], head h reading kv head h // group (as HF's repeat_kv)."""
    if group == 1:
        return x
    kvh, length, d = x.shape
    return x[:, None].expand(kvh, group, length, d).reshape(kvh * group, length, d)


def _sdpa(q, k, v, mask: torch.Tensor, scale: float, softcap: float,
          sinks: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SDPA with a boolean mask; with a logit softcap, attention sinks or an additive bias
    (ALiBi's), the same in plain ops. sinks: one logit per query head, shaped to broadcast
    against the scores' leading dims (each softmax gains it in its denominator); bias: float32,
    broadcast against the scores, added after the softcap. A query with no visible key gives 0
    either way."""
    if softcap <= 0 and sinks is None:  # (ALiBi's bias as SDPA's float mask: every query sees itself)
        attn_mask = mask if bias is None else bias.masked_fill(~mask, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s.float() + bias
    s = s.masked_fill(~mask, float("-inf")).float()
    if sinks is None:
        return torch.softmax(s, dim=-1).nan_to_num(0.0).to(v.dtype) @ v
    sink = sinks.float().expand(*s.shape[:-1], 1)
    p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    return p.to(v.dtype) @ v


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def write_kv(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        n = meta.num_actual_tokens
        slots = meta.slot_mapping[:n]
        if n != meta.num_tokens or (n and int(slots.min()) < 0):
            keep = slots >= 0
            slots, key, value = slots[keep], key[:n][keep], value[:n][keep]
        else:
            key, value = key[:n], value[:n]
        kvh, d = key.shape[-2:]
        key, value = to_cache_dtype(key, k_cache.dtype), to_cache_dtype(value, v_cache.dtype)
        if k_cache.dtype == FP8_KV:  # PyTorch has no FP8 index_copy_ on CPU: copy the bytes
            k_cache, v_cache, key, value = (t.view(torch.uint8) for t in (k_cache, v_cache, key, value))
        k_cache.view(-1, kvh, d).index_copy_(0, slots, key)
        v_cache.view(-1, kvh, d).index_copy_(0, slots, value)

    def attend(self, query, k_cache, v_cache, meta: AttentionMetadata, scale, key, value,
               window: int = 0, softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
               alibi: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = torch.empty_like(query)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(query[:nd], k_cache, v_cache, meta, scale, window, softcap, sinks, alibi)
        qsl, seq_lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
        for r in range(nd, meta.num_reqs):
            qs, qe = qsl[r], qsl[r + 1]
            limit = None if meta.kv_limit is None else meta.kv_limit[qs:qe]
            out[qs:qe] = self._prefill(query[qs:qe], key[qs:qe], value[qs:qe], k_cache, v_cache,
                                       meta.block_tables[r], seq_lens[r], meta.block_size, scale, window, softcap,
                                       sinks, limit, alibi)
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale, window: int = 0,
                softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
                alibi: Optional[torch.Tensor] = None) -> torch.Tensor:
        nd, nh, d = q.shape
        kvh = k_cache.shape[2]
        group = nh // kvh
        max_len = max(meta.seq_lens_cpu[:nd])
        nb = -(-max_len // meta.block_size)
        bt = meta.block_tables[:nd, :nb].long()
        k = k_cache[bt].view(nd, nb * meta.block_size, kvh, d).transpose(1, 2).to(q.dtype)  # [nd, kvh, L, d]
        v = v_cache[bt].view(nd, nb * meta.block_size, kvh, d).transpose(1, 2).to(q.dtype)
        pos = torch.arange(nb * meta.block_size, device=q.device)
        lens = meta.seq_lens[:nd, None]
        mask = pos[None, :] < lens
        if window:
            mask &= pos[None, :] >= first_visible(lens - 1, window)
        bias = None
        if alibi is not None:  # [nd, kvh, group, L]: slope * (key position - the query's)
            bias = alibi.float().view(1, kvh, group, 1) * (pos[None, :] - (lens - 1)).view(nd, 1, 1, -1)
        # One query token per request: its `group` heads sharing a kv head act as `group` queries.
        o = _sdpa(q.view(nd, kvh, group, d), k, v, mask.view(nd, 1, 1, -1), scale, softcap,
                  None if sinks is None else sinks.view(kvh, group, 1), bias)
        return o.reshape(nd, nh, d)

    @staticmethod
    def _prefill(q, key, value, k_cache, v_cache, block_table, seq_len, block_size, scale, window: int = 0,
                 softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
                 limit: Optional[torch.Tensor] = None, alibi: Optional[torch.Tensor] = None) -> torch.Tensor:
        """limit: [q_len] keys each query sees (AttentionMetadata.kv_limit), else causal; a
        window counts back from the query's own position either way."""
        q_len, nh, d = q.shape
        kvh = k_cache.shape[2]
        group = nh // kvh
        ctx = seq_len - q_len
        if ctx == 0 and k_cache.dtype == key.dtype:  # nothing cached before this chunk: the new K/V as they are
            k, v = key, value
        else:  # (an FP8 cache: what it holds, so that every step sees the same rounded K/V)
            nb = -(-seq_len // block_size)
            blocks = block_table[:nb].long()
            k = k_cache[blocks].view(-1, kvh, d)[:seq_len].to(q.dtype)
            v = v_cache[blocks].view(-1, kvh, d)[:seq_len].to(q.dtype)
        mask = None  # plain causal from the start: SDPA's own is_causal
        if ctx or window or softcap > 0 or sinks is not None or limit is not None or alibi is not None:
            cols = torch.arange(seq_len, device=q.device)[None, :]
            rows = torch.arange(ctx, seq_len, device=q.device)[:, None]
            mask = cols <= rows if limit is None else cols < limit[:, None]
            if window:
                mask &= cols >= first_visible(rows, window)
        k = _expand_kv(k.transpose(0, 1), group)
        v = _expand_kv(v.transpose(0, 1), group)
        if mask is None:
            o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True, scale=scale)
        else:
            bias = None if alibi is None else alibi.float().view(nh, 1, 1) * (cols - rows)
            o = _sdpa(q.transpose(0, 1), k, v, mask, scale, softcap, None if sinks is None else sinks.view(nh, 1, 1),
                      bias)
        return o.transpose(0, 1)


# Chunks of at most this many tokens after cached context go through the decode kernel.
SHORT_CHUNK = 16


class CpuAttentionBackend(TorchAttentionBackend):
    """The PyTorch backend with decode attention in a native kernel that reads each K/V row
    once from the block pool, instead of gathering a padded copy (pure PyTorch cannot index
    paged memory without copying). Prefill stays on PyTorch's fused SDPA, except short chunks
    after cached context (speculative drafts, a prompt's tail after a prefix-cache hit): there
    each query token is a decode row of its own causal length, in the native kernel."""

    name = "cpu"

    @staticmethod
    def _prefill(q, key, value, k_cache, v_cache, block_table, seq_len, block_size, scale, window: int = 0,
                 softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
                 limit: Optional[torch.Tensor] = None, alibi: Optional[torch.Tensor] = None) -> torch.Tensor:
        from pagedserve.attention import cpu_kernels

        q_len = q.shape[0]
        ctx = seq_len - q_len
        if ctx == 0 or q_len > SHORT_CHUNK or limit is not None or not cpu_kernels.supports(q, k_cache):
            return TorchAttentionBackend._prefill(q, key, value, k_cache, v_cache, block_table, seq_len,
                                                  block_size, scale, window, softcap, sinks, limit, alibi)
        # The chunk's own K/V are already in the cache (write_kv runs first).
        lens = torch.arange(ctx + 1, seq_len + 1, dtype=torch.int32)
        tables = block_table.unsqueeze(0).expand(q_len, -1)
        return cpu_kernels.paged_decode(q, k_cache, v_cache, tables, lens, scale, window, softcap, sinks, alibi)

    @staticmethod
    def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale, window: int = 0,
                softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
                alibi: Optional[torch.Tensor] = None) -> torch.Tensor:
        from pagedserve.attention import cpu_kernels

        nd = q.shape[0]
        if not cpu_kernels.supports(q, k_cache):
            return TorchAttentionBackend._decode(q, k_cache, v_cache, meta, scale, window, softcap, sinks, alibi)
        return cpu_kernels.paged_decode(q, k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                                        window, softcap, sinks, alibi)
