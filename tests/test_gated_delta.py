"""Gated DeltaNet linear attention (model/layers/gated_delta.py) and the engine around its
per-request state: the chunked form equals the token-by-token recurrence and transformers'
reference; the layer run in chunks and single tokens through state rows equals transformers'
layer over the whole sequence; a reused row starts fresh; and in the engine, rows are reused, prefix hits resume from saved
states (siblings of n > 1 too, with LRU eviction), async scheduling and preemption keep
outputs, and a draft model with such layers is refused (tests/test_speculative_states.py: speculative
decoding on them)."""

from __future__ import annotations

import random

import pytest
import torch
from engine_helpers import assert_scan_equals_recurrence, state_step_meta

from conftest import HFReference, assert_greedy_matches
from pagedserve import LLM, SamplingParams
from pagedserve.model.layers.gated_delta import GatedDeltaNet, gated_delta_chunked
from pagedserve.model.layers.state_mixer import conv_chunk
from pagedserve.ops.state_reference import conv_step, gated_delta_step, l2_normalize
from pagedserve.model.random_model import build_random_model

HYBRID = ["linear_attention", "full_attention", "linear_attention"]


def _inputs(length: int, heads: int = 3, dk: int = 8, dv: int = 5, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(length, heads, dk, generator=g, dtype=dtype)) * dk**-0.5
    k = l2_normalize(torch.randn(length, heads, dk, generator=g, dtype=dtype))
    v = torch.randn(length, heads, dv, generator=g, dtype=dtype)
    decay = -torch.rand(length, heads, generator=g, dtype=dtype) * 2  # exp(g) in (e^-2, 1]
    beta = torch.rand(length, heads, generator=g, dtype=dtype)
    state = torch.randn(heads, dk, dv, generator=g, dtype=dtype)
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("length,at", [(1, 0), (15, 0), (16, 0), (17, 0), (50, 0), (50, 5), (40, 16), (3, 31)])
def test_chunked_form_equals_the_recurrence(length, at):
    """From any start position `at` (blocks then end at multiples of 16 counted from 0), with
    the states before the block ends inside the sequence kept."""
    q, k, v, g, beta, state = _inputs(length, seed=length)
    keep = [p for p in range(16, at + length, 16) if p > at]
    out, final, kept = gated_delta_chunked(q, k, v, g, beta, state, at=at, keep=keep, chunk=16)
    assert_scan_equals_recurrence(gated_delta_step, (q, k, v, g, beta), state, at, keep, out, final, kept)


