"""Speculative decoding with a draft model: every draft the proposer makes is the draft
model's own greedy continuation (checked against transformers on the draft's weights),
through chunked catch-up, rejections, preemption, prefix-cache hits and forked siblings;
the target's outputs are unchanged; the target as its own draft has its drafts accepted;
nothing leaks; bad configs are refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import HFReference, assert_greedy_matches
from engine_helpers import assert_no_leak, spy_proposals

from pagedserve import LLM, SamplingParams

PER_BLOCK_8 = 2 * 2 * 8 * 2 * 16 * 4  # target: layers * (k, v) * block 8 * kv heads * head dim * fp32


def _spec(model: str, k: int = 3) -> dict:
    return {"model": model, "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def near_draft(llama_dir, tmp_path_factory) -> str:
    """The target with noise in its last MLP: it agrees with the target often, not always."""
    from transformers import AutoModelForCausalLM

    path = str(tmp_path_factory.mktemp("near_draft"))
    shutil.copytree(llama_dir, path, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        w = model.model.layers[-1].mlp.down_proj.weight
        w += torch.randn(w.shape, generator=g) * w.std() * 0.6
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def draft_ref(near_draft) -> HFReference:
    return HFReference(near_draft)


@pytest.fixture(scope="module")
def plain(llama_dir) -> LLM:
    return LLM(llama_dir, max_model_len=256, async_scheduling=False)


def _prompts(n: int, words: int = 6) -> list[list[int]]:
    return [[(11 * i + 7 * j) % 900 + 4 for j in range(words + 9 * i)] for i in range(n)]


def _check_drafts(calls: list, ref: HFReference) -> None:
    assert calls
    for toks, drafts in calls:
        assert_greedy_matches(ref.greedy(toks, len(drafts)), drafts)


def _tokens(outs) -> list:
    return [[c.token_ids for c in o.outputs] for o in outs]


def _acceptance(llm: LLM) -> float:
    s = llm.llm_engine.scheduler
    return s.num_accepted_tokens / s.num_draft_tokens


def test_the_target_as_its_own_draft(llama_dir, hf_refs):
    """Every draft is the target's own next token: all are accepted (a draft KV entry at a wrong
    position or from a stale block would show as rejections), and the tokens are
    transformers' greedy ones."""
    llm = LLM(llama_dir, max_model_len=256, speculative_config=_spec(llama_dir, 4))
    prompts = _prompts(4)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert_greedy_matches(hf_refs["llama"].greedy(p, 24), o.outputs[0].token_ids)
    assert llm.llm_engine.scheduler.num_draft_tokens > 40
    assert _acceptance(llm) > 0.95
    assert_no_leak(llm)
    assert not llm.llm_engine.scheduler.proposer._held  # forgotten with their requests


def test_drafts_are_the_draft_models_greedy_tokens(llama_dir, near_draft, draft_ref, plain):
    """A draft that is sometimes wrong: each proposal is what transformers' greedy decoding of
    the draft model gives, after rejections, and in catch-up chunks of 16 tokens; the
    target's tokens are unchanged."""
    llm = LLM(llama_dir, max_model_len=256, max_num_batched_tokens=16, max_num_seqs=4,
              speculative_config=_spec(near_draft))
    calls = spy_proposals(llm)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts(5)]
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == _tokens(plain.generate(prompts, params,
                                                                                            use_tqdm=False))
    _check_drafts(calls, draft_ref)
    assert 0.1 < _acceptance(llm) < 0.95  # both outcomes happen
    assert_no_leak(llm)


