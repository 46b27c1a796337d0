"""Phi-3 specifics beyond the transformers comparisons of test_correctness.py (the "phi3"
model: fused checkpoint tensors, sliding window, partial rotary, LongRoPE short factors):
LongRoPE's long factors, chosen by max_model_len, and partial-rotary config errors."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from conftest import HFReference, assert_greedy_matches
from pagedserve import LLM, SamplingParams

ORIGINAL = 32  # the pretraining length: LongRoPE's long factors apply past it


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory, tokenizer_dir) -> str:
    from pagedserve.model.random_model import build_random_model

    path = str(tmp_path_factory.mktemp("phi3_long"))
    build_random_model(path, "Phi3ForCausalLM", initializer_range=0.5, tokenizer_dir=tokenizer_dir, num_heads=4,
                       num_kv_heads=2, max_position_embeddings=128, original_max_position_embeddings=ORIGINAL,
                       partial_rotary_factor=0.5, rope_scaling={
                           "rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0],
                           "long_factor": [1.0, 6.0, 20.0, 60.0]})
    return path


def _greedy(path: str, prompts: list[list[int]], max_model_len: int, n: int = 8):
    llm = LLM(path, max_model_len=max_model_len)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def _prompts(lengths) -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(4, 1000) for _ in range(n)] for n in lengths]


def test_long_factors_past_the_pretraining_length(long_dir):
    """max_model_len past original_max_position_embeddings: long factors for every position,
    as transformers uses them for a sequence already past that length (a prompt longer than
    it), with LongRoPE's attention scaling. Within it: the short factors, as transformers."""
    ref = HFReference(long_dir)
    long_prompts = _prompts((ORIGINAL + 3, 70))
    for p, o in zip(long_prompts, _greedy(long_dir, long_prompts, max_model_len=128)):
        want = ref.greedy(p, 8)
        assert_greedy_matches(want, o.outputs[0].token_ids)
        first = o.outputs[0].logprobs[0][o.outputs[0].token_ids[0]].logprob
        assert abs(first - float(want.logits[0].log_softmax(-1)[want.tokens[0]])) < 2e-4
    short_prompts = _prompts((5, 20))
    for p, o in zip(short_prompts, _greedy(long_dir, short_prompts, max_model_len=ORIGINAL)):
        assert_greedy_matches(ref.greedy(p, 8), o.outputs[0].token_ids)


def test_the_factors_differ_and_follow_max_model_len(long_dir):
    """The two caches differ (the test above could not tell them apart otherwise), and the
    rotation covers half of each head."""
    short = LLM(long_dir, max_model_len=ORIGINAL).llm_engine.runner.model
    long = LLM(long_dir, max_model_len=128).llm_engine.runner.model
    rs, rl = short.model.layers[0].self_attn.rotary, long.model.layers[0].self_attn.rotary
    assert rs.rotary_dim == rl.rotary_dim == rs.head_dim // 2 and rs.partial
    assert not torch.allclose(rs.cos_sin[:ORIGINAL], rl.cos_sin[:ORIGINAL])


def test_bad_partial_rotary_factor_is_a_clear_error(long_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(long_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.1}
    cfg["partial_rotary_factor"] = 0.1  # 16 * 0.1: 1 dim, odd
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="partial_rotary_factor=0.1 gives a rotary dim of 1 for head dim 16"):
        LLM(str(bad))


def test_partial_rotary_with_plain_rope(tmp_path, tokenizer_dir):
    """Phi-4-mini's 3/4 of a head under plain RoPE (no scaling): greedy tokens and logprobs
    as transformers'."""
    from pagedserve.model.random_model import build_random_model

    path = build_random_model(str(tmp_path / "m"), "Phi3ForCausalLM", initializer_range=0.5,
                              tokenizer_dir=tokenizer_dir, num_heads=4, num_kv_heads=1, partial_rotary_factor=0.75)
    ref = HFReference(path)
    prompts = _prompts((9, 41))
    for p, o in zip(prompts, _greedy(path, prompts, max_model_len=256)):
        want = ref.greedy(p, 8)
        assert_greedy_matches(want, o.outputs[0].token_ids)
        first = o.outputs[0].logprobs[0][o.outputs[0].token_ids[0]].logprob
        assert abs(first - float(want.logits[0].log_softmax(-1)[want.tokens[0]])) < 2e-4
