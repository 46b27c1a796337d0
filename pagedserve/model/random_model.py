"""Small random-weight Hugging Face model directories, built locally (tests, benchmarks,
`pagedserve verify` checks): a byte-level BPE tokenizer trained on text CPython ships
(pydoc_data), and a transformers model of a supported architecture saved with safetensors."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

# DeepSeek-style experts (DeepSeek, GLM-4.5): 8 in 4 groups of which 2 compete, 2 per token,
# a shared expert, a dense first layer.
_GROUPED_EXPERTS = {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
                    "n_shared_experts": 1, "first_k_dense_replace": 1}
_DEEPSEEK = {"kv_lora_rank": 32, "q_lora_rank": 48, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 24,
             **_GROUPED_EXPERTS}

_GATED_DELTA = {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
                "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "head_dim": 16}

ARCH_CONFIGS = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", {"sliding_window": None}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {}),
    # Gemma: head_dim set small (the configs' default is 256); Gemma 2's window and softcaps
    # small enough to matter in short tests.
    "GemmaForCausalLM": ("GemmaConfig", {"head_dim": 16}),
    "Gemma2ForCausalLM": ("Gemma2Config", {"head_dim": 16, "sliding_window": 16, "attn_logit_softcapping": 5.0,
                                           "final_logit_softcapping": 3.0}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 16}),
    # Gemma 4 at a small scale: global layers of 32-wide heads, one KV head, keys as values;
    # the last two layers sharing KV (their MLPs double-wide), per-layer inputs of 8, 4
    # experts (2 a token) beside each MLP, a window short tests cross.
    "Gemma4ForCausalLM": ("Gemma4TextConfig", {
        "head_dim": 16, "global_head_dim": 32, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
        "sliding_window": 16, "num_kv_shared_layers": 2, "use_double_wide_mlp": True,
        "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 1024, "enable_moe_block": True,
        "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 48, "final_logit_softcapping": 30.0,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention",
                        "sliding_attention", "full_attention"]}),
    # Gemma 3n at a small scale: 4 AltUp copies, LAuReL of rank 4, per-layer inputs of 8, a window
    # short tests cross; build_random_model gives layer types, KV sharing and sparsity by depth.
    "Gemma3nForCausalLM": ("Gemma3nTextConfig", {
        "head_dim": 16, "sliding_window": 16, "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 1024,
        "laurel_rank": 4, "altup_num_inputs": 4, "final_logit_softcapping": 30.0}),
    # Phi (phi-1.5, phi-2): RoPE on half of each head (partial_rotary_factor, as released).
    "PhiForCausalLM": ("PhiConfig", {"partial_rotary_factor": 0.5}),
    "Phi3ForCausalLM": ("Phi3Config", {"sliding_window": None}),
    # Granite's four scalars away from 1, so that a model ignoring one differs.
    "GraniteForCausalLM": ("GraniteConfig", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                             "attention_multiplier": 0.2, "logits_scaling": 2.5}),
    # Granite 3 MoE (model/granite_moe.py): 4 experts, 2 a token, Granite's four scalars away
    # from 1; the Shared form adds an always-on SwiGLU MLP.
    "GraniteMoeForCausalLM": ("GraniteMoeConfig", {"num_local_experts": 4, "num_experts_per_tok": 2,
                                                   "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                                   "attention_multiplier": 0.2, "logits_scaling": 2.5}),
    "GraniteMoeSharedForCausalLM": ("GraniteMoeSharedConfig", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "shared_intermediate_size": 64, "embedding_multiplier": 3.0,
        "residual_multiplier": 0.5, "attention_multiplier": 0.2, "logits_scaling": 2.5}),
    "OlmoForCausalLM": ("OlmoConfig", {}),
    "Olmo2ForCausalLM": ("Olmo2Config", {}),
    "Olmo3ForCausalLM": ("Olmo3Config", {"sliding_window": 16}),
    "Exaone4ForCausalLM": ("Exaone4Config", {"sliding_window": 16}),
    # K-EXAONE: EXAONE 4.0's attention, a dense first layer, then 4 experts in 2 groups (1 competes),
    # 2 a token, under a sigmoid router with a correction bias (drawn), and a shared expert.
    "ExaoneMoeForCausalLM": ("ExaoneMoeConfig", {"sliding_window": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                                 "n_group": 2, "topk_group": 1, "num_shared_experts": 1,
                                                 "moe_intermediate_size": 64, "routed_scaling_factor": 2.5}),
    "Ernie4_5ForCausalLM": ("Ernie4_5Config", {"use_bias": True}),
    # ERNIE 4.5 MoE: experts on layers 1..2 (layer 0 dense), 4 of them, 2 a token, a shared one.
    "Ernie4_5_MoeForCausalLM": ("Ernie4_5_MoeConfig", {"moe_num_experts": 4, "moe_k": 2, "moe_num_shared_experts": 1,
                                                       "moe_layer_start_index": 1, "moe_layer_end_index": 2}),
    "Ministral3ForCausalLM": ("Ministral3Config", {}),
    # Ministral, CWM: windows on the layers layer_types marks (CWM: three of four by default).
    "MinistralForCausalLM": ("MinistralConfig", {}),
    "CwmForCausalLM": ("CwmConfig", {}),
    "HunYuanDenseV1ForCausalLM": ("HunYuanDenseV1Config", {}),
    "ArceeForCausalLM": ("ArceeConfig", {}),
    "ApertusForCausalLM": ("ApertusConfig", {"dtype": "float32"}),
    "SeedOssForCausalLM": ("SeedOssConfig", {"attention_bias": True, "attention_out_bias": True, "mlp_bias": True}),
    "CohereForCausalLM": ("CohereConfig", {"logit_scale": 0.5}),
    "Cohere2ForCausalLM": ("Cohere2Config", {"logit_scale": 0.5, "sliding_window": 16}),
    # GPT-NeoX (Pythia): RoPE on a quarter of each head, as Pythia's config.json says it (rotary_pct).
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", {"rotary_pct": 0.25}),
    "Starcoder2ForCausalLM": ("Starcoder2Config", {}),
    # GPT-2, GPT-BigCode: their MLP width is n_inner (None: 4 * hidden), not intermediate_size.
    "GPT2LMHeadModel": ("GPT2Config", {}),
    "GPTBigCodeForCausalLM": ("GPTBigCodeConfig", {}),
    # Falcon: the MLP width is ffn_hidden_size (default 4 * hidden); the builder's num_kv_heads
    # goes to the config's num_kv_heads (used by the new decoder architecture only).
    "FalconForCausalLM": ("FalconConfig", {}),
    # BLOOM, MPT (ALiBi): their MLP widths are 4 * hidden and expansion_ratio * hidden.
    "BloomForCausalLM": ("BloomConfig", {}),
    "MptForCausalLM": ("MptConfig", {}),
    "HeliumForCausalLM": ("HeliumConfig", {"head_dim": 16}),
    "PersimmonForCausalLM": ("PersimmonConfig", {}),
    # DBRX: 4 experts of 48, 2 a token (weights renormalised: their 1-norm).
    "DbrxForCausalLM": ("DbrxConfig", {"ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 4,
                                                      "moe_top_k": 2}}),
    "Jais2ForCausalLM": ("Jais2Config", {}),
    # OPT: the MLP width is ffn_dim (default 3072).
    "OPTForCausalLM": ("OPTConfig", {"ffn_dim": 128}),
    # GPT-J: RoPE on half of each head of 16 (rotary_dim), its MLP width n_inner (None: 4 * hidden).
    "GPTJForCausalLM": ("GPTJConfig", {"rotary_dim": 8}),
    # StableLM: RoPE on a quarter of each head (transformers' default partial_rotary_factor).
    "StableLmForCausalLM": ("StableLmConfig", {}),
    # Nemotron: RoPE on half of each head (transformers' default partial_rotary_factor), ReLU².
    "NemotronForCausalLM": ("NemotronConfig", {}),
    "Glm4ForCausalLM": ("Glm4Config", {}),
    "GlmForCausalLM": ("GlmConfig", {}),
    "SmolLM3ForCausalLM": ("SmolLM3Config", {"no_rope_layers": [1, 0]}),
    # Hybrid linear attention (model/qwen3_next.py): Gated DeltaNet layers (2 key heads serving 4
    # value heads) and full-attention ones (every 4th unless layer_types says), RoPE on a quarter
    # of each attention head.
    "Qwen3NextForCausalLM": ("Qwen3NextConfig", {**_GATED_DELTA, "num_experts": 4, "num_experts_per_tok": 2,
                                                 "decoder_sparse_step": 1, "mlp_only_layers": [1]}),
    "Qwen3_5ForCausalLM": ("Qwen3_5TextConfig", _GATED_DELTA),
    "Qwen3_5MoeForCausalLM": ("Qwen3_5MoeTextConfig", {**_GATED_DELTA, "num_experts": 4, "num_experts_per_tok": 2}),
    # Granite 4.0 (model/granite_hybrid.py): Mamba-2 layers (8 heads of 16 in 2 groups) and
    # attention ones (layer_types; no RoPE unless position_embedding_type says), a shared MLP
    # plus 4 experts (2 a token; none: num_local_experts 0), Granite's four scalars away from 1.
    "GraniteMoeHybridForCausalLM": ("GraniteMoeHybridConfig", {
        "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 2, "mamba_d_state": 16, "mamba_chunk_size": 32,
        "num_local_experts": 4, "num_experts_per_tok": 2, "shared_intermediate_size": 64,
        "position_embedding_type": "nope", "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
        "attention_multiplier": 0.2, "logits_scaling": 2.5}),
    # Nemotron-H: Mamba-2 blocks (8 heads of 16 in 2 groups), attention blocks without position
    # encoding, ReLU² MLP blocks, in hybrid_override_pattern's order.
    "NemotronHForCausalLM": ("NemotronHConfig", {
        "mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 2, "ssm_state_size": 16, "chunk_size": 32,
        "head_dim": 16, "hybrid_override_pattern": "M-*M"}),
    # Bamba: Mamba-2 layers and attention layers (attn_layer_indices), RoPE on half of each head.
    "BambaForCausalLM": ("BambaConfig", {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 2,
                                         "mamba_d_state": 16, "mamba_chunk_size": 32, "attn_layer_indices": [1],
                                         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                             "partial_rotary_factor": 0.5}}),
    # Falcon-H1: Mamba-2 (its own inner width, a gated norm after the gate... per config) and
    # attention side by side in every layer; every muP multiplier away from 1.
    "FalconH1ForCausalLM": ("FalconH1Config", {
        "mamba_d_ssm": 96, "mamba_n_heads": 6, "mamba_d_head": 16, "mamba_n_groups": 2, "mamba_d_state": 16,
        "mamba_chunk_size": 32, "mamba_rms_norm": True, "mamba_norm_before_gate": True, "projectors_bias": False,
        "embedding_multiplier": 1.5, "lm_head_multiplier": 0.7, "mlp_multipliers": [0.8, 1.3], "key_multiplier": 0.6,
        "attention_in_multiplier": 1.2, "attention_out_multiplier": 0.9, "ssm_multipliers": [1.1, 0.9, 1.2, 0.8, 1.3],
        "ssm_in_multiplier": 0.7, "ssm_out_multiplier": 1.4}),
    # Mamba-2 alone: every layer a Mamba-2 block (8 heads of 16 in 2 groups), no attention.
    "Mamba2ForCausalLM": ("Mamba2Config", {"num_heads": 8, "head_dim": 16, "n_groups": 2, "state_size": 16,
                                           "chunk_size": 32}),
    # Mamba-1 alone (and Falcon Mamba's, with dt, B and C normalised): 16 state entries per
    # channel, a rank-8 dt projection.
    "MambaForCausalLM": ("MambaConfig", {"state_size": 16, "time_step_rank": 8}),
    "FalconMambaForCausalLM": ("FalconMambaConfig", {"state_size": 16, "time_step_rank": 8}),
    # Jamba: Mamba-1 layers (16 state entries, rank-8 dt) and attention layers in turn, 4
    # experts (2 a token) in every second layer, an MLP in the others.
    "JambaForCausalLM": ("JambaConfig", {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
                                         "expert_layer_offset": 1, "num_experts": 4, "num_experts_per_tok": 2,
                                         "mamba_d_state": 16, "mamba_dt_rank": 8, "mamba_expand": 2}),
    # MiniMax-Text-01: lightning (linear) attention and softmax attention layers, 4 experts (2 a
    # token) after each, the layers' scale factors away from 1.
    "MiniMaxForCausalLM": ("MiniMaxConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "block_size": 16,
                                             "full_attn_alpha_factor": 1.2, "full_attn_beta_factor": 0.8,
                                             "linear_attn_alpha_factor": 0.9, "linear_attn_beta_factor": 1.1,
                                             "mlp_alpha_factor": 1.3, "mlp_beta_factor": 0.7}),
    # LFM2: short-convolution layers and attention layers (full_attn_idxs), the MLP width LFM2
    # derives from intermediate_size.
    "Lfm2ForCausalLM": ("Lfm2Config", {"full_attn_idxs": [1], "block_multiple_of": 32}),
    # LFM2-MoE: a dense first layer, then 4 experts of 48 (2 a token), the router's scores
    # renormalised and scaled; convolution and attention layers as layer_types says (the specs).
    "Lfm2MoeForCausalLM": ("Lfm2MoeConfig", {"num_dense_layers": 1, "num_experts": 4, "num_experts_per_tok": 2,
                                             "moe_intermediate_size": 48, "routed_scaling_factor": 1.5}),
    # Zamba2: Mamba-2 layers (8 heads of 16 in 2 groups), a shared transformer block before the
    # "hybrid" ones (layers_block_type, as many as num_layers), rank-8 adapters.
    "Zamba2ForCausalLM": ("Zamba2Config", {"n_mamba_heads": 8, "mamba_d_state": 16, "mamba_ngroups": 2,
                                           "chunk_size": 32, "adapter_rank": 8,
                                           "layers_block_type": ["linear_attention", "hybrid"]}),
    # Zamba v1: Mamba-1 layers in 2 heads of 64 channels (16 state entries, rank-4 dt each), one
    # shared transformer block before the "hybrid" ones.
    "ZambaForCausalLM": ("ZambaConfig", {"n_mamba_heads": 2, "mamba_d_state": 16,
                                         "layers_block_type": ["linear_attention", "hybrid"]}),
    # Encoder-only (model/bert.py): embeddings and cross-encoders.
    "BertModel": ("BertConfig", {}),
    "XLMRobertaModel": ("XLMRobertaConfig", {}),
    "BertForSequenceClassification": ("BertConfig", {"num_labels": 1}),
    "XLMRobertaForSequenceClassification": ("XLMRobertaConfig", {"num_labels": 3}),
    # ModernBERT: global attention every third layer, local windows of 8 (4 either side).
    "ModernBertModel": ("ModernBertConfig", {"local_attention": 8, "global_attn_every_n_layers": 3}),
    "ModernBertForSequenceClassification": ("ModernBertConfig", {"local_attention": 8, "global_attn_every_n_layers": 3,
                                                                 "num_labels": 3}),
    # Mixtures of experts: 4 experts, 2 per token; expert sizes follow intermediate_size.
    "MixtralForCausalLM": ("MixtralConfig", {"sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2}),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True}),
    "OlmoeForCausalLM": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False}),
    "FlexOlmoForCausalLM": ("FlexOlmoConfig", {"num_experts": 4, "num_experts_per_tok": 2}),
    # Phi-3.5-MoE: sparsemixer over 4 experts, with a jitter wide enough that its mask both keeps
    # and drops experts.
    "PhimoeForCausalLM": ("PhimoeConfig", {"num_local_experts": 4, "num_experts_per_tok": 2,
                                           "router_jitter_noise": 0.3}),
    # Llama 4 at a small scale: chunks of 16 positions, every second layer without RoPE (its
    # queries' temperature changing every 8 positions) and with 4 experts, one a token.
    "Llama4ForCausalLM": ("Llama4TextConfig", {"num_local_experts": 4, "num_experts_per_tok": 1,
                                               "interleave_moe_layer_step": 2, "intermediate_size_mlp": 96,
                                               "attention_chunk_size": 16, "no_rope_layer_interval": 2,
                                               "floor_scale": 8, "attn_scale": 0.5, "head_dim": 16}),
    # GPT-OSS: attention sinks, alternating window / full layers, YaRN, experts with biases and
    # a clamped SwiGLU; a window and a YaRN original length that short tests cross.
    "GptOssForCausalLM": ("GptOssConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16,
                                           "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0,
                                                               "beta_slow": 1.0, "truncate": False,
                                                               "original_max_position_embeddings": 256,
                                                               "rope_theta": 150000.0}}),
    # DeepSeek: latent attention (ranks, nope / rope / v head dims of their own) and grouped
    # experts (V2: 1 group competes, else its best-score group limit changes nothing).
    "DeepseekV2ForCausalLM": ("DeepseekV2Config", {**_DEEPSEEK, "topk_method": "group_limited_greedy", "topk_group": 1,
                                                   "routed_scaling_factor": 1.5}),
    "DeepseekV3ForCausalLM": ("DeepseekV3Config", {**_DEEPSEEK, "routed_scaling_factor": 2.5,
                                                   "norm_topk_prob": True}),
    # GLM-4.7-Flash: DeepSeek-V3's latent attention and experts, dense / sparse layers by name.
    "Glm4MoeLiteForCausalLM": ("Glm4MoeLiteConfig", {**_DEEPSEEK, "routed_scaling_factor": 1.8, "norm_topk_prob": True,
                                                     "mlp_layer_types": ["sparse", "dense", "sparse"]}),
    # GLM-4.5: DeepSeek-V3's grouped experts, q/k/v biases, q/k norms, RoPE on half of each head.
    "Glm4MoeForCausalLM": ("Glm4MoeConfig", {**_GROUPED_EXPERTS, "routed_scaling_factor": 2.5, "attention_bias": True,
                                             "use_qk_norm": True}),
    # Solar Open: GLM-4.5's experts in every layer (no dense first layer), q/k/v biases, full RoPE.
    "SolarOpenForCausalLM": ("SolarOpenConfig", {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2,
                                                 "topk_group": 1, "n_shared_experts": 1, "moe_intermediate_size": 64,
                                                 "routed_scaling_factor": 2.5, "attention_bias": True}),
    # MiniMax-M2: q/k norms over all heads, RoPE on half of each head (rotary_dim), 4 experts (2 a
    # token) under a sigmoid router with a correction bias (drawn).
    "MiniMaxM2ForCausalLM": ("MiniMaxM2Config", {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                                                 "rotary_dim": 8}),
    # MiMo-V2-Flash: a full layer, then window layers (window 16) with twice the KV heads and
    # sinks; value heads narrower than q/k heads (16 of 32), RoPE on a third of each head with its
    # own theta per layer type; a dense first layer, then 4 experts in 2 groups (1 competes), 2 a
    # token, under a sigmoid router with a correction bias, renormalised and scaled.
    "MiMoV2FlashForCausalLM": ("MiMoV2FlashConfig", {
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5,
        "moe_intermediate_size": 64, "head_dim": 32, "v_head_dim": 16, "sliding_window": 16,
        "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
        "mlp_layer_types": ["dense", "sparse", "sparse"]}),
    # Hunyuan-A13B: 4 experts beside the shared MLP, 2 a token in the first layer and 1 in the
    # second (moe_topk per layer).
    "HunYuanMoEV1ForCausalLM": ("HunYuanMoEV1Config", {"num_experts": 4, "moe_topk": [2, 1]}),
    # dots.llm1: Qwen3's attention, a dense first layer, then DeepSeek-V3's experts (8 in 4 groups
    # of which 2 compete, 2 a token, a shared expert) renormalised and scaled.
    "Dots1ForCausalLM": ("Dots1Config", {**_GROUPED_EXPERTS, "moe_intermediate_size": 64, "norm_topk_prob": True,
                                         "routed_scaling_factor": 2.5}),
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def training_text() -> list[str]:
    """English reference text that every CPython installation carries (PSF licence)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def build_tokenizer(path: str, vocab_size: int = 1024, texts: Optional[list[str]] = None) -> Any:
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or training_text(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
    return fast


def build_random_model(
    path: str,
    arch: str = "LlamaForCausalLM",
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: Optional[int] = None,
    vocab_size: Optional[int] = None,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.02,
    tie_word_embeddings: bool = False,
    rope_scaling: Optional[dict] = None,
    seed: int = 0,
    tokenizer_vocab: int = 1024,
    tokenizer_dir: Optional[str] = None,
    dtype: str = "float32",
    random_biases: Optional[bool] = None,
    random_norms: bool = False,
    **extra: Any,
) -> str:
    """Write a random-weight model directory (config, safetensors, tokenizer); returns path.
    `tokenizer_dir` reuses an already built tokenizer instead of training one. random_biases:
    every bias drawn like the weights instead of transformers' zeros (default: for GPT-OSS,
    whose biases are everywhere, so that a model ignoring one differs). random_norms: every
    norm's weight drawn around 1 instead of all ones (a norm applied in the wrong place then
    shows)."""
    import torch
    import transformers

    if arch not in ARCH_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCH_CONFIGS)}")
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        tok.save_pretrained(path)
    else:
        tok = build_tokenizer(path, tokenizer_vocab)
    cfg_name, defaults = ARCH_CONFIGS[arch]
    kwargs = dict(defaults)
    kwargs.update(
        vocab_size=vocab_size or len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM",
                "Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM", "Ernie4_5_MoeForCausalLM", "Qwen3NextForCausalLM",
                "Qwen3_5MoeForCausalLM"):
        kwargs["moe_intermediate_size"] = intermediate_size // 2
    if arch in ("Qwen2MoeForCausalLM", "Qwen3NextForCausalLM", "Qwen3_5MoeForCausalLM"):
        kwargs["shared_expert_intermediate_size"] = intermediate_size
    if arch == "FalconForCausalLM":
        kwargs["num_kv_heads"] = num_kv_heads
    if arch == "Gemma4ForCausalLM":  # sliding and global layers in turn, as many as asked for (the last global)
        kwargs["layer_types"] = ["full_attention" if (num_layers - 1 - i) % 2 == 0 else "sliding_attention"
                                 for i in range(num_layers)]
        kwargs["num_kv_shared_layers"] = max(0, min(2, num_layers - 2))
    if arch == "DbrxForCausalLM":  # (DbrxConfig's sub-configs read d_model, and its KV heads from attn_config)
        kwargs["d_model"] = hidden_size
        kwargs["attn_config"] = {"kv_n_heads": num_kv_heads, **extra.pop("attn_config", {})}
    if arch == "Gemma3nForCausalLM":  # Gemma 4's layer types and sharing; the first layer's MLP sparse
        kwargs["layer_types"] = ["full_attention" if (num_layers - 1 - i) % 2 == 0 else "sliding_attention"
                                 for i in range(num_layers)]
        kwargs["num_kv_shared_layers"] = max(0, min(2, num_layers - 2))
        kwargs["activation_sparsity_pattern"] = [0.95] + [0.0] * (num_layers - 1)
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    kwargs.update(extra)
    config = getattr(transformers, cfg_name)(**kwargs)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).to(getattr(torch, dtype))
    if random_biases if random_biases is not None else arch == "GptOssForCausalLM":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, initializer_range)
    if random_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                # (GPT-2's ln_1, ln_f; StableLM's per-head q/k norms, norms.<head>)
                # (MPT's norm_1, norm_2, norm_f)
                if name.endswith("norm.weight") or re.search(r"\.(ln_\w+|norms\.\d+|\w+norm_\d|norm_[12f])\.weight$",
                                                             name):
                    p.normal_(1.0, 0.3)
                elif name.endswith(("router.scale", "router.per_expert_scale")):  # (Gemma 4's)
                    p.uniform_(0.5, 1.5)
                elif name.endswith("altup.correct_output_scale"):  # (Gemma 3n's: zeros would hide PLE)
                    p.uniform_(0.5, 1.5)
            for name, b in model.named_buffers():
                if name.endswith("layer_scalar"):  # Gemma 4's output scale per layer
                    b.uniform_(0.5, 1.5)
    if arch == "NemotronHForCausalLM":
        # dt = softplus(raw + dt_bias) near 0.05, clear of time_step_min (0.001): transformers clamps
        # dt there in prefill but not in decode (pagedserve, like vLLM, follows time_step_limit).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("mixer.dt_bias"):
                    p.fill_(-3.0)
    with torch.no_grad():  # DeepSeek-V3's (LFM2-MoE's) router bias (a buffer, zeros in transformers): drawn
        for name, b in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "feed_forward.expert_bias")):
                b.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return path


