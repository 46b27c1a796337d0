"""The batched sampler against a small per-row reference implementation on known logits."""

from __future__ import annotations

import math

import pytest
import torch

from pagedserve.engine.request import Request
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.sampler import Sampler
from pagedserve.worker.sampling_state import SamplingStates

V = 40
NEG = float("-inf")


def _req(rid, prompt, output, **sp) -> Request:
    eos = sp.pop("eos", frozenset())
    bad = sp.pop("bad", [])
    params = SamplingParams(max_tokens=50, **sp)
    params._eos_token_ids = frozenset(eos)  # as the engine does, before the request is made
    params._bad_words_token_ids = bad
    r = Request(rid, prompt, params)
    for t in output:
        r.append_output_token(t)
    return r


# ---- reference: one row at a time, plain Python -------------------------------------------
def ref_process(logits: list[float], req: Request) -> list[float]:
    p = req.sampling_params
    out = list(logits)
    if p.allowed_token_ids is not None:
        out = [x if i in p.allowed_token_ids else NEG for i, x in enumerate(out)]
    banned = set()
    if len(req.output_token_ids) < p.min_tokens:
        banned |= set(p.stop_token_ids) | set(p._eos_token_ids)
    for seq in p._bad_words_token_ids:
        prefix = seq[:-1]
        if not prefix or req.output_token_ids[-len(prefix):] == prefix:
            banned.add(seq[-1])
    out = [NEG if i in banned else x for i, x in enumerate(out)]
    for t, b in (p.logit_bias or {}).items():
        out[t] += b
    seen = set(req.prompt_token_ids) | set(req.output_token_ids)
    for t in seen:
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(req.output_token_ids):
        out[t] -= p.frequency_penalty * req.output_token_ids.count(t) + p.presence_penalty
    return out


def ref_probs(logits: list[float], p: SamplingParams) -> list[float]:
    """Final sampling distribution after temperature, min-p, top-k and top-p."""
    z = [x / p.temperature for x in logits]
    m = max(z)
    e = [math.exp(x - m) if x != NEG else 0.0 for x in z]
    s = sum(e)
    probs = [x / s for x in e]
    keep = set(range(V))
    if p.min_p > 0:
        keep &= {i for i, q in enumerate(probs) if q >= p.min_p * max(probs)}
    if p.top_k > 0:
        kth = sorted((z[i] for i in keep), reverse=True)[min(p.top_k, len(keep)) - 1]
        keep &= {i for i in keep if z[i] >= kth}
    if p.top_p < 1.0:
        kept = sorted(keep, key=lambda i: -probs[i])
        total = sum(probs[i] for i in kept)
        acc, nucleus = 0.0, set()
        for i in kept:
            nucleus.add(i)
            acc += probs[i] / total
            if acc >= p.top_p:
                break
        keep = nucleus
    w = [probs[i] if i in keep else 0.0 for i in range(V)]
    s = sum(w)
    return [x / s for x in w]


CASES = [
    dict(temperature=0.0),
    dict(temperature=0.0, repetition_penalty=1.7),
    dict(temperature=0.0, frequency_penalty=1.5, presence_penalty=-0.5),
    dict(temperature=0.0, presence_penalty=2.0, logit_bias={3: 5.0, 7: -100.0}),
    dict(temperature=0.0, allowed_token_ids=[2, 5, 11, 30]),
    dict(temperature=0.0, min_tokens=10, stop_token_ids=[4], eos={6}),
    dict(temperature=0.0, bad=[[9], [1, 2, 8], [5, 13]]),
    dict(temperature=0.8, top_k=5, repetition_penalty=1.3),
    dict(temperature=1.3, top_p=0.7, frequency_penalty=0.4),
    dict(temperature=1.0, min_p=0.2, logit_bias={0: 2.0}),
    dict(temperature=0.6, top_k=8, top_p=0.8, min_p=0.05, allowed_token_ids=list(range(0, 40, 2))),
]


@pytest.fixture
def batch():
    torch.manual_seed(0)
    logits = torch.randn(len(CASES), V) * 3
    reqs = [_req(str(i), [1, 2, 3, 4, 5, 3, 9], [5, 5, 7, 1, 2, 30, 5], **c) for i, c in enumerate(CASES)]
    return logits, reqs


def test_processing_matches_reference(batch):
    logits, reqs = batch
    b = SamplingStates(V, torch.device("cpu")).build(reqs)
    got = Sampler.process_logits(logits.clone(), b)
    for i, r in enumerate(reqs):
        ref = torch.tensor(ref_process(logits[i].tolist(), r))
        torch.testing.assert_close(got[i], ref, rtol=1e-5, atol=1e-5, equal_nan=False)


def test_greedy_rows_are_argmax_of_processed_logits(batch):
    logits, reqs = batch
    b = SamplingStates(V, torch.device("cpu")).build(reqs)
    tokens = Sampler()(logits.clone(), b).tokens
    for i, r in enumerate(reqs):
        if r.sampling_params.is_greedy:
            ref = ref_process(logits[i].tolist(), r)
            assert tokens[i].item() == max(range(V), key=lambda t: ref[t])


