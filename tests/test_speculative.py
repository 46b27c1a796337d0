"""N-gram speculative decoding: the proposer finds the right continuation; greedy outputs are
exactly those without speculation (tokens, text, finish and stop reasons) over stops of every
kind, max_tokens, the context limit, mixed batches with sampled requests, preemption and
prefix caching; drafts are accepted; nothing leaks; bad configs are refused."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import assert_no_leak

from pagedserve import LLM, SamplingParams
from pagedserve.engine.ngram import NgramProposer, SpeculativeConfig
from pagedserve.engine.request import Request

PER_BLOCK_8 = 2 * 2 * 8 * 2 * 16 * 4  # layers * (k, v) * block 8 * kv heads * head dim * fp32
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


_ids = iter(range(10**6))


def _req(tokens: list[int]) -> Request:
    return Request(f"r{next(_ids)}", tokens, SamplingParams(temperature=0))


def test_proposer_takes_what_followed_the_latest_match():
    p = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1))
    # ... 7 8 9 [1 2] 5 6 ... 1 2 -> the 3-gram "? 1 2" is new; "1 2" last occurred before "5 6 3"
    assert p.propose(_req([7, 8, 9, 1, 2, 5, 6, 3, 4, 1, 2]), 3) == [5, 6, 3]
    assert p.propose(_req([3, 1, 2, 9, 0, 1, 2, 8, 7, 1, 2]), 3) == [8, 7, 1]  # the most recent occurrence
    assert p.propose(_req([1, 2, 3, 4]), 3) == []  # no repeat
    assert p.propose(_req([5, 5, 5]), 2) == [5]  # the continuation is cut at the end of the tokens
    assert p.propose(_req([1, 2, 3, 1, 2]), 0) == []
    # Word alignment: token 256 is the bytes 00 01 00 00; 1 is 01 00 00 00. A byte-level hit
    # across two words must not count.
    assert p.propose(_req([256, 0, 7, 1, 0, 9, 1]), 3) == [0, 9, 1]
    r = _req([4, 5, 6, 4, 5])
    assert p.propose(r, 3) == [6, 4, 5]
    r.append_output_token(6)  # the proposer's copy grows with the request
    assert p.propose(r, 3) == [4, 5, 6]


@pytest.mark.parametrize("bad", [
    {"method": "eagle", "num_speculative_tokens": 2}, {"method": "ngram"}, {"num_speculative_tokens": 0},
    {"num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, {"num_speculative_tokens": 2,
                                                                                    "foo": 1}, "ngram"])
def test_bad_configs(bad):
    with pytest.raises(ValueError, match="speculative_config"):
        SpeculativeConfig.from_dict(bad)


class OracleProposer(NgramProposer):
    """Drafts from a reference run (what plain greedy decoding produced for the same prompt),
    with one token wrong at a position that moves with the output's length, and sometimes
    none wrong: every number of accepted drafts, 0 to k, occurs. A random model rarely
    repeats itself, so n-gram drafts alone would almost all be rejected."""

    def __init__(self, k: int) -> None:
        super().__init__(SpeculativeConfig(num_speculative_tokens=k))
        self.reference: dict[tuple, list[int]] = {}

    def propose(self, req: Request, max_tokens: int) -> list[int]:
        ref = self.reference.get(tuple(req.prompt_token_ids))
        done = len(req.output_token_ids)
        if ref is None:
            return super().propose(req, max_tokens)
        d = list(ref[done:done + min(self.cfg.num_speculative_tokens, max_tokens)])
        wrong = done % (self.cfg.num_speculative_tokens + 2)
        if wrong < len(d):
            d[wrong] = (d[wrong] + 1) % 1000
        return d


@pytest.fixture(scope="module")
def engines(llama_dir):
    plain = LLM(llama_dir, max_model_len=256, async_scheduling=False)
    spec = LLM(llama_dir, max_model_len=256, speculative_config=SPEC)
    spec.llm_engine.scheduler.proposer = OracleProposer(4)
    return plain, spec


def _teach(engines, prompts, max_tokens: int = 200) -> None:
    """Give the oracle the plain engine's greedy outputs for these prompts."""
    plain, spec = engines
    outs = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                          use_tqdm=False)
    for o in outs:
        spec.llm_engine.scheduler.proposer.reference[tuple(o.prompt_token_ids)] = o.outputs[0].token_ids