def _vl_tokenizer(path: str, tokenizer_dir: Optional[str], special: list[str], template: str) -> Any:
    """A vision-language model's tokenizer: tokenizer_dir's (or a new one), with the model's
    image (and turn) tokens added as special tokens and its chat template."""
    import transformers

    if tokenizer_dir is not None:
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    else:
        tok = build_tokenizer(path)
    tok.add_tokens(special, special_tokens=True)
    tok.chat_template = template
    return tok


# A LLaVA-1.5-style template: each image part becomes the <image> placeholder where it stands.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() }}: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_LLAVA_TEXT_CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}


def build_random_llava(path: str, tokenizer_dir: Optional[str] = None, text_model_type: str = "llama",
                       image_size: int = 28, patch_size: int = 14, select_strategy: str = "default",
                       feature_layer: Any = -2, initializer_range: float = 0.02, seed: int = 0,
                       dtype: str = "float32", vision: str = "clip", pinpoints: Optional[list] = None,
                       max_patches: Optional[int] = None) -> str:
    """A random LlavaForConditionalGeneration directory: a small CLIP (or SigLIP) vision
    tower, the projector, a Llama / Mistral / Qwen2 decoder, the tokenizer with an `<image>`
    token and a LLaVA-style chat template, and the tower's image processor
    (preprocessor_config.json). With `pinpoints` ([[height, width], ...], multiples of
    image_size): a LlavaNextForConditionalGeneration (LLaVA-1.6) tiling images to them; with
    `max_patches` too, a LlavaOnevisionForConditionalGeneration (vision_aspect_ratio
    "anyres_max_<max_patches>", a `<video>` token as well)."""
    import torch
    import transformers

    onevision = pinpoints is not None and max_patches is not None
    tok = _vl_tokenizer(path, tokenizer_dir, ["<image>", "<video>"] if onevision else ["<image>"], LLAVA_CHAT_TEMPLATE)
    text = getattr(transformers, _LLAVA_TEXT_CONFIGS[text_model_type])(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=initializer_range, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None)
    tower = {"clip": transformers.CLIPVisionConfig, "siglip": transformers.SiglipVisionConfig}[vision](
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
        patch_size=patch_size, **({"vision_use_head": False} if onevision and vision == "siglip" else {}))
    kind = "Llava" if pinpoints is None else "LlavaOnevision" if onevision else "LlavaNext"
    extra = {} if pinpoints is None else {"image_grid_pinpoints": pinpoints}
    if onevision:
        extra.update(vision_aspect_ratio=f"anyres_max_{max_patches}",
                     video_token_index=tok.convert_tokens_to_ids("<video>"))
    cfg = getattr(transformers, f"{kind}Config")(vision_config=tower, text_config=text,
                                                 image_token_index=tok.convert_tokens_to_ids("<image>"),
                                                 vision_feature_select_strategy=select_strategy,
                                                 vision_feature_layer=feature_layer, **extra)
    cfg.architectures = [f"{kind}ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(cfg).to(getattr(torch, dtype))
    if pinpoints is not None:  # transformers leaves it unset (the checkpoint fills it): make it random
        with torch.no_grad():
            model.model.image_newline.normal_(0, 1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if onevision:
        transformers.LlavaOnevisionImageProcessor(size={"height": image_size, "width": image_size},
                                                  image_grid_pinpoints=pinpoints).save_pretrained(path)
    elif pinpoints is not None:
        transformers.LlavaNextImageProcessor(size={"shortest_edge": image_size}, crop_size={
            "height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints).save_pretrained(path)
    if pinpoints is not None:
        # As hub checkpoints name it (without torchvision transformers saves its PIL fallback's name).
        conf = os.path.join(path, "preprocessor_config.json")
        with open(conf) as f:
            settings = json.load(f)
        with open(conf, "w") as f:
            json.dump({**settings, "image_processor_type": f"{kind}ImageProcessor"}, f, indent=2)
        return path
    if vision == "clip":
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": image_size},
                                                    crop_size={"height": image_size, "width": image_size})
    else:
        processor = transformers.SiglipImageProcessor(size={"height": image_size, "width": image_size})
    processor.save_pretrained(path)
    return path


# An InternVL-hf-style ChatML template: each image part becomes <IMG_CONTEXT> where it stands
# (InternVLProcessor writes <img>, its tiles' <IMG_CONTEXT> run and </img> in its place).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The names InternVL tokenizers give their image tokens (tokenizer_config.json's extra_special_tokens).
INTERNVL_IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}


def build_random_internvl(path: str, tokenizer_dir: Optional[str] = None, text_model_type: str = "qwen2",
                          image_size: int = 56, patch_size: int = 14, max_patches: int = 4,
                          initializer_range: float = 0.02, seed: int = 0, dtype: str = "float32") -> str:
    """A random InternVLForConditionalGeneration directory (InternVL3 / 3.5 "-hf"): a small
    InternViT tower (image_size-pixel tiles in patch_size patches, pixel-shuffled 2x2 into one
    token), the projector, a Qwen2 / Qwen3 / Llama decoder, the tokenizer with <img> </img>
    <IMG_CONTEXT> <video> named as InternVL's are and a ChatML template, and the GotOcr2 image
    processor tiling images into 1..max_patches tiles plus a thumbnail (and processor_config.json
    with InternVLProcessor's image_seq_length, as the hub's)."""
    import torch
    import transformers

    tok = _vl_tokenizer(path, tokenizer_dir, list(INTERNVL_IMAGE_TOKENS.values()), INTERNVL_CHAT_TEMPLATE)
    tok.save_pretrained(path)
    conf = os.path.join(path, "tokenizer_config.json")
    with open(conf) as f:
        settings = json.load(f)
    with open(conf, "w") as f:  # as the hub's: the tokenizer then has start_image_token etc. (InternVLProcessor)
        json.dump({**settings, "extra_special_tokens": INTERNVL_IMAGE_TOKENS}, f, indent=2)
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    # (A short max_position_embeddings: Qwen's 32768 would size a CPU KV cache of gigabytes.)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, initializer_range=initializer_range, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, bos_token_id=None, max_position_embeddings=2048)
    if text_model_type == "qwen3":
        text["head_dim"] = 16
    text = getattr(transformers, {**_LLAVA_TEXT_CONFIGS, "qwen3": "Qwen3Config"}[text_model_type])(**text)
    # Layer scale 1 and weights larger than transformers' defaults: every vision layer matters.
    vision = transformers.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                                               attention_bias=True, layer_scale_init_value=1.0,
                                               initializer_range=0.2)
    seq = (image_size // patch_size) ** 2 // 4  # tokens a tile: 2x2 patches shuffled into one
    cfg = transformers.InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5,
                                      image_token_id=tok.context_image_token_id, image_seq_length=seq,
                                      tie_word_embeddings=False)
    cfg.architectures = ["InternVLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(cfg)
    with torch.no_grad():  # zeros and small in transformers: drawn, so positions and the image matter
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "position_embeddings")):
                p.normal_(0.0, 1.0)
            elif "multi_modal_projector.linear" in name and name.endswith("weight"):
                p.normal_(0.0, 0.15)
            elif name.endswith("bias") and "language_model" in name:
                p.normal_(0.0, initializer_range)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    # As hub checkpoints store it: no cropping in preprocessor_config.json, InternVLProcessor asks for it.
    images = transformers.GotOcr2ImageProcessor(size={"height": image_size, "width": image_size},
                                                crop_to_patches=False, min_patches=1, max_patches=max_patches,
                                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    images.save_pretrained(path)
    with open(os.path.join(path, "processor_config.json"), "w") as f:  # as the hub's (InternVLProcessor needs
        json.dump({"image_seq_length": seq, "processor_class": "InternVLProcessor"}, f, indent=2)  # torchvision)
    conf = os.path.join(path, "preprocessor_config.json")
    with open(conf) as f:
        settings = json.load(f)
    with open(conf, "w") as f:  # the hub's name (without torchvision transformers saves its PIL fallback's)
        json.dump({**settings, "image_processor_type": "GotOcr2ImageProcessorFast"}, f, indent=2)
    return path


# A Qwen2-VL-style ChatML template: each image part becomes <|vision_start|><|image_pad|><|vision_end|>.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_random_qwen2_vl(path: str, tokenizer_dir: Optional[str] = None, version: str = "2",
                          min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 64, window_size: int = 56,
                          mrope_section: tuple = (2, 3, 3), initializer_range: float = 0.02, seed: int = 0,
                          dtype: str = "float32", moe: bool = False) -> str:
    """A random Qwen2VLForConditionalGeneration (version "2"), Qwen2_5_VLForConditionalGeneration
    ("2.5"), Qwen3VLForConditionalGeneration ("3"; Qwen3VLMoeForConditionalGeneration with
    `moe`) or Qwen3_5ForConditionalGeneration ("3.5"; Qwen3_5Moe... with `moe`) directory: a
    small vision transformer (2.5:
    window attention in all but its last block; 3: 16-pixel patches, DeepStack features) with
    its 2x2 patch merger, a Qwen2 (3: Qwen3) decoder with M-RoPE and random q/k/v biases,
    the tokenizer with <|vision_start|> <|image_pad|> <|vision_end|> and a ChatML template,
    and the image processor (preprocessor_config.json; images resized to min..max_pixels)."""
    import torch
    import transformers

    tok = _vl_tokenizer(path, tokenizer_dir, ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"],
                        QWEN_VL_CHAT_TEMPLATE)
    start, pad, end = tok.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, initializer_range=initializer_range,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section)},
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    if version == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        arch = "Qwen2VLForConditionalGeneration"
    elif version == "2.5":
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=window_size, fullatt_block_indexes=[2])
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        arch = "Qwen2_5_VLForConditionalGeneration"
    elif version == "3":  # interleaved M-RoPE over 8 frequencies, DeepStack from vision blocks 0 and 1
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [4, 2, 2], "mrope_interleaved": True})
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
        config_cls, model_cls = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
        arch = "Qwen3VLForConditionalGeneration"
        if moe:  # Qwen3-VL-MoE: 4 experts, 2 a token, in every decoder layer (2 x 48 != 64: no square stacks)
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
            config_cls, model_cls = transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration
            arch = "Qwen3VLMoeForConditionalGeneration"
    elif version == "3.5":  # the hybrid decoder (Gated DeltaNet, gated attention), no DeepStack
        text.update(_GATED_DELTA)
        text.update(head_dim=32, num_hidden_layers=3, layer_types=["linear_attention", "full_attention",
                                                                   "linear_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                     "mrope_section": [4, 2, 2], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
        config_cls, model_cls = transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration
        arch = "Qwen3_5ForConditionalGeneration"
        if moe:
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                        shared_expert_intermediate_size=64)
            config_cls, model_cls = transformers.Qwen3_5MoeConfig, transformers.Qwen3_5MoeForConditionalGeneration
            arch = "Qwen3_5MoeForConditionalGeneration"
    else:
        raise ValueError(f"version must be '2', '2.5', '3' or '3.5', got {version!r}.")
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=pad, vision_start_token_id=start,
                     vision_end_token_id=end)
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    model = model_cls(cfg)
    with torch.no_grad():  # transformers starts biases at zero: drawn, so a model ignoring one differs
        for name, p in model.named_parameters():
            if name.endswith("bias") and "visual" not in name:
                p.normal_(0.0, initializer_range)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # Qwen3: sharper attention, positions matter
                p.uniform_(1.0, 4.0)
            elif "deepstack_merger_list" in name and name.endswith("fc2.weight"):  # DeepStack features that matter
                p.normal_(0.0, 0.5)
            elif name.endswith("mlp.gate.weight"):  # a router: no ties among experts
                p.normal_(0.0, 1.0)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tok.save_pretrained(path)
    patch = vision["patch_size"]  # images resized to multiples of 2x2 patches
    transformers.Qwen2VLImageProcessor(min_pixels=min_pixels * patch**2 // 196, max_pixels=max_pixels * patch**2 // 196,
                                       patch_size=patch).save_pretrained(path)
    return path


