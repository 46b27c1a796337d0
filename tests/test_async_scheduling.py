"""Async scheduling (step N + 1 scheduled and launched before step N's tokens are back, its
decode inputs gathered on the device from N's samples) gives exactly the outputs of the
synchronous loop: greedy and seeded sampling, stops of every kind, penalties, logprobs,
n > 1, preemption, prefix caching and aborts, with nothing leaked."""

from __future__ import annotations

import pytest
from engine_helpers import assert_no_leak

from pagedserve import LLM, SamplingParams

PER_BLOCK_8 = 2 * 2 * 8 * 2 * 16 * 4  # layers * (k, v) * block 8 * kv heads * head dim * fp32


@pytest.fixture(scope="module")
def pair(llama_dir):
    """(synchronous, async) engines on the same model."""
    return (LLM(llama_dir, max_model_len=256, async_scheduling=False),
            LLM(llama_dir, max_model_len=256, async_scheduling=True))


def _prompts(n: int, base: int = 5) -> list[dict]:
    return [{"prompt_token_ids": [(base + 7 * i + 3 * j) % 1000 + 4 for j in range(3 + 5 * i)]} for i in range(n)]


def _fields(outs) -> list:
    """What must match exactly: tokens, text, how each sequence ended."""
    return [(o.prompt_token_ids, [(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs])
            for o in outs]


def _logprob_values(outs) -> list[float]:
    """Every logprob reported, flattened in a fixed order. They match to float round-off
    only: the two loops batch differently (n > 1 siblings join a step later when async)."""
    vals: list[float] = [c.cumulative_logprob or 0.0 for o in outs for c in o.outputs]
    for o in outs:
        for d in (o.prompt_logprobs or [])[1:]:
            vals += [lp.logprob for _, lp in sorted(d.items())]
        for c in o.outputs:
            for d in c.logprobs or []:
                vals += [lp.logprob for _, lp in sorted(d.items())]
    return vals


def _same(pair, prompts, params) -> list:
    sync, asyn = pair
    a = sync.generate(prompts, params, use_tqdm=False)
    b = asyn.generate(prompts, params, use_tqdm=False)
    assert _fields(b) == _fields(a)
    assert _logprob_values(b) == pytest.approx(_logprob_values(a), abs=1e-4)
    assert_no_leak(sync)
    assert_no_leak(asyn)
    return a


class _PatchCounter:
    """Counts steps that took input tokens from the previous step's samples on the device."""

    def __init__(self, llm: LLM) -> None:
        self.runner = llm.llm_engine.runner
        self.real = self.runner._pending_token_patch
        self.patched_rows = 0

    def __enter__(self):
        def counted(rows):
            self.patched_rows += len(rows)
            return self.real(rows)

        self.runner._pending_token_patch = counted
        return self

    def __exit__(self, *exc):
        del self.runner._pending_token_patch


def test_config_default_follows_the_device(llama_dir):
    assert LLM(llama_dir, max_model_len=64).llm_engine.async_scheduling is False  # CPU: nothing to overlap
    assert LLM(llama_dir, max_model_len=64, async_scheduling=True).llm_engine.async_scheduling


def test_greedy_mixed_lengths_are_identical_and_pipelined(pair):
    params = [SamplingParams(temperature=0, max_tokens=1 + 3 * i, ignore_eos=True) for i in range(8)]
    with _PatchCounter(pair[1]) as c:
        outs = _same(pair, _prompts(8), params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1 + 3 * i for i in range(8)]
    # Every decode input after a request's first token came from the device.
    assert c.patched_rows == sum(3 * i for i in range(8))


def test_stop_tokens_eos_and_stop_strings(pair):
    sync = pair[0]
    free = sync.generate(_prompts(6), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    params = []
    for i, o in enumerate(free):
        ids = o.outputs[0].token_ids
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[ids[4 + i]], ignore_eos=True))
        elif i % 3 == 1:  # as EOS (the scheduler's check is the same one), and never before min_tokens
            params.append(SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[ids[2]], min_tokens=6,
                                         ignore_eos=True))
        else:
            text = o.outputs[0].text
            params.append(SamplingParams(temperature=0, max_tokens=24, stop=[text[len(text) // 2:][:3]],
                                         ignore_eos=True))
    outs = _same(pair, _prompts(6), params)
    for i, o in enumerate(outs):
        c = o.outputs[0]
        if i % 3 == 1:  # the token may not come back after min_tokens
            assert len(c.token_ids) >= 6 and (c.finish_reason == "length" or c.token_ids[-1] == free[i].outputs[0].token_ids[2])
        else:
            assert c.finish_reason == "stop" and len(c.token_ids) < 24


def test_seeded_sampling_logprobs_and_n(pair):
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=11 + i, max_tokens=12, logprobs=3,
                             ignore_eos=True, n=1 + i % 2) for i in range(5)]
    outs = _same(pair, _prompts(5), params)
    assert outs[1].outputs[1].token_ids != outs[1].outputs[0].token_ids


