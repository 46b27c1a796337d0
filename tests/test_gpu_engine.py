"""The engine on CUDA with the Triton backend (and decode CUDA graphs, on by default):
float32 against transformers, bf16 against the PyTorch backend, dtype resolution and KV
sizing. All `-m gpu`: skipped where there is no CUDA device."""

from __future__ import annotations

import gc

import pytest
import torch

from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu

KV_BYTES = 256 << 20  # a fixed pool: several engines share the GPU inside one test process


def _free(llm) -> None:
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def _divergence(n: int, a, b) -> str:
    """Where two completions part, and whether the model's raw logprobs (where asked for)
    agreed up to there: a large gap means different logits, a tiny one a different draw."""
    i = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
             min(len(a.token_ids), len(b.token_ids)))
    msg = f"output {n}: part at token {i} (sync {a.token_ids[i:i + 3]}, async {b.token_ids[i:i + 3]})"
    if a.logprobs and b.logprobs and i < min(len(a.logprobs), len(b.logprobs)):
        gaps = [abs(a.logprobs[j][t].logprob - b.logprobs[j][t].logprob) for j, t in enumerate(a.token_ids[:i])]
        top = [{t: round(lp.logprob, 6) for t, lp in d.items()} for d in (a.logprobs[i], b.logprobs[i])]
        msg += f"; max |d logprob| before it {max(gaps, default=0.0):.3g}; at it sync {top[0]}, async {top[1]}"
    return msg


def _prompts(n: int, seed: int) -> list[list[int]]:
    return [[(seed * 7 + 11 * i + 5 * j) % 1000 + 4 for j in range(3 + 29 * i % 97)] for i in range(n)]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "llama3_rope", "mixtral", "qwen2_moe", "qwen3_moe",
                                  "mistral_swa", "qwen2_swa", "gemma", "gemma2", "gemma3", "phi3", "granite", "olmo2",
                                  "smollm3", "olmoe", "cohere", "glm4", "glm", "olmo3", "seed_oss", "ernie4_5", "ernie4_5_moe",
                                  "ministral3", "exaone4", "cohere2", "hunyuan", "arcee", "apertus", "qwen3_next",
                                  "qwen3_5", "qwen3_5_moe", "granite_hybrid", "granite_hybrid_dense",
                                  "nemotron_h", "lfm2", "mamba2", "mamba", "falcon_mamba", "jamba", "minimax", "bamba",
                                  "falcon_h1", "nemotron_3", "llama4", "gemma4", "minimax_m2", "mimo_v2_flash",
                                  "hunyuan_moe", "dots1", "phimoe", "olmo", "exaone_moe", "solar_open", "ministral",
                                  "cwm", "bloom", "bloom_post_norm", "mpt", "falcon_rw", "jais2", "gpt_neox", "phi",
                                  "starcoder2", "gpt2", "gpt_bigcode", "falcon_mq", "falcon_gqa", "opt",
                                  "opt_postnorm", "gptj", "stablelm", "stablelm_par", "nemotron", "zamba2",
                                  "zamba2_untied", "zamba", "dbrx", "lfm2_moe", "flex_olmo", "helium", "persimmon"])
def test_triton_float32_matches_transformers(model_dirs, hf_refs, name):
    from conftest import assert_greedy_matches

    llm = LLM(model_dirs[name], device="cuda", dtype="float32", max_num_batched_tokens=64, block_size=16,
              max_num_seqs=16, kv_cache_memory_bytes=KV_BYTES)
    runner = llm.llm_engine.runner
    # Decode graphs for every model: experts too, on the fused MoE kernel (no host sync); but
    # Nemotron 3's gateless experts, which have no kernel (their PyTorch path syncs).
    assert runner.backend.name == "triton" and (runner.graphs is not None) == (name != "nemotron_3")
    prompts = _prompts(6, 1)
    prompts.append(prompts[5][:48] + [5, 6])  # a prefix-cache hit (3 full blocks)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert_greedy_matches(hf_refs[name].greedy(p, 12), o.outputs[0].token_ids)
    _free(llm)