# A Gemma-3-style template: each image part becomes <start_of_image> where it stands.
GEMMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_random_gemma3_vl(path: str, tokenizer_dir: Optional[str] = None, image_size: int = 56,
                           tokens_per_image: int = 16, initializer_range: float = 0.3, seed: int = 0,
                           dtype: str = "float32") -> str:
    """A random Gemma3ForConditionalGeneration directory: a small SigLIP tower (image_size
    pixels in 14-pixel patches, pooled to tokens_per_image), a Gemma 3 decoder with a
    sliding-window and a full layer, the tokenizer with <start_of_image> <image_soft_token>
    <end_of_image> and a Gemma-style chat template, and the image processor."""
    import torch
    import transformers

    tok = _vl_tokenizer(path, tokenizer_dir, ["<start_of_image>", "<image_soft_token>", "<end_of_image>",
                                              "<start_of_turn>", "<end_of_turn>"], GEMMA3_CHAT_TEMPLATE)
    boi, image, eoi = tok.convert_tokens_to_ids(["<start_of_image>", "<image_soft_token>", "<end_of_image>"])
    # (An LM head of its own: tied to the sqrt(hidden)-scaled embeddings, a random model repeats its input.)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=len(tok), sliding_window=12, tie_word_embeddings=False,
                layer_types=["sliding_attention", "full_attention"], initializer_range=initializer_range,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image,
                                    image_token_index=image, boi_token_index=boi, eoi_token_index=eoi,
                                    initializer_range=initializer_range, tie_word_embeddings=False)
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # transformers starts the projector at zero: drawn, so the image matters
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 1.0)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tok.save_pretrained(path)
    transformers.Gemma3ImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


