"""Kyutai Helium (HeliumForCausalLM: Helium-1 2B / preview): the Llama decoder with RoPE on
interleaved pairs over the whole head (run as split-halves RoPE on q/k rows permuted at load,
as GLM's: glm4.py), q/k/v biases where attention_bias says but none on the output projection,
MLP biases per mlp_bias, and RMSNorms of eps 1e-8 by default. It is GLM-4-9B-chat-hf's model
without partial rotary."""

from __future__ import annotations

from pagedserve.model.glm4 import GlmForCausalLM


class HeliumForCausalLM(GlmForCausalLM):
    pass
