"""MiniMax's lightning attention (model/minimax.py): the slope rates it computes for a
checkpoint that does not carry them equal transformers'; a checkpoint's own replace them.
(The whole model against transformers: test_correctness.)"""

from __future__ import annotations

import torch

from pagedserve.model.minimax import LightningAttention


def test_slope_rates_equal_transformers():
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    cfg = MiniMaxConfig(hidden_size=64, num_attention_heads=8, head_dim=8, num_hidden_layers=5)
    for layer in range(5):
        want = MiniMaxLightningAttention(cfg, layer).slope_rate.reshape(-1)
        torch.testing.assert_close(LightningAttention(cfg, layer).slope_rate, want, rtol=1e-6, atol=0)


def test_a_checkpoint_slope_rate_replaces_the_computed_one(model_dirs):
    from pagedserve import LLM

    llm = LLM(model_dirs["minimax"])
    model = llm.llm_engine.runner.model
    layer = model.state_layers()[1]  # the third decoder layer
    from safetensors import safe_open

    with safe_open(f"{model_dirs['minimax']}/model.safetensors", "pt") as f:
        saved = f.get_tensor("model.layers.2.self_attn.slope_rate").reshape(-1)
    saved = saved * 1.5  # what a checkpoint with rates of its own would hold
    model.load_weights([("model.layers.2.self_attn.slope_rate", saved.reshape(-1, 1, 1))])
    torch.testing.assert_close(layer.slope_rate, saved)