def _prompts(n: int) -> list:
    # Repetitive prompts: the model's greedy continuations of a random model fall into loops
    # too, so drafts are often right.
    words = "the value of an object is returned by the method when it is called".split()
    return [" ".join((words[i % 6: i % 6 + 4]) * (2 + i % 3)) for i in range(n)]


def _fields(outs) -> list:
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def _same(engines, prompts, params):
    plain, spec = engines
    _teach(engines, prompts)
    want = plain.generate(prompts, params, use_tqdm=False)
    got = spec.generate(prompts, params, use_tqdm=False)
    assert _fields(got) == _fields(want)
    assert_no_leak(spec)
    return want


def test_greedy_outputs_are_unchanged_and_drafts_land(engines):
    sched = engines[1].llm_engine.scheduler
    drafted, accepted = sched.num_draft_tokens, sched.num_accepted_tokens
    _same(engines, _prompts(6), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    drafted, accepted = sched.num_draft_tokens - drafted, sched.num_accepted_tokens - accepted
    assert accepted > 60 and drafted > accepted  # most drafts land, the wrong ones do not


def test_with_ngram_drafts_alone(llama_dir):
    """The real proposer: outputs unchanged whatever it proposes."""
    plain = LLM(llama_dir, max_model_len=256, async_scheduling=False)
    spec = LLM(llama_dir, max_model_len=256, speculative_config=SPEC)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    want = plain.generate(_prompts(6), params, use_tqdm=False)
    assert _fields(spec.generate(_prompts(6), params, use_tqdm=False)) == _fields(want)
    assert spec.llm_engine.scheduler.num_draft_tokens > 0
    assert_no_leak(spec)
    assert not spec.llm_engine.scheduler.proposer._bufs  # forgotten with their requests


def test_every_way_to_stop(engines):
    plain = engines[0]
    ref = plain.generate(_prompts(4), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                         use_tqdm=False)
    # Stop strings and stop tokens taken from the middle of the reference outputs, so that they
    # fire inside accepted drafts too.
    stops = [o.outputs[0].text[10:13] for o in ref if len(o.outputs[0].text) > 13]
    stop_ids = [o.outputs[0].token_ids[7] for o in ref]
    for params in (SamplingParams(temperature=0, max_tokens=30, stop=stops),
                   SamplingParams(temperature=0, max_tokens=30, stop=stops, include_stop_str_in_output=True),
                   SamplingParams(temperature=0, max_tokens=30, stop_token_ids=stop_ids, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)):  # up to the context
        _same(engines, _prompts(4), params)


def test_mixed_batches_preemption_and_prefix_caching(llama_dir, engines):
    prompts = _prompts(6)
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              # Sampled with top_k=1: the rejection-sampling path, whose outputs must then be
              # exactly greedy's.
              SamplingParams(temperature=0.9, top_k=1, seed=3, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2)] * 2
    params[-1] = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, presence_penalty=0.5)  # penalised
    want = _same(engines, prompts, params)
    tight = LLM(llama_dir, max_model_len=256, block_size=8, kv_cache_memory_bytes=14 * PER_BLOCK_8,
                speculative_config=SPEC)
    tight.llm_engine.scheduler.proposer = engines[1].llm_engine.scheduler.proposer
    got = tight.generate(prompts, params, use_tqdm=False)
    assert _fields(got) == _fields(want)
    assert tight.llm_engine.scheduler.num_preemptions > 0 and tight.llm_engine.scheduler.num_accepted_tokens > 0
    assert_no_leak(tight)
    again = engines[1].generate(prompts, params, use_tqdm=False)  # the prefix cache now holds them
    assert _fields(again) == _fields(want)


