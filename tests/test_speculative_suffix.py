"""Suffix decoding (engine/suffix.py, vLLM's method "suffix"): the proposer's matches in the
request's own tokens and in finished requests' outputs, its adaptive draft length and
probability floor, what it remembers and forgets; in the engine, outputs equal plain
decoding's, and a workload that repeats itself drafts almost every token right."""

from __future__ import annotations

import pytest
from engine_helpers import assert_no_leak

from pagedserve import LLM, SamplingParams
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.spec_config import SpeculativeConfig
from pagedserve.engine.suffix import SuffixProposer


def _proposer(**kw) -> SuffixProposer:
    return SuffixProposer(SpeculativeConfig.from_dict({"method": "suffix", **kw}))


def _req(rid: str, prompt: list[int], output: list[int] = ()) -> Request:
    r = Request(rid, list(prompt), SamplingParams(max_tokens=100))
    for t in output:
        r.append_output_token(t)
    return r


def test_config_defaults_and_refusals():
    cfg = SpeculativeConfig.from_dict({"method": "suffix"})
    assert (cfg.num_speculative_tokens, cfg.suffix_decoding_max_tree_depth, cfg.suffix_decoding_max_cached_requests,
            cfg.suffix_decoding_max_spec_factor, cfg.suffix_decoding_min_token_prob) == (24, 24, 10000, 1.0, 0.1)
    for bad, match in (({"model": "x"}, "takes no model"), ({"suffix_decoding_min_token_prob": 1.5}, "min_token_prob"),
                       ({"suffix_decoding_max_tree_depth": 1}, "max_tree_depth"),
                       ({"suffix_decoding_max_spec_factor": 0}, "max_spec_factor")):
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.from_dict({"method": "suffix", **bad})
    with pytest.raises(ValueError, match="are for method 'suffix'"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2, "suffix_decoding_max_tree_depth": 8})


def test_own_tokens_longest_match_and_adaptive_length():
    p = _proposer()
    # The tail [7, 8, 9] occurred at the start: what followed it, as many tokens as matched.
    assert p.propose(_req("a", [7, 8, 9, 1, 2, 3, 4, 5, 7, 8, 9]), 10) == [1, 2, 3]
    # The longest match wins over a more recent shorter one: [.., 6, 8, 9] matches 3 there.
    req = _req("b", [6, 8, 9, 40, 41, 42, 5, 8, 9, 50, 51, 6, 8, 9])
    assert p.propose(req, 10) == [40, 41, 42]
    assert p.propose(req, 2) == [40, 41]  # max_tokens caps it
    assert _proposer(suffix_decoding_max_spec_factor=0.5).propose(_req("c", [7, 8, 9, 1, 2, 3, 7, 8, 9]), 10) == [1]
    assert p.propose(_req("d", [1, 2, 3, 4]), 10) == []  # nothing occurred before


def test_finished_outputs_are_matched_and_the_floor_holds():
    p = _proposer()
    for i, out in enumerate(([5, 6, 10, 11, 12], [5, 6, 10, 11, 12], [5, 6, 20, 21, 22], [5, 6, 10, 11, 13])):
        done = _req(f"r{i}", [1], out)
        done.status = RequestStatus.FINISHED_STOPPED
        p.observe_finished(done)
    # Four outputs continue [5, 6]: 10 (3 of 4), then 11 (3 of 4); a match of 2 tokens
    # drafts at most 2.
    assert p.propose(_req("n", [9, 5, 6]), 10) == [10, 11]  # (a match of 2 tokens: 2 drafts)
    strict = _proposer(suffix_decoding_min_token_prob=0.6, suffix_decoding_max_spec_factor=4.0)
    for i, out in enumerate(([5, 6, 10, 11, 12], [5, 6, 10, 11, 13], [5, 6, 20, 21, 22], [5, 6, 10, 11, 13])):
        done = _req(f"s{i}", [1], out)
        done.status = RequestStatus.FINISHED_LENGTH_CAPPED
        strict.observe_finished(done)
    assert strict.propose(_req("t", [9, 5, 6]), 10) == [10, 11]  # then 13 or 12: 2 and 1 of 4, under 0.6
    aborted = _req("x", [1], [77, 78, 79])
    aborted.status = RequestStatus.FINISHED_ABORTED
    strict.observe_finished(aborted)
    assert strict.propose(_req("u", [77, 78]), 10) == []  # an aborted output is not remembered


def test_the_oldest_outputs_go_first():
    p = _proposer(suffix_decoding_max_cached_requests=2)
    for i, out in enumerate(([1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12])):
        done = _req(f"r{i}", [0], out)
        done.status = RequestStatus.FINISHED_STOPPED
        p.observe_finished(done)
    assert p.propose(_req("a", [1, 2]), 4) == []  # evicted
    assert p.propose(_req("b", [9, 10]), 4) == [11, 12]
    p.forget("b")
    assert "b" not in p._local


@pytest.mark.parametrize("name", ["llama", "qwen3_5"])
def test_engine_outputs_unchanged_and_repeats_draft_right(name, model_dirs):
    """Plain decoding's tokens, first and second time over the same prompts; the second time
    the first outputs are in the corpus, so nearly every draft stands (Qwen3.5's Gated
    DeltaNet states step back past the rest)."""
    path = model_dirs[name]
    prompts = [{"prompt_token_ids": [(11 * i + 5 * j) % 900 + 4 for j in range(8 + 5 * i)]} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(path, max_model_len=256).generate(prompts, params, use_tqdm=False)]
    llm = LLM(path, max_model_len=256, speculative_config={"method": "suffix", "num_speculative_tokens": 8})
    sched = llm.llm_engine.scheduler
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    drafted, accepted = sched.num_draft_tokens, sched.num_accepted_tokens
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    drafted, accepted = sched.num_draft_tokens - drafted, sched.num_accepted_tokens - accepted
    assert drafted > 60 and accepted > 0.9 * drafted
    assert_no_leak(llm)
    assert not sched.proposer._local
