"""LoRA adapters: each request's tokens equal transformers' on the base model with that
adapter merged in, with several adapters and the base model in one batch."""

from __future__ import annotations

import json
import os

import pytest

from conftest import HFReference, assert_greedy_matches
from pagedserve import LLM, SamplingParams
from pagedserve.errors import ParamError
from pagedserve.lora.random_adapter import make_adapter
from pagedserve.lora.request import LoRARequest

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def adapters(model_dirs, tmp_path_factory):
    """Three adapters on the llama model: all projections; attention only on layer 1 with
    rsLoRA scaling; a Qwen2-MoE adapter is built by its own test."""
    base = model_dirs["llama"]
    out = {}
    for name, kw in {"all": dict(seed=1), "attn": dict(seed=2, rank=4, targets=("q_proj", "v_proj", "o_proj"),
                                                         layers=[1], rslora=True)}.items():
        d = str(tmp_path_factory.mktemp(f"lora_{name}"))
        out[name] = make_adapter(base, d, **kw)
    return out


def _prompts():
    return [[(13 * i + 7 * j) % 1000 + 4 for j in range(n)] for i, n in enumerate((5, 40, 17, 90))]


def test_mixed_batch_matches_merged_models(model_dirs, hf_refs, adapters):
    llm = LLM(model_dirs["llama"], enable_lora=True, max_loras=2, max_num_batched_tokens=48, block_size=8)
    prompts = _prompts()
    reqs = [LoRARequest("all", 1, adapters["all"][0]), None, LoRARequest("attn", 2, adapters["attn"][0]),
            LoRARequest("all", 1, adapters["all"][0])]
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False, lora_request=reqs)
    refs = {"all": HFReference(adapters["all"][1]), "attn": HFReference(adapters["attn"][1])}
    for p, o, r in zip(prompts, outs, reqs):
        ref = hf_refs["llama"] if r is None else refs[r.lora_name]
        assert_greedy_matches(ref.greedy(p, MAX_TOKENS), o.outputs[0].token_ids)
        assert o.lora_request == r
    # The adapters change the output (else the check above proves nothing).
    base = [hf_refs["llama"].greedy(p, MAX_TOKENS).tokens for p in prompts]
    assert outs[0].outputs[0].token_ids != base[0] and outs[2].outputs[0].token_ids != base[2]
    kv = llm.llm_engine.kv
    assert kv.pool.num_free_blocks == kv.num_blocks
    assert not llm.llm_engine.runner.lora.refs  # every request let go of its adapter


def test_prefix_cache_is_per_adapter(model_dirs, adapters):
    llm = LLM(model_dirs["llama"], enable_lora=True, block_size=8)
    prompt = {"prompt_token_ids": list(range(4, 44))}
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    lora = LoRARequest("all", 1, adapters["all"][0])
    first = llm.generate(prompt, sp, use_tqdm=False, lora_request=lora)[0]
    same = llm.generate(prompt, sp, use_tqdm=False, lora_request=lora)[0]
    base = llm.generate(prompt, sp, use_tqdm=False)[0]
    other = llm.generate(prompt, sp, use_tqdm=False, lora_request=LoRARequest("attn", 2, adapters["attn"][0]))[0]
    assert first.num_cached_tokens == 0 and same.num_cached_tokens == 32  # all but the last block: its last token is computed
    assert base.num_cached_tokens == 0 and other.num_cached_tokens == 0  # KV computed under another adapter
    assert same.outputs[0].token_ids == first.outputs[0].token_ids


