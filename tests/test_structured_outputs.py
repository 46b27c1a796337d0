"""Structured outputs (xgrammar): the output of a constrained request stays inside its JSON
schema, regex, choice or grammar; greedy decoding under a grammar is transformers' argmax
over the tokens the grammar allows, step by step; unconstrained requests in the same batch
are untouched; async scheduling, preemption and n > 1 keep all of it; bad constraints are
a ValueError naming the field, with nothing left in the engine."""

from __future__ import annotations

import json
import re

import pytest
import torch
from engine_helpers import assert_no_leak

from pagedserve import LLM, SamplingParams
from pagedserve.engine.grammar import new_bitmask, unpack_bitmask
from pagedserve.errors import ParamError
from pagedserve.sampling_params import GuidedDecodingParams, StructuredOutputsParams

xgr = pytest.importorskip("xgrammar")

PER_BLOCK_8 = 2 * 2 * 8 * 2 * 16 * 4  # layers * (k, v) * block 8 * kv heads * head dim * fp32

SCHEMA = {  # every value bounded, so a complete object always fits in max_tokens
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["color", "ok", "n"],
    "additionalProperties": False,
}


def _prompts(n: int) -> list[str]:
    # Text prompts: random token ids can end in half a UTF-8 character, which then shows in
    # the output's text.
    words = "the value of an object is returned by the method when it is called".split()
    return [" ".join(words[i % 5: i % 5 + 3 + 2 * i]) for i in range(n)]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, max_model_len=256, async_scheduling=False)


def _check_schema(text: str) -> bool:
    obj = json.loads(text)
    return (set(obj) == {"color", "ok", "n"} and obj["color"] in ("red", "green", "blue")
            and isinstance(obj["ok"], bool) and isinstance(obj["n"], int) and 0 <= obj["n"] <= 99)


# ---- parameters ---------------------------------------------------------------------------
def test_params_need_exactly_one_constraint():
    with pytest.raises(ParamError, match="none are specified") as e:
        StructuredOutputsParams()
    assert e.value.param == "structured_outputs"
    with pytest.raises(ValueError, match=r"2 are \(json, regex\)"):
        StructuredOutputsParams(json=SCHEMA, regex="a")
    for bad in (dict(choice=[]), dict(choice=["a", ""]), dict(regex=""), dict(json=3), dict(json_object=False),
                dict(regex="a", whitespace_pattern=" "), dict(structural_tag=3)):
        with pytest.raises(ParamError):
            StructuredOutputsParams(**bad)
    assert StructuredOutputsParams(json=SCHEMA).json == json.dumps(SCHEMA)  # dicts become their text
    with pytest.raises(ParamError, match="unknown field"):
        SamplingParams(structured_outputs={"regex": "a", "bogus": 1})


def test_guided_decoding_is_the_same_parameter():
    g = GuidedDecodingParams(choice=["x", "y"])
    p = SamplingParams(guided_decoding=g)
    assert p.structured_outputs is g and p.needs_output_history
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs.regex == "a+"
    with pytest.raises(ParamError, match="not both"):
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="a"), guided_decoding=g)