# A Gemma-4-style template: each image part becomes <|image|> where it stands.
GEMMA4_CHAT_TEMPLATE = GEMMA3_CHAT_TEMPLATE.replace("<start_of_image>", "<|image|>")


def build_random_gemma4_vl(path: str, tokenizer_dir: Optional[str] = None, max_soft_tokens: int = 70,
                           bidirectional: bool = True, initializer_range: float = 0.3, seed: int = 0,
                           dtype: str = "float32") -> str:
    """A random Gemma4ForConditionalGeneration directory: a small Gemma 4 vision tower (4-pixel
    patches pooled 2 x 2, at most max_soft_tokens rows an image), Gemma 4's decoder as
    ARCH_CONFIGS has it (an image's tokens attending both ways with `bidirectional`), the
    tokenizer with <|image|> <start_of_image> <end_of_image>, a Gemma-style chat template and
    the image processor."""
    import torch
    import transformers

    tok = _vl_tokenizer(path, tokenizer_dir, ["<|image|>", "<start_of_image>", "<end_of_image>", "<|video|>",
                                              "<|audio|>", "<start_of_turn>", "<end_of_turn>"], GEMMA4_CHAT_TEMPLATE)
    image, boi, eoi, video, audio = tok.convert_tokens_to_ids(["<|image|>", "<start_of_image>", "<end_of_image>",
                                                               "<|video|>", "<|audio|>"])
    n = len(tok)
    text = dict(ARCH_CONFIGS["Gemma4ForCausalLM"][1], hidden_size=64, intermediate_size=64, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=n, vocab_size_per_layer_input=n,
                tie_word_embeddings=True, initializer_range=initializer_range, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, bos_token_id=None,
                use_bidirectional_attention="vision" if bidirectional else None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=2, position_embedding_size=128,
                  initializer_range=initializer_range)
    cfg = transformers.Gemma4Config(text_config=text, vision_config=vision, image_token_id=image, boi_token_id=boi,
                                    eoi_token_id=eoi, video_token_id=video, audio_token_id=audio,
                                    initializer_range=initializer_range)
    cfg.architectures = ["Gemma4ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = transformers.Gemma4ForConditionalGeneration(cfg)
    with torch.no_grad():  # transformers starts the 2-D position table at ones: drawn, so positions matter
        model.model.vision_tower.patch_embedder.position_embedding_table.normal_(0.0, 1.0)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tok.save_pretrained(path)
    transformers.Gemma4ImageProcessor(patch_size=4, pooling_kernel_size=2,
                                      max_soft_tokens=max_soft_tokens).save_pretrained(path)
    return path


def build_random_gemma4_assistant(path: str, target_dir: str, hidden_size: int = 48, ordered: bool = True,
                                  seed: int = 0, std: float = 0.3) -> str:
    """A random Gemma4AssistantForCausalLM directory for the Gemma 4 model in target_dir: a
    sliding-window and a global layer of the target's store layers' head shapes (every layer
    reading the target's KV), its own hidden size, and with `ordered` the centroid-masked
    logits (16 clusters of the vocabulary, 4 scored), the token order drawn."""
    import torch
    import transformers

    with open(os.path.join(target_dir, "config.json")) as f:
        t = json.load(f)
    t = t.get("text_config", t)
    text = dict(vocab_size=t["vocab_size"], hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=t["num_key_value_heads"],
                head_dim=t["head_dim"], per_layer_config=t.get("per_layer_config"), sliding_window=t["sliding_window"],
                layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=0, rope_parameters=t["rope_parameters"], rms_norm_eps=t["rms_norm_eps"],
                pad_token_id=t["pad_token_id"], eos_token_id=t["eos_token_id"], initializer_range=std)
    text["per_layer_config"] = {"1": next(iter((t.get("per_layer_config") or {"1": {}}).values()))}
    cfg = transformers.Gemma4AssistantConfig(text_config=text, backbone_hidden_size=t["hidden_size"],
                                             use_ordered_embeddings=ordered, num_centroids=16,
                                             centroid_intermediate_top_k=4, initializer_range=std)
    cfg.architectures = ["Gemma4AssistantForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.Gemma4AssistantForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
        if ordered:
            model.masked_embedding.token_ordering.copy_(torch.randperm(int(t["vocab_size"])))
    model.save_pretrained(path)
    return path


# A Mistral-style template: each image part becomes [IMG] where it stands.
MISTRAL3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST]{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}[IMG]{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'user' %}[/INST]{% endif %}{% endfor %}"
)