def test_penalties_and_bad_words_wait_for_the_history(pair):
    sync = pair[0]
    prompt = _prompts(1)[0]
    ids = sync.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    tok = sync.get_tokenizer()
    params = [SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.8, frequency_penalty=0.7,
                             presence_penalty=0.3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, bad_words=[tok.decode(ids[3:5])], ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    _same(pair, [prompt] * 3, params)


def test_prompt_logprobs_and_prefix_cache_hits(pair):
    shared = list(range(100, 140))
    prompts = [{"prompt_token_ids": shared + [200 + i] * (i + 1)} for i in range(4)]
    _same(pair, prompts, SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=2, ignore_eos=True))
    kv = pair[1].llm_engine.kv
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    _same(pair, prompts[:1], params)
    before = kv.prefix_hits
    _same(pair, prompts, params)
    assert kv.prefix_hits >= before + 4 * 32  # two full blocks of the shared part, each


def test_length_caps(llama_dir):
    sync = LLM(llama_dir, max_model_len=48, async_scheduling=False)
    asyn = LLM(llama_dir, max_model_len=48, async_scheduling=True)
    prompts = [{"prompt_token_ids": [9 + i] * (40 + i)} for i in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=8 - i, ignore_eos=True) for i in range(4)]  # up to the cap
    outs = _same((sync, asyn), prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 7, 6, 5]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_preemption_keeps_outputs(llama_dir):
    engines = [LLM(llama_dir, block_size=8, kv_cache_memory_bytes=12 * PER_BLOCK_8, async_scheduling=a)
               for a in (False, True)]
    prompts = [{"prompt_token_ids": [(5 * i + j) % 900 + 3 for j in range(20 + 6 * i)]} for i in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=5, max_tokens=25, n=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    _same(engines, prompts, params)
    assert engines[1].llm_engine.scheduler.num_preemptions > 0


def test_abort_while_a_step_is_in_flight(pair):
    asyn = pair[1]
    eng = asyn.llm_engine
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ids = [eng.add_request(None, p, sp) for p in _prompts(4)]
    for _ in range(4):
        eng.step()
    assert eng._inflight is not None
    eng.abort_request(ids[:2])
    finals = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
    assert set(finals) == set(ids[2:])
    ref = pair[0].generate(_prompts(4)[2:], sp, use_tqdm=False)
    assert [finals[i] for i in ids[2:]] == [o.outputs[0].token_ids for o in ref]
    assert_no_leak(asyn)
    # Everything aborted while in flight: nothing is left to run.
    ids = [eng.add_request(None, p, sp) for p in _prompts(3)]
    eng.step()
    eng.step()
    eng.abort_request(ids)
    assert not eng.has_unfinished_requests()
    eng.step()
    assert_no_leak(asyn)


def test_chunked_prefill_with_prompt_logprobs(llama_dir, pair):
    """Chunks that end before the prompt does sample nothing but still report prompt logprobs."""
    chunked = [LLM(llama_dir, max_model_len=256, max_num_batched_tokens=16, async_scheduling=a) for a in (False, True)]
    prompts = [{"prompt_token_ids": [(11 * i + j) % 900 + 3 for j in range(30 + 7 * i)]} for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=1, logprobs=1, ignore_eos=True)
    outs = _same(chunked, prompts, params)
    whole = pair[0].generate(prompts, params, use_tqdm=False)  # each prompt in one step
    assert _fields(outs) == _fields(whole)
    assert _logprob_values(outs) == pytest.approx(_logprob_values(whole), abs=1e-4)
    assert all(len(o.prompt_logprobs) == len(p["prompt_token_ids"]) for o, p in zip(outs, prompts))
