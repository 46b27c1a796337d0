"""A vision-language checkpoint served as its language model (Gemma 3 4B and up ship as
Gemma3ForConditionalGeneration, Llama 4 as Llama4ForConditionalGeneration, Gemma 4 as
Gemma4ForConditionalGeneration, Gemma 3n as Gemma3nForConditionalGeneration): text prompts give
transformers' tokens on the same weights; the vision tower is not loaded."""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import HFReference, assert_greedy_matches, assert_output_matches
from pagedserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def gemma3_mm_dir(tokenizer_dir, tmp_path_factory):
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = transformers.Gemma3Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=len(tok), sliding_window=19,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                         initializer_range=0.5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=len(tok) - 1, boi_token_index=len(tok) - 2,
        eoi_token_index=len(tok) - 3, initializer_range=0.5)
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("gemma3_mm"))
    transformers.Gemma3ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama4_mm_dir(tokenizer_dir, tmp_path_factory):
    import transformers
    from transformers import AutoTokenizer

    from pagedserve.model.random_model import ARCH_CONFIGS

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # (intermediate_size = hidden_size: the stacked experts' down_proj is square, so its layout
    # cannot be told from its shape)
    cfg = transformers.Llama4Config(
        text_config=dict(ARCH_CONFIGS["Llama4ForCausalLM"][1], hidden_size=64, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                         initializer_range=0.5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                           projector_output_dim=64),
        image_token_index=len(tok) - 1, boi_token_index=len(tok) - 2, eoi_token_index=len(tok) - 3)
    cfg.architectures = ["Llama4ForConditionalGeneration"]
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("llama4_mm"))
    transformers.Llama4ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma4_mm_dir(tokenizer_dir, tmp_path_factory):
    import transformers
    from transformers import AutoTokenizer

    from pagedserve.model.random_model import ARCH_CONFIGS

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    n = len(tok)
    cfg = transformers.Gemma4Config(
        text_config=dict(ARCH_CONFIGS["Gemma4ForCausalLM"][1], hidden_size=64, intermediate_size=64,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, vocab_size=n,
                         vocab_size_per_layer_input=n, initializer_range=0.5, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, patch_size=14, position_embedding_size=64),
        image_token_id=n - 1, boi_token_id=n - 2, eoi_token_id=n - 3, video_token_id=n - 4, boa_token_id=n - 5,
        eoa_token_index=n - 6, audio_token_id=n - 7, initializer_range=0.5)
    cfg.architectures = ["Gemma4ForConditionalGeneration"]
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("gemma4_mm"))
    transformers.Gemma4ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("name, arch", [("gemma3_mm_dir", "Gemma3"), ("llama4_mm_dir", "Llama4"),
                                        ("gemma4_mm_dir", "Gemma4")])
def test_text_prompts_match_transformers(name, arch, request):
    gemma3_mm_dir = request.getfixturevalue(name)
    llm = LLM(gemma3_mm_dir, max_num_batched_tokens=32, block_size=8)
    assert type(llm.llm_engine.runner.model).__name__ == f"{arch}ForCausalLM"
    ref = HFReference(gemma3_mm_dir)
    # (transformers takes Llama 4's language model alone, loaded from the same checkpoint)
    assert type(ref.model).__name__ in (f"{arch}ForConditionalGeneration", f"{arch}ForCausalLM")
    prompts = [[(11 * i + 3 * j) % 1000 + 4 for j in range(n)] for i, n in enumerate((5, 30, 70))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert_greedy_matches(ref.greedy(p, 10), o.outputs[0].token_ids)
    # No vision weights were loaded into memory.
    assert not any("vision" in n for n, _ in llm.llm_engine.runner.model.named_parameters())


@contextlib.contextmanager
def _gemma3n_without_timm():
    """transformers' Gemma 3n with its vision tower (a timm model; timm is not installed here)
    left out: the rest of Gemma3nForConditionalGeneration, its text path included, as it is."""
    from transformers.models.gemma3n import modeling_gemma3n

    real = modeling_gemma3n.AutoModel

    class _AutoModel:
        @staticmethod
        def from_config(cfg, *args, **kwargs):
            if cfg.model_type == "gemma3n_vision":
                return torch.nn.Identity()
            return real.from_config(cfg, *args, **kwargs)

    modeling_gemma3n.AutoModel = _AutoModel
    try:
        yield
    finally:
        modeling_gemma3n.AutoModel = real


@pytest.fixture(scope="module")
def gemma3n_mm_dir(tokenizer_dir, tmp_path_factory):
    """A Gemma3nForConditionalGeneration directory (a one-layer audio tower, no vision tower) whose
    last 16 token ids are image and audio markers with embeddings of their own, as the real
    model's ids past its text vocabulary; transformers stays able to load it while in use."""
    import transformers
    from transformers import AutoTokenizer

    from pagedserve.model.random_model import ARCH_CONFIGS

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    n = len(tok)
    text = dict(ARCH_CONFIGS["Gemma3nForCausalLM"][1], hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=n, vocab_size_per_layer_input=n - 16,
                layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
                activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0], initializer_range=0.5,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = transformers.Gemma3nConfig(
        text_config=text, vision_config=dict(vocab_offset=n - 16, vocab_size=8, hidden_size=32),
        audio_config=dict(vocab_offset=n - 8, vocab_size=8, hidden_size=32, conf_num_hidden_layers=1,
                          conf_num_attention_heads=2, sscp_conv_channel_size=[8, 4], input_feat_size=16),
        image_token_id=n - 15, boi_token_id=n - 17, eoi_token_id=n - 16, boa_token_id=n - 18, eoa_token_id=n - 8,
        audio_token_id=n - 7, initializer_range=0.5)
    cfg.architectures = ["Gemma3nForConditionalGeneration"]
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("gemma3n_mm"))
    with _gemma3n_without_timm():
        model = transformers.Gemma3nForConditionalGeneration(cfg)
        with torch.no_grad():  # (norms and AltUp's output scale drawn: its zeros would hide the per-layer inputs)
            for name, p in model.named_parameters():
                if name.endswith(("norm.weight", "correct_output_scale")):
                    p.uniform_(0.5, 1.5)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        yield path


def test_gemma3n_text_prompts_match_transformers(gemma3n_mm_dir):
    """Text prompts, marker ids of both tables among them, against transformers' own
    Gemma3nForConditionalGeneration; the towers are not loaded, the marker tables are."""
    llm = LLM(gemma3n_mm_dir, max_num_batched_tokens=32, block_size=8)
    model = llm.llm_engine.runner.model
    assert type(model).__name__ == "Gemma3nForCausalLM"
    ref = HFReference(gemma3n_mm_dir)
    assert type(ref.model).__name__ == "Gemma3nForConditionalGeneration"
    n = model.config.vocab_size
    prompts = [[(11 * i + 3 * j) % 1000 + 4 for j in range(k)] for i, k in enumerate((5, 30, 70))]
    prompts[1][3:6] = [n - 16, n - 15, n - 9]  # (image markers)
    prompts[2][10:13] = [n - 8, n - 7, n - 1]  # (audio markers)
    prompts[2][40] = n - 12
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert_output_matches(ref.greedy(p, 10), o, lp_tol=2e-4)
    names = [name for name, _ in model.named_parameters()]
    assert not any("tower" in name or "soft_embedding" in name for name in names)
    assert "model.embed_vision.embedding.weight" in names and "model.embed_audio.embedding.weight" in names
