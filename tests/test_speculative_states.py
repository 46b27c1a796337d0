"""Speculative decoding on models whose layers keep a per-request state (Gated DeltaNet,
Mamba-2, Mamba-1, lightning attention, short convolutions): a verification runs its tokens
through the state layers one at a time, keeps the state after each, and the runner steps each
request's state back to after its last accepted token. Outputs must equal plain decoding's
whatever number of drafts stands (the oracle of test_speculative.py makes every number occur),
with verifications of several lengths beside prefill chunks, under preemption, async
scheduling, prefix caching (states saved inside verifications) and the verification graphs'
static buffers."""

from __future__ import annotations

import pytest
from engine_helpers import assert_no_leak
from test_speculative import OracleProposer, _fields, _prompts

from pagedserve import LLM, SamplingParams

K = 3
SPEC = {"method": "ngram", "num_speculative_tokens": K}
LP_TOL = 5e-4  # (a verification's attention rows run as one chunk: float32 round-off only)


class UnevenOracle(OracleProposer):
    """The oracle with 1 to k drafts a step, so that a step verifies chunks of several lengths."""

    def propose(self, req, max_tokens: int) -> list[int]:
        n = 1 + (len(req.output_token_ids) + len(req.prompt_token_ids)) % self.cfg.num_speculative_tokens
        return super().propose(req, min(n, max_tokens))


def _spec_llm(path: str, oracle: type = OracleProposer, **kw) -> LLM:
    llm = LLM(path, max_model_len=kw.pop("max_model_len", 256), speculative_config=SPEC, **kw)
    llm.llm_engine.scheduler.proposer = oracle(K)
    return llm


def _teach(llm: LLM, want) -> None:
    llm.llm_engine.scheduler.proposer.reference.update(
        {tuple(o.prompt_token_ids): o.outputs[0].token_ids for o in want})


def _assert_same(got, want) -> None:
    assert _fields(got) == _fields(want)
    for g, w in zip(got, want):
        for pos_g, pos_w, t in zip(g.outputs[0].logprobs or [], w.outputs[0].logprobs or [], w.outputs[0].token_ids):
            assert abs(pos_g[t].logprob - pos_w[t].logprob) < LP_TOL


@pytest.mark.parametrize("name", ["qwen3_5", "granite_hybrid", "mamba", "minimax", "lfm2"])
def test_greedy_outputs_unchanged(name, model_dirs):
    """Gated DeltaNet (Qwen3.5), Mamba-2 (Granite 4.0-H), Mamba-1, lightning attention (no
    convolution state) and short convolutions (no recurrence)."""
    path = model_dirs[name]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)
    want = LLM(path, max_model_len=256).generate(_prompts(6), params, use_tqdm=False)
    spec = _spec_llm(path)
    _teach(spec, want)
    _assert_same(spec.generate(_prompts(6), params, use_tqdm=False), want)
    sched = spec.llm_engine.scheduler
    assert sched.num_accepted_tokens > 60 and sched.num_draft_tokens > sched.num_accepted_tokens
    assert_no_leak(spec)


def test_uneven_verifications_beside_prefills_and_preemption(model_dirs):
    """Verifications of 2 to 4 tokens in one step (the eager path's gathered rows), beside
    prefill chunks of a small token budget, with a KV cache small enough to preempt; sampled
    rows with top_k=1 (the rejection-sampling path, which must then give greedy's tokens)."""
    path = model_dirs["qwen3_5"]
    prompts = _prompts(6)
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.9, top_k=1, seed=3, max_tokens=30, ignore_eos=True)] * 3
    want = LLM(path, max_model_len=256).generate(prompts, params, use_tqdm=False)
    probe = LLM(path, max_model_len=256, block_size=8)
    per_block = probe.llm_engine.runner.kv_block_bytes()
    del probe
    spec = _spec_llm(path, UnevenOracle, block_size=8, max_num_batched_tokens=24, kv_cache_memory_bytes=14 * per_block)
    _teach(spec, want)
    lens = []
    settle = spec.llm_engine.runner._settle_verifications
    spec.llm_engine.runner._settle_verifications = lambda order, host, *a: (
        lens.append(sorted({s.num_tokens for s in order if s.drafts})) or settle(order, host, *a))
    _assert_same(spec.generate(prompts, params, use_tqdm=False), want)
    sched = spec.llm_engine.scheduler
    assert sched.num_preemptions > 0 and sched.num_accepted_tokens > 20
    assert any(len(x) > 1 for x in lens)  # steps that verified chunks of different lengths
    assert_no_leak(spec)


def test_async_scheduling_beside_speculation(model_dirs):
    """Drafts off above disable_by_batch_size=2: the big batch's steps run ahead of their
    tokens, then each step with drafts lands before the next is scheduled."""
    path = model_dirs["granite_hybrid"]
    prompts = _prompts(6)
    params = [SamplingParams(temperature=0, max_tokens=8 + 9 * i, ignore_eos=True) for i in range(6)]
    want = LLM(path, max_model_len=256, async_scheduling=False).generate(prompts, params, use_tqdm=False)
    spec = LLM(path, max_model_len=256, async_scheduling=True, speculative_config={**SPEC, "disable_by_batch_size": 2})
    oracle = spec.llm_engine.scheduler.proposer = OracleProposer(K)
    oracle.cfg.disable_by_batch_size = 2
    _teach(spec, want)
    runner = spec.llm_engine.runner
    ahead = []
    patch = runner._pending_token_patch
    runner._pending_token_patch = lambda rows: ahead.append(len(rows)) or patch(rows)
    assert _fields(spec.generate(prompts, params, use_tqdm=False)) == _fields(want)
    assert max(ahead) >= 3 and spec.llm_engine.scheduler.num_accepted_tokens > 10
    assert_no_leak(spec)