def test_unpack_bitmask_matches_bit_by_bit():
    vocab = 70  # not a multiple of 32; bit 31 (the sign bit) in use
    words = new_bitmask(3, vocab)
    assert (unpack_bitmask(words, vocab)).all()
    g = torch.Generator().manual_seed(0)
    words = torch.randint(-2**31, 2**31 - 1, words.shape, generator=g, dtype=torch.int32)
    want = torch.tensor([[bool((int(words[r, t // 32]) >> (t % 32)) & 1) for t in range(vocab)] for r in range(3)])
    assert torch.equal(unpack_bitmask(words, vocab), want)


# ---- the engine ---------------------------------------------------------------------------
def test_every_kind_of_constraint_holds(llm):
    prompts = _prompts(4)
    cases = [
        (dict(choice=["alpha", "beta", "gamma delta"]), lambda t: t in ("alpha", "beta", "gamma delta")),
        (dict(regex=r"[a-c]{3}-[0-9]{2}"), lambda t: bool(re.fullmatch(r"[a-c]{3}-[0-9]{2}", t))),
        (dict(json=SCHEMA, disable_any_whitespace=True), _check_schema),
        (dict(grammar='root ::= "(" item ("," item)? ")"\nitem ::= [xyz]'),
         lambda t: bool(re.fullmatch(r"\([xyz](,[xyz])?\)", t))),
    ]
    for spec, check in cases:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, structured_outputs=spec),
                            use_tqdm=False)
        for o in outs:
            c = o.outputs[0]
            assert c.finish_reason == "stop", (spec, c.text)
            assert check(c.text), (spec, c.text)
    assert_no_leak(llm)


def test_json_object_output_is_always_a_json_object_prefix(llm):
    """Any object; a complete one when the request ends by itself."""
    outs = llm.generate(_prompts(3), SamplingParams(temperature=0.8, seed=3, max_tokens=48,
                                                    structured_outputs={"json_object": True}), use_tqdm=False)
    for o in outs:
        text = o.outputs[0].text
        assert text.lstrip().startswith("{")
        if o.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_greedy_under_a_grammar_is_transformers_masked_argmax(llm, llama_dir, hf_refs):
    """Each token pagedserve chose is transformers' argmax among the tokens an independent
    xgrammar matcher allows at that point (near-ties tolerated, as elsewhere)."""
    from transformers import AutoTokenizer

    hf = hf_refs["llama"].model
    tok = AutoTokenizer.from_pretrained(llama_dir)
    vocab = hf.config.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
    compiled = xgr.GrammarCompiler(info).compile_regex(r"(the|a|an) [a-z]{2,6}( [a-z]{2,6}){0,3}\.")
    prompts = _prompts(3)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, structured_outputs={
        "regex": r"(the|a|an) [a-z]{2,6}( [a-z]{2,6}){0,3}\."}), use_tqdm=False)
    for p, o in zip(prompts, outs):
        got = o.outputs[0].token_ids
        matcher = xgr.GrammarMatcher(compiled)
        ids = list(o.prompt_token_ids)
        for i, t in enumerate(got):
            words = new_bitmask(1, vocab)
            matcher.fill_next_token_bitmask(words, 0)
            with torch.inference_mode():
                row = hf(torch.tensor([ids])).logits[0, -1].float()
            row = row.masked_fill(~unpack_bitmask(words, vocab)[0], float("-inf"))
            best = int(row.argmax())
            if best != t:
                gap = float(row[best] - row[t])
                assert gap < 1e-3, f"token {i}: got {t}, masked argmax {best} leads by {gap:.4g}"
                break
            assert matcher.accept_token(t)
            ids.append(t)
        else:
            assert matcher.is_terminated()  # it stopped exactly where the grammar ended


def test_unconstrained_requests_in_the_same_batch_are_untouched(llm):
    prompts = _prompts(4)
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompts, plain, use_tqdm=False)
    constrained = SamplingParams(temperature=0, max_tokens=12, structured_outputs={"choice": ["yes", "no"]})
    mixed = llm.generate(prompts, [plain, constrained, plain, constrained], use_tqdm=False)
    for i in (0, 2):
        assert mixed[i].outputs[0].token_ids == alone[i].outputs[0].token_ids
    for i in (1, 3):
        assert mixed[i].outputs[0].text in ("yes", "no")


def test_async_scheduling_preemption_and_n(llama_dir, llm):
    """The same outputs with async scheduling and under forced preemption; each of n samples
    walks the grammar on its own."""
    params = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=dict(json=SCHEMA,
                                                                                  disable_any_whitespace=True)),
              SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=40,
                             structured_outputs=dict(regex=r"[a-c]{3}-[0-9]{2}"))] * 3
    prompts = _prompts(6)
    want = llm.generate(prompts, params, use_tqdm=False)
    asyn = LLM(llama_dir, max_model_len=256, async_scheduling=True)
    tight = LLM(llama_dir, max_model_len=256, block_size=8, kv_cache_memory_bytes=12 * PER_BLOCK_8,
                async_scheduling=False)
    for other in (asyn, tight):
        got = other.generate(prompts, params, use_tqdm=False)
        assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
        assert_no_leak(other)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    for o in want[1::2]:
        assert len(o.outputs) == 3
        assert all(re.fullmatch(r"[a-c]{3}-[0-9]{2}", c.text) for c in o.outputs)


