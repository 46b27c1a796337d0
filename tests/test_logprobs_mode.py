"""logprobs_mode (vLLM's): raw logits are transformers' logits; processed logprobs are those
of the distribution a token is drawn from (temperature, top-k), derived here from the raw
ones of the same seeded run, which draws the same tokens."""

from __future__ import annotations

import math

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.sampling_params import BeamSearchParams

PROMPTS = [[1, 5, 9, 14, 3, 7, 22, 8], [1, 100, 200, 300, 400]]
SAMPLED = SamplingParams(temperature=0.7, top_k=5, max_tokens=6, logprobs=5, seed=11, ignore_eos=True)


def _run(llm_dir: str, mode: str, params: SamplingParams) -> list:
    llm = LLM(llm_dir, logprobs_mode=mode, max_model_len=64, seed=0)
    return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)]


def test_raw_logits_are_transformers_logits(llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    llm = LLM(llama_dir, logprobs_mode="raw_logits", max_model_len=64, seed=0)
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)[0]
    ids = PROMPTS[0] + list(out.outputs[0].token_ids)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
    n = len(PROMPTS[0])
    for i, (t, lp) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        assert t == int(logits[n - 1 + i].argmax())
        assert abs(lp[t].logprob - float(logits[n - 1 + i, t])) < 1e-3 and lp[t].rank == 1
    for j in range(1, n):  # prompt position j: the logit its token had after the tokens before it
        assert abs(out.prompt_logprobs[j][ids[j]].logprob - float(logits[j - 1, ids[j]])) < 1e-3


def test_processed_logprobs_are_of_the_sampled_distribution(llama_dir):
    raw = _run(llama_dir, "raw_logprobs", SAMPLED)
    proc = _run(llama_dir, "processed_logprobs", SAMPLED)
    logits = _run(llama_dir, "processed_logits", SAMPLED)
    checked = 0
    for r, p, lg in zip(raw, proc, logits):
        assert r.token_ids == p.token_ids == lg.token_ids  # the mode changes what is reported, not the draw
        for t, rlp, plp, llp in zip(r.token_ids, r.logprobs, p.logprobs, lg.logprobs):
            assert set(rlp) == set(plp)  # the raw top 5 are the top-k survivors
            scaled = {tok: v.logprob / 0.7 for tok, v in rlp.items()}
            norm = math.log(sum(math.exp(v) for v in scaled.values()))
            for tok, v in plp.items():
                assert abs(v.logprob - (scaled[tok] - norm)) < 1e-4
            # processed logits: the raw logits over T, up to the row's shift (log of its partition)
            shifts = {round(llp[tok].logprob - scaled[tok], 3) for tok in llp}
            assert len(shifts) == 1
            assert abs(sum(math.exp(v.logprob) for v in plp.values()) - 1) < 1e-4
            checked += 1
    assert checked == 12


def test_greedy_rows_report_the_processed_logits(llama_dir):
    """A greedy row's processed distribution has no temperature: with no penalty it is raw."""
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True)
    raw, proc = _run(llama_dir, "raw_logprobs", params), _run(llama_dir, "processed_logprobs", params)
    for r, p in zip(raw, proc):
        assert r.token_ids == p.token_ids
        for a, b in zip(r.logprobs, p.logprobs):
            assert {t: round(v.logprob, 4) for t, v in a.items()} == {t: round(v.logprob, 4) for t, v in b.items()}
    # ... and with a bias, the biased distribution (the raw one would still rank the token first).
    biased = SamplingParams(temperature=0.0, max_tokens=1, logprobs=3, logit_bias={raw[0].token_ids[0]: -100})
    first = _run(llama_dir, "processed_logprobs", biased)[0]
    assert first.token_ids[0] != raw[0].token_ids[0] and raw[0].token_ids[0] not in first.logprobs[0]


def test_bad_modes_and_beam_search_in_logits_mode(llama_dir):
    with pytest.raises(ValueError, match="logprobs_mode must be one of"):
        LLM(llama_dir, logprobs_mode="logits", max_model_len=64)
    llm = LLM(llama_dir, logprobs_mode="raw_logits", max_model_len=64)
    with pytest.raises(ValueError, match="beam search needs logprobs"):
        llm.beam_search([{"prompt_token_ids": PROMPTS[0]}], BeamSearchParams(beam_width=2, max_tokens=2))