def test_async_scheduling_beside_speculation(llama_dir, engines):
    """Async scheduling with drafts off above disable_by_batch_size=2: the big batch's steps
    run ahead of their tokens (decode rows whose input is still in flight), and once the
    batch is down to two the engine lands each step before scheduling, so drafts follow the
    right tokens. Outputs equal plain decoding's, stop strings included."""
    plain = engines[0]
    prompts = _prompts(6)
    params = [SamplingParams(temperature=0, max_tokens=8 + 9 * i, ignore_eos=True) for i in range(6)]
    ref = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True), use_tqdm=False)
    params[3] = SamplingParams(temperature=0, max_tokens=40, stop=[ref[3].outputs[0].text[20:24]])
    want = plain.generate(prompts, params, use_tqdm=False)
    spec = LLM(llama_dir, max_model_len=256, async_scheduling=True,
               speculative_config={**SPEC, "disable_by_batch_size": 2})
    oracle = spec.llm_engine.scheduler.proposer = OracleProposer(4)
    oracle.cfg.disable_by_batch_size = 2
    oracle.reference = {tuple(o.prompt_token_ids): o.outputs[0].token_ids for o in ref}
    runner = spec.llm_engine.runner
    ahead = []
    patch = runner._pending_token_patch
    runner._pending_token_patch = lambda rows: ahead.append(len(rows)) or patch(rows)
    got = spec.generate(prompts, params, use_tqdm=False)
    assert _fields(got) == _fields(want)
    sched = spec.llm_engine.scheduler
    assert max(ahead) >= 3 and sched.num_accepted_tokens > 20  # steps ran ahead, and drafts stood
    # Arrivals while one request drafts: the step that admits them has drafts, and the batch
    # it leaves is past the limit; the step after must still wait for it.
    eng = spec.llm_engine
    late = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    done: dict = {}

    def collect(outs) -> None:
        done.update({o.request_id: o.outputs[0].token_ids for o in outs if o.finished})

    eng.add_request("first", prompts[0], late)
    drafted = sched.num_drafts
    while sched.num_drafts == drafted:
        collect(eng.step())
    for i in range(1, 4):
        eng.add_request(f"late{i}", prompts[i], late)
    while eng.has_unfinished_requests():
        collect(eng.step())
    want = plain.generate(prompts[:4], late, use_tqdm=False)
    assert [done[k] for k in ("first", "late1", "late2", "late3")] == [w.outputs[0].token_ids for w in want]
    assert_no_leak(spec)


def test_rejection_sampling_keeps_the_distribution():
    """Over many trials, the first token emitted at a position is distributed as the target
    q, whatever the draft: accepted with probability q(d), else drawn from q without d."""
    from pagedserve.worker.spec_verify import rejection_sample, settle

    g = torch.Generator().manual_seed(0)
    q = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    trials = 200_000
    for draft in (0, 3, 4):
        accepted, resampled = rejection_sample(q.expand(trials, 5), torch.full((trials,), draft),
                                               torch.rand(trials, generator=g), torch.rand(trials, generator=g))
        assert not (resampled == draft).any()  # a rejected draft is never drawn again
        first = torch.where(accepted, torch.tensor(draft), resampled)
        freq = torch.bincount(first, minlength=5).float() / trials
        torch.testing.assert_close(freq, q, atol=4e-3, rtol=0)
        assert abs(accepted.float().mean().item() - q[draft].item()) < 4e-3
    assert settle([5, 6, 7], [5, 6, 9, 1]) == ([5, 6], 9)  # greedy: drafts stand while they match
    assert settle([5, 6, 7], [5, 6, 7, 1]) == ([5, 6, 7], 1)
    assert settle([5, 6, 7], [8, 3, 2, 1], [True, False, True]) == ([5], 3)  # sampled: the first rejection ends it


def test_sampled_requests_speculate(engines):
    """temperature > 0: drafts are checked by rejection sampling; seeded runs repeat."""
    plain, spec = engines
    prompts = _prompts(4)
    _teach(engines, prompts)
    sched = spec.llm_engine.scheduler
    before = sched.num_draft_tokens
    params = SamplingParams(temperature=0.5, seed=11, max_tokens=40, ignore_eos=True)
    a = spec.generate(prompts, params, use_tqdm=False)
    assert sched.num_draft_tokens > before
    assert _fields(spec.generate(prompts, params, use_tqdm=False)) == _fields(a)
    assert all(len(o.outputs[0].token_ids) == 40 for o in a)
    assert_no_leak(spec)