def test_a_grammar_that_min_tokens_blocks_ends_cleanly(llm):
    """After "yes" only the stop token is allowed, and min_tokens bans it: every token is
    masked. The request still ends (no crash, no garbage after the answer, nothing leaked)."""
    for temperature in (0.0, 1.0):
        outs = llm.generate(_prompts(2), SamplingParams(temperature=temperature, seed=0, min_tokens=5, max_tokens=10,
                                                        structured_outputs={"choice": ["yes"]}), use_tqdm=False)
        for o in outs:
            assert o.outputs[0].text == "yes" and o.outputs[0].finish_reason == "stop"
    assert_no_leak(llm)


@pytest.mark.parametrize("spec, message", [
    (dict(json='{"type": "object", "properties": '), "invalid json"),
    (dict(regex="[a-"), "invalid regex"),
    (dict(grammar="root ::= undefined_rule"), "invalid grammar"),
])
def test_an_invalid_constraint_is_a_value_error(llm, spec, message):
    with pytest.raises(ParamError, match=message) as e:
        llm.generate(_prompts(1), SamplingParams(structured_outputs=spec), use_tqdm=False)
    assert e.value.param == "structured_outputs" and "/project/" not in str(e.value)  # no C++ source paths
    assert_no_leak(llm)


# ---- structural tags: free text until a trigger, then a tagged block held to its schema -------
TAG = {"structures": [{"begin": "<f>", "schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                                                  "required": ["n"], "additionalProperties": False},
                       "end": "</f>"}], "triggers": ["<f>"]}


def test_structural_tag_holds_tagged_blocks_to_their_schema(llm):
    compiled = llm.llm_engine.compile_grammar(SamplingParams(structured_outputs={"structural_tag": TAG}))
    for text, ok in [('free text <f>{"n": 3}</f> and more', True), ('x <f>{"m": 3}', False),
                     ("no tag at all", True), ("<f>not json", False)]:
        assert xgr.GrammarMatcher(compiled).accept_string(text) is ok, text
    with pytest.raises(ParamError, match="invalid structural_tag"):
        llm.generate(_prompts(1), SamplingParams(structured_outputs={"structural_tag": {"structures": []}}),
                     use_tqdm=False)
    assert_no_leak(llm)


def test_structural_tag_in_xgrammars_format_shapes_the_output(llm):
    """xgrammar's own format, as vLLM passes it through: a fixed opening, then a JSON object."""
    value = {"enum": ["red", "green", "blue"]}  # (a random model pads an object with whitespace)
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "const_string", "value": "Answer: "}, {"type": "json_schema", "json_schema": value}]}}
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=40, structured_outputs={"structural_tag": tag})
    for out in llm.generate(_prompts(3), params, use_tqdm=False):
        text = out.outputs[0].text
        assert text.startswith("Answer: ") and out.outputs[0].finish_reason == "stop", text
        assert json.loads(text[len("Answer: "):]) in value["enum"]
    assert_no_leak(llm)


