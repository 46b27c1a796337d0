"""Custom logits processors (vLLM's interface, pagedserve/logits_processor.py): each row's
state follows its request through continuous batching, chunked prefill, preemption, n > 1 and
async scheduling; per-request processors; argmax-invariant ones after temperature; bad
processors and bad per-request arguments refused; the server's vllm_xargs."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import assert_no_leak
from logits_procs import EchoPrompt, ScriptProcessor, TopOneRecorder, scripted_token

from pagedserve import LLM, SamplingParams
from pagedserve.logits_processor import MoveDirectionality, load_logits_processors, process_dict_updates
from pagedserve.worker.custom_logits import batch_update

PER_BLOCK_8 = 2 * 2 * 8 * 2 * 16 * 4  # layers * (k, v) * block 8 * kv heads * head dim * fp32


def _req(rid: str) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, prompt_token_ids=[1], prompt_is_embeds=False, output_token_ids=[],
                           sampling_params=SamplingParams(extra_args={"rid": rid}))


def test_batch_updates_carry_every_row_to_its_request():
    """Random batches in a row: applying each update (removed, added, moved) to a row -> request
    map gives exactly the new rows, with nothing at or past batch_size."""
    rng = random.Random(0)
    pool = [_req(str(i)) for i in range(40)]
    rows: list[str] = []
    state: dict[int, str] = {}
    swaps = moves = 0
    for _ in range(300):
        keep = [r for r in rows if rng.random() < 0.8]
        fresh = [r for r in pool if r.request_id not in rows and rng.random() < 0.1]
        new = [pool[int(r)] for r in keep] + fresh
        if rng.random() < 0.3:
            rng.shuffle(new)
        new = new[:16]
        upd = batch_update(rows, new)
        if upd is None:
            assert [r.request_id for r in new] == rows
            continue
        assert upd.batch_size == len(new)
        assert not set(upd.removed) & {i for i, *_ in upd.added}
        process_dict_updates(state, upd, lambda p, _, __: p.extra_args["rid"])
        assert state == {i: r.request_id for i, r in enumerate(new)}
        swaps += sum(d == MoveDirectionality.SWAP for *_, d in upd.moved)
        moves += sum(d == MoveDirectionality.UNIDIRECTIONAL for *_, d in upd.moved)
        rows = [r.request_id for r in new]
    assert swaps and moves  # both kinds exercised


def _expected(script: int, n: int) -> list[int]:
    return [scripted_token(script, j) for j in range(n)]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_rows_follow_requests_through_continuous_batching(llama_dir, async_scheduling):
    """12 requests of different lengths through 4 rows, prompts in 16-token chunks: the scripted
    ones produce their script exactly, the others what they produce without processors."""
    kwargs = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16, async_scheduling=async_scheduling)
    llm = LLM(llama_dir, logits_processors=[ScriptProcessor], **kwargs)
    plain = LLM(llama_dir, **kwargs)
    prompts = [{"prompt_token_ids": [(11 * i + 5 * j) % 900 + 4 for j in range(3 + 9 * (i % 5))]} for i in range(12)]
    params = [SamplingParams(temperature=0, max_tokens=4 + (5 * i) % 11, ignore_eos=True,
                             extra_args={"script": i} if i % 2 else None) for i in range(12)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    ref = plain.generate(prompts, params, use_tqdm=False)
    for i, (o, r) in enumerate(zip(outs, ref)):
        got = list(o.outputs[0].token_ids)
        assert got == (_expected(i, params[i].max_tokens) if i % 2 else list(r.outputs[0].token_ids)), i
    assert_no_leak(llm)


def test_preemption_n_and_sampling_keep_each_script(llama_dir):
    """A 12-block cache preempts requests (they come back as added rows), n = 2 children each
    follow the script, and a sampled request's script still wins over its temperature."""
    llm = LLM(llama_dir, block_size=8, kv_cache_memory_bytes=12 * PER_BLOCK_8, logits_processors=[ScriptProcessor])
    prompts = [{"prompt_token_ids": [(5 * i + j) % 900 + 3 for j in range(20 + 6 * i)]} for i in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, extra_args={"script": 1}),
              SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True, extra_args={"script": 2}),
              SamplingParams(temperature=0.8, seed=5, max_tokens=25, n=2, ignore_eos=True, extra_args={"script": 3}),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, extra_args={"script": 4})]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for i, o in enumerate(outs):
        for c in o.outputs:
            assert list(c.token_ids) == _expected(i + 1, params[i].max_tokens)
    assert len(outs[2].outputs) == 2
    assert_no_leak(llm)


def test_request_level_processors(llama_dir):
    """AdapterLogitsProcessor: a 3-argument request processor gets the prompt (echo), a
    2-argument one the output so far (no token twice in a row); other requests untouched."""
    llm = LLM(llama_dir, max_model_len=128, logits_processors=["logits_procs:EchoPrompt"])
    plain = LLM(llama_dir, max_model_len=128)
    prompt = {"prompt_token_ids": [13, 300, 42, 9, 511]}  # (plain greedy output repeats a token)
    base = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    echo, ban = (SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, extra_args=a)
                 for a in ({"echo": True}, {"ban_last": True}))
    got = llm.generate([prompt] * 3, [echo, ban, base], use_tqdm=False)
    assert list(got[0].outputs[0].token_ids) == [13, 300, 42, 9, 511] * 2 + [13, 300]
    ref = list(plain.generate([prompt], base, use_tqdm=False)[0].outputs[0].token_ids)
    k = next(j for j in range(1, len(ref)) if ref[j] == ref[j - 1])  # the first repeat
    toks = list(got[1].outputs[0].token_ids)
    assert toks[:k] == ref[:k] and toks[k] != ref[k]
    assert all(a != b for a, b in zip(toks, toks[1:]))
    assert list(got[2].outputs[0].token_ids) == ref
    assert_no_leak(llm)


