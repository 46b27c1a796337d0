"""Qwen2: the Llama decoder with biases on q/k/v (not on o)."""

from __future__ import annotations

from typing import Any

from pagedserve.model.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        return {"qkv_bias": True, "o_bias": False, "qk_norm": False}
