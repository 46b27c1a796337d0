"""Models whose every layer has a sliding window (Mistral 7B v0.1, Phi-3-mini): KV blocks
wholly before the window of a request's next token are given back to the pool, so a request
holds about window + chunk tokens of KV however long it runs. Outputs still equal
transformers', with preemption and prefix caching in play."""

from __future__ import annotations

import random

import pytest

from conftest import assert_greedy_matches
from pagedserve import LLM, SamplingParams

WINDOW = 19  # mistral_swa's (conftest.MODEL_SPECS)


def _prompts(lengths, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 1000) for _ in range(n)] for n in lengths]


def _per_block(path: str, block_size: int) -> int:
    probe = LLM(path, block_size=block_size)
    caches = probe.llm_engine.runner.kv_caches
    return caches[0][0][0].numel() * 2 * 4 * len(caches)


def test_blocks_before_the_window_are_given_back(model_dirs, hf_refs):
    llm = LLM(model_dirs["mistral_swa"], block_size=4, max_num_batched_tokens=16, async_scheduling=False)
    kv = llm.llm_engine.kv
    assert kv.window == WINDOW
    held = []
    schedule = llm.llm_engine.scheduler.schedule

    def watch():
        out = schedule()
        held.extend(sum(b is not None for b in kv.req_blocks[s.request.request_id]) for s in out.scheduled)
        return out

    llm.llm_engine.scheduler.schedule = watch
    (prompt,) = _prompts([50])
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                       use_tqdm=False)[0]
    assert_greedy_matches(hf_refs["mistral_swa"].greedy(prompt, 40), out.outputs[0].token_ids)
    bound = kv.max_blocks_held(90, 16)
    assert bound == (WINDOW - 1 + 16) // 4 + 2 < 90 // 4
    assert max(held) <= bound  # never the whole sequence's 23 blocks
    assert held[-1] <= (WINDOW + 4) // 4 + 1  # decoding: the window's blocks and the one being filled
    assert kv.pool.num_free_blocks == kv.num_blocks and not kv.req_blocks


def test_long_requests_run_in_a_small_cache(model_dirs, hf_refs):
    """Four requests of up to 120 tokens (30 blocks each without giving blocks back) in a
    20-block cache: preemptions, recomputation, and the outputs of an unconstrained run."""
    path = model_dirs["mistral_swa"]
    prompts = _prompts([40, 60, 80, 50], seed=1)
    llm = LLM(path, block_size=4, kv_cache_memory_bytes=20 * _per_block(path, 4), max_num_batched_tokens=32,
              async_scheduling=False)
    assert llm.llm_engine.kv.num_blocks == 20
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for p, o in zip(prompts, outs):
        assert_greedy_matches(hf_refs["mistral_swa"].greedy(p, 40), o.outputs[0].token_ids)
    kv = llm.llm_engine.kv
    assert kv.pool.num_free_blocks == kv.num_blocks and not kv.req_blocks


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_given_back_blocks_stay_in_the_prefix_cache(model_dirs, hf_refs, async_scheduling):
    llm = LLM(model_dirs["mistral_swa"], block_size=4, async_scheduling=async_scheduling)
    (prompt,) = _prompts([60], seed=2)
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
    again = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
    assert again.num_cached_tokens >= 56  # the prompt's full blocks, given back long before, hit
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert_greedy_matches(hf_refs["mistral_swa"].greedy(prompt, 30), first.outputs[0].token_ids)


def test_a_layer_without_a_window_keeps_every_block(model_dirs):
    for name in ("qwen2_swa", "gemma2", "llama"):  # one full layer (qwen2_swa: layer 0), alternation, none
        assert LLM(model_dirs[name]).llm_engine.kv.window == 0
    assert LLM(model_dirs["phi3"]).llm_engine.kv.window == 23


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_request_longer_than_the_cache_is_accepted(model_dirs, hf_refs, async_scheduling):
    """The capacity check counts what a windowed request holds at once, not its length; with
    async scheduling too, where blocks go back a step later (once published)."""
    path = model_dirs["mistral_swa"]
    llm = LLM(path, block_size=4, kv_cache_memory_bytes=10 * _per_block(path, 4), max_num_batched_tokens=16,
              async_scheduling=async_scheduling)
    assert llm.llm_engine.kv.max_blocks_held(100, 16) == 10
    (prompt,) = _prompts([70], seed=3)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                       use_tqdm=False)[0]  # 100 tokens: 25 blocks, in a 10-block cache
    assert_greedy_matches(hf_refs["mistral_swa"].greedy(prompt, 30), out.outputs[0].token_ids)