def test_argmax_invariant_processors_run_after_temperature(llama_dir):
    """An argmax-invariant processor sees the sampled rows' logits divided by their temperature
    (transformers' logits / T) and is skipped for all-greedy batches; keeping only the top
    token makes sampling greedy."""
    from transformers import AutoModelForCausalLM

    TopOneRecorder.seen.clear()
    llm = LLM(llama_dir, max_model_len=128, logits_processors=[TopOneRecorder])
    prompt = [1, 17, 230, 5, 88, 14]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    hot = SamplingParams(temperature=0.8, seed=1, max_tokens=8, ignore_eos=True, extra_args={"record": "hot"})
    cold = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, extra_args={"record": "cold"})
    ref = list(llm.generate([{"prompt_token_ids": prompt}], greedy, use_tqdm=False)[0].outputs[0].token_ids)
    outs = llm.generate([{"prompt_token_ids": prompt}] * 2, [hot, cold], use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == [ref, ref]
    assert "cold" in TopOneRecorder.seen  # (mixed with a sampled row, the greedy row goes through it)
    TopOneRecorder.seen.clear()
    llm.generate([{"prompt_token_ids": prompt}], cold, use_tqdm=False)
    assert "cold" not in TopOneRecorder.seen  # an all-greedy batch skips it
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0, -1] / 0.8
    TopOneRecorder.seen.clear()
    llm.generate([{"prompt_token_ids": prompt}], hot, use_tqdm=False)
    torch.testing.assert_close(TopOneRecorder.seen["hot"], want, atol=1e-4, rtol=1e-4)


def test_bad_processors_and_arguments_are_refused(llama_dir, base_dir):
    for bad, words in ((["no_such_module:Proc"], "logits_processors[0]: cannot load"),
                       (["logits_procs:Missing"], "logits_processors[0]: cannot load"),
                       (["logits_procs:NotAProcessor"], "lacks apply"),
                       (["logits_procs:scripted_token"], "is not a class"),
                       (["noseparator"], "module:Class"),
                       ("logits_procs:ScriptProcessor", "must be a list")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            LLM(llama_dir, max_model_len=64, logits_processors=bad)
    with pytest.raises(ValueError, match="speculative_config"):
        LLM(llama_dir, max_model_len=64, logits_processors=[ScriptProcessor],
            speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="pooling model"):
        LLM(base_dir, runner="pooling", logits_processors=[ScriptProcessor])
    assert load_logits_processors(None) == ()
    llm = LLM(llama_dir, max_model_len=64, logits_processors=[ScriptProcessor])
    with pytest.raises(ValueError, match=r"extra_args\['script'\] must be an integer"):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(extra_args={"script": "x"}), use_tqdm=False)
    with pytest.raises(ValueError, match="extra_args must be a dict"):
        SamplingParams(extra_args=["script"])
    assert_no_leak(llm)


def test_server_passes_vllm_xargs(llama_dir):
    """--logits-processors on the server: vllm_xargs reach the processor as extra_args; bad
    ones are a 400 naming the problem."""
    import openai
    from server_helpers import openai_client, serving

    with serving(llama_dir, engine_kwargs={"logits_processors": ["logits_procs:ScriptProcessor"]}) as srv:
        with openai_client(srv) as client:
            out = client.completions.create(model="tiny-llama", prompt="hello there", max_tokens=6, temperature=0,
                                            extra_body={"vllm_xargs": {"script": 5}, "return_token_ids": True,
                                                        "ignore_eos": True})
            assert list(out.choices[0].token_ids) == _expected(5, 6)
            chat = client.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0.7,
                extra_body={"vllm_xargs": {"script": 9}, "return_token_ids": True, "ignore_eos": True})
            assert list(chat.choices[0].token_ids) == _expected(9, 5)
            with pytest.raises(openai.BadRequestError, match="must be an integer"):
                client.completions.create(model="tiny-llama", prompt="hi", max_tokens=2,
                                          extra_body={"vllm_xargs": {"script": "five"}})
            with pytest.raises(openai.BadRequestError, match="vllm_xargs"):
                client.completions.create(model="tiny-llama", prompt="hi", max_tokens=2, n=2,
                                          extra_body={"vllm_xargs": {"script": 1}, "use_beam_search": True})


def test_cli_flag_loads_the_classes(llama_dir):
    from pagedserve.entrypoints.cli import build_parser, engine_args_from

    ns = build_parser().parse_args(["serve", llama_dir, "--logits-processors", "logits_procs:ScriptProcessor",
                                    "logits_procs.EchoPrompt"])
    config = engine_args_from(ns, llama_dir).create_engine_config()
    assert config.logits_processors == (ScriptProcessor, EchoPrompt)


def test_installed_plugins_load_first(monkeypatch):
    """Packages' entry points in the group pagedserve.logits_processors load before the named
    classes; one that fails to load stops start-up, naming itself."""
    import importlib.metadata

    def broken():
        raise ImportError("no module named plug")

    plugins = [SimpleNamespace(name="echo", value="logits_procs:EchoPrompt", load=lambda: EchoPrompt)]
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: plugins if group == "pagedserve.logits_processors" else [])
    assert load_logits_processors([ScriptProcessor]) == (EchoPrompt, ScriptProcessor)
    plugins.append(SimpleNamespace(name="bad", value="plug:P", load=broken))
    with pytest.raises(ValueError, match="plugin 'bad'.*no module named plug"):
        load_logits_processors(None)