def test_sequences_together_equal_each_alone():
    """A step's prefill chunks run as one batch (blocks of the shorter ones padded): each
    sequence's outputs, final state and kept states equal its own run."""
    from pagedserve.model.layers.gated_delta import gated_delta_chunks

    cases = [(50, 5, [16, 32, 48]), (3, 31, []), (40, 16, [32]), (17, 0, [16])]
    seqs, states, alone = [], [], []
    for length, at, keep in cases:
        q, k, v, g, beta, state = _inputs(length, seed=length + at)
        seqs.append((q, k, v, g, beta))
        states.append(state)
        alone.append(gated_delta_chunked(q, k, v, g, beta, state, at=at, keep=keep, chunk=16))
    outs, finals, kept = gated_delta_chunks(seqs, torch.stack(states), [c[1] for c in cases], [c[2] for c in cases],
                                            chunk=16)
    for i, (out, final, ks) in enumerate(alone):
        torch.testing.assert_close(outs[i], out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(finals[i], final, rtol=1e-10, atol=1e-10)
        assert len(kept[i]) == len(ks)
        for a, b in zip(kept[i], ks):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_prefill_groups_bound_the_padding():
    from pagedserve.model.layers.state_mixer import padding_groups

    lengths = [5, 500, 6, 7, 480, 3000, 64, 64]
    groups = padding_groups(lengths, first=2)
    assert sorted(r for g in groups for r in g) == list(range(2, 10))
    for g in groups:
        sizes = [lengths[r - 2] for r in g]
        assert len(g) * max(sizes) <= 2 * sum(sizes)
    assert [2, 4, 5] in groups and [7] in groups  # the 3000-token prompt runs alone


def test_recurrence_equals_transformers_reference():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    q, k, v, g, beta, state = _inputs(40, seed=7)
    out, final, _ = gated_delta_chunked(q, k, v, g, beta, state)
    # transformers scales the query itself (q / sqrt(dk)) and takes [batch, length, heads, dim]
    want, want_final = torch_recurrent_gated_delta_rule(
        (q * 8**0.5).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), g.unsqueeze(0), beta.unsqueeze(0),
        initial_state=state.unsqueeze(0), output_final_state=True)
    # (transformers computes in float32)
    torch.testing.assert_close(out, want[0].to(out.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(final, want_final[0].to(out.dtype), rtol=1e-5, atol=1e-6)


def test_conv_chunks_equal_steps():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(9, 6, generator=g), torch.randn(6, 4, generator=g)
    state = torch.randn(6, 3, generator=g)
    out, new, kept = conv_chunk(x, state, w, at=10, keep=[12, 17])
    s, steps, want_kept = state.unsqueeze(0), [], []
    for t in range(9):
        if 10 + t in (12, 17):
            want_kept.append(s[0])
        o, s = conv_step(x[t : t + 1], s, w)
        steps.append(o[0])
    torch.testing.assert_close(out, torch.stack(steps))
    torch.testing.assert_close(new, s[0])
    torch.testing.assert_close(torch.stack(kept), torch.stack(want_kept))
    # the state is the last K-1 inputs, the earlier state's tail where the chunk is shorter
    torch.testing.assert_close(conv_chunk(x[:2], state, w)[1], torch.cat([state[:, 2:], x[:2].t()], dim=1))


def _layer_pair(seed: int = 0):
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    cfg = Qwen3_5TextConfig(hidden_size=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                            linear_value_head_dim=16, num_hidden_layers=1, layer_types=["linear_attention"])
    torch.manual_seed(seed)
    hf = Qwen3_5GatedDeltaNet(cfg, 0).eval()
    ours = GatedDeltaNet(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.5)
        ours.in_proj.weight.copy_(torch.cat([hf.in_proj_qkv.weight, hf.in_proj_z.weight, hf.in_proj_b.weight,
                                             hf.in_proj_a.weight]))
        for name in ("conv1d.weight", "dt_bias", "A_log", "norm.weight", "out_proj.weight"):
            ours.get_parameter(name).copy_(hf.get_parameter(name))
    return hf, ours


@torch.no_grad()
def test_layer_in_pieces_equals_transformers_whole():
    """Two requests through state rows 2 and 0, in prefill chunks and single-token (decode)
    steps, interleaved: their outputs are transformers' layer over each whole sequence. Row 2
    starts full of garbage (a finished request's), which a fresh request must not read."""
    hf, ours = _layer_pair()
    ours.allocate_state(3, torch.device("cpu"), torch.float32, torch.float32)
    ours.conv_state.normal_()
    ours.ssm_state.normal_()
    a, b = torch.randn(80, 64), torch.randn(70, 64)
    want_a, want_b = hf(a.unsqueeze(0))[0], hf(b.unsqueeze(0))[0]
    got_a, got_b = [], []
    # step 1: a's first chunk alone (fresh); step 2: a one-token prompt start for b (fresh) as
    # a decode row beside a's second chunk; then b's chunk beside a's decode; then both decode.
    out = ours(None, a[:37], state_step_meta([37], 0, [2], [False]))
    got_a.append(out)
    out = ours(None, torch.cat([b[:1], a[37:60]]), state_step_meta([1, 23], 1, [0, 2], [False, True]))
    got_b.append(out[:1]); got_a.append(out[1:])
    out = ours(None, torch.cat([a[60:61], b[1:69]]), state_step_meta([1, 68], 1, [2, 0], [True, True]))
    got_a.append(out[:1]); got_b.append(out[1:])
    out = ours(None, torch.cat([b[69:70], a[61:62]]), state_step_meta([1, 1], 2, [0, 2], [True, True]))
    got_b.append(out[:1]); got_a.append(out[1:])
    torch.testing.assert_close(torch.cat(got_a), want_a[:62], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(got_b), want_b, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, tokenizer_dir) -> tuple[str, HFReference]:
    path = str(tmp_path_factory.mktemp("qwen3_next"))
    build_random_model(path, "Qwen3NextForCausalLM", num_layers=3, layer_types=HYBRID, initializer_range=0.5,
                       tokenizer_dir=tokenizer_dir)
    return path, HFReference(path)


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 1024) for _ in range(n)] for n in lengths]


def _greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _assert_rows_free(llm: LLM) -> None:
    assert not llm.llm_engine.runner.block_table.row_of
    assert llm.llm_engine.kv.pool.num_free_blocks == llm.llm_engine.kv.num_blocks