# ---- with a reasoning parser: the grammar waits for </think> --------------------------------
@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory, tokenizer_dir):
    """A random model whose tokenizer has <think> and </think> as single tokens (as Qwen3's)."""
    from transformers import AutoTokenizer

    from pagedserve.model.random_model import build_random_model

    tok_dir = str(tmp_path_factory.mktemp("think_tok"))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    tok.save_pretrained(tok_dir)
    path = str(tmp_path_factory.mktemp("think_model"))
    build_random_model(path, initializer_range=0.5, tokenizer_dir=tok_dir)
    return path, (tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>"))


def test_the_grammar_starts_after_the_reasoning(thinking_model):
    """deepseek_r1: the output is reasoning until </think>; the grammar then holds the rest."""
    path, (start_id, end_id) = thinking_model
    llm = LLM(path, max_model_len=256, reasoning_parser="deepseek_r1", async_scheduling=False)
    tok = llm.get_tokenizer()
    # The bias makes the model close its thinking at once; the grammar must let that through,
    # then hold the rest (where it masks </think> itself, bias or not).
    params = SamplingParams(temperature=0, max_tokens=60, logit_bias={end_id: 100.0}, skip_special_tokens=False,
                            structured_outputs=dict(json=SCHEMA, disable_any_whitespace=True))
    thinking = llm.generate(["What color?"], params, use_tqdm=False)[0].outputs[0]
    assert thinking.token_ids[0] == end_id and thinking.finish_reason == "stop"
    assert _check_schema(tok.decode(thinking.token_ids[1:], skip_special_tokens=True))
    # A prompt that already closed its think block: the grammar holds from the first token,
    # so </think> cannot come.
    closed = llm.generate([{"prompt_token_ids": tok.encode("What color? <think></think>")}], params,
                          use_tqdm=False)[0].outputs[0]
    assert end_id not in closed.token_ids and _check_schema(tok.decode(closed.token_ids, skip_special_tokens=True))
    assert_no_leak(llm)
    with pytest.raises(ValueError, match="reasoning_parser"):
        LLM(path, reasoning_parser="o1")


@pytest.mark.parametrize("parser", ["qwen3", "glm45"])
def test_qwen3_waits_only_for_an_output_that_opens_with_think(thinking_model, llama_dir, parser):
    """qwen3 (and glm45): a first token other than <think> starts the grammar at once (a model that does
    not think is held from the start); <think> first makes it wait for </think>. A tokenizer
    without single-token tags never waits."""
    path, (start_id, end_id) = thinking_model
    llm = LLM(path, max_model_len=256, reasoning_parser=parser, async_scheduling=False)
    tok = llm.get_tokenizer()
    plain = SamplingParams(temperature=0, max_tokens=60, skip_special_tokens=False,
                           structured_outputs=dict(json=SCHEMA, disable_any_whitespace=True))
    out = llm.generate(["What color?"], plain, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[0] != start_id and _check_schema(tok.decode(out.token_ids, skip_special_tokens=True))
    # <think> is allowed as the first token besides the grammar; then nothing is held (the
    # bias keeps the model "thinking" until max_tokens).
    opened = SamplingParams(temperature=0, max_tokens=12, logit_bias={start_id: 100.0}, skip_special_tokens=False,
                            structured_outputs=dict(json=SCHEMA, disable_any_whitespace=True))
    out = llm.generate(["What color?"], opened, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [start_id] * 12 and out.finish_reason == "length"
    assert_no_leak(llm)
    no_tags = LLM(llama_dir, max_model_len=256, reasoning_parser=parser, async_scheduling=False)
    out = no_tags.generate(["What color?"], plain, use_tqdm=False)[0].outputs[0]
    assert _check_schema(no_tags.get_tokenizer().decode(out.token_ids, skip_special_tokens=True))


def test_speculative_decoding_under_a_grammar(llm, llama_dir):
    """Requests with a grammar speculate: each draft row is masked by the grammar after the
    drafts before it; n-gram drafts the grammar refuses are cut before the step; confirmed
    drafts advance the grammar. The oracle drafts plain decoding's own tokens with one wrong
    a step (every acceptance count happens), sampled requests draw them through a draft
    model: outputs equal plain decoding's, and every constraint holds."""
    from test_speculative import SPEC, OracleProposer

    prompts = _prompts(4)
    cases = [dict(json=SCHEMA, disable_any_whitespace=True), dict(regex=r"[a-c]{3}-[0-9]{2}( [a-c]{3}-[0-9]{2})*"),
             dict(choice=["alpha beta gamma", "beta gamma alpha"])]
    spec = LLM(llama_dir, max_model_len=256, speculative_config=SPEC)
    oracle = spec.llm_engine.scheduler.proposer = OracleProposer(4)
    sched = spec.llm_engine.scheduler
    for constraint in cases:
        params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=constraint)
        want = llm.generate(prompts, params, use_tqdm=False)
        for o in want:
            oracle.reference[tuple(o.prompt_token_ids)] = o.outputs[0].token_ids
        before = sched.num_accepted_tokens
        got = spec.generate(prompts, params, use_tqdm=False)
        assert [(o.outputs[0].text, o.outputs[0].finish_reason) for o in got] == \
            [(o.outputs[0].text, o.outputs[0].finish_reason) for o in want]
        assert sched.num_accepted_tokens > before
    assert all(_check_schema(o.outputs[0].text) for o in spec.generate(
        prompts, SamplingParams(temperature=0, max_tokens=40, structured_outputs=cases[0]), use_tqdm=False))
    assert_no_leak(spec)
    drafted = LLM(llama_dir, max_model_len=256, speculative_config={"model": llama_dir, "num_speculative_tokens": 3})
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=40, structured_outputs=cases[0])
    outs = drafted.generate(prompts, params, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "stop" and _check_schema(o.outputs[0].text) for o in outs)
    assert drafted.llm_engine.scheduler.num_accepted_tokens > 0
    assert_no_leak(drafted)