def test_plain_greedy_takes_16_bit_logits_as_they_are():
    """A batch with nothing to process takes argmax of the model's 16-bit logits without a
    float32 copy: the same token, the first of equal maxima, as the float32 path."""
    torch.manual_seed(1)
    logits = (torch.randn(6, V) * 3).to(torch.bfloat16)
    logits[2, 7] = logits[2, 30] = logits[2].max() + 1  # a tie: the lower id wins
    plain = [_req(str(i), [1, 2], [3], temperature=0) for i in range(6)]
    b = SamplingStates(V, torch.device("cpu")).build(plain)
    assert b.all_greedy and b.num_logprobs is None and not Sampler.processes(b)
    tokens = Sampler()(logits, b).tokens
    assert tokens.tolist() == logits.float().argmax(dim=-1).tolist() and tokens[2].item() == 7
    # Anything to process (here a bias) still goes through the float32 path.
    biased = [_req(str(i), [1, 2], [3], temperature=0, logit_bias={5: 100.0}) for i in range(6)]
    b = SamplingStates(V, torch.device("cpu")).build(biased)
    assert Sampler.processes(b) and Sampler()(logits, b).tokens.tolist() == [5] * 6


def test_truncation_matches_reference_distribution(batch):
    logits, reqs = batch
    b = SamplingStates(V, torch.device("cpu")).build(reqs)
    processed = Sampler.process_logits(logits.clone(), b)
    probs = Sampler().probabilities(logits.clone(), b)
    for i, r in enumerate(reqs):
        if r.sampling_params.is_greedy:
            continue
        ref = torch.tensor(ref_probs(processed[i].tolist(), r.sampling_params))
        torch.testing.assert_close(probs[i], ref, rtol=1e-4, atol=1e-6)


def test_random_draws_follow_the_distribution():
    torch.manual_seed(1)
    row = torch.randn(V) * 2
    p = SamplingParams(temperature=0.9, top_k=6, top_p=0.9)
    n = 20000
    reqs = [_req(str(i), [1], [], temperature=0.9, top_k=6, top_p=0.9) for i in range(n)]
    b = SamplingStates(V, torch.device("cpu")).build(reqs)
    tokens = Sampler()(row.expand(n, V).clone(), b).tokens
    ref = ref_probs(row.tolist(), p)
    counts = torch.bincount(tokens, minlength=V).float() / n
    assert set(tokens.tolist()) <= {i for i, q in enumerate(ref) if q > 0}
    for t in range(V):
        assert abs(counts[t].item() - ref[t]) < 4 * math.sqrt(ref[t] * (1 - ref[t]) / n) + 1e-9


def test_seeded_rows_ignore_batch_composition():
    torch.manual_seed(2)
    logits = torch.randn(6, V)
    target = logits[2].clone()

    def draw(rows, pos):
        states = SamplingStates(V, torch.device("cpu"))
        reqs = [_req(f"o{i}", [1], [], temperature=1.0) for i in range(rows)]
        reqs.insert(pos, _req("t", [1], [], temperature=1.0, seed=77, top_p=0.95))
        lg = torch.randn(rows + 1, V)
        lg[pos] = target
        out = []
        for _ in range(5):
            out.append(Sampler()(lg.clone(), states.build(reqs)).tokens[pos].item())
        return out

    assert draw(0, 0) == draw(5, 3) == draw(2, 2)


def test_penalty_counts_follow_new_tokens_incrementally():
    states = SamplingStates(V, torch.device("cpu"))
    r = _req("a", [1, 2], [3], temperature=0.0, frequency_penalty=1.0)
    states.build([r])
    r.append_output_token(3)
    r.append_output_token(4)
    b = states.build([r])
    assert b.penalty_sub[0, 3].item() == 2 and b.penalty_sub[0, 4].item() == 1 and b.penalty_sub[0].sum() == 3
    assert b.seen_mask is None  # no repetition penalty asked for
    r2 = _req("b", [1, 2], [3, 3], temperature=0.0, repetition_penalty=1.2, presence_penalty=0.5)
    b = states.build([r, r2])
    assert b.seen_mask[1, [1, 2, 3]].all() and b.seen_mask[1].sum() == 3 and b.repetition.tolist() == pytest.approx([1.0, 1.2])
    assert b.penalty_sub[1, 3].item() == 0.5 and b.penalty_sub[1].sum() == 0.5


def test_logprobs_are_raw_and_ranked():
    torch.manual_seed(3)
    logits = torch.randn(3, V)
    reqs = [_req("a", [1], [], temperature=0.0, logprobs=3, logit_bias={0: 50.0}),
            _req("b", [1], [], temperature=1.0, logprobs=0),
            _req("c", [1], [], temperature=1.0)]
    out = Sampler()(logits.clone(), SamplingStates(V, torch.device("cpu")).build(reqs))
    raw = logits.log_softmax(-1)
    assert out.tokens[0].item() == 0  # the bias decided the token ...
    assert out.sampled_logprobs[0].item() == pytest.approx(raw[0, 0].item(), abs=1e-6)  # ... not the logprob
    for i in range(3):
        t = out.tokens[i].item()
        assert out.sampled_ranks[i].item() == int((raw[i] > raw[i, t]).sum()) + 1
    top = raw[0].topk(3)
    assert out.topk_ids[0].tolist() == top.indices.tolist()
