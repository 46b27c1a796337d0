"""Shared fixtures: tiny random-weight models of every supported architecture, built once
per session with a tokenizer trained locally, and a Hugging Face greedy reference."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

# Under pytest-xdist (the README's `-n 2`) each worker is one process per core: one thread
# each, or OpenMP's spinning threads fight over the cores (a test ran 45x slower that way).
# Set before torch loads OpenMP; subprocesses (server and CLI tests) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Without CUDA, Triton kernels run on CPU tensors in Triton's interpreter. Set before anything
# imports triton (it reads the variable at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need a CUDA device: skipped where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# name -> (architecture, build kwargs). initializer_range 0.5 keeps logits well apart so
# float32 round-off cannot flip a greedy choice.
_HYBRID = ["linear_attention", "full_attention", "linear_attention"]
MODEL_SPECS = {
    "llama": ("LlamaForCausalLM", dict(num_heads=4, num_kv_heads=2)),
    "mistral": ("MistralForCausalLM", dict(num_heads=4, num_kv_heads=1)),
    "qwen2": ("Qwen2ForCausalLM", dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=True)),
    # Hybrid linear attention: Gated DeltaNet layers around a gated full-attention layer;
    # Qwen3-Next's experts skip the middle layer (mlp_only_layers).
    "qwen3_next": ("Qwen3NextForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=3, layer_types=_HYBRID)),
    "qwen3_5": ("Qwen3_5ForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=3, layer_types=_HYBRID,
                                           tie_word_embeddings=True, random_norms=True)),
    "qwen3_5_moe": ("Qwen3_5MoeForCausalLM", dict(num_heads=4, num_kv_heads=1, num_layers=3, layer_types=[
        "full_attention", "linear_attention", "linear_attention"])),
    # Granite 4.0-H: Mamba-2 layers around an attention layer without RoPE, a shared MLP and 4
    # experts; Granite 4.0's dense form with RoPE.
    "granite_hybrid": ("GraniteMoeHybridForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=3, layer_types=[
        "mamba", "attention", "mamba"], random_norms=True)),
    "granite_hybrid_dense": ("GraniteMoeHybridForCausalLM", dict(
        num_heads=4, num_kv_heads=1, num_layers=3, layer_types=["attention", "mamba", "attention"], num_local_experts=0,
        position_embedding_type="rope")),
    # Nemotron-H: Mamba-2, MLP, attention (no position encoding) and Mamba-2 blocks; weights small
    # enough that every dt stays clear of time_step_min (random_model.py says why).
    "nemotron_h": ("NemotronHForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=4, random_norms=True,
                                                initializer_range=0.15)),
    # Bamba: Mamba-2 layers around an attention layer with RoPE on half of each head.
    "bamba": ("BambaForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=3, random_norms=True)),
    # Falcon-H1: Mamba-2 and attention side by side, muP multipliers folded into the weights;
    # its second form without the SSM's norm, with every bias drawn (folded too).
    "falcon_h1": ("FalconH1ForCausalLM", dict(num_heads=4, num_kv_heads=2, random_norms=True)),
    "falcon_h1_biases": ("FalconH1ForCausalLM", dict(num_heads=4, num_kv_heads=2, mamba_rms_norm=False,
                                                     projectors_bias=True, mamba_proj_bias=True, attention_bias=True,
                                                     mlp_bias=True, random_biases=True)),
    # Mamba-2 alone: no attention layer at all.
    "mamba2": ("Mamba2ForCausalLM", dict(num_layers=2, random_norms=True)),
    # Mamba-1 alone, and Falcon Mamba (dt, B and C RMS-normalised without weights).
    "mamba": ("MambaForCausalLM", dict(num_layers=2, random_norms=True)),
    "falcon_mamba": ("FalconMambaForCausalLM", dict(num_layers=2, random_norms=True)),
    # Jamba: Mamba-1 (weighted dt / B / C norms), attention without RoPE, experts every second
    # layer (softmax weights not renormalised).
    "jamba": ("JambaForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=4, random_norms=True)),
    # Nemotron 3: Nemotron-H with expert blocks (4 gateless experts in 2 groups, 2 a token, a
    # grouped sigmoid router with its correction bias, a shared expert, the routed experts in a
    # 32-wide latent space).
    "nemotron_3": ("NemotronHForCausalLM", dict(
        num_heads=4, num_kv_heads=2, num_layers=4, initializer_range=0.15, hybrid_override_pattern="ME*E",
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, moe_shared_expert_intermediate_size=64,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, moe_latent_size=32)),
    # MiniMax-Text-01: lightning attention, softmax attention and lightning layers, experts
    # after each, scaled post-norm layers.
    "minimax": ("MiniMaxForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=3, head_dim=16, layer_types=[
        "linear_attention", "full_attention", "linear_attention"], random_norms=True)),
    # Zamba2: Mamba-2 layers, a shared transformer block (on [hidden, embeddings]) before the
    # hybrid ones: two blocks over three hybrid layers, the third running block 0 again with
    # adapters and a KV cache of its own; q/k/v adapters and RoPE. Its second form: GQA, no
    # q/k/v adapters or RoPE, biases drawn, and untied embeddings, with which transformers gives
    # each hybrid layer a block of its own. (At 0.5 the shared blocks' float32 noise grows about
    # 10x a hybrid layer: logprobs part from transformers' by 0.4; at 0.15 by 5e-5.)
    "zamba2": ("Zamba2ForCausalLM", dict(num_heads=4, num_kv_heads=4, num_layers=5, layers_block_type=[
        "mamba", "hybrid", "mamba", "hybrid", "hybrid"], num_mem_blocks=2, use_shared_attention_adapter=True,
        use_mem_rope=True, tie_word_embeddings=True, random_norms=True, initializer_range=0.15)),
    "zamba2_untied": ("Zamba2ForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=4, layers_block_type=[
        "hybrid", "mamba", "hybrid", "hybrid"], num_mem_blocks=2, add_bias_linear=True, random_biases=True,
        random_norms=True, initializer_range=0.15)),
    # Zamba v1: Mamba-1 layers of 2 heads (each its own dt, B and C), one shared block (tied) run
    # twice, GQA, the Mamba projections' biases drawn (the output bias is added once, not per head).
    "zamba": ("ZambaForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=4, layers_block_type=[
        "mamba", "hybrid", "mamba", "hybrid"], mamba_proj_bias=True, random_biases=True, random_norms=True,
        tie_word_embeddings=True, initializer_range=0.15)),
    # LFM2: short-convolution layers around an attention layer with q/k norms.
    "lfm2": ("Lfm2ForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=3, random_norms=True)),
    # LFM2-MoE: LFM2's layers, the first with a dense MLP, the others with 4 experts (2 a token) chosen
    # by sigmoid scores plus a drawn expert bias, renormalised and scaled by 1.5; the head tied.
    "lfm2_moe": ("Lfm2MoeForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=3, random_norms=True,
                                            layer_types=["conv", "full_attention", "conv"], tie_word_embeddings=True)),
    # Mixtures of experts (4 experts, top 2): every layer sparse; Qwen2-MoE's shared expert;
    # Qwen3-MoE with a dense layer (mlp_only_layers).
    "mixtral": ("MixtralForCausalLM", dict(num_heads=4, num_kv_heads=2)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", dict(num_heads=4, num_kv_heads=2)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=32, mlp_only_layers=[1])),
    # OLMoE: q/k norms over all heads at once, experts in every layer, weights not renormalised;
    # clip_qkv clamping about 3 in 4 of the normed q/k entries and 1 in 15 of v's.
    "olmoe": ("OlmoeForCausalLM", dict(num_heads=4, num_kv_heads=2, random_norms=True, clip_qkv=0.3)),
    # FlexOlmo: OLMo 2's post-norm layers (q/k norms over all heads, drawn) with OLMoE's experts (top 2
    # of 4, not renormalised as released: the norm after the experts would undo it anyway).
    "flex_olmo": ("FlexOlmoForCausalLM", dict(num_heads=4, num_kv_heads=2, random_norms=True)),
    # Phi-3.5-MoE: LayerNorms and every bias drawn (the LM head's too), a window of 23, the
    # sparsemixer router, LongRoPE with short factors and short_mscale (max_model_len within the
    # original length; long_mscale set apart so that taking it shows).
    "phimoe": ("PhimoeForCausalLM", dict(num_heads=4, num_kv_heads=2, sliding_window=23, attention_bias=True,
                                         lm_head_bias=True, random_biases=True, random_norms=True,
                                         rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 2048,
        "short_factor": [1.0, 1.2, 1.5, 2.0, 2.6, 3.3, 4.1, 5.0], "long_factor": [1.0, 3.0, 6.0, 9.0, 12.0, 15.0,
                                                                             18.0, 21.0],
        "short_mscale": 1.2, "long_mscale": 0.7})),
    # Llama 4: chunked local attention in chunks of 16 on the RoPE layers (interleaved pairs, L2
    # q/k norms), NoPE layers with the query temperature, one expert of 4 a token on every
    # second layer (random_model.py's defaults).
    "llama4": ("Llama4ForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=4, random_norms=True)),
    # Gemma 2: alternating sliding / full layers, attention and final softcaps. Gemma 3: q/k
    # norms, local and global layers with their own RoPE (linear scaling on the global ones).
    "gemma": ("GemmaForCausalLM", dict(num_heads=4, num_kv_heads=1, head_dim=32)),
    "gemma2": ("Gemma2ForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=32, sliding_window=19)),
    "gemma3": ("Gemma3ForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=32, num_layers=3, sliding_window=19,
                                         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                         rope_parameters={
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                             "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                "rope_theta": 1000000.0}})),
    # Gemma 4 (random_model.py's defaults): sliding and global layers of their own head widths,
    # keys as values, the last two layers reading earlier layers' KV, per-layer inputs, experts
    # beside the MLPs; proportional RoPE on half of the global heads' pairs.
    "gemma4": ("Gemma4ForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=6, sliding_window=19,
                                         tie_word_embeddings=True, random_norms=True, rope_parameters={
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                             "full_attention": {"rope_type": "proportional", "rope_theta": 10000.0,
                                                                "partial_rotary_factor": 0.5}})),
    # Gemma 3n (random_model.py's defaults): every feature at once: 4 AltUp copies with the second
    # active (so that taking the first shows), LAuReL, per-layer inputs (ids past 768 take row 0's),
    # the last two layers reading earlier layers' KV, the Gaussian top-k gate on two layers at two
    # sparsities, MLP widths per layer, sliding and global layers; drawn norms and output scales.
    "gemma3n": ("Gemma3nForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=6, sliding_window=19,
                                           tie_word_embeddings=True, random_norms=True, altup_active_idx=1,
                                           vocab_size_per_layer_input=768, intermediate_size=[128, 96] * 3,
                                           activation_sparsity_pattern=[0.95, 0.6, 0.0, 0.0, 0.0, 0.0])),
    # Sliding windows: Mistral's on every layer; Qwen2's on the layers from max_window_layers.
    "mistral_swa": ("MistralForCausalLM", dict(num_heads=4, num_kv_heads=2, sliding_window=19)),
    "qwen2_swa": ("Qwen2ForCausalLM", dict(num_heads=4, num_kv_heads=2, use_sliding_window=True, sliding_window=13,
                                          max_window_layers=1)),
    # Phi-3 family: checkpoint with fused qkv / gate_up, a sliding window, LongRoPE (short
    # factors: max_model_len stays within the pretraining length) on half of each head
    # (partial rotary, as Phi-4-mini).
    "phi3": ("Phi3ForCausalLM", dict(num_heads=4, num_kv_heads=2, sliding_window=23, partial_rotary_factor=0.5,
                                     original_max_position_embeddings=2048, rope_scaling={
                                         "rope_type": "longrope", "short_factor": [1.0, 1.3, 1.9, 2.8],
                                         "long_factor": [1.0, 4.0, 9.0, 16.0]})),
    # Granite's multipliers, OLMo 2's post-norm layers and whole-projection q/k norms, SmolLM3's
    # layer without RoPE.
    "granite": ("GraniteForCausalLM", dict(num_heads=4, num_kv_heads=2)),
    # Granite 3 MoE: the multipliers around 4 experts (top 2 logits, softmax over them); the
    # Shared form's always-on MLP beside them.
    "granite_moe": ("GraniteMoeForCausalLM", dict(num_heads=4, num_kv_heads=2, random_norms=True)),
    "granite_moe_shared": ("GraniteMoeSharedForCausalLM", dict(num_heads=4, num_kv_heads=1, random_norms=True)),
    # OLMo 1: LayerNorms without weights, q/k/v and o_proj biases (drawn), q/k/v clamped at 3 (a
    # fair share of them past it at these weights); a stray sliding_window transformers ignores.
    "olmo": ("OlmoForCausalLM", dict(num_heads=4, num_kv_heads=2, attention_bias=True, random_biases=True,
                                     clip_qkv=3.0, sliding_window=19)),
    "olmo2": ("Olmo2ForCausalLM", dict(num_heads=4, num_kv_heads=2)),
    # OLMo 3: OLMo 2's layers with a window on three of four; YaRN on the full layer only.
    "olmo3": ("Olmo3ForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=4, random_norms=True, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
        "full_attention": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                           "beta_fast": 32.0, "beta_slow": 1.0, "rope_theta": 500000.0}})),
    # Ministral 3: YaRN and the queries' position scale, with an original length short tests cross.
    "ministral3": ("Ministral3ForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=16, rope_parameters={
        "rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32, "llama_4_scaling_beta": 0.5,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 1000000.0})),
    # Ministral: a window of 19 on the layers layer_types marks, full attention on the middle one.
    "ministral": ("MinistralForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=3, head_dim=16,
                                               sliding_window=19, random_norms=True, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention"])),
    # CWM: windows of 19 on three of four layers (its default layer_types), Llama-3 RoPE with an
    # original length short tests cross, MLP biases (drawn). (Its config needs an int bos_token_id.)
    "cwm": ("CwmForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=4, head_dim=16, sliding_window=19,
                                   mlp_bias=True, random_biases=True, random_norms=True, bos_token_id=0,
                                   rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 1000000.0})),
    # EXAONE 4.0: post-norm layers, per-head q/k norms, windows on three of four, the fourth without RoPE.
    "exaone4": ("Exaone4ForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=4, head_dim=16,
                                          sliding_window_pattern=4, random_norms=True)),
    # K-EXAONE: EXAONE 4.0's attention (windows on three of four layers, the fourth without RoPE) in
    # pre-norm layers, a dense first layer, then grouped sigmoid-routed experts with a drawn
    # correction bias and a shared expert.
    "exaone_moe": ("ExaoneMoeForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=4, head_dim=16,
                                                sliding_window=19, sliding_window_pattern=4, random_norms=True)),
    # ERNIE 4.5: biases everywhere (drawn), interleaved RoPE over the whole head.
    "ernie4_5": ("Ernie4_5ForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=16, random_biases=True,
                                            tie_word_embeddings=True)),
    # ERNIE 4.5 MoE: a dense first layer, softmax routing moved by a drawn correction bias.
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=16, num_layers=3,
                                                    random_biases=True)),
    # Hunyuan: q/k norms after RoPE (drawn norm weights: the order shows), NTK-alpha RoPE.
    "hunyuan": ("HunYuanDenseV1ForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=16, random_norms=True,
                                                  rope_parameters={
        "rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0})),
    # Arcee AFM: a gateless ReLU² MLP. Apertus: a gateless xIELU MLP, q/k norms, Llama-3 RoPE.
    "arcee": ("ArceeForCausalLM", dict(num_heads=4, num_kv_heads=2)),
    "apertus": ("ApertusForCausalLM", dict(num_heads=4, num_kv_heads=2, random_norms=True, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256, "rope_theta": 500000.0})),
    # Seed-OSS: q/k/v, output and MLP biases (drawn, not zeros), a head_dim of its own.
    "seed_oss": ("SeedOssForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=32, random_biases=True)),
    "smollm3": ("SmolLM3ForCausalLM", dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True)),
    # Cohere: parallel attention + MLP, mean-centred LayerNorm, logit scale, interleaved RoPE.
    "cohere": ("CohereForCausalLM", dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True)),
    # Command R7B / A: Cohere's layers, windows on three of four, the fourth without RoPE.
    "cohere2": ("Cohere2ForCausalLM", dict(num_heads=4, num_kv_heads=2, num_layers=4, tie_word_embeddings=True)),
    # GLM-4: sandwich norms, q/k/v biases, interleaved RoPE on half of each head.
    "glm4": ("Glm4ForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=32)),
    "glm": ("GlmForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=32)),
    # GPT-OSS: attention sinks, window 16 on every other layer, YaRN, biased experts with the
    # clamped SwiGLU (initializer_range 0.5 drives some past the clamp).
    "gpt_oss": ("GptOssForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=16)),
    # DeepSeek's latent attention and group-limited routers. V2: a plain query projection
    # (V2-Lite), softmax router, interleaved RoPE. V3: a low-rank query, sigmoid router with
    # its correction bias, renormalised weights, YaRN with mscale (the softmax scale moves too).
    "deepseek_v2": ("DeepseekV2ForCausalLM", dict(num_heads=4, num_layers=3, q_lora_rank=None)),
    "deepseek_v3": ("DeepseekV3ForCausalLM", dict(num_heads=4, num_layers=3, rope_parameters={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8, "rope_theta": 10000.0})),
    # GLM-4.7-Flash: V3's latent attention and experts, its dense layer named in mlp_layer_types.
    "glm4_moe_lite": ("Glm4MoeLiteForCausalLM", dict(num_heads=4, num_layers=3)),
    # GLM-4.5: V3's router and shared experts on a Llama decoder with q/k/v biases (drawn, not
    # zeros), q/k norms and RoPE on half of each head.
    "glm4_moe": ("Glm4MoeForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=32, num_layers=3,
                                            random_biases=True)),
    # Solar Open: GLM-4.5's router, groups and shared expert in every layer, q/k/v biases (drawn); a
    # stray sliding_window transformers ignores.
    "solar_open": ("SolarOpenForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=16, num_layers=2,
                                                random_biases=True, random_norms=True, sliding_window=19)),
    # GPT-NeoX (Pythia): fused per-head qkv, RoPE on a quarter of each head, LayerNorms and every
    # bias drawn; parallel residual, and the sequential form. (Multi-head: the stray
    # num_key_value_heads the builder writes must be ignored.)
    "gpt_neox": ("GPTNeoXForCausalLM", dict(num_heads=4, random_biases=True, random_norms=True)),
    "gpt_neox_seq": ("GPTNeoXForCausalLM", dict(num_heads=4, random_biases=True, random_norms=True,
                                                use_parallel_residual=False)),
    # Phi (phi-1.5, phi-2): attention and MLP in parallel on one LayerNorm, RoPE on half of each
    # head, every bias drawn (the LM head's too), GQA.
    "phi": ("PhiForCausalLM", dict(num_heads=4, num_kv_heads=2, random_biases=True, random_norms=True)),
    # StarCoder 2: LayerNorms, every bias drawn, a GELU MLP without a gate, GQA, a window of 19.
    "starcoder2": ("Starcoder2ForCausalLM", dict(num_heads=4, num_kv_heads=2, random_biases=True, random_norms=True,
                                                sliding_window=19, tie_word_embeddings=True)),
    # GPT-2: learned positions, transposed Conv1D weights, fused c_attn, LayerNorms (ln_*) and every
    # bias drawn, the head tied to wte.
    "gpt2": ("GPT2LMHeadModel", dict(num_heads=4, random_biases=True, random_norms=True, tie_word_embeddings=True)),
    # GPT-BigCode (StarCoder 1): GPT-2's layout on nn.Linear, multi-query attention (one k/v head);
    # without multi_query, c_attn's rows per head.
    "gpt_bigcode": ("GPTBigCodeForCausalLM", dict(num_heads=4, random_biases=True, random_norms=True,
                                                  tie_word_embeddings=True)),
    "gpt_bigcode_mha": ("GPTBigCodeForCausalLM", dict(num_heads=4, random_biases=True, random_norms=True,
                                                      multi_query=False)),
    # Falcon 7B: multi-query attention, attention and MLP in parallel on one LayerNorm, biases
    # (bias=True) drawn; the new decoder architecture (40B, 180B): query_key_value's rows per
    # key/value group (2 groups), ln_attn and ln_mlp.
    "falcon_mq": ("FalconForCausalLM", dict(num_heads=4, bias=True, random_biases=True, random_norms=True)),
    "falcon_gqa": ("FalconForCausalLM", dict(num_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                                            random_norms=True, tie_word_embeddings=True)),
    # ALiBi. BLOOM: 6 heads (two slopes from the series for 8), every bias and norm drawn; its form
    # with the residual stream taking the LayerNorms' outputs. MPT: 6 heads (its slopes' odd-even
    # order), clip_qkv clamping about a fifth of q/k/v, its own softmax scale.
    # Falcon-RW: Falcon with ALiBi (8 heads: slopes exact in transformers' bfloat16), per-head qkv.
    "bloom": ("BloomForCausalLM", dict(hidden_size=96, num_heads=6, random_biases=True, random_norms=True,
                                       tie_word_embeddings=True)),
    "bloom_post_norm": ("BloomForCausalLM", dict(num_heads=4, random_biases=True, random_norms=True,
                                                 apply_residual_connection_post_layernorm=True,
                                                 tie_word_embeddings=True)),
    "mpt": ("MptForCausalLM", dict(hidden_size=96, num_heads=6, random_norms=True, tie_word_embeddings=True,
                                   attn_config={"clip_qkv": 0.25, "softmax_scale": 0.3})),
    "falcon_rw": ("FalconForCausalLM", dict(num_heads=8, num_kv_heads=8, alibi=True, multi_query=False,
                                            parallel_attn=False, bias=True, random_biases=True, random_norms=True)),
    # DBRX: unbiased LayerNorms (drawn), the fused Wqkv clamped by clip_qkv (about a quarter of q/k/v),
    # GQA, 4 fused experts (2 a token, weights renormalised); RoPE's base in both places a config may
    # hold it (dbrx.py says why).
    "dbrx": ("DbrxForCausalLM", dict(num_heads=4, num_kv_heads=2, random_norms=True,
                                     attn_config={"clip_qkv": 5.0, "rope_theta": 5e5},
                                     rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
    # Helium: RoPE on interleaved pairs of the whole head, q/k/v and MLP biases drawn (none on o_proj), GQA.
    "helium": ("HeliumForCausalLM", dict(num_heads=4, num_kv_heads=2, attention_bias=True, mlp_bias=True,
                                         random_biases=True, random_norms=True)),
    # Persimmon: LayerNorms, the per-head fused query_key_value, q/k LayerNorms shared by the heads, RoPE
    # on half of each head, a ReLU² MLP; every bias and norm drawn.
    "persimmon": ("PersimmonForCausalLM", dict(num_heads=4, num_kv_heads=4, random_biases=True, random_norms=True)),
    # JAIS 2: LayerNorms, a gateless ReLU² MLP, every bias and norm drawn.
    "jais2": ("Jais2ForCausalLM", dict(num_heads=4, num_kv_heads=2, random_biases=True, random_norms=True)),
    # OPT: learned positions at an offset of 2, pre-LayerNorm layers, every bias and norm drawn, the
    # head tied; OPT-350M's form: post-LayerNorm layers, no final norm, embeddings of 32 brought to
    # the hidden size by project_in and back by project_out.
    "opt": ("OPTForCausalLM", dict(num_heads=4, random_biases=True, random_norms=True, tie_word_embeddings=True)),
    "opt_postnorm": ("OPTForCausalLM", dict(num_heads=4, random_biases=True, random_norms=True,
                                            tie_word_embeddings=True, do_layer_norm_before=False,
                                            word_embed_proj_dim=32)),
    # GPT-J: attention and MLP in parallel on one LayerNorm, RoPE on interleaved pairs of half of
    # each head, the MLP's and the untied head's biases drawn.
    "gptj": ("GPTJForCausalLM", dict(num_heads=4, random_biases=True, random_norms=True)),
    # StableLM: LayerNorms, RoPE on a quarter of each head, q/k/v biases drawn (StableLM 2 1.6B);
    # StableLM 2 12B's form: parallel residual on one LayerNorm, per-head q/k LayerNorms, GQA.
    "stablelm": ("StableLmForCausalLM", dict(num_heads=4, num_kv_heads=4, use_qkv_bias=True, random_biases=True,
                                             random_norms=True)),
    "stablelm_par": ("StableLmForCausalLM", dict(num_heads=4, num_kv_heads=2, use_parallel_residual=True,
                                                 qk_layernorm=True, random_norms=True)),
    # Nemotron (Minitron): LayerNorm1P norms (weight + 1) drawn, a ReLU² MLP without a gate, RoPE on
    # half of each head, every bias drawn (attention_bias, mlp_bias), GQA.
    "nemotron": ("NemotronForCausalLM", dict(num_heads=4, num_kv_heads=2, attention_bias=True, mlp_bias=True,
                                             random_biases=True, random_norms=True)),
    "llama3_rope": ("LlamaForCausalLM", dict(num_heads=4, num_kv_heads=4, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256, "rope_theta": 500000.0})),
    # MiniMax-M2: q/k norms over all heads (drawn), RoPE on half of each head, a sigmoid router
    # moved by its drawn correction bias, weights renormalised over the top 2 of 4 experts; a stray
    # sliding_window that transformers ignores (so must we).
    "minimax_m2": ("MiniMaxM2ForCausalLM", dict(num_heads=4, num_kv_heads=2, random_norms=True, sliding_window=19)),
    # MiMo-V2-Flash: a full layer (2 KV heads), two window layers (4 KV heads, sinks, window 16):
    # two KV cache shapes; narrower value heads, per-type RoPE on a third of each head, q/k/v
    # biases drawn, a dense layer, then grouped sigmoid-routed experts with a drawn correction bias.
    "mimo_v2_flash": ("MiMoV2FlashForCausalLM", dict(num_heads=8, num_kv_heads=2, num_layers=3, attention_bias=True,
                                                     random_biases=True, random_norms=True)),
    # Hunyuan-A13B: the dense Hunyuan's q/k norms after RoPE (drawn) and NTK-alpha RoPE, experts
    # (top 2, then top 1, of 4) beside a shared MLP, q/k/v/o biases drawn; a stray sliding_window
    # that transformers ignores (so must we).
    "hunyuan_moe": ("HunYuanMoEV1ForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=16, attention_bias=True,
                                                    random_biases=True, random_norms=True, sliding_window=19,
                                                    rope_parameters={
        "rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0})),
    # dots.llm1: per-head q/k norms (drawn), a window of 19 on the layers from max_window_layers, a
    # dense first layer, then grouped sigmoid-routed experts (drawn correction bias) and a shared one.
    "dots1": ("Dots1ForCausalLM", dict(num_heads=4, num_kv_heads=2, head_dim=16, num_layers=3, sliding_window=19,
                                       max_window_layers=1, random_norms=True)),
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    from pagedserve.model.random_model import build_tokenizer

    path = str(tmp_path_factory.mktemp("tokenizer"))
    build_tokenizer(path, vocab_size=1024)
    return path


def _build(tmp_path_factory, tokenizer_dir: str, name: str) -> str:
    from pagedserve.model.random_model import build_random_model

    arch, kwargs = MODEL_SPECS[name]
    path = str(tmp_path_factory.mktemp(name))
    kwargs = {"initializer_range": 0.5, **kwargs}
    build_random_model(path, arch, tokenizer_dir=tokenizer_dir, **kwargs)
    return path


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, str]:
    return {name: _build(tmp_path_factory, tokenizer_dir, name) for name in MODEL_SPECS}


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> str:
    return model_dirs["llama"]


@dataclass
class Reference:
    tokens: list[int]
    logits: list[torch.Tensor]  # one [vocab] row per generated position


class HFReference:
    """Greedy decoding with transformers itself (float32, CPU), memoised per prompt."""

    def __init__(self, path: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.cache: dict[tuple, Reference] = {}

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], max_tokens: int) -> Reference:
        key = (tuple(prompt_ids), max_tokens)
        if key not in self.cache:
            ids = list(prompt_ids)
            tokens, logits = [], []
            for _ in range(max_tokens):  # full recomputation: slow but free of cache subtleties
                row = self.model(torch.tensor([ids])).logits[0, -1].float()
                t = int(row.argmax())
                tokens.append(t)
                logits.append(row)
                ids.append(t)
            self.cache[key] = Reference(tokens, logits)
        return self.cache[key]


@pytest.fixture(scope="session")
def llava_dir(tokenizer_dir, tmp_path_factory) -> str:
    """A random LLaVA (tests/test_multimodal_llava.py): 56-pixel images in 14-pixel patches,
    16 placeholders an image (the class token dropped)."""
    from pagedserve.model.random_model import build_random_llava

    path = str(tmp_path_factory.mktemp("llava"))
    return build_random_llava(path, tokenizer_dir, image_size=56, initializer_range=0.5)


@pytest.fixture(scope="session")
def hf_refs(model_dirs) -> dict[str, HFReference]:
    return {name: HFReference(path) for name, path in model_dirs.items()}


@torch.inference_mode()
def cached_greedy(model: Any, input_ids: torch.Tensor, max_tokens: int, **inputs: Any) -> Reference:
    """Greedy decoding with a transformers model's own KV cache (`inputs`: its image tensors).
    With the cache, a sampled token that happens to be an image placeholder is not taken for
    one, as it would be if the whole sequence went through the model again."""
    import inspect

    # transformers renames past_key_values to cache (5.24 warns, later versions drop the old name)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens, logits = [], []
    out = model(input_ids=input_ids, use_cache=True, **inputs)
    for _ in range(max_tokens):
        row = out.logits[0, -1].float()
        tokens.append(int(row.argmax()))
        logits.append(row)
        out = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{cache_arg: out.past_key_values})
    return Reference(tokens, logits)


def assert_greedy_matches(ref: Reference, got: list[int], tie_tol: float = 1e-3) -> None:
    """Tokens must equal the reference; at the first difference, accept only a near-tie in
    transformers' own logits (and stop comparing, the sequences have parted)."""
    assert len(got) == len(ref.tokens), f"length {len(got)} != reference {len(ref.tokens)}"
    for i, (a, b) in enumerate(zip(got, ref.tokens)):
        if a != b:
            gap = float(ref.logits[i][b] - ref.logits[i][a])
            assert gap < tie_tol, f"token {i}: got {a}, transformers chose {b} with a logit lead of {gap:.4g}"
            return