def _assert_logprobs_match(ref: HFReference, prompt: list[int], out) -> None:
    """Tokens and their logprobs equal transformers' (the logprobs, not only the tokens: a
    wrong resumed state moves them by ~1e-2 here, fading over the tokens after it)."""
    want = ref.greedy(prompt, len(out.outputs[0].token_ids))
    assert out.outputs[0].token_ids == want.tokens
    for i, (tok, lps) in enumerate(zip(want.tokens, out.outputs[0].logprobs)):
        assert abs(lps[tok].logprob - float(want.logits[i].log_softmax(-1)[tok])) < 2e-4


def test_rows_reused_by_later_requests_start_fresh(hybrid):
    """Every row once held a finished request's state; later requests (a one-token prompt,
    which runs as a decode row, among them) must start from zeros."""
    path, ref = hybrid
    llm = LLM(path, max_num_seqs=3, max_num_batched_tokens=48, block_size=8)
    for seed, lengths in ((0, (60, 90, 45, 30)), (1, (1, 70, 2, 33, 1))):
        prompts = _prompts(seed, lengths)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(), use_tqdm=False)
        for p, o in zip(prompts, outs):
            assert_greedy_matches(ref.greedy(p, 16), o.outputs[0].token_ids)
        _assert_rows_free(llm)


def test_prefix_hits_resume_from_saved_states(hybrid):
    """Prefix caching: a prompt's chunk stops at its last block boundary before its final
    token (40 of 41), whose state is saved; a later prompt sharing those 40 tokens resumes from
    that state (its row full of garbage before), n > 1 siblings do too; with two slots, a third
    prompt's state evicts the least recently used one, and a prefix whose state is gone is not
    a hit even though its KV blocks are still cached."""
    path, ref = hybrid
    llm = LLM(path, block_size=8, max_num_batched_tokens=24, state_cache_slots=2)
    runner, cache = llm.llm_engine.runner, llm.llm_engine.runner.state_cache
    copies = []
    copy = runner._copy_states
    runner._copy_states = lambda pairs, load: copies.append((load, len(pairs))) or copy(pairs, load)
    a, c = _prompts(4, (41, 30))
    out = llm.generate([{"prompt_token_ids": a}], _greedy(), use_tqdm=False)[0]
    assert_greedy_matches(ref.greedy(a, 16), out.outputs[0].token_ids)
    assert copies == [(False, 1)] and len(cache) == 1  # saved at 40 (a 24-token step then a 16-token one)

    for layer in runner.state_layers:  # every row's state is garbage now
        for t in (layer.conv_state, layer.ssm_state):
            t.normal_()
    b = a[:40] + _prompts(5, (10,))[0]
    out = llm.generate([{"prompt_token_ids": b}], _greedy(), use_tqdm=False)[0]
    assert out.num_cached_tokens == 40 and (True, 1) in copies
    assert_greedy_matches(ref.greedy(b, 16), out.outputs[0].token_ids)

    def run(prompt: list[int]):
        out = llm.generate([{"prompt_token_ids": prompt}], _greedy(), use_tqdm=False)[0]
        assert_greedy_matches(ref.greedy(prompt, 16), out.outputs[0].token_ids)
        return out.num_cached_tokens

    assert run(a[:40] + _prompts(6, (5,))[0]) == 40  # a's state is now the most recently used
    top1 = SamplingParams(temperature=1.0, top_k=1, n=3, max_tokens=16, ignore_eos=True)  # greedy, n > 1
    copies.clear()
    out = llm.generate([{"prompt_token_ids": c}], top1, use_tqdm=False)[0]
    assert len(out.outputs) == 3
    for sample in out.outputs:
        assert_greedy_matches(ref.greedy(c, 16), sample.token_ids)
    assert sum(n for load, n in copies if load) == 2  # the two siblings resumed from the first's state at 24
    # Two slots: saving c's state evicted b's (48, least recently used), not a's.
    assert len(cache) == 2
    assert run(a[:40] + _prompts(7, (5,))[0]) == 40
    # b's state at 48 is gone: the hit falls back to a's at 40, though all 6 KV blocks are cached.
    assert run(b[:48] + _prompts(8, (3,))[0]) == 40
    _assert_rows_free(llm)