def build_random_mistral3(path: str, tokenizer_dir: Optional[str] = None, longest_edge: int = 112,
                          initializer_range: float = 0.3, seed: int = 0, dtype: str = "float32") -> str:
    """A random Mistral3ForConditionalGeneration directory: a small Pixtral tower (14-pixel
    patches, images up to `longest_edge` pixels, merged 2x2), Mistral 3's projector, a Mistral
    decoder, the tokenizer with [IMG] [IMG_BREAK] [IMG_END] and a Mistral-style template, and
    the image processor."""
    import torch
    import transformers

    tok = _vl_tokenizer(path, tokenizer_dir, ["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"],
                        MISTRAL3_CHAT_TEMPLATE)
    text = transformers.MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      initializer_range=initializer_range, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, bos_token_id=None, sliding_window=None)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, head_dim=16, image_size=longest_edge,
                                              patch_size=14)
    cfg = transformers.Mistral3Config(vision_config=vision, text_config=text,
                                      image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
                                      vision_feature_layer=-1)
    cfg.architectures = ["Mistral3ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = transformers.Mistral3ForConditionalGeneration(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    transformers.PixtralImageProcessor(size={"longest_edge": longest_edge}, patch_size=14).save_pretrained(path)
    return path


# Llama 4's template's image part: each image part becomes <|image|> where it stands.
LLAMA4_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)
LLAMA4_IMAGE_TOKENS = ["<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
                       "<|tile_y_separator|>", "<|header_start|>", "<|header_end|>", "<|eot|>"]