def test_preemption_prefix_caching_and_mixed_batches(llama_dir, near_draft, draft_ref, plain):
    """Preempted requests (a 14-block cache), prefix-cache hits of an earlier run, forked
    siblings, sampled, logprobs and penalised requests beside greedy ones: the draft's KV is
    trusted only where the request's own draft wrote it."""
    tight = LLM(llama_dir, max_model_len=256, block_size=8, kv_cache_memory_bytes=14 * PER_BLOCK_8 * 2,
                speculative_config=_spec(near_draft))
    roomy = LLM(llama_dir, max_model_len=256, block_size=8, speculative_config=_spec(near_draft))
    calls = [spy_proposals(tight), spy_proposals(roomy)]
    prompts = [{"prompt_token_ids": p} for p in _prompts(6, 20)]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              # top_k=1: the rejection-sampling path, which must then give greedy's tokens
              SamplingParams(temperature=0.9, top_k=1, seed=3, max_tokens=30, ignore_eos=True, n=2),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2)] * 2
    params[-1] = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, presence_penalty=0.5)  # penalised
    want = _tokens(plain.generate(prompts, params, use_tqdm=False))
    assert _tokens(tight.generate(prompts, params, use_tqdm=False)) == want
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert _tokens(roomy.generate(prompts, params, use_tqdm=False)) == want
    again = roomy.generate(prompts, params, use_tqdm=False)
    assert _tokens(again) == want
    assert all(o.num_cached_tokens >= 16 for o in again)  # prefix-cache hits: target blocks, no draft KV
    for c in calls:
        _check_drafts(c, draft_ref)
    for llm in (tight, roomy):
        assert_no_leak(llm)
        assert not llm.llm_engine.scheduler.proposer._held


def test_rejection_sampling_with_a_draft_distribution():
    """Drafts drawn from r, accepted with probability min(1, q/r), else replaced by a draw from
    max(0, q - r): the first token is distributed as q, and a draft stands with probability
    sum(min(q, r))."""
    from pagedserve.worker.spec_verify import rejection_sample

    g = torch.Generator().manual_seed(0)
    q = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    trials = 200_000
    for r in (torch.tensor([0.1, 0.5, 0.2, 0.1, 0.1]), q.clone(), torch.tensor([0.0, 0.0, 0.0, 0.2, 0.8])):
        drafts = torch.multinomial(r, trials, replacement=True, generator=g)
        accepted, resampled = rejection_sample(q.expand(trials, 5), drafts, torch.rand(trials, generator=g),
                                               torch.rand(trials, generator=g), r.expand(trials, 5))
        first = torch.where(accepted, drafts, resampled)
        freq = torch.bincount(first, minlength=5).float() / trials
        torch.testing.assert_close(freq, q, atol=4e-3, rtol=0)
        assert abs(accepted.float().mean().item() - torch.minimum(q, r).sum().item()) < 4e-3


def test_sampled_drafts_follow_the_requests_distribution(llama_dir):
    """The target as its own draft, sampled at temperature 2 with top-p: the drafts are drawn
    from the very distribution the target samples from, so nearly all stand (drafts taken as
    one-hot, or drawn at another temperature, would mostly be rejected)."""
    llm = LLM(llama_dir, max_model_len=256, speculative_config=_spec(llama_dir, 3))
    params = SamplingParams(temperature=2.0, top_p=0.95, seed=7, max_tokens=24, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts(4)], params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    assert llm.llm_engine.scheduler.num_draft_tokens > 30 and _acceptance(llm) > 0.95
    assert not llm.llm_engine.runner.draft._probs  # each taken by its step's verification
    assert_no_leak(llm)


def test_sampled_requests_with_a_draft(llama_dir, near_draft):
    llm = LLM(llama_dir, max_model_len=256, speculative_config=_spec(near_draft))
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=25, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts(3)]
    a, b = (_tokens(llm.generate(prompts, params, use_tqdm=False)) for _ in range(2))
    assert a == b and all(len(c) == 25 for o in a for c in o)  # seeded: the same again
    assert llm.llm_engine.scheduler.num_accepted_tokens > 0
    assert_no_leak(llm)