def random_image(seed: int, size: tuple[int, int] = (90, 60)):
    """A PIL image (width, height) of random pixels."""
    from PIL import Image

    w, h = size
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_data_url(img) -> str:
    """A PIL image as a `data:image/png;base64,` URL, as chat image_url parts carry it."""
    import base64

    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def image_chat(urls: list[str], text: str = "What is in the picture?") -> list[dict]:
    """One user message: an image_url part per URL, then the text."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]
             + [{"type": "text", "text": text}]}]


def image_prompt(text: str, images: list):
    """vLLM's prompt with images, or the text alone without any."""
    return {"prompt": text, "multi_modal_data": {"image": images}} if images else text


def assert_output_matches(ref: Reference, out, lp_tol: float = 2e-3) -> None:
    """A RequestOutput's greedy tokens (assert_greedy_matches) and their logprobs (asked with
    logprobs=0) against the reference's, up to where the sequences part at a near-tie."""
    c = out.outputs[0]
    assert_greedy_matches(ref, c.token_ids)
    for i, (t, step) in enumerate(zip(c.token_ids, c.logprobs)):
        if t != ref.tokens[i]:
            break
        want = float(ref.logits[i].log_softmax(-1)[t])
        assert abs(step[t].logprob - want) < lp_tol, (i, step[t].logprob, want)