def test_prefix_cache_saves_states_inside_verifications(model_dirs):
    """Generated tokens past position 256 are verified with drafts; the state at 256, saved
    from a verification slot (or the row) once the drafts are checked, is where the next turn
    resumes: its outputs equal those of an engine that computes the whole prompt."""
    path = model_dirs["qwen3_5"]
    prompts = _prompts(3)
    params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    plain = LLM(path, max_model_len=512, enable_prefix_caching=False)
    first = plain.generate(prompts, params, use_tqdm=False)
    spec = _spec_llm(path, max_model_len=512)
    _teach(spec, first)
    runner = spec.llm_engine.runner
    reserved = []
    reserve = runner.state_cache.reserve
    runner.state_cache.reserve = lambda: reserved.append(1) or reserve()
    assert _fields(spec.generate(prompts, params, use_tqdm=False)) == _fields(first)
    assert reserved and not runner._pending_saves  # saved from verifications, then registered
    turn2 = [{"prompt_token_ids": o.prompt_token_ids + o.outputs[0].token_ids[:280]} for o in first]
    follow = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    want = plain.generate(turn2, follow, use_tqdm=False)
    got = spec.generate(turn2, follow, use_tqdm=False)
    assert all(o.num_cached_tokens == 256 for o in got)
    _assert_same(got, want)
    assert_no_leak(spec)


@pytest.mark.parametrize("name", ["qwen3_5", "granite_hybrid"])
def test_verification_graphs(name, model_dirs):
    """Steps of decodes and verifications on the verification graphs' static buffers
    (capture=False, Triton kernels in the interpreter): every request runs 1 + k tokens
    there, padding included, and is stepped back to its last accepted token."""
    pytest.importorskip("triton")
    path = model_dirs[name]
    kw = dict(max_model_len=128, attention_backend="triton", dtype="float32", block_size=8, max_num_seqs=4)
    prompts = _prompts(3)
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=1)
    want = LLM(path, **kw).generate(prompts, params, use_tqdm=False)
    spec = _spec_llm(path, UnevenOracle, **kw)  # (shorter verifications: padded to 1 + k)
    _teach(spec, want)
    runner = spec.llm_engine.runner
    runner.graphs = runner.make_graph_runner(capture=False)
    runner.verify_graphs = runner.make_graph_runner(capture=False, query_len=1 + K)
    calls = []
    run = runner.verify_graphs.run
    runner.verify_graphs.run = lambda *a: calls.append(len(a[3])) or run(*a)
    _assert_same(spec.generate(prompts, params, use_tqdm=False), want)
    assert calls and max(calls) == 3
    assert_no_leak(spec)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_churn_with_aborts_stops_and_preemption(model_dirs, async_scheduling):
    """Requests arriving and leaving at every step: some aborted mid-way (while verifying,
    or while their step is in flight), some ended by a stop string or max_tokens, greedy and
    sampled, under a KV cache small enough to preempt and with prefix caching. Every request
    that runs to its end gives plain decoding's tokens, and nothing is left behind."""
    import random

    path = model_dirs["granite_hybrid"]
    rng = random.Random(5)
    prompts = _prompts(8)
    ref = LLM(path, max_model_len=256).generate(
        prompts, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)
    probe = LLM(path, max_model_len=256, block_size=8)
    per_block = probe.llm_engine.runner.kv_block_bytes()
    del probe
    spec = _spec_llm(path, UnevenOracle, block_size=8, max_num_batched_tokens=32, async_scheduling=async_scheduling,
                     kv_cache_memory_bytes=12 * per_block)
    _teach(spec, ref)
    eng = spec.llm_engine
    want, done, aborted = {}, {}, set()
    for i in range(24):  # a request every other step, while earlier ones run
        j = i % len(prompts)
        n = rng.randrange(6, 48)
        stop = ref[j].outputs[0].text[10:14] if i % 5 == 0 else None
        params = (SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, stop=stop) if i % 3
                  else SamplingParams(temperature=0.9, top_k=1, seed=i, max_tokens=n, ignore_eos=True, stop=stop))
        eng.add_request(f"r{i}", prompts[j], params)
        if stop is None:
            want[f"r{i}"] = ref[j].outputs[0].token_ids[:n]
        for _ in range(2):
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o.outputs[0].token_ids
        if i % 4 == 3:  # abort one that is still running
            live = [r for r in want if r not in done and r not in aborted]
            if live:
                victim = rng.choice(live)
                eng.abort_request(victim)
                aborted.add(victim)
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    for rid, tokens in want.items():
        if rid not in aborted:
            assert done[rid] == tokens, rid
    assert aborted and eng.scheduler.num_preemptions > 0 and eng.scheduler.num_accepted_tokens > 20
    assert_no_leak(spec)
    assert not eng.runner.block_table.row_of and not eng.runner._pending_saves


def test_draft_model_with_state_layers_refused(model_dirs):
    with pytest.raises(ValueError, match="draft model .* has linear-attention / state-space layers"):
        LLM(model_dirs["llama"], speculative_config={"method": "draft_model", "model": model_dirs["mamba"],
                                                     "num_speculative_tokens": 2})