def test_penalties_bias_and_allowed_tokens_speculate(engines):
    """Penalties count each row's preceding drafts as output (a draft row sees the drafts
    before it); logit bias and allowed tokens hold at every row. Greedy outputs, and sampled
    ones with top_k=1, equal plain decoding's while drafts stand and fall (the oracle)."""
    prompts = _prompts(6)
    allowed = sorted({t for p in prompts for t in engines[0].get_tokenizer().encode(p)} | set(range(40)))
    common = dict(max_tokens=30, ignore_eos=True)
    params = [SamplingParams(temperature=0, repetition_penalty=1.3, **common),
              SamplingParams(temperature=0, presence_penalty=0.8, frequency_penalty=0.6, **common),
              SamplingParams(temperature=0.9, top_k=1, seed=2, frequency_penalty=1.1, **common),
              SamplingParams(temperature=0, logit_bias={7: 6.0, 11: 5.0}, **common),
              SamplingParams(temperature=0, allowed_token_ids=allowed, repetition_penalty=1.2, **common),
              SamplingParams(temperature=0, presence_penalty=1.5, logprobs=2, **common)]
    plain, spec = engines
    # The oracle drafts each request's own penalised continuation (one token wrong a step), so
    # drafts stand deep into a step: where a penalty counted too few drafts, a row would
    # prefer a token the plain run avoids.
    want = plain.generate(prompts, params, use_tqdm=False)
    for o in want:
        spec.llm_engine.scheduler.proposer.reference[tuple(o.prompt_token_ids)] = o.outputs[0].token_ids
    sched = spec.llm_engine.scheduler
    before = sched.num_accepted_tokens
    assert _fields(spec.generate(prompts, params, use_tqdm=False)) == _fields(want)
    assert_no_leak(spec)
    assert sched.num_accepted_tokens - before > 80
    unbiased = engines[0].generate(prompts[3:4], SamplingParams(temperature=0, **common),
                                   use_tqdm=False)[0].outputs[0].token_ids
    assert want[3].outputs[0].token_ids != unbiased  # the bias shows


def test_penalties_count_the_drafts_before_each_row(tokenizer_dir, tmp_path):
    """A model that, unpenalised, repeats its current token (every token its own successor, by
    a small lead): a penalty must count the drafts before a row, or that row repeats its
    input draft where plain decoding, having emitted it, moves on."""
    from scripted_model import build_scripted_model

    path = build_scripted_model(str(tmp_path / "echo"), tokenizer_dir, [[t, t] for t in range(1024)], lead=0.05)
    plain = LLM(path, max_model_len=128, async_scheduling=False)
    spec = LLM(path, max_model_len=128, speculative_config=SPEC)
    oracle = spec.llm_engine.scheduler.proposer = OracleProposer(4)
    prompts = [{"prompt_token_ids": [5 + 9 * i, 300 + i, 17 * i + 2]} for i in range(4)]
    common = dict(temperature=0, max_tokens=24, ignore_eos=True)
    for params in (SamplingParams(presence_penalty=2.0, **common), SamplingParams(frequency_penalty=2.0, **common),
                   SamplingParams(repetition_penalty=3.0, **common)):
        want = plain.generate(prompts, params, use_tqdm=False)
        repeats = plain.generate(prompts, SamplingParams(**common), use_tqdm=False)
        assert all(len(set(o.outputs[0].token_ids)) == 1 for o in repeats)  # unpenalised: one token over and over
        for o in want:
            oracle.reference[tuple(o.prompt_token_ids)] = o.outputs[0].token_ids
        before = spec.llm_engine.scheduler.num_accepted_tokens
        got = spec.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        assert spec.llm_engine.scheduler.num_accepted_tokens - before > 30


