"""SamplingParams end to end: logprobs against transformers, stop strings, n > 1 sharing
blocks, bad words, validation against the model."""

from __future__ import annotations

import random

import pytest
import torch
from engine_helpers import assert_no_leak

from pagedserve import LLM, SamplingParams
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.sampling_params import RequestOutputKind


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, max_model_len=512)


def _greedy(llm: LLM, prompt, max_tokens: int, **kw) -> list[int]:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)
    return llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0].token_ids


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("llm_kwargs", [{}, {"max_num_batched_tokens": 16, "block_size": 8}])
def test_logprobs_and_prompt_logprobs_match_transformers(llama_dir, hf_refs, llm_kwargs):
    hf = hf_refs["llama"]
    llm = LLM(llama_dir, **llm_kwargs)
    rng = random.Random(5)
    prompts = [[rng.randrange(4, 1024) for _ in range(n)] for n in (3, 37, 70)]
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=5, prompt_logprobs=3, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        ref = _hf_logprobs(hf, p + c.token_ids)
        assert len(c.logprobs) == len(c.token_ids) == 10
        total = 0.0
        for i, (tok, lps) in enumerate(zip(c.token_ids, c.logprobs)):
            row = ref[len(p) - 1 + i]
            assert list(lps)[0] == tok  # the sampled token first, then the top-k
            assert lps[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
            assert lps[tok].rank == 1  # greedy
            top = row.topk(5)
            assert set(lps) == set(top.indices.tolist())
            for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
                assert lps[tid].logprob == pytest.approx(lp, abs=1e-4)
                assert lps[tid].decoded_token == llm.get_tokenizer().decode([tid])
            total += lps[tok].logprob
        assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)
        # prompt logprobs: None for the first token, then P(token j | tokens < j)
        assert len(o.prompt_logprobs) == len(p) and o.prompt_logprobs[0] is None
        for j in range(1, len(p)):
            d = o.prompt_logprobs[j]
            row = ref[j - 1]
            assert d[p[j]].logprob == pytest.approx(row[p[j]].item(), abs=1e-4)
            assert d[p[j]].rank == int((row > row[p[j]]).sum()) + 1
            assert set(row.topk(3).indices.tolist()) <= set(d)
    assert_no_leak(llm)


def test_prompt_logprobs_survive_preemption(llama_dir, hf_refs):
    hf = hf_refs["llama"]
    per_block = 2 * 2 * 8 * 2 * 16 * 4  # layers * (k, v) * block * kv heads * head dim * fp32
    llm = LLM(llama_dir, block_size=8, kv_cache_memory_bytes=16 * per_block)
    prompts = [[(7 * i + 3 * j) % 1000 + 4 for j in range(40 + 9 * i)] for i in range(4)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=30, prompt_logprobs=1, ignore_eos=True),
                        use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for p, o in zip(prompts, outs):
        ref = _hf_logprobs(hf, p)
        assert len(o.prompt_logprobs) == len(p)
        for j in range(1, len(p)):
            assert o.prompt_logprobs[j][p[j]].logprob == pytest.approx(ref[j - 1, p[j]].item(), abs=1e-4)
    assert_no_leak(llm)


def test_stop_strings_across_token_boundaries(llm):
    tok = llm.get_tokenizer()
    prompt = {"prompt_token_ids": [40, 41, 42, 43]}
    ids = _greedy(llm, prompt, 20)
    pieces = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    # A stop string made of the last char of token 5's text and the first of token 6's.
    i = next(i for i in range(4, 18) if len(pieces[i]) > len(pieces[i - 1]) and len(pieces[i + 1]) > len(pieces[i]))
    cut = len(pieces[i]) - 1
    stop = pieces[i + 1][cut: cut + 2]
    start = pieces[i + 1].find(stop)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop=[stop, "never-there"],
                                              ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == pieces[i + 1][:start] and stop not in out.text
    assert out.token_ids == ids[: len(out.token_ids)] and len(out.token_ids) <= i + 2
    inc = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop=stop, include_stop_str_in_output=True,
                                              ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert inc.text == pieces[i + 1][: start + len(stop)]
    assert_no_leak(llm)


def test_streaming_deltas_never_leak_a_stop_string(llm):
    tok = llm.get_tokenizer()
    prompt = {"prompt_token_ids": [50, 51, 52]}
    ids = _greedy(llm, prompt, 16)
    full = tok.decode(ids)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    engine = llm.llm_engine
    rid = engine.add_request(None, prompt, SamplingParams(temperature=0, max_tokens=16, stop=[stop], ignore_eos=True,
                                                          output_kind=RequestOutputKind.DELTA))
    text, finished = "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            text += out.outputs[0].text
            assert stop not in text
            finished = out
    assert finished.finished and finished.outputs[0].finish_reason == "stop"
    assert text == full[: full.find(stop)]
    assert_no_leak(llm)


def test_detokenizer_multibyte_split_across_tokens(llm):
    tok = llm.get_tokenizer()
    text = "naïve café — 3€ ✓ 日本語 done"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters are split into byte tokens
    d = IncrementalDetokenizer(tok, [5, 6], skip_special_tokens=True)
    pieces = [d.add_tokens([t]) for t in ids]
    assert "".join(pieces) == text == d.text
    assert not any("\ufffd" in p for p in pieces)