def build_random_llama4_vl(path: str, tokenizer_dir: Optional[str] = None, tile: int = 28, max_patches: int = 4,
                           initializer_range: float = 0.3, seed: int = 0, dtype: str = "float32") -> str:
    """A random Llama4ForConditionalGeneration directory: a small Llama 4 vision tower (7-pixel
    patches on `tile`-pixel tiles, 4 rows a tile after the pixel shuffle; images cut into up
    to `max_patches` tiles and a whole-image tile), the projector, Llama 4's decoder as
    ARCH_CONFIGS has it (chunks of 16, NoPE layers, experts), the tokenizer with Llama 4's image
    tokens, its chat template's image part, and the image processor's settings (written as
    the hub's: transformers' class needs torchvision)."""
    import torch
    import transformers

    tok = _vl_tokenizer(path, tokenizer_dir, LLAMA4_IMAGE_TOKENS, LLAMA4_CHAT_TEMPLATE)
    start, end, patch = tok.convert_tokens_to_ids(["<|image_start|>", "<|image_end|>", "<|patch|>"])
    text = dict(ARCH_CONFIGS["Llama4ForCausalLM"][1], hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok), initializer_range=initializer_range,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    # (the pixel shuffle takes 4 x hidden_size features into the MLP: intermediate_size must be that;
    # the tower gives rows of the text width, so a skipped projector would still fit)
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=tile, patch_size=7, vision_output_dim=64, projector_input_dim=64,
                  projector_output_dim=64, initializer_range=initializer_range)
    cfg = transformers.Llama4Config(text_config=text, vision_config=vision, image_token_index=patch,
                                    boi_token_index=start, eoi_token_index=end)
    cfg.architectures = ["Llama4ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = transformers.Llama4ForConditionalGeneration(cfg)
    with torch.no_grad():  # transformers' init leaves the vision norms at ones and the biases at zero
        for name, p in model.vision_model.named_parameters():
            if name.endswith(".bias") or "layernorm" in name or "_norm" in name:
                p.normal_(1.0 if name.endswith(".weight") else 0.0, 0.2)
        for p in model.parameters():  # (not model.to: it would cast the tower's complex RoPE buffer to real)
            p.data = p.data.to(getattr(torch, dtype))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    processor = {"image_processor_type": "Llama4ImageProcessorFast", "processor_class": "Llama4Processor",
                 "size": {"height": tile, "width": tile}, "max_patches": max_patches, "resize_to_max_canvas": False,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
                 "resample": 2, "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True}
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(processor, f, indent=2)
    with open(os.path.join(path, "processor_config.json"), "w") as f:
        json.dump({"processor_class": "Llama4Processor", "patch_size": 7, "pixel_shuffle_ratio": 0.5}, f, indent=2)
    return path


def build_random_eagle_head(path: str, target_dir: str, version: int = 3, num_layers: int = 1,
                            draft_vocab_size: Optional[int] = None, aux_layer_ids: Optional[list[int]] = None,
                            fc_bias: bool = False, seed: int = 0, std: float = 0.1,
                            speculators_tokens: Optional[int] = None, variants: Optional[dict] = None) -> str:
    """A random EAGLE-1 or EAGLE-3 head for the Llama-shaped model in target_dir, in the
    checkpoint layout of the published heads (model/eagle.py): EAGLE-1 `fc` and `layers.N`;
    EAGLE-3 `fc`, `midlayer` (first layer), `norm`, its own `lm_head` over `draft_vocab_size`
    tokens with `d2t` / `t2d` maps. speculators_tokens: an EAGLE-3 head saved as the
    `speculators` library saves one (model/speculators.py), proposing that many tokens.
    variants: EAGLE-3 flags set in its config ({"norm_before_fc": True, "fc_norm": True,
    "norm_output": True, "norm_before_residual": ...}), with the weights they need. Returns path."""
    import torch
    from safetensors.torch import save_file

    with open(os.path.join(target_dir, "config.json")) as f:
        cfg = json.load(f)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    vocab = cfg["vocab_size"]
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    def layer(prefix: str, in_size: int, with_input_norm: bool) -> dict:
        w = {f"{prefix}.self_attn.q_proj.weight": rand(heads * hd, in_size),
             f"{prefix}.self_attn.k_proj.weight": rand(kv * hd, in_size),
             f"{prefix}.self_attn.v_proj.weight": rand(kv * hd, in_size),
             f"{prefix}.self_attn.o_proj.weight": rand(h, heads * hd),
             f"{prefix}.mlp.gate_proj.weight": rand(inter, h), f"{prefix}.mlp.up_proj.weight": rand(inter, h),
             f"{prefix}.mlp.down_proj.weight": rand(h, inter),
             f"{prefix}.post_attention_layernorm.weight": 1 + rand(h)}
        if with_input_norm:
            w[f"{prefix}.input_layernorm.weight"] = 1 + rand(h)
        return w

    os.makedirs(path, exist_ok=True)
    # A Llama decoder layer's config, as published heads have (whatever the target's kind).
    llama = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
             "vocab_size", "rms_norm_eps", "max_position_embeddings", "hidden_act", "bos_token_id", "eos_token_id",
             "pad_token_id", "dtype", "torch_dtype", "initializer_range", "tie_word_embeddings")
    head = {k: cfg[k] for k in llama if k in cfg}
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if cfg.get("model_type") == "llama":
        head.update({k: cfg[k] for k in ("rope_parameters", "rope_scaling", "rope_theta") if k in cfg})
    else:  # (another kind's RoPE may rotate part of each head, or be M-RoPE: the head's is plain)
        head["rope_theta"] = cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)
    head.update(model_type="llama", num_hidden_layers=num_layers)
    weights: dict = {}
    if version == 1:
        head["architectures"] = ["LlamaForCausalLM"]
        weights["fc.weight"] = rand(h, 2 * h)
        for i in range(num_layers):
            weights.update(layer(f"layers.{i}", h, i > 0))
    else:
        dv = draft_vocab_size or vocab
        head.update(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=dv, target_hidden_size=h,
                    **(variants or {}))
        if aux_layer_ids is not None:
            head["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids)}
        n_aux = len(aux_layer_ids) if aux_layer_ids is not None else 3
        weights["fc.weight"] = rand(h, n_aux * h)
        if (variants or {}).get("norm_before_fc"):
            weights["input_norm.weight"] = 1 + rand(n_aux * h)
        if (variants or {}).get("fc_norm"):
            weights.update({f"fc_norm.{i}.weight": 1 + rand(h) for i in range(n_aux)})
        first = "layers.0" if speculators_tokens else "midlayer"
        weights.update(layer(first, 2 * h, True))
        weights[f"{first}.hidden_norm.weight"] = 1 + rand(h)
        for i in range(1, num_layers):
            weights.update(layer(f"layers.{i}", h, True))
        weights["norm.weight"] = 1 + rand(h)
        weights["lm_head.weight"] = rand(dv, h)
        # The draft vocabulary: every other target token from 0 (d2t holds target - draft).
        targets = torch.arange(dv) * max(1, vocab // dv)
        weights["d2t"] = targets - torch.arange(dv)
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[targets] = True
        weights["t2d"] = t2d
    if fc_bias:
        weights["fc.bias"] = rand(h)
    if speculators_tokens:
        head = _speculators_layout(head, target_dir, speculators_tokens)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(head, f, indent=1)
    return path


def _speculators_layout(head: dict, target_dir: str, tokens: int) -> dict:
    """An EAGLE-3 head's config as `speculators` writes it: the layer's settings nested, the
    head's fields on top, the proposal length and the verifier named."""
    top = ("draft_vocab_size", "target_hidden_size", "norm_before_residual", "norm_before_fc", "fc_norm",
           "norm_output")
    layer = {k: v for k, v in head.items() if k not in top + ("architectures", "eagle_config")}
    out = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
           "transformer_layer_config": dict(layer, model_type="llama"),
           **{k: head[k] for k in top if k in head},
           "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                  "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": tokens}],
                                  "verifier": {"name_or_path": target_dir, "architectures": ["LlamaForCausalLM"]}}}
    ids = head.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids")
    if ids is not None:
        out["eagle_aux_hidden_state_layer_ids"] = ids
    return out