def _round_trip_pairs(tokenizer_dir: str, n: int) -> list[tuple[int, int]]:
    """n token pairs (x, y) whose text encodes back to exactly [x, y] (a bad word's tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pairs: list[tuple[int, int]] = []
    used: set[int] = set()
    for x in range(300, 1000):
        for y in range(x + 1, min(x + 60, 1000)):
            if x in used or y in used:
                continue
            if tok.encode(tok.decode([x, y]).lstrip(), add_special_tokens=False) == [x, y]:
                pairs.append((x, y))
                used |= {x, y}
                break
        if len(pairs) == n:
            return pairs
    raise AssertionError("no such token pairs")


def test_min_tokens_and_bad_words_count_the_drafts(tokenizer_dir, tmp_path):
    """min_tokens and multi-token bad words read the output so far, which at a draft row
    includes the drafts before it. Chain models (each token's successor fixed) show it, with
    the oracle drafting plain decoding's own tokens: a stop token at exactly min_tokens, and a
    bad word whose first token is a draft."""
    from transformers import AutoTokenizer

    from scripted_model import build_scripted_model

    pairs = _round_trip_pairs(tokenizer_dir, 4)
    taken = {t for p in pairs for t in p}
    filler = iter(t for t in range(20, 300) if t not in taken)
    # Chain i: a start, 2 + i tokens, the pair, then more: the pair lands at another place in a
    # step's drafts for each prompt.
    chains = [[next(filler) for _ in range(3 + i)] + list(pair) + [next(filler) for _ in range(12)]
              for i, pair in enumerate(pairs)]
    path = build_scripted_model(str(tmp_path / "chains"), tokenizer_dir, chains, lead=0.1)
    plain = LLM(path, max_model_len=128, async_scheduling=False)
    spec = LLM(path, max_model_len=128, speculative_config=SPEC)
    oracle = spec.llm_engine.scheduler.proposer = OracleProposer(4)
    prompts = [{"prompt_token_ids": [3, c[0]]} for c in chains]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(temperature=0, max_tokens=16)
    cases = [
        # the stop token c[n] comes after n - 1 output tokens: min_tokens n - 1 lets it end the
        # request there (counted without the drafts, its row would still ban it)
        [SamplingParams(stop_token_ids=[c[n]], min_tokens=n - 1, **common) for c, n in zip(chains, (3, 5, 6, 8))],
        [SamplingParams(bad_words=[tok.decode(list(pair))], ignore_eos=True, **common) for pair in pairs],
    ]
    for params in cases:
        want = plain.generate(prompts, params, use_tqdm=False)
        for o in want:
            oracle.reference[tuple(o.prompt_token_ids)] = o.outputs[0].token_ids
        got = spec.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert [o.outputs[0].finish_reason for o in plain.generate(prompts, cases[0], use_tqdm=False)] == ["stop"] * 4


@pytest.mark.parametrize("threshold", [1, 5])
def test_long_prefill_token_threshold(llama_dir, engines, threshold):
    """vLLM's long_prefill_token_threshold: prompts go in chunks of at most `threshold` tokens
    beside requests that draft (a one-token chunk mid-prompt must not draft: only a request's
    last token does; that drafted mid-prompt and crashed before); outputs equal plain
    decoding's. Bad values are ValueErrors."""
    plain = engines[0]
    prompts = _prompts(4)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = plain.generate(prompts, params, use_tqdm=False)
    llm = LLM(llama_dir, max_model_len=256, long_prefill_token_threshold=threshold, speculative_config=SPEC)
    sched = llm.llm_engine.scheduler
    chunks = []
    schedule = sched.schedule

    def spy():
        out = schedule()
        chunks.extend(s.num_tokens for s in out.scheduled if s.start < s.request.num_prompt_tokens and not s.drafts)
        return out

    sched.schedule = spy
    assert _fields(llm.generate(prompts, params, use_tqdm=False)) == _fields(want)
    assert max(chunks) == threshold and sched.num_draft_tokens > 0
    assert_no_leak(llm)
    for kw, match in ((dict(long_prefill_token_threshold=-1), "non-negative"),
                      (dict(long_prefill_token_threshold=8, enable_chunked_prefill=False), "chunked prefill")):
        with pytest.raises(ValueError, match=match):
            LLM(llama_dir, max_model_len=256, **kw)