def test_n_samples_share_prompt_blocks(llama_dir):
    prompt = {"prompt_token_ids": [(13 * j) % 900 + 7 for j in range(160)]}
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)

    def peak_blocks(llm, prompts, params_list):
        engine = llm.llm_engine
        for p, sp in zip(prompts, params_list):
            engine.add_request(None, p, sp)
        peak, outs = 0, []
        while engine.has_unfinished_requests():
            outs += [o for o in engine.step() if o.finished]
            peak = max(peak, engine.kv.num_blocks - engine.kv.pool.num_free_blocks)
        return peak, outs

    llm = LLM(llama_dir, enable_prefix_caching=False, block_size=16)
    shared_peak, outs = peak_blocks(llm, [prompt], [params])
    (out,) = outs
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # independent samples
    single = SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)
    separate_peak, _ = peak_blocks(llm, [prompt] * 4, [single] * 4)
    # 160 prompt tokens = 10 blocks: shared they cost 10 + 4 tails, separately 4 x 11.
    assert shared_peak <= 10 + 4 * 2 < separate_peak
    assert_no_leak(llm)
    # Same seed, same samples (child i uses seed + i), also through the LLM API.
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert_no_leak(llm)


def test_n_samples_abort_and_stream(llm):
    engine = llm.llm_engine
    rid = engine.add_request(None, {"prompt_token_ids": list(range(10, 60))},
                             SamplingParams(n=3, temperature=0.8, max_tokens=40, ignore_eos=True,
                                            output_kind=RequestOutputKind.DELTA))
    seen = set()
    for _ in range(4):
        for out in engine.step():
            seen |= {c.index for c in out.outputs}
    assert seen == {0, 1, 2}
    engine.abort_request(rid)
    assert not engine.has_unfinished_requests()
    engine.step()
    assert_no_leak(llm)


def test_bad_words_are_never_generated(llm):
    tok = llm.get_tokenizer()
    prompt = {"prompt_token_ids": [60, 61, 62]}
    ids = _greedy(llm, prompt, 16)
    word = tok.decode([ids[2]]).strip() or tok.decode([ids[3]]).strip()
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, bad_words=[word]),
                       use_tqdm=False)[0].outputs[0]
    banned = [s for s in llm.llm_engine._bad_words_ids([word])]
    assert banned
    for seq in banned:
        assert not any(out.token_ids[i: i + len(seq)] == seq for i in range(len(out.token_ids)))


def test_penalties_change_greedy_output(llm):
    prompt = {"prompt_token_ids": [70, 71, 72]}
    plain = _greedy(llm, prompt, 24)
    pen = _greedy(llm, prompt, 24, frequency_penalty=2.0, presence_penalty=2.0, repetition_penalty=2.0)
    assert len(set(pen)) >= len(set(plain))
    allowed = llm.generate(prompt, SamplingParams(temperature=0.7, max_tokens=24, ignore_eos=True,
                                                  allowed_token_ids=[100, 200, 300]),
                           use_tqdm=False)[0].outputs[0].token_ids
    assert set(allowed) <= {100, 200, 300}
    biased = _greedy(llm, prompt, 5, logit_bias={123: 100})
    assert biased == [123] * 5


@pytest.mark.parametrize("params, match", [
    (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=50), "prompt_logprobs"),
    (dict(logit_bias={5000: 1.0}), "logit_bias"),
    (dict(allowed_token_ids=[1, 4096]), "allowed_token_ids"),
    (dict(stop_token_ids=[10**6]), "stop_token_ids"),
])
def test_validation_against_the_model(llm, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate("hello", SamplingParams(**params), use_tqdm=False)
    assert_no_leak(llm)


@pytest.mark.parametrize("kwargs, match", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
    (dict(logprobs=-1), "logprobs"), (dict(stop=[""]), "stop"), (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(bad_words=[" "]), "bad_words"), (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(stop="x", detokenize=False), "detokenize"), (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (dict(top_k=1.5), "top_k"), (dict(max_tokens="5"), "max_tokens"), (dict(seed=2**64), "seed"),
    (dict(top_k=2**70), "top_k"), (dict(logit_bias={1: float("nan")}), "logit_bias"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("nan")), "temperature"),
])
def test_sampling_params_field_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_logit_bias_is_clamped_and_greedy_normalises():
    assert SamplingParams(logit_bias={"3": 500}).logit_bias == {3: 100.0}
    g = SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.1)
    assert (g.top_k, g.top_p, g.min_p) == (0, 1.0, 0.0)


def test_extreme_valid_values_do_not_crash(llm):
    outs = llm.generate(["a", "b"], [SamplingParams(seed=2**63 - 1, n=3, temperature=1.0, top_k=2**40, max_tokens=3,
                                                    ignore_eos=True),
                                     SamplingParams(seed=-(2**63), temperature=50.0, top_p=1e-9, max_tokens=3,
                                                    ignore_eos=True)], use_tqdm=False)
    assert [len(c.token_ids) for o in outs for c in o.outputs] == [3, 3, 3, 3]
    assert_no_leak(llm)


def test_truncate_prompt_tokens(llm):
    out = llm.generate({"prompt_token_ids": list(range(10, 40))},
                       SamplingParams(temperature=0, max_tokens=3, truncate_prompt_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == list(range(35, 40))
