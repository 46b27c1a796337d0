"""Beam search against its twin: the same algorithm run on transformers' own logits (float32),
for several beam widths and length penalties, with and without EOS; parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

from pagedserve import LLM
from pagedserve.beam_search import beam_score
from pagedserve.errors import ParamError
from pagedserve.sampling_params import BeamSearchParams


def _reference(hf, prompt: list[int], width: int, max_tokens: int, eos: set, length_penalty: float,
               max_len: int) -> list[tuple[list[int], float]]:
    """Beam search as vLLM defines it, on transformers' logits: each round every live beam
    offers its top 2 x width tokens; the width best by score go on; EOS ends a beam."""
    live, done = [(list(prompt), 0.0)], []

    def score(b):
        return beam_score(b[0], b[1], eos, length_penalty)

    for _ in range(max_tokens):
        grown = []
        for toks, cum in live:
            with torch.inference_mode():
                lp = hf(torch.tensor([toks])).logits[0, -1].float().log_softmax(-1)
            vals, ids = lp.topk(2 * width)
            for v, t in zip(vals.tolist(), ids.tolist()):
                (done if t in eos else grown).append((toks + [t], cum + v))
        live = sorted(grown, key=score, reverse=True)[:width]
        done += [b for b in live if len(b[0]) >= max_len]
        live = [b for b in live if len(b[0]) < max_len]
        if not live:
            break
    return sorted(done + live, key=score, reverse=True)[:width]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, max_model_len=256)


@pytest.mark.parametrize("width, length_penalty, ignore_eos", [(1, 1.0, True), (3, 1.0, False), (4, 0.5, True)])
def test_beam_search_matches_its_twin_on_transformers(llm, hf_refs, width, length_penalty, ignore_eos):
    hf = hf_refs["llama"].model
    eos = set() if ignore_eos else set(llm.llm_engine.eos_token_ids)
    prompts = [[5, 17, 300, 41], [900, 2, 33]]
    params = BeamSearchParams(beam_width=width, max_tokens=6, length_penalty=length_penalty, ignore_eos=ignore_eos)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for p, out in zip(prompts, outs):
        ref = _reference(hf, p, width, 6, eos, length_penalty, 256)
        assert [s.tokens for s in out.sequences] == [toks for toks, _ in ref]
        for s, (_, cum) in zip(out.sequences, ref):
            assert math.isclose(s.cum_logprob, cum, abs_tol=1e-3)
            assert s.tokens[:len(p)] == p and len(s.logprobs) == len(s.tokens) - len(p)
            assert s.finish_reason == ("stop" if s.tokens[-1] in eos else "length")


def test_beam_width_one_is_greedy(llm):
    from pagedserve import SamplingParams

    prompt = {"prompt_token_ids": [7, 8, 9, 10]}
    beam = llm.beam_search([prompt], BeamSearchParams(beam_width=1, max_tokens=8, ignore_eos=True))[0].sequences[0]
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert beam.tokens[4:] == greedy.outputs[0].token_ids and beam.text == greedy.outputs[0].text


def test_bad_params(llm):
    for bad in (dict(beam_width=0, max_tokens=3), dict(beam_width=2, max_tokens=0),
                dict(beam_width=2, max_tokens=3, temperature=-1)):
        with pytest.raises(ParamError):
            BeamSearchParams(**bad)
    with pytest.raises(ParamError, match="max_logprobs") as e:  # 2 x 11 logprobs > the default 20
        llm.beam_search(["hello"], BeamSearchParams(beam_width=11, max_tokens=2))
    assert e.value.param == "beam_width"


def test_eos_ends_beams(llm, hf_refs, monkeypatch):
    """With the model's likeliest next token standing in for EOS, beams that take it end at
    once ("stop", EOS not in the text), and the rest go on, as in the twin."""
    from pagedserve import SamplingParams

    prompt = [5, 17, 300, 41]
    first = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1),
                         use_tqdm=False)[0].outputs[0].token_ids[0]
    monkeypatch.setattr(llm.llm_engine, "eos_token_ids", frozenset({first}))
    out = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=3, max_tokens=5))[0]
    ref = _reference(hf_refs["llama"].model, prompt, 3, 5, {first}, 1.0, 256)
    assert [s.tokens for s in out.sequences] == [toks for toks, _ in ref]
    stopped = [s for s in out.sequences if s.finish_reason == "stop"]
    assert stopped and all(s.tokens[-1] == first and s.text == "" for s in stopped if len(s.tokens) == 5)


def test_beam_score():
    assert beam_score([1, 2, 3, 0], -3.0, {0}, 1.0) == -1.0  # the final EOS does not count
    assert math.isclose(beam_score([1, 2, 3, 4], -4.0, {0}, 0.5), -2.0)


def test_server_use_beam_search_equals_llm_beam_search(llama_dir):
    """/v1/completions and /v1/chat/completions with use_beam_search: n beams per prompt, best
    first, the same as LLM.beam_search on the same engine settings."""
    import httpx
    from server_helpers import serving

    from pagedserve import LLM
    from pagedserve.sampling_params import BeamSearchParams

    prompts = ["The capital of France is", "def f(x):"]
    llm = LLM(llama_dir, max_model_len=512)
    offline = llm.beam_search([{"prompt": p} for p in prompts],
                              BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.5))
    prompt_lens = [len(llm.get_tokenizer().encode(p)) for p in prompts]
    conv = [{"role": "user", "content": "Hello!"}]
    tok = llm.get_tokenizer()
    chat_ids = tok.encode(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)
    chat_offline = llm.beam_search([{"prompt_token_ids": chat_ids}], BeamSearchParams(beam_width=2, max_tokens=5))[0]
    with serving(llama_dir, "tiny-llama") as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": prompts, "use_beam_search": True, "n": 3,
                                                           "max_tokens": 6, "length_penalty": 0.5}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": conv, "use_beam_search": True, "n": 2,
                                                                "max_tokens": 5}, timeout=60)
        assert r.status_code == 200, r.text
        chat = r.json()
    assert [c["message"]["content"] for c in chat["choices"]] == [s.text for s in chat_offline.sequences]
    assert chat["usage"]["prompt_tokens"] == len(chat_ids)
    choices = body["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    for i, out in enumerate(offline):
        assert [c["text"] for c in choices[3 * i: 3 * i + 3]] == [s.text for s in out.sequences]
        assert [c["finish_reason"] for c in choices[3 * i: 3 * i + 3]] == [s.finish_reason for s in out.sequences]
    assert len({c["text"] for c in choices[:3]}) == 3  # three different beams
    assert body["usage"]["prompt_tokens"] == sum(prompt_lens)
    assert body["usage"]["completion_tokens"] == sum(len(s.tokens) - n for o, n in zip(offline, prompt_lens)
                                                     for s in o.sequences)