def assert_cases_match(llm: Any, reference: Any, cases: list, params: Any) -> None:
    """One batch of (text, images) prompts: each output equals reference.greedy(text, images),
    and the encoder cache is empty afterwards (embeddings go with their requests)."""
    outs = llm.generate([image_prompt(t, ims) for t, ims in cases], params, use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(reference.greedy(text, images), out)
    assert not llm.llm_engine.runner.encoder_cache.embeddings


def assert_pixels_key_the_cache(llm: Any, reference: Any, prompt: str, a: Any, b: Any, params: Any,
                                block_size: int = 8) -> tuple:
    """The same prompt with image `a`, then `b`: both equal the reference, and `b` finds only
    the blocks before its image in the prefix cache (same tokens, other pixels). (first, other)."""
    first, other = (llm.generate(image_prompt(prompt, [im]), params, use_tqdm=False)[0] for im in (a, b))
    assert_output_matches(reference.greedy(prompt, [a]), first)
    assert_output_matches(reference.greedy(prompt, [b]), other)
    start = first.prompt_token_ids.index(llm.llm_engine.mm_processor.token_id)
    assert other.num_cached_tokens == (start // block_size) * block_size
    return first, other


@pytest.fixture(scope="session")
def base_dir(model_dirs, tmp_path_factory):
    """The qwen3 test model saved as a base-model checkpoint (Qwen3Model: no LM head, names
    without "model."), as embedding models such as Qwen3-Embedding ship."""
    from transformers import AutoModel

    src = model_dirs["qwen3"]
    out = str(tmp_path_factory.mktemp("qwen3_base"))
    AutoModel.from_pretrained(src, dtype=torch.float32).save_pretrained(out)
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and f != "config.json":
            shutil.copy(os.path.join(src, f), out)
    return out