def test_a_draft_with_a_smaller_vocabulary(llama_dir, tokenizer_dir, tmp_path_factory, plain):
    """Prompt tokens the draft does not have are read as token 0: no crash, outputs unchanged."""
    from pagedserve.model.random_model import build_random_model

    small = build_random_model(str(tmp_path_factory.mktemp("small_vocab")), vocab_size=512, num_layers=1,
                               initializer_range=0.5, tokenizer_dir=tokenizer_dir, seed=3)
    llm = LLM(llama_dir, max_model_len=256, speculative_config=_spec(small))
    prompts = [{"prompt_token_ids": [900, 1000, 5, 600, 7]}]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == _tokens(plain.generate(prompts, params,
                                                                                            use_tqdm=False))
    assert llm.llm_engine.scheduler.num_draft_tokens > 0


@pytest.mark.parametrize("cfg, match", [
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs model"),
    ({"method": "ngram", "model": "x", "num_speculative_tokens": 2}, "takes no model"),
    ({"model": "x", "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "for method 'ngram'"),
    ({"model": "x", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2}, "draft_tensor_parallel_size"),
    ({"method": "medusa", "model": "x", "num_speculative_tokens": 2}, "method must be one of"),
    ({"model": "/nonexistent/draft", "num_speculative_tokens": 2}, "not a local directory"),
])
def test_bad_draft_configs(llama_dir, cfg, match):
    with pytest.raises(ValueError, match=match):
        LLM(llama_dir, speculative_config=cfg)


def test_refused_combinations(llama_dir, model_dirs, tokenizer_dir, tmp_path_factory):
    from pagedserve.model.random_model import build_random_model

    big = build_random_model(str(tmp_path_factory.mktemp("big_vocab")), vocab_size=2048, num_layers=1,
                             tokenizer_dir=tokenizer_dir)
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(llama_dir, speculative_config=_spec(big))
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        LLM(llama_dir, speculative_config=_spec(llama_dir), enable_sleep_mode=True)
    with pytest.raises(ValueError, match="sliding window"):  # Mistral: every layer windowed, blocks given back
        LLM(model_dirs["mistral_swa"], speculative_config=_spec(model_dirs["mistral_swa"]))


def test_the_command_line_takes_a_draft_model(llama_dir):
    import json

    from pagedserve.entrypoints.cli import build_parser, engine_args_from

    ns = build_parser().parse_args(["serve", llama_dir, "--speculative-config",
                                    json.dumps({"model": llama_dir, "num_speculative_tokens": 2})])
    spec = engine_args_from(ns, llama_dir).create_engine_config().speculative_config
    assert (spec.method, spec.model, spec.num_speculative_tokens) == ("draft_model", llama_dir, 2)


def test_what_the_draft_cache_still_holds():
    """After drafts [a, b, c] at position 10 the draft's cache holds positions < 10 and the
    fed drafts a, b (positions 10, 11) while the request's tokens agree; never the request's
    last token, which is fed again to draft what follows it."""
    from pagedserve.worker.draft_model import _Drafted

    held = _Drafted(10, [7, 8, 9])
    base = list(range(10))
    assert held.valid(base + [7, 8, 5]) == 12  # a and b accepted, c replaced
    assert held.valid(base + [7, 4]) == 11  # b rejected
    assert held.valid(base + [3]) == 10  # a rejected
    assert held.valid(base + [7]) == 10  # no drafts ran that step; the last token is a's value
    assert held.valid(base + [7, 8, 9, 1]) == 12  # all accepted: c was never fed


def test_a_draft_model_on_the_triton_backend(llama_dir, hf_refs):
    """Both models through the Triton kernels (interpreted on CPU; on a GPU in
    tests/test_gpu_engine.py): the draft's catch-up chunks and one-token passes, the target's
    verification; tokens are transformers', and the target as its own draft is accepted."""
    pytest.importorskip("triton")
    llm = LLM(llama_dir, attention_backend="triton", dtype="float32", block_size=8, max_num_seqs=2,
              max_model_len=64, speculative_config=_spec(llama_dir, 2))
    prompts = _prompts(2, 5)
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert_greedy_matches(hf_refs["llama"].greedy(p, 7), o.outputs[0].token_ids)
    assert llm.llm_engine.scheduler.num_draft_tokens >= 6 and _acceptance(llm) > 0.9


def test_graph_paths_on_static_buffers(llama_dir, near_draft, draft_ref, hf_refs):
    """Every CUDA-graph path of speculation on its static buffers (replayed eagerly here:
    capture=False; captured in tests/test_gpu_engine.py), Triton kernels for both models: the
    target's verification steps (3 rows a request; requests with fewer drafts near their
    max_tokens are padded), the draft's one-token passes, and its catch-up passes of one and
    two tokens a request (two after a full acceptance). Every draft is transformers' greedy
    one for the draft model, and the target's tokens are transformers'."""
    pytest.importorskip("triton")
    llm = LLM(llama_dir, attention_backend="triton", dtype="float32", block_size=8, max_num_seqs=4,
              max_model_len=64, speculative_config=_spec(near_draft, 2))
    runner = llm.llm_engine.runner
    draft = runner.draft
    calls: dict[str, list] = {}

    def counted(graphs, name):
        run = graphs.run
        # (requests, padding rows among theirs: fewer drafts than the graphs' rows)
        graphs.run = lambda *a: calls.setdefault(name, []).append((len(a[3]), int((a[2] == -1).sum()))) or run(*a)
        return graphs

    runner.verify_graphs = counted(runner.make_graph_runner(capture=False, query_len=3), "verify")
    draft.graphs = counted(runner.make_graph_runner(capture=False, model=draft.model), "draft")
    draft.pair_graphs = counted(runner.make_graph_runner(capture=False, model=draft.model, query_len=2), "pair")
    pair_lens = []
    varlen = draft.pair_graphs.run_varlen
    draft.pair_graphs.run_varlen = lambda *a: pair_lens.append(np.diff(a[4]).tolist()) or varlen(*a)
    proposals = spy_proposals(llm)
    prompts = _prompts(4, 3)
    max_tokens = [9, 11, 12, 14]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, m, o in zip(prompts, max_tokens, outs):
        assert_greedy_matches(hf_refs["llama"].greedy(p, m), o.outputs[0].token_ids)
    _check_drafts(proposals, draft_ref)
    assert 0.1 < _acceptance(llm) < 0.95
    assert max(n for n, _ in calls["verify"]) == 4 and any(pad for _, pad in calls["verify"]) and calls["draft"]
    assert any(set(lens) == {1, 2} for lens in pair_lens), pair_lens  # mixed catch-up passes
    assert_no_leak(llm)


def _hf_logprobs(hf, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' log-softmax rows predicting each of `tokens` after `prompt`."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: -1]
    return logits.float().log_softmax(-1)


def _check_logprobs(out, prompt: list[int], hf, k: int) -> None:
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids)
    rows = _hf_logprobs(hf, prompt, list(c.token_ids))
    for t, row, lp in zip(c.token_ids, rows, c.logprobs):
        assert abs(lp[t].logprob - float(row[t])) < 1e-4
        assert lp[t].rank == int((row > row[t]).sum()) + 1
        top = {i for i, v in lp.items() if v.rank <= k}
        assert top == set(row.topk(k).indices.tolist())
    assert abs(c.cumulative_logprob - sum(lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs))) < 1e-3


def test_requests_with_logprobs_speculate(llama_dir, near_draft, plain):
    """Logprobs no longer keep a request from speculating. Each emitted token's logprob, rank
    and top-k are read from the row that predicted it. For sampled requests that is the
    token emitted (an accepted draft, or its replacement), not the sampler's own draw there.
    They equal transformers' on the whole output, and greedy outputs equal plain decoding's,
    stop strings inside a step's drafts included."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    llm = LLM(llama_dir, max_model_len=256, speculative_config=_spec(near_draft))
    prompts = _prompts(4)
    sampled = SamplingParams(temperature=1.0, seed=5, max_tokens=30, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampled, use_tqdm=False)
    sched = llm.llm_engine.scheduler
    assert 0 < sched.num_accepted_tokens < sched.num_draft_tokens  # drafts stood and fell
    for p, o in zip(prompts, outs):
        _check_logprobs(o, p, hf, 3)
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2)
    want = plain.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    stops = [w.outputs[0].text[8:11] for w in want if len(w.outputs[0].text) > 11]
    for params in (greedy, SamplingParams(temperature=0, max_tokens=30, logprobs=2, stop=stops)):
        want = plain.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        got = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for p, w, g in zip(prompts, want, got):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids and g.outputs[0].text == w.outputs[0].text
            _check_logprobs(g, p, hf, 2)
    assert_no_leak(llm)


def test_served_with_a_draft_model(llama_dir, plain):
    """`serve` with a draft model: a streamed completion gives the offline greedy tokens, and
    /metrics carries vLLM's speculative-decoding counters (accepted by position summing to
    the accepted total)."""
    from server_helpers import metric, openai_client, scrape, serving

    prompt = _prompts(1)[0]
    want = plain.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=20,
                                                                        ignore_eos=True), use_tqdm=False)
    with serving(llama_dir, engine_kwargs={"speculative_config": _spec(llama_dir, 3)}) as srv, \
            openai_client(srv) as client:
        stream = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=20, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        tokens = [t for chunk in stream for c in chunk.choices for t in (c.token_ids or [])]
        assert tokens == want[0].outputs[0].token_ids
        m = scrape(srv.url)
        drafted = metric(m, "pagedserve:spec_decode_num_draft_tokens_total")
        accepted = metric(m, "pagedserve:spec_decode_num_accepted_tokens_total")
        per_pos = [metric(m, "pagedserve:spec_decode_num_accepted_tokens_per_pos_total", position=str(j))
                   for j in range(3)]
        assert drafted > 0 and accepted > 0.9 * drafted and sum(per_pos) == accepted
        assert per_pos[0] >= per_pos[1] >= per_pos[2] > 0
        assert metric(m, "pagedserve:spec_decode_num_drafts_total") >= drafted / 3
        # Several tokens a step, with logprobs, streamed: the chunks add up to the whole reply
        # (completions and chat alike).
        kw = dict(model="tiny-llama", max_tokens=16, temperature=0, logprobs=True, top_logprobs=2)
        whole = client.chat.completions.create(messages=[{"role": "user", "content": "hi there"}], **kw)
        chunks = client.chat.completions.create(messages=[{"role": "user", "content": "hi there"}], stream=True, **kw)
        streamed = [lp for ch in chunks for c in ch.choices if c.logprobs for lp in c.logprobs.content]
        assert [(x.token, round(x.logprob, 4)) for x in streamed] == \
            [(x.token, round(x.logprob, 4)) for x in whole.choices[0].logprobs.content]
        whole = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=16, temperature=0, logprobs=2)
        chunks = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=16, temperature=0,
                                           logprobs=2, stream=True)
        tokens, lps = [], []
        for ch in chunks:
            for c in ch.choices:
                if c.logprobs:
                    tokens += c.logprobs.tokens
                    lps += c.logprobs.token_logprobs
        assert tokens == whole.choices[0].logprobs.tokens and len(lps) == len(tokens) == 16


def test_speculation_limits(llama_dir, plain):
    """vLLM's disable_by_batch_size: no drafts while more requests than that run (drafts
    again once the batch has shrunk); the draft's max_model_len: a request drafts only while
    its drafts stay within it. Tokens are plain decoding's either way."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (4, 4, 4, 30)]
    prompts = [{"prompt_token_ids": p} for p in _prompts(4)]
    want = _tokens(plain.generate(prompts, params, use_tqdm=False))
    llm = LLM(llama_dir, max_model_len=256, speculative_config={**_spec(llama_dir, 2), "disable_by_batch_size": 1})
    sizes = []
    schedule = llm.llm_engine.scheduler.schedule

    def spy():
        out = schedule()
        sizes.append((len(out.scheduled), sum(bool(s.drafts) for s in out.scheduled)))
        return out

    llm.llm_engine.scheduler.schedule = spy
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == want
    assert all(d == 0 for n, d in sizes if n > 1) and any(d for n, d in sizes if n == 1)
    short = LLM(llama_dir, max_model_len=256, speculative_config={**_spec(llama_dir, 2), "max_model_len": 40})
    calls = spy_proposals(short)
    one = [{"prompt_token_ids": _prompts(1, 20)[0]}]  # 20 tokens, 40 more: the last 20 past the draft's 40
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    assert _tokens(short.generate(one, params, use_tqdm=False)) == _tokens(plain.generate(one, params,
                                                                                          use_tqdm=False))
    assert calls and max(len(toks) + len(d) for toks, d in calls) <= 40  # never a draft past position 39
    for bad in ({"disable_by_batch_size": 0}, {"max_model_len": "8"}, {"revision": "main"},
                {"quantization": "fp8"}):
        with pytest.raises(ValueError, match="speculative_config"):
            LLM(llama_dir, speculative_config={**_spec(llama_dir), **bad})