def test_shared_prefix_hits_a_state_saved_inside_a_chunk(hybrid):
    """States are also saved every 256 tokens: a prompt computed in chunks of 100 keeps its
    state at 256 from inside the chunk [200, 300) (whose scan blocks are aligned to absolute
    positions); another prompt sharing the first 300 tokens resumes there, not at its own
    boundary (304, past the shared part)."""
    path, ref = hybrid
    llm = LLM(path, block_size=16, max_num_batched_tokens=100)
    shared = _prompts(9, (300,))[0]
    first, second = shared + _prompts(10, (20,))[0], shared + _prompts(11, (25,))[0]
    assert llm.generate([{"prompt_token_ids": first}], _greedy(8), use_tqdm=False)[0].num_cached_tokens == 0
    assert len(llm.llm_engine.runner.state_cache) == 2  # at 256 (inside a chunk) and 304 (the boundary)
    for layer in llm.llm_engine.runner.state_layers:
        for t in (layer.conv_state, layer.ssm_state):
            t.normal_()
    out = llm.generate([{"prompt_token_ids": second}], _greedy(8, logprobs=1), use_tqdm=False)[0]
    assert out.num_cached_tokens == 256
    _assert_logprobs_match(ref, second, out)
    _assert_rows_free(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_next_turn_resumes_inside_the_previous_reply(hybrid, async_scheduling):
    """States of generated tokens are saved too (every 256): a conversation's next turn, whose
    prompt is the last one, its reply and a new message, resumes at 256, inside the reply.
    Under async scheduling the state is saved when computed, and keyed once the token the step
    was fed lands (its prefix hash needs it)."""
    path, ref = hybrid
    llm = LLM(path, block_size=16, async_scheduling=async_scheduling)
    turn1 = _prompts(12, (40,))[0]
    reply = llm.generate([{"prompt_token_ids": turn1}], _greedy(230), use_tqdm=False)[0].outputs[0].token_ids
    turn2 = turn1 + list(reply) + _prompts(13, (10,))[0]
    out = llm.generate([{"prompt_token_ids": turn2}], _greedy(8, logprobs=1), use_tqdm=False)[0]
    assert out.num_cached_tokens == 256
    _assert_logprobs_match(ref, turn2, out)
    _assert_rows_free(llm)
    assert not llm.llm_engine.runner._pending_saves


def test_async_scheduling_and_preemption_keep_outputs(hybrid):
    path, ref = hybrid
    probe = LLM(path, block_size=8)
    per_block = probe.llm_engine.runner.kv_block_bytes()
    del probe
    prompts = _prompts(3, (30, 45, 60, 75, 90, 105, 120, 135))
    llm = LLM(path, block_size=8, async_scheduling=True, kv_cache_memory_bytes=(-(-(135 + 16) // 8) + 6) * per_block)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(), use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for p, o in zip(prompts, outs):
        assert_greedy_matches(ref.greedy(p, 16), o.outputs[0].token_ids)
    _assert_rows_free(llm)


def test_a_step_resuming_without_a_state_is_refused(hybrid):
    """A request scheduled past position 0 with neither a state row nor a saved state (a
    scheduler bug) must fail loudly, not run from zeros or from another request's row."""
    from pagedserve.engine.request import Request
    from pagedserve.engine.scheduler import ScheduledRequest

    llm = LLM(hybrid[0], block_size=8)
    runner = llm.llm_engine.runner
    req = Request("lost", [5, 6, 7, 8, 9, 10, 11, 12, 13], _greedy(4))
    with pytest.raises(RuntimeError, match="resumes at position 8 but has no state there"):
        runner._host_inputs([ScheduledRequest(req, 8, 1, [1, 2], samples=True)])
    assert not runner.block_table.row_of  # (no row was taken)


def test_state_dtype_and_refusals(hybrid):
    path, _ = hybrid
    llm = LLM(path, mamba_ssm_cache_dtype="bfloat16")
    layers = llm.llm_engine.runner.state_layers
    assert len(layers) == 2 and all(layer.ssm_state.dtype == torch.bfloat16 for layer in layers)
    assert all(layer.ssm_state.shape == (257, 4, 16, 16) for layer in layers)  # max_num_seqs rows + scratch
    assert llm.generate([{"prompt_token_ids": [5, 6, 7]}], _greedy(4), use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="mamba_ssm_cache_dtype"):
        LLM(path, mamba_ssm_cache_dtype="int8")
    with pytest.raises(ValueError, match="draft model .* has linear-attention / state-space layers"):
        LLM(path, speculative_config={"method": "draft_model", "model": path, "num_speculative_tokens": 2})
