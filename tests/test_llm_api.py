"""The offline LLM API: prompt forms, result order and fields, validation, stopping,
seeded sampling and request accounting."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from engine_helpers import assert_no_leak

from pagedserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, max_model_len=512, seed=0)


def test_mixed_prompts_in_input_order(llm):
    tok = llm.get_tokenizer()
    prompts = ["The capital of France is", {"prompt_token_ids": [5, 6, 7]}, "x", {"prompt_token_ids": [9] * 40}]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(outs) == 4
    assert outs[0].prompt == "The capital of France is" and outs[0].prompt_token_ids == tok.encode(prompts[0])
    assert outs[1].prompt is None and outs[1].prompt_token_ids == [5, 6, 7]
    assert outs[3].prompt_token_ids == [9] * 40
    assert len({o.request_id for o in outs}) == 4
    for o in outs:
        c = o.outputs[0]
        assert o.finished and c.index == 0 and len(c.token_ids) == 5
        assert c.finish_reason == "length" and c.stop_reason is None
        assert c.text == tok.decode(c.token_ids)
    single = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                          use_tqdm=False)
    assert single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert_no_leak(llm)


def test_per_prompt_sampling_params(llm):
    outs = llm.generate(["a", "b"], [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                                     SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 7]
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)


def test_stop_token_and_eos(llm):
    p = {"prompt_token_ids": [11, 12, 13, 14]}
    base = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    toks = base.outputs[0].token_ids
    stop = toks[3]
    first = toks.index(stop)
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.token_ids == toks[: first + 1] and c.finish_reason == "stop" and c.stop_reason == stop
    # The stop token stays in token_ids but not in the text, unless include_stop_str_in_output (as vLLM).
    tok = llm.get_tokenizer()
    assert c.text == tok.decode(toks[:first], skip_special_tokens=True)
    kept = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop],
                                          include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == tok.decode(toks[: first + 1], skip_special_tokens=True) and kept.text != c.text
    # EOS comes from the model's generation config; it stops with stop_reason None ...
    engine = llm.llm_engine
    assert engine.eos_token_ids == {llm.get_tokenizer().eos_token_id}
    saved = engine.eos_token_ids
    engine.eos_token_ids = frozenset({stop})
    try:
        c = llm.generate(p, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
        assert c.token_ids == toks[: first + 1] and c.finish_reason == "stop" and c.stop_reason is None
        # ... unless ignore_eos, or until min_tokens are out.
        c = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
        assert c.token_ids == toks
        c = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, min_tokens=first + 2),
                         use_tqdm=False)[0].outputs[0]
        assert len(c.token_ids) > first + 1 and c.token_ids[:first] == toks[:first]
    finally:
        engine.eos_token_ids = saved
    assert_no_leak(llm)


def test_max_tokens_none_runs_to_context(llm):
    out = llm.generate({"prompt_token_ids": [3] * 500}, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 12 and out.outputs[0].finish_reason == "length"


def test_seeded_sampling_independent_of_batch(llm):
    target = {"prompt_token_ids": [21, 22, 23, 24, 25]}
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(target, sp, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": [i, i + 1, i + 2] * (i % 5 + 1)} for i in range(30, 37)]
    noisy = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batch = others[:3] + [target] + others[3:]
    outs = llm.generate(batch, [noisy] * 3 + [sp] + [noisy] * 4, use_tqdm=False)
    assert outs[3].outputs[0].token_ids == alone
    outs = llm.generate([target] + others, [sp] + [noisy] * 7, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone
    # A different seed gives a different sequence; unseeded samples differ from greedy.
    other = llm.generate(target, SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert other != alone
    # top_k=1 is greedy whatever the temperature.
    greedy = llm.generate(target, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    k1 = llm.generate(target, SamplingParams(temperature=1.5, top_k=1, max_tokens=16, ignore_eos=True),
                      use_tqdm=False)[0].outputs[0].token_ids
    assert k1 == greedy
    assert_no_leak(llm)


@pytest.mark.parametrize("prompt, params, match", [
    ("", SamplingParams(), "empty"),
    ({"prompt_token_ids": []}, SamplingParams(), "empty"),
    ({"prompt_token_ids": [1, 99999]}, SamplingParams(), "out of vocabulary"),
    ({"prompt_token_ids": [1, -1]}, SamplingParams(), "out of vocabulary"),
    ({"prompt_token_ids": "abc"}, SamplingParams(), "prompt_token_ids"),
    ({"prompt_token_ids": [1] * 512}, SamplingParams(), "maximum model length"),
    ({"prompt_token_ids": [1] * 500}, SamplingParams(max_tokens=20), "maximum context length is 512"),
    ({"prompt_token_ids": [1, 2]}, SamplingParams(stop_token_ids=[5000]), "stop_token_ids"),
    (42, SamplingParams(), "prompt must be"),
])
def test_bad_requests_rejected_up_front(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(["fine prompt", prompt], params, use_tqdm=False)
    assert_no_leak(llm)  # the good prompt before it was not queued either


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n must"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(temperature=0, n=2), "greedy"),
])
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_request_larger_than_pool_rejected(llama_dir):
    llm = LLM(llama_dir, block_size=16, kv_cache_memory_bytes=4 * 2 * 2 * 16 * 2 * 16 * 4)  # 4 blocks = 64 tokens
    assert llm.llm_engine.kv.num_blocks == 4
    with pytest.raises(ValueError, match="whole cache holds 64"):
        llm.generate({"prompt_token_ids": [1] * 60}, SamplingParams(max_tokens=10), use_tqdm=False)
    out = llm.generate({"prompt_token_ids": [1] * 54}, SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 10


def test_engine_config_errors(llama_dir, tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword"):
        LLM(llama_dir, not_a_knob=1)
    with pytest.raises(ValueError, match="not a local directory"):
        LLM(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="dtype"):
        LLM(llama_dir, dtype="int3")
    with pytest.raises(ValueError, match="block_size"):
        LLM(llama_dir, block_size=12)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(llama_dir, max_model_len=10**6)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(llama_dir, enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=128)
    bad = tmp_path / "bad_arch"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["CodeGenForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="supported architectures: .*Gemma2ForCausalLM, .*LlamaForCausalLM, .*MistralForCausalLM, .*MixtralForCausalLM"):
        LLM(str(bad))
    nowt = tmp_path / "no_weights"
    shutil.copytree(llama_dir, nowt)
    for f in nowt.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(nowt))


def test_abort_frees_blocks(llm):
    engine = llm.llm_engine
    ids = [engine.add_request(None, {"prompt_token_ids": [7] * (10 + i)}, SamplingParams(max_tokens=50, ignore_eos=True))
           for i in range(5)]
    for _ in range(3):
        engine.step()
    assert engine.kv.pool.num_free_blocks < engine.kv.num_blocks
    engine.abort_request(ids[:2])
    engine.abort_request(ids[2:])
    assert not engine.has_unfinished_requests()
    engine.step()  # the runner drops the aborted requests' state
    assert not engine.runner.sampling_states.states
    assert_no_leak(llm)


def test_chat_renders_the_template(llm):
    tok = llm.get_tokenizer()
    conv = [{"role": "user", "content": "Hello there"}]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = llm.chat(conv, sp, use_tqdm=False)
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert out[0].prompt == text and out[0].prompt_token_ids == tok.encode(text, add_special_tokens=False)
    ref = llm.generate({"prompt_token_ids": out[0].prompt_token_ids}, sp, use_tqdm=False)
    assert out[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
    two = llm.chat([conv, conv + [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "?"}]], sp,
                   use_tqdm=False)
    assert len(two) == 2 and len(two[1].prompt_token_ids) > len(two[0].prompt_token_ids)
    with pytest.raises(ValueError, match="chat template"):
        llm.chat(conv, sp, chat_template="{{ raise_exception('no') }}", use_tqdm=False)


def test_chat_hands_tools_and_template_kwargs_to_the_template(llm):
    template = ("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{% if think %}<think>{% endif %}"
                "{% for m in messages %}{{ m.content }}{% endfor %}")
    conv = [{"role": "user", "content": "Hello"}]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    sp = SamplingParams(temperature=0, max_tokens=2)
    out = llm.chat(conv, sp, chat_template=template, tools=tools, chat_template_kwargs={"think": True},
                   use_tqdm=False)
    assert out[0].prompt == "[lookup]<think>Hello"
    assert llm.chat(conv, sp, chat_template=template, use_tqdm=False)[0].prompt == "Hello"
    cont = llm.chat(conv + [{"role": "assistant", "content": " world"}], sp, chat_template=template,
                    add_generation_prompt=False, continue_final_message=True, use_tqdm=False)
    assert cont[0].prompt == "Hello world"
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(conv, sp, continue_final_message=True, use_tqdm=False)