def _extra_layer(raw: dict, bigger: dict, seed: int) -> dict:
    """The tensors of layer num_hidden_layers of the model whose config.json is `raw`, grown
    to the `bigger` config, drawn by transformers, named model.layers.{n}.*."""
    import tempfile

    import torch
    import transformers
    from safetensors.torch import load_file

    arch = raw["architectures"][0]
    config = getattr(transformers, ARCH_CONFIGS[arch][0]).from_dict(bigger)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config)
    prefix = f"model.layers.{raw['num_hidden_layers']}."
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors = {}
        for name in sorted(os.listdir(tmp)):
            if name.endswith(".safetensors"):
                tensors.update({k: v for k, v in load_file(os.path.join(tmp, name)).items() if k.startswith(prefix)})
    return tensors


def _save_mtp(model_dir: str, raw: dict, tensors: dict, **config: Any) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(model_dir, "model-mtp.safetensors"))
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(dict(raw, **config), f, indent=1)
    return model_dir


def add_random_mtp_layer(model_dir: str, seed: int = 0, std: float = 0.1, own_head: bool = True,
                         own_embed: bool = False) -> str:
    """Give the DeepSeek-V3 / GLM-4.5 / GLM-4.7-Flash model in model_dir one random
    multi-token-prediction layer, as their checkpoints hold them (model/mtp.py): tensors under
    model.layers.{num_hidden_layers}. (enorm, hnorm, eh_proj, shared_head.norm, optionally
    shared_head.head and embed_tokens, and a decoder layer of the model's kind) in a file of
    their own, and num_nextn_predict_layers 1 in config.json. Returns model_dir."""
    import torch

    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    n, h, vocab = raw["num_hidden_layers"], raw["hidden_size"], raw["vocab_size"]
    bigger = dict(raw, num_hidden_layers=n + 1)
    if raw.get("mlp_layer_types"):
        bigger["mlp_layer_types"] = raw["mlp_layer_types"] + ["sparse"]  # (an MTP layer has experts)
    tensors = _extra_layer(raw, bigger, seed)
    prefix = f"model.layers.{n}."
    g = torch.Generator().manual_seed(seed + 1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    tensors.update({prefix + "enorm.weight": 1 + rand(h), prefix + "hnorm.weight": 1 + rand(h),
                    prefix + "eh_proj.weight": rand(h, 2 * h), prefix + "shared_head.norm.weight": 1 + rand(h)})
    if own_head:
        tensors[prefix + "shared_head.head.weight"] = rand(vocab, h)
    if own_embed:
        tensors[prefix + "embed_tokens.weight"] = rand(vocab, h)
    return _save_mtp(model_dir, raw, tensors, num_nextn_predict_layers=1)


def add_random_qwen_mtp(model_dir: str, seed: int = 0, std: float = 0.1) -> str:
    """Give the Qwen3-Next / Qwen3.5 model in model_dir one random multi-token-prediction layer
    as their checkpoints hold it (model/qwen3_next_mtp.py): tensors under mtp. (fc, the
    zero-centred norms pre_fc_norm_embedding, pre_fc_norm_hidden and norm, and layers.0, a
    full-attention decoder layer of the model's kind) in a file of their own, and
    mtp_num_hidden_layers 1 in config.json. Returns model_dir."""
    import torch

    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    n, h = raw["num_hidden_layers"], raw["hidden_size"]
    bigger = dict(raw, num_hidden_layers=n + 1, layer_types=raw["layer_types"] + ["full_attention"])
    prefix = f"model.layers.{n}."
    tensors = {"mtp.layers.0." + k[len(prefix):]: v for k, v in _extra_layer(raw, bigger, seed).items()}
    g = torch.Generator().manual_seed(seed + 1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    tensors.update({"mtp.fc.weight": rand(h, 2 * h), "mtp.pre_fc_norm_embedding.weight": rand(h),
                    "mtp.pre_fc_norm_hidden.weight": rand(h), "mtp.norm.weight": rand(h)})
    return _save_mtp(model_dir, raw, tensors, mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False)