def test_max_loras_bounds_the_batch(model_dirs, adapters):
    """Three adapters, two at a time: all finish, each equal to its run alone."""
    llm = LLM(model_dirs["llama"], enable_lora=True, max_loras=2, max_cpu_loras=2)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    d3 = make_adapter(model_dirs["llama"], os.path.dirname(adapters["all"][0]) + "_3", seed=3)[0]
    loras = [LoRARequest("all", 1, adapters["all"][0]), LoRARequest("attn", 2, adapters["attn"][0]),
             LoRARequest("three", 3, d3)] * 2
    prompts = [{"prompt_token_ids": p} for p in (_prompts() * 2)[:6]]
    sched = llm.llm_engine.scheduler
    seen = []
    orig = sched.schedule

    def spy():
        out = orig()
        seen.append({s.request.lora_request.lora_int_id for s in out.scheduled})
        return out

    sched.schedule = spy
    together = llm.generate(prompts, sp, use_tqdm=False, lora_request=loras)
    assert max(len(s) for s in seen) == 2
    for p, lora, o in zip(prompts, loras, together):
        alone = llm.generate(p, sp, use_tqdm=False, lora_request=lora)[0]
        assert alone.outputs[0].token_ids == o.outputs[0].token_ids
    assert len(llm.llm_engine.runner.lora.adapters) <= 2  # unused ones beyond max_cpu_loras dropped


def test_moe_model_adapter(model_dirs, tmp_path):
    """Qwen2-MoE: adapters on attention and on the shared expert (a dense MLP) match the merged
    model; one on the routed experts is refused."""
    base = model_dirs["qwen2_moe"]
    targets = ("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapter, merged = make_adapter(base, str(tmp_path / "a"), seed=5, rank=4, targets=targets, std=0.2,
                                   exclude=".experts.")
    llm = LLM(base, enable_lora=True)
    prompts = _prompts()[:2]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False,
                        lora_request=LoRARequest("moe", 1, adapter))
    ref = HFReference(merged)
    for p, o in zip(prompts, outs):
        assert_greedy_matches(ref.greedy(p, MAX_TOKENS), o.outputs[0].token_ids)
    experts = make_adapter(base, str(tmp_path / "b"), seed=6, rank=4, targets=targets)[0]
    with pytest.raises(ParamError, match="cannot take a LoRA adapter"):
        llm.generate("hi", lora_request=LoRARequest("experts", 2, experts), use_tqdm=False)


def test_bad_adapters_are_clear_errors(model_dirs, adapters, tmp_path):
    base = model_dirs["llama"]
    with pytest.raises(ParamError, match="enable_lora"):
        LLM(base).generate("hi", lora_request=LoRARequest("all", 1, adapters["all"][0]), use_tqdm=False)
    llm = LLM(base, enable_lora=True, max_lora_rank=4)
    sp = SamplingParams(max_tokens=2)

    def gen(lora):
        return llm.generate("hi", sp, use_tqdm=False, lora_request=lora)

    with pytest.raises(ParamError, match="rank 8 is above max_lora_rank"):
        gen(LoRARequest("all", 1, adapters["all"][0]))
    with pytest.raises(ParamError, match="no adapter_config.json"):
        gen(LoRARequest("nothing", 3, str(tmp_path)))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(adapters["attn"][0]):
        (bad / f).write_bytes(open(os.path.join(adapters["attn"][0], f), "rb").read())
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ParamError, match="DoRA"):
        gen(LoRARequest("dora", 4, str(bad)))
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2}))
    with pytest.raises(ParamError, match="factors have shapes"):
        gen(LoRARequest("shape", 5, str(bad)))
    ok = LoRARequest("attn", 2, adapters["attn"][0])
    gen(ok)
    with pytest.raises(ParamError, match="already the adapter"):
        gen(LoRARequest("attn-again", 2, adapters["all"][0]))
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, "/tmp")
    assert llm.llm_engine.get_num_unfinished_requests() == 0
    kv = llm.llm_engine.kv
    assert kv.pool.num_free_blocks == kv.num_blocks