def test_triton_bf16_matches_torch_backend(llama_dir):
    """bf16 greedy tokens of the two backends agree; where they part, the PyTorch backend's
    own logprobs must show a near-tie between the two choices."""
    prompts = _prompts(12, 2)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    runs = {}
    for backend in ("torch", "triton"):
        llm = LLM(llama_dir, device="cuda", dtype="bfloat16", attention_backend=backend, block_size=16,
                  max_num_seqs=16, max_num_batched_tokens=128, kv_cache_memory_bytes=KV_BYTES)
        runs[backend] = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        _free(llm)
    for ref, got in zip(runs["torch"], runs["triton"]):
        ref_ids, got_ids = ref.outputs[0].token_ids, got.outputs[0].token_ids
        for i, (a, b) in enumerate(zip(got_ids, ref_ids)):
            if a != b:
                lps = ref.outputs[0].logprobs[i]
                assert a in lps, f"token {i}: triton chose {a}, outside the torch backend's top 5"
                gap = lps[b].logprob - lps[a].logprob
                assert gap < 0.25, f"token {i}: triton chose {a}, torch {b} with a logprob lead of {gap:.3g}"
                break


def test_dtype_auto_and_kv_sizing(llama_dir):
    # The test models are saved in float32: "auto" on CUDA gives bf16, weights and KV alike;
    # the pool is sized from gpu_memory_utilization after the profiling pass.
    llm = LLM(llama_dir, device="cuda", gpu_memory_utilization=0.3, max_num_seqs=8)
    cfg, runner = llm.llm_engine.config, llm.llm_engine.runner
    assert cfg.dtype == torch.bfloat16 and runner.kv_caches[0][0].dtype == torch.bfloat16
    assert next(runner.model.parameters()).dtype == torch.bfloat16
    total = torch.cuda.get_device_properties(0).total_memory
    kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in runner.kv_caches)
    assert cfg.num_gpu_blocks > 0 and kv_bytes < 0.3 * total
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    _free(llm)


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_async_scheduling_matches_sync_on_cuda(llama_dir, eager):
    """On CUDA async scheduling is the default: decode inputs come from the previous step's
    samples on the device, through graph replays. Tokens match the synchronous loop exactly
    (float32), with stop tokens, seeded sampling and logprobs in a pipelined batch, then
    penalties and logit rules (those wait for the history), and launching a step performs no
    synchronizing CUDA operation."""
    prompts = [{"prompt_token_ids": p} for p in _prompts(10, 3)]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    def engine(async_scheduling: bool):
        return LLM(llama_dir, device="cuda", dtype="float32", async_scheduling=async_scheduling, max_num_seqs=16,
                   enforce_eager=eager, kv_cache_memory_bytes=KV_BYTES)

    ref_llm = engine(False)
    free = ref_llm.generate(prompts, greedy, use_tqdm=False)
    pipelined = []
    for i, o in enumerate(free):
        if i % 3 == 0:
            pipelined.append(SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[o.outputs[0].token_ids[5]],
                                            ignore_eos=True))
        elif i % 3 == 1:  # logprobs too: they show whether a difference is the model's or the draw's
            pipelined.append(SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=i, max_tokens=20,
                                            logprobs=5, ignore_eos=True))
        else:
            pipelined.append(SamplingParams(temperature=0, max_tokens=20, prompt_logprobs=1, logprobs=2,
                                            ignore_eos=True))
    history = [SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, presence_penalty=0.5,
                              ignore_eos=True),
               SamplingParams(temperature=0, max_tokens=20, allowed_token_ids=list(range(4, 900)),
                              logit_bias={7: 3.0}, min_tokens=4, stop_token_ids=[9], ignore_eos=True)]
    refs = (free + ref_llm.generate(prompts, pipelined, use_tqdm=False)
            + ref_llm.generate(prompts[:2], history, use_tqdm=False))
    _free(ref_llm)
    llm = engine(True)  # the same calls in the same order: the same prefix-cache hits
    assert llm.llm_engine.async_scheduling and (llm.llm_engine.runner.graphs is None) == eager
    runner = llm.llm_engine.runner
    real, patched = runner._pending_token_patch, []
    runner._pending_token_patch = lambda rows: patched.append(len(rows)) or real(rows)
    real_launch = runner.launch

    def launch(out):  # preparing a step must never wait for the GPU (a sync raises here)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_launch(out)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    runner.launch = launch
    got = (llm.generate(prompts, greedy, use_tqdm=False) + llm.generate(prompts, pipelined, use_tqdm=False)
           + llm.generate(prompts[:2], history, use_tqdm=False))
    assert sum(patched) > 0
    for n, (a, b) in enumerate(zip(refs, got)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, _divergence(n, a.outputs[0], b.outputs[0])
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
    kv = llm.llm_engine.kv
    assert kv.pool.num_free_blocks == kv.num_blocks
    _free(llm)


def _count_replays(graphs) -> list:
    """Each run of a graph runner from now on: its number of requests."""
    calls: list = []
    run = graphs.run
    graphs.run = lambda *a: calls.append(len(a[3])) or run(*a)
    return calls


@pytest.mark.parametrize("name", ["llama", "qwen3_5", "granite_hybrid"])
def test_speculative_decoding_on_cuda(name, model_dirs):
    """N-gram drafts on CUDA (Triton attention, float32): steps with drafts replay the
    verification graphs (4 rows a request, padded where a request has fewer drafts), plain
    decode steps the decode graphs; greedy tokens equal the plain engine's, and sampled
    requests with top_k=1 (the rejection-sampling path) too. An oracle proposer makes drafts
    stand. Qwen3.5 (Gated DeltaNet) and Granite 4.0-H (Mamba-2) run their verifications a
    token at a time through the state kernels inside the graphs, and step back after."""
    from test_speculative import OracleProposer

    path = model_dirs[name]
    prompts = [{"prompt_token_ids": p} for p in _prompts(6, 5)]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=1, seed=1, max_tokens=24, ignore_eos=True)] * 3
    plain = LLM(path, device="cuda", dtype="float32", async_scheduling=False, kv_cache_memory_bytes=KV_BYTES)
    want = plain.generate(prompts, params, use_tqdm=False)
    _free(plain)
    spec = LLM(path, device="cuda", dtype="float32", kv_cache_memory_bytes=KV_BYTES,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    oracle = OracleProposer(3)
    oracle.reference = {tuple(o.prompt_token_ids): o.outputs[0].token_ids for o in want}
    spec.llm_engine.scheduler.proposer = oracle
    runner = spec.llm_engine.runner
    assert runner.verify_graphs is not None and runner.verify_graphs.use_graphs and runner.verify_graphs.graphs
    verified = _count_replays(runner.verify_graphs)
    got = spec.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert spec.llm_engine.scheduler.num_accepted_tokens > 20 and runner.graphs is not None
    assert verified and max(verified) == 6
    _free(spec)


def test_draft_model_on_cuda(llama_dir):
    """A draft model on CUDA (Triton attention for both models, float32; the target's
    verification steps, the draft's one-token passes and its two-token catch-ups replay CUDA
    graphs): the target as its own draft has nearly every draft accepted, and the tokens equal
    the plain engine's."""
    prompts = [{"prompt_token_ids": p} for p in _prompts(6, 5)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = LLM(llama_dir, device="cuda", dtype="float32", async_scheduling=False, kv_cache_memory_bytes=KV_BYTES)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    _free(plain)
    spec = LLM(llama_dir, device="cuda", dtype="float32", kv_cache_memory_bytes=KV_BYTES,
               speculative_config={"model": llama_dir, "num_speculative_tokens": 3})
    runner = spec.llm_engine.runner
    replays = {name: _count_replays(g) for name, g in (("verify", runner.verify_graphs), ("draft", runner.draft.graphs),
                                                       ("pair", runner.draft.pair_graphs))}
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    sched = spec.llm_engine.scheduler
    assert got == want
    assert sched.num_draft_tokens > 30 and sched.num_accepted_tokens > 0.9 * sched.num_draft_tokens
    assert all(replays.values()), {k: len(v) for k, v in replays.items()}
    _free(spec)


def test_lora_in_cuda_graphs(llama_dir, tmp_path):
    """Adapters on CUDA with decode graphs captured (float32, Triton): two adapters and the base
    model in one batch, then a third adapter loaded into a slot the graphs read in place;
    tokens equal the enforce_eager engine's, and decode steps replayed graphs."""
    from pagedserve.lora.random_adapter import make_adapter
    from pagedserve.lora.request import LoRARequest

    loras = [LoRARequest(f"a{i}", i + 1, make_adapter(llama_dir, str(tmp_path / f"a{i}"), seed=i)[0])
             for i in range(3)]
    prompts = [{"prompt_token_ids": p} for p in _prompts(3, 9)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    batches = ([loras[0], None, loras[1]], [loras[2], loras[1], None])
    results = {}
    for eager in (True, False):
        llm = LLM(llama_dir, device="cuda", dtype="float32", enforce_eager=eager, enable_lora=True, max_loras=2,
                  kv_cache_memory_bytes=KV_BYTES)
        runner = llm.llm_engine.runner
        replays = [] if eager else _count_replays(runner.graphs)
        results[eager] = [[o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False,
                                                                        lora_request=b)] for b in batches]
        assert eager or replays
        factors = [f for a in runner.lora.adapters.values() for fs in a.modules.values() for f in fs]
        assert factors and all(f.a.device.type == "cpu" and f.a.is_pinned() for f in factors)  # host, pinned
        assert runner.lora_slots.stacks and all(s.a.is_cuda for s in runner.lora_slots.stacks.values())
        _free(llm)
    assert results[False] == results[True]
    assert results[True][0][1] != results[True][1][1]  # the same prompt: the base model, then an adapter


def test_eagle_head_graphs_on_cuda(llama_dir, tmp_path):
    """An EAGLE-3 head's passes captured in CUDA graphs (one-token passes and catch-ups of up
    to 1 + k tokens a request): its drafts are those of the same head run eagerly
    (speculative_config enforce_eager), and the tokens are plain decoding's."""
    from engine_helpers import spy_proposals

    from pagedserve.model.random_model import build_random_eagle_head

    head = build_random_eagle_head(str(tmp_path / "head"), llama_dir, version=3, aux_layer_ids=[0, 1], seed=3)
    prompts = [{"prompt_token_ids": p} for p in _prompts(6, 7)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = LLM(llama_dir, device="cuda", dtype="float32", kv_cache_memory_bytes=KV_BYTES)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    _free(plain)
    drafts, replays = [], {}
    for eager in (True, False):
        llm = LLM(llama_dir, device="cuda", dtype="float32", kv_cache_memory_bytes=KV_BYTES, async_scheduling=False,
                  speculative_config={"method": "eagle3", "model": head, "num_speculative_tokens": 3,
                                      "enforce_eager": eager})
        draft = llm.llm_engine.runner.draft
        assert (draft.graphs is None) == eager
        if not eager:
            replays = {"one": _count_replays(draft.graphs), "catch": _count_replays(draft.catch_graphs)}
        calls = spy_proposals(llm)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
        drafts.append(calls)
        _free(llm)
    same = sum(a == b for a, b in zip(*drafts))
    assert len(drafts[0]) == len(drafts[1]) and same >= 0.95 * len(drafts[0]), (same, len(drafts[0]))
    assert all(replays.values()), {k: len(v) for k, v in replays.items()}
