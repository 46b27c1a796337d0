"""Qwen3: the Llama decoder with per-head RMSNorm on queries and keys before RoPE."""

from __future__ import annotations

from typing import Any

from pagedserve.model.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        bias = bool(getattr(cfg, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": True}
