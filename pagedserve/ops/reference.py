"""Pure-PyTorch twins of the Triton kernels: the same contracts, written for clarity, computed
in float32 (float64 on request). Tests compare every kernel against these."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from pagedserve.attention.backend import first_visible


def reshape_and_cache_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """key/value [T, KVH, D] into caches [num_blocks, block_size, KVH, D] at flat slot
    slot_mapping[t] (= block * block_size + offset); slot -1 is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    kvh, d = key.shape[-2:]
    key, value = key[keep], value[keep]
    if k_cache.dtype == torch.float8_e4m3fn:  # saturated at e4m3's largest value; copied as bytes
        key, value = (x.float().clamp(-448.0, 448.0).to(k_cache.dtype).view(torch.uint8) for x in (key, value))
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(-1, kvh, d).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slots, value.to(v_cache.dtype))


def paged_attention_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: Sequence[int], query_start_loc: Sequence[int],
                        scale: float, compute_dtype: torch.dtype = torch.float32, window: int = 0,
                        softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
                        kv_limit: Optional[Sequence[int]] = None,
                        alibi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention for each request r of a flat varlen batch: its query tokens
    query[qsl[r]:qsl[r+1]] are the last q_len positions of a sequence of seq_lens[r] tokens
    whose K/V sit in the cache pages block_tables[r]; query i at position p = seq_len - q_len + i
    sees keys [0, p], or with a sliding window the last `window` of them, (p - window, p], or
    with window < 0 those of its chunk of -window positions (backend.first_visible).
    softcap > 0: scores become softcap * tanh(scores / softcap) (Gemma 2) before the softmax.
    sinks [Hq] (GPT-OSS's attention sinks): one more logit per head in each softmax's
    denominator, with no value (so the weights sum to under 1). kv_limit [T]: query row t
    sees keys [0, kv_limit[t]) instead of [0, p] (a window still counts back from p).
    alibi [Hq] (ALiBi's slopes): scores gain slope[h] * (key position - p) after the softcap.
    GQA: query head h reads kv head h // (Hq // KVH). A query with no visible key gives 0.
    Rows past the last request are left 0. Returns [T, Hq, D] in compute_dtype."""
    t, hq, d = query.shape
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    group = hq // kvh
    out = torch.zeros(t, hq, d, dtype=compute_dtype, device=query.device)
    for r in range(len(seq_lens)):
        qs, qe, n = int(query_start_loc[r]), int(query_start_loc[r + 1]), int(seq_lens[r])
        if qe == qs:
            continue
        nb = -(-n // block_size)
        blocks = block_tables[r, :nb].long()
        k = k_cache[blocks].reshape(-1, kvh, d)[:n].to(compute_dtype)  # [n, kvh, d]
        v = v_cache[blocks].reshape(-1, kvh, d)[:n].to(compute_dtype)
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [hq, n, d]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        q = query[qs:qe].to(compute_dtype).transpose(0, 1)  # [hq, q_len, d]
        s = q @ k.transpose(1, 2) * scale  # [hq, q_len, n]
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        rows = torch.arange(n - (qe - qs), n, device=query.device)
        cols = torch.arange(n, device=query.device)[None, :]
        if alibi is not None:
            s = s + alibi.to(query.device, compute_dtype)[:, None, None] * (cols - rows[:, None])
        if kv_limit is None:
            visible = cols <= rows[:, None]
        else:
            visible = cols < torch.as_tensor(kv_limit[qs:qe], device=query.device)[:, None]
        if window:
            visible &= cols >= first_visible(rows[:, None], window)
        s = s.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = sinks.to(query.device, compute_dtype)[:, None, None].expand(hq, s.shape[1], 1)
            s = torch.cat([s, sink], dim=-1)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
        if sinks is not None:
            p = p[..., :-1]
        out[qs:qe] = (p @ v).transpose(0, 1)
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    """Hugging Face's RMSNorm (float32 statistics, the normalised row cast back before the
    weight); with residual: (norm(x + residual), x + residual)."""
    if residual is not None:
        x = x + residual
        return rms_norm_ref(x, weight, eps), x
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's rotate_half RoPE in the tensors' dtype; returns rotated copies. A cache
    narrower than the head (cos_sin [P, R], R < D: partial rotary) rotates the leading R dims
    and passes the rest through."""
    cos, sin = cos_sin[positions].to(q.dtype).chunk(2, dim=-1)  # [T, R/2] each
    cos = torch.cat([cos, cos], -1)[:, None, :]
    sin = torch.cat([sin, sin], -1)[:, None, :]
    r = cos_sin.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :r], x[..., r:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        out = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
        return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out

    return rotate(q), rotate(k)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """GeGLU (Gemma): GELU of the gate (tanh approximation) times up, in the tensor's dtype."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def swigluoai_and_mul_ref(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's clamped SwiGLU over [gate | up] halves, as transformers' GptOssExperts
    computes it on interleaved columns, in float32 with one rounding."""
    gate, up = x.float().chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return ((up + 1) * (gate * torch.sigmoid(gate * alpha))).to(x.dtype)
