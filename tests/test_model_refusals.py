"""Architectures refuse, by name, the config options they do not implement (instead of
running a different model)."""

from __future__ import annotations

import pytest
import transformers

from pagedserve.model.registry import resolve_model_class

_SMALL = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=128)

_HYBRID = {"layers_block_type": ["hybrid"]}  # (Zamba's default layer types would not fit _SMALL's one layer)
_UNSHARED = {"num_kv_shared_layers": 0}  # (Gemma 3n's default 15 would not fit it either)

# (architecture, config class, the option set, the word the error must name)
_REFUSED = [
    ("MptForCausalLM", "MptConfig", {"attn_config": {"alibi": False}}, "alibi"),
    ("MptForCausalLM", "MptConfig", {"attn_config": {"qk_ln": True}}, "qk_ln"),
    ("MptForCausalLM", "MptConfig", {"attn_config": {"prefix_lm": True}}, "prefix_lm"),
    ("MptForCausalLM", "MptConfig", {"attn_config": {"attn_type": "multiquery_attention"}}, "attn_type"),
    ("MptForCausalLM", "MptConfig", {"no_bias": False}, "no_bias"),
    ("MptForCausalLM", "MptConfig", {"logit_scale": 2.0}, "logit_scale"),
    ("OPTForCausalLM", "OPTConfig", {"layer_norm_elementwise_affine": False}, "layer_norm_elementwise_affine"),
    ("PhimoeForCausalLM", "PhimoeConfig", {"num_experts_per_tok": 1}, "num_experts_per_tok"),
    ("PhimoeForCausalLM", "PhimoeConfig", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4,
                                                             "short_mscale": 1.0, "long_mscale": 1.0}}, "rope_type"),
    ("MiniMaxM2ForCausalLM", "MiniMaxM2Config", {"qk_norm_type": "per_head"}, "qk_norm_type"),
    ("MiniMaxM2ForCausalLM", "MiniMaxM2Config", {"scoring_func": "softmax"}, "scoring_func"),
    ("MiniMaxM2ForCausalLM", "MiniMaxM2Config", {"attn_type_list": [0]}, "attn_type_list"),
    ("MiMoV2FlashForCausalLM", "MiMoV2FlashConfig", {"add_full_attention_sink_bias": True},
     "add_full_attention_sink_bias"),
    ("MiMoV2FlashForCausalLM", "MiMoV2FlashConfig", {"swa_num_key_value_heads": 3}, "swa_num_key_value_heads"),
    ("HunYuanMoEV1ForCausalLM", "HunYuanMoEV1Config", {"use_cla": True}, "use_cla"),
    ("HunYuanMoEV1ForCausalLM", "HunYuanMoEV1Config", {"num_shared_expert": [2]}, "num_shared_expert"),
    ("HunYuanMoEV1ForCausalLM", "HunYuanMoEV1Config", {"moe_intermediate_size": 32}, "moe_intermediate_size"),
    ("Dots1ForCausalLM", "Dots1Config", {"scoring_func": "softmax"}, "scoring_func"),
    ("Zamba2ForCausalLM", "Zamba2Config", {**_HYBRID, "use_long_context": True}, "use_long_context"),
    ("Zamba2ForCausalLM", "Zamba2Config", {**_HYBRID, "use_shared_mlp_adapter": False}, "use_shared_mlp_adapter"),
    ("Zamba2ForCausalLM", "Zamba2Config", {**_HYBRID, "use_shared_attention_adapter": True, "num_key_value_heads": 2},
     "use_shared_attention_adapter"),
    ("ZambaForCausalLM", "ZambaConfig", {**_HYBRID, "hidden_mamba_act": "gelu"}, "hidden_mamba_act"),
    ("ZambaForCausalLM", "ZambaConfig", {**_HYBRID, "attention_hidden_size": 96}, "attention_hidden_size"),
    ("Gemma3nForCausalLM", "Gemma3nTextConfig", {**_UNSHARED, "altup_active_idx": 4}, "altup_active_idx"),
    ("Gemma3nForCausalLM", "Gemma3nTextConfig", {**_UNSHARED, "hidden_size_per_layer_input": 0},
     "hidden_size_per_layer_input"),
    ("Gemma3nForCausalLM", "Gemma3nTextConfig", {**_UNSHARED, "activation_sparsity_pattern": [1.0]},
     "activation_sparsity_pattern"),
    ("Gemma3nForCausalLM", "Gemma3nTextConfig", {"num_kv_shared_layers": 1}, "num_kv_shared_layers"),
]


@pytest.mark.parametrize("arch,config,option,word", _REFUSED, ids=[r[0] + "-" + r[3] for r in _REFUSED])
def test_unsupported_options_are_refused(arch, config, option, word):
    cfg = getattr(transformers, config)(**_SMALL, **option)
    cfg.architectures = [arch]
    with pytest.raises(ValueError, match=word):
        resolve_model_class(cfg)(cfg, 64)


@pytest.mark.parametrize("arch,config", [("HunYuanDenseV1ForCausalLM", "HunYuanDenseV1Config"),
                                         ("OlmoForCausalLM", "OlmoConfig")])
def test_windows_transformers_ignores_are_ignored(arch, config):
    """A sliding_window in config.json that transformers' model does not apply: full attention."""
    import torch

    cfg = getattr(transformers, config)(**_SMALL, sliding_window=8)
    cfg.architectures = [arch]
    with torch.device("meta"):
        model = resolve_model_class(cfg)(cfg, 64)
    assert [a.window for a in model.attention_layers()] == [0]


def test_dbrx_rope_base_from_attn_config():
    """DBRX's RoPE base is attn_config.rope_theta where given (what the released models were
    trained with: 500000), which transformers 5 leaves out of rope_parameters (10000)."""
    import math

    import torch

    cfg = transformers.DbrxConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=128, attn_config={"rope_theta": 5e5})
    cfg.architectures = ["DbrxForCausalLM"]
    with torch.device("meta"):
        model = resolve_model_class(cfg)(cfg, 64)
    table = model.model.layers[0].self_attn.rotary.cos_sin  # [position, cos | sin]; head_dim 16
    assert table[1, 1].item() == pytest.approx(math.cos(5e5 ** (-2 / 16)))