@pytest.mark.parametrize("async_limit", [None, 8], ids=["sync", "async"])
def test_a_random_mix_of_requests_equals_plain_decoding(llama_dir, near_draft, plain, async_limit):
    """Forty requests in one batch, each drawing its own mix (seeded) of what speculation
    must get right: logprobs, penalties, bias, min_tokens, stop strings, a grammar, n=2, and
    greedy or sampled with top_k=1. Tokens, text, finish reasons and logprobs equal plain
    decoding's, through a small KV cache that preempts; nothing leaks. "async": async
    scheduling with drafts only once at most 8 requests run."""
    import random

    rng = random.Random(11)
    prompts, params = [], []
    for i in range(40):
        kw: dict = dict(max_tokens=rng.randint(5, 30), ignore_eos=rng.random() < 0.7)
        if rng.random() < 0.5:
            kw.update(temperature=0.8, top_k=1, seed=i)
        else:
            kw.update(temperature=0)
        if rng.random() < 0.4:
            kw["logprobs"] = rng.randint(0, 3)
        if rng.random() < 0.3:
            kw[rng.choice(["repetition_penalty", "presence_penalty", "frequency_penalty"])] = rng.choice([1.2, 0.7])
        if rng.random() < 0.2:
            kw["logit_bias"] = {rng.randrange(1000): 4.0}
        if rng.random() < 0.2:
            kw["min_tokens"] = rng.randint(1, 5)
        if rng.random() < 0.2:
            kw["stop"] = ["e", "an"]
        if rng.random() < 0.15:
            kw["structured_outputs"] = {"regex": "[a-d]{2,6}( [0-9]+)?"}
        if rng.random() < 0.15 and kw["temperature"]:
            kw["n"] = 2
        prompts.append({"prompt_token_ids": [(7 * i + 3 * j) % 900 + 4 for j in range(rng.randint(3, 40))]})
        params.append(SamplingParams(**kw))
    want = plain.generate(prompts, params, use_tqdm=False)
    spec = {**_spec(near_draft), "disable_by_batch_size": async_limit} if async_limit else _spec(near_draft)
    llm = LLM(llama_dir, max_model_len=256, block_size=8, kv_cache_memory_bytes=60 * PER_BLOCK_8 * 2,
              speculative_config=spec, async_scheduling=async_limit is not None)
    got = llm.generate(prompts, params, use_tqdm=False)
    sched = llm.llm_engine.scheduler  # (drafts only in the async run's last stretch: fewer stand)
    assert sched.num_preemptions > 0 and sched.num_accepted_tokens > (50 if async_limit is None else 10)
    for w, g, prm in zip(want, got, params):
        for a, b in zip(w.outputs, g.outputs):
            assert (b.token_ids, b.text) == (a.token_ids, a.text), prm
            assert (b.token_ids, b.text, b.finish_reason, b.stop_reason) == (a.token_ids, a.text, a.finish_reason,
                                                                              a.stop_reason)
            if a.logprobs is not None:
                assert len(b.logprobs) == len(a.logprobs)
                for x, y in zip(a.logprobs, b.logprobs):
                    assert x.keys() == y.keys() and all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
    assert_no_leak(llm)