def test_lora_on_the_triton_backend(model_dirs, adapters):
    """The Triton path (interpreted here) keeps the hooks: no fused GEMV goes around them."""
    lora = LoRARequest("all", 1, adapters["all"][0])
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts()[:2]]
    llm = LLM(model_dirs["llama"], enable_lora=True, attention_backend="triton", block_size=8, max_num_seqs=4,
              dtype="float32")
    got = llm.generate(prompts, sp, use_tqdm=False, lora_request=lora)
    ref = HFReference(adapters["all"][1])
    for p, o in zip(prompts, got):
        assert_greedy_matches(ref.greedy(p["prompt_token_ids"], 6), o.outputs[0].token_ids)


def test_lora_on_the_graph_paths(model_dirs, adapters):
    """Adapters inside CUDA graphs: the decode graphs' and the speculative verification graphs'
    static-buffer paths (capture=False: the same buffers and slots, the Triton kernels
    interpreted). A batch of two adapters and the base model, then other adapters loaded
    into the slots the graphs read in place (max_loras=2: a third adapter evicts one); every
    request's tokens equal transformers' with its adapter merged."""
    pytest.importorskip("triton")
    base = model_dirs["llama"]
    d3, merged3 = make_adapter(base, os.path.dirname(adapters["all"][0]) + "_g3", seed=7)
    llm = LLM(base, enable_lora=True, max_loras=2, attention_backend="triton", block_size=8, max_num_seqs=4,
              dtype="float32", speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    runner = llm.llm_engine.runner
    calls = {}
    for name, graphs in (("decode", runner.make_graph_runner(capture=False)),
                         ("verify", runner.make_graph_runner(capture=False, query_len=3))):
        run = graphs.run
        graphs.run = (lambda name, run: lambda *a: calls.setdefault(name, []).append(len(a[3])) or run(*a))(name, run)
        setattr(runner, "graphs" if name == "decode" else "verify_graphs", graphs)
    refs = {"all": HFReference(adapters["all"][1]), "attn": HFReference(adapters["attn"][1]),
            "three": HFReference(merged3), None: HFReference(base)}
    loras = {"all": LoRARequest("all", 1, adapters["all"][0]), "attn": LoRARequest("attn", 2, adapters["attn"][0]),
             "three": LoRARequest("three", 3, d3), None: None}
    # Repetitive prompts, so that n-gram drafts come up.
    prompts = [[4 + (i + j) % 5 for j in range(12 + 3 * i)] for i in range(3)]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for names in (("all", None, "attn"), ("three", "attn", None)):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False,
                            lora_request=[loras[n] for n in names])
        for p, n, o in zip(prompts, names, outs):
            assert_greedy_matches(refs[n].greedy(p, 8), o.outputs[0].token_ids)
    assert max(calls["decode"]) == 3 and max(calls["verify"]) == 3, calls
    assert runner.lora_slots.held[0].name == "three" or runner.lora_slots.held[1].name == "three"


def test_hybrid_model_adapter(model_dirs, tmp_path):
    """Qwen3.5 (Gated DeltaNet layers and gated attention): an adapter on the attention (its
    query projection twice as wide: query and gate), the MLP and the linear-attention layers'
    projections matches the merged model."""
    base = model_dirs["qwen3_5"]
    targets = ("q_proj", "v_proj", "o_proj", "up_proj", "in_proj_qkv", "in_proj_z", "out_proj")
    adapter, merged = make_adapter(base, str(tmp_path / "a"), seed=7, rank=4, targets=targets, std=0.2)
    llm = LLM(base, enable_lora=True)
    prompts = _prompts()[:2]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False,
                        lora_request=LoRARequest("hybrid", 1, adapter))
    ref, base_ref = HFReference(merged), HFReference(base)
    for p, o in zip(prompts, outs):
        assert_greedy_matches(ref.greedy(p, MAX_TOKENS), o.outputs[0].token_ids)
    assert any(ref.greedy(p, MAX_TOKENS).tokens != base_ref.greedy(p, MAX_TOKENS).tokens for p in prompts)
