"""Decode CUDA graphs: bucket choice, padding and static-buffer filling on CPU; the replay
path end to end on CPU with capture=False (same buffers, eager forward, Triton kernels in
the interpreter); capture and replay proper under `-m gpu`."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from pagedserve.worker.cuda_graphs import DecodeBuffers, bucket_for, capture_sizes, pad_uniform


def test_capture_sizes():
    assert capture_sizes(256) == [1, 2, 4] + list(range(8, 257, 8))
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(2000)[-1] == 512


def test_bucket_for():
    sizes = capture_sizes(20)
    assert [bucket_for(sizes, n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 20)] == [1, 2, 4, 8, 8, 16, 16, 20, 20]
    assert bucket_for(sizes, 21) is None


def test_buffers_fill_pads_rows_and_keeps_block_tables():
    buf = DecodeBuffers(max_batch=8, max_blocks_per_seq=5, block_size=4, max_model_len=20, device=torch.device("cpu"))
    # The four per-row tensors are aligned views of one buffer (one copy up per step).
    base, end = buf._header.data_ptr(), buf._header.data_ptr() + buf._header.numel()
    for t in (buf.input_ids, buf.positions, buf.slot_mapping, buf.seq_lens):
        assert (t.data_ptr() - base) % 128 == 0 and base <= t.data_ptr() and t.data_ptr() + t.nbytes <= end
    rows = np.array([[3, 1, 0], [2, 7, 6]], dtype=np.int32)
    buf.fill(np.array([11, 12]), np.array([9, 4]), np.array([5, 29]), np.array([10, 5], dtype=np.int32), rows, 4)
    assert buf.input_ids[:4].tolist() == [11, 12, 0, 0]
    assert buf.positions[:4].tolist() == [9, 4, 0, 0]
    assert buf.slot_mapping[:4].tolist() == [5, 29, -1, -1]  # padding rows write no KV
    assert buf.seq_lens[:4].tolist() == [10, 5, 0, 0]  # ... and see no key
    assert buf.block_tables[:2, :3].tolist() == rows.tolist()
    meta = buf.metadata(4)
    assert (meta.num_tokens, meta.num_reqs, meta.num_decodes, meta.max_query_len) == (4, 4, 4, 1)
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert meta.block_tables.shape == (4, 5) and meta.block_tables.data_ptr() == buf.block_tables.data_ptr()
    assert meta.seq_lens_cpu == []  # host copies cannot follow a replay: a misuse fails loudly
    # A smaller batch into the same bucket re-pads the rows the previous step used.
    buf.fill(np.array([13]), np.array([1]), np.array([2]), np.array([2], dtype=np.int32), rows[:1, :1], 4)
    assert buf.slot_mapping[:4].tolist() == [2, -1, -1, -1] and buf.seq_lens[:4].tolist() == [2, 0, 0, 0]


def test_pad_uniform_keeps_each_tokens_causal_bound():
    """Requests of 1, 3 and 2 tokens laid out 3 rows each: tokens first, padding after them
    (token 0 at the last position, slot -1), seq_len grown by the padding."""
    qsl = [0, 1, 4, 6]
    ids, pos = np.array([10, 20, 21, 22, 30, 31]), np.array([7, 4, 5, 6, 0, 1])
    slots, seq_lens = np.array([100, 200, 201, 202, 300, 301]), [8, 7, 2]
    ids_p, pos_p, slots_p, seq_p, dst = pad_uniform(3, qsl, ids, pos, slots, seq_lens)
    assert dst.tolist() == [0, 3, 4, 5, 6, 7]
    assert ids_p.tolist() == [10, 0, 0, 20, 21, 22, 30, 31, 0]
    assert pos_p.tolist() == [7, 7, 7, 4, 5, 6, 0, 1, 1]
    assert slots_p.tolist() == [100, -1, -1, 200, 201, 202, 300, 301, -1]
    assert seq_p.tolist() == [10, 7, 3]
    for r in range(3):  # query i of a chunk sees keys [0, seq_len - q_len + i]: unchanged
        for i in range(qsl[r + 1] - qsl[r]):
            assert seq_p[r] - 3 + i == seq_lens[r] - (qsl[r + 1] - qsl[r]) + i == pos[qsl[r] + i]
    with pytest.raises(AssertionError):
        pad_uniform(2, qsl, ids, pos, slots, seq_lens)  # a request longer than q


def test_buffers_of_several_query_rows():
    buf = DecodeBuffers(max_batch=4, max_blocks_per_seq=5, block_size=4, max_model_len=20, device=torch.device("cpu"),
                        query_len=3)
    assert buf.block_tables.shape == (4, 6)  # a padded seq_len reaches max_model_len + 2
    ids, pos, slots, lens, _ = pad_uniform(3, [0, 2], np.array([5, 6]), np.array([8, 9]), np.array([40, 41]), [10])
    buf.fill(ids, pos, slots, lens, np.array([[10, 11, 12]], dtype=np.int32), 2)
    assert buf.input_ids[:6].tolist() == [5, 6, 0, 0, 0, 0]
    assert buf.slot_mapping[:6].tolist() == [40, 41, -1, -1, -1, -1]
    assert buf.seq_lens[:2].tolist() == [11, 0]  # the padding request sees no key
    meta = buf.metadata(2)
    assert (meta.num_tokens, meta.num_reqs, meta.num_decodes, meta.max_query_len) == (6, 2, 0, 3)
    assert meta.query_start_loc.tolist() == [0, 3, 6] and meta.slot_mapping.shape == (6,)


def _llm_with_history(llama_dir):
    """A Triton-backend engine whose KV cache holds random history to attend over."""
    from pagedserve import LLM

    llm = LLM(llama_dir, attention_backend="triton", block_size=4, max_num_seqs=8, dtype="float32")
    runner = llm.llm_engine.runner
    g = torch.Generator().manual_seed(0)
    for layer_k, layer_v in runner.kv_caches:
        layer_k.copy_(torch.randn(layer_k.shape, generator=g))
        layer_v.copy_(torch.randn(layer_v.shape, generator=g))
    return runner


def _eager_and_graph_path(runner, host, run):
    """The step's hidden states eagerly, what `run` (a graph runner's path) returns, each from
    the same KV cache; the cache before, and the caches each left."""
    caches = lambda: [c for pair in runner.kv_caches for c in pair]  # noqa: E731
    before = [c.clone() for c in caches()]
    with torch.inference_mode():
        eager = runner.model(*runner._device_inputs(host)).clone()
        after_eager = [c.clone() for c in caches()]
        for a, b in zip(before, caches()):
            b.copy_(a)
        padded = run()
    return eager, padded, before, after_eager, caches()


def _assert_same_kv_and_none_for_padding(before, after_eager, after, slots, k_shape) -> None:
    written = torch.zeros(k_shape[:2], dtype=torch.bool)
    written.view(-1)[torch.from_numpy(slots)] = True
    for a, b, c in zip(after_eager, after, before):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # same KV for the real rows (GEMM shapes differ)
        assert torch.equal(b[~written], c[~written])  # and none for the padding rows


def test_padded_bucket_matches_unpadded_step(llama_dir):
    """The model on a bucket's padded buffers gives the real rows exactly what the eager,
    unpadded metadata gives, and writes no KV for the padding rows."""
    pytest.importorskip("triton")
    from pagedserve.worker.model_runner import HostInputs

    runner = _llm_with_history(llama_dir)
    graphs = runner.make_graph_runner(capture=False)
    seq_lens = np.array([5, 1, 12], dtype=np.int32)
    block_rows = np.array([[1, 2, 0], [3, 0, 0], [4, 5, 6]], dtype=np.int32)
    positions = seq_lens.astype(np.int64) - 1
    slots = np.array([block_rows[i, p // 4] * 4 + p % 4 for i, p in enumerate(positions)], dtype=np.int64)
    ids = np.array([7, 8, 9])
    host = HostInputs(ids, positions, slots, seq_lens.tolist(), [0, 1, 2, 3], block_rows, 3, [0, 1, 2])
    eager, padded, before, after_eager, after = _eager_and_graph_path(
        runner, host, lambda: graphs.run(ids, positions, slots, seq_lens, block_rows))  # bucket 4: one padding row
    assert graphs.bucket(3) == 4 and padded.shape == eager.shape
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    _assert_same_kv_and_none_for_padding(before, after_eager, after, slots, runner.kv_caches[0][0].shape)


def test_uniform_bucket_matches_a_varlen_step(llama_dir):
    """Graphs of 3 query rows a request (speculative verification) on a step of a decode, a
    last token with two drafts crossing a block boundary, and a two-token prompt: the real
    rows get what the eager varlen step gives, and the padding rows write no KV."""
    pytest.importorskip("triton")
    from pagedserve.worker.model_runner import HostInputs

    runner = _llm_with_history(llama_dir)
    graphs = runner.make_graph_runner(capture=False, query_len=3)
    assert graphs.query_len == 3 and graphs.buffers.metadata(1).num_decodes == 0
    block_rows = np.array([[1, 2, 0], [4, 5, 6], [7, 0, 0]], dtype=np.int32)
    positions = np.array([4, 6, 7, 8, 0, 1])
    qsl, seq_lens = [0, 1, 4, 6], [5, 9, 2]
    rows = [0, 1, 1, 1, 2, 2]
    slots = np.array([block_rows[r, p // 4] * 4 + p % 4 for r, p in zip(rows, positions)], dtype=np.int64)
    ids = np.array([7, 8, 9, 10, 11, 12])
    host = HostInputs(ids, positions, slots, seq_lens, qsl, block_rows, 1, [0, 1, 2])
    eager, (hidden, dst), before, after_eager, after = _eager_and_graph_path(
        runner, host, lambda: graphs.run_varlen(ids, positions, slots, seq_lens, qsl, block_rows))
    assert graphs.bucket(3) == 4 and hidden.shape[0] == 9 and dst.tolist() == [0, 3, 4, 5, 6, 7]
    torch.testing.assert_close(hidden[torch.from_numpy(dst)], eager, rtol=1e-5, atol=1e-5)
    _assert_same_kv_and_none_for_padding(before, after_eager, after, slots, runner.kv_caches[0][0].shape)


# One architecture per kind of decode path (suite time): gpt_neox stands for phi (partial rotary,
# parallel residual), gpt_bigcode for gpt2 (learned positions), falcon_gqa for falcon_mq, opt and
# stablelm for their other forms, phimoe for starcoder2's window; each is checked on the torch
# backend in test_correctness.py.
@pytest.mark.parametrize("name", ["llama", "llama4", "gemma4", "gemma3n", "mixtral", "qwen2_moe", "qwen3_5",
                                  "qwen3_next", "granite_hybrid", "granite_moe", "nemotron_h", "lfm2", "mamba2",
                                  "mamba", "falcon_mamba", "jamba", "minimax",
                                  "gpt_neox", "gpt_bigcode", "falcon_gqa", "opt", "gptj", "stablelm",
                                  "phimoe",
                                  "nemotron", "minimax_m2", "mimo_v2_flash", "hunyuan_moe",
                                  "dots1", "bloom"])
def test_engine_on_static_buffer_path_matches_transformers(name, model_dirs, hf_refs):
    """Decode steps through DecodeGraphRunner (capture=False) inside the engine: greedy tokens
    still equal transformers', and the path was taken. The MoE models' experts run on the
    fused Triton kernel there (no host sync), which makes them graph-safe. Models with state
    layers (Qwen3.5, Qwen3-Next, Granite 4.0-H, Nemotron-H, LFM2, Mamba-2, Mamba, Falcon
    Mamba, Jamba, MiniMax) run them on their Triton kernels (decode steps, but MiniMax's; the
    prefill scans of the 75-token prompt) and read their state rows from static buffers, padding requests a
    scratch row; a one-token prompt starts its state there."""
    pytest.importorskip("triton")
    from conftest import assert_greedy_matches

    from pagedserve import LLM, SamplingParams

    llm = LLM(model_dirs[name], attention_backend="triton", block_size=8, max_num_seqs=4, dtype="float32")
    runner = llm.llm_engine.runner
    assert runner.model.cuda_graph_safe
    runner.graphs = runner.make_graph_runner(capture=False)
    calls = []
    run = runner.graphs.run
    runner.graphs.run = lambda *a: calls.append(len(a[0])) or run(*a)
    # (75 tokens: two of the state layers' 64-token scan blocks, on their Triton kernels)
    prompts = [[(7 * i + 3 * j) % 1000 + 4 for j in range(n)] for i, n in enumerate((5, 17, 9, 75))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert_greedy_matches(hf_refs[name].greedy(p, 6), o.outputs[0].token_ids)
    assert calls and max(calls) == 4
    if runner.state_layers:  # a one-token prompt is a decode row: a fresh state in a reused row
        calls.clear()
        out = llm.generate([{"prompt_token_ids": [77]}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                           use_tqdm=False)[0]
        assert_greedy_matches(hf_refs[name].greedy([77], 4), out.outputs[0].token_ids)
        assert calls == [1] * 4


def test_no_graphs_on_cpu_or_with_enforce_eager(llama_dir):
    from pagedserve import LLM

    assert LLM(llama_dir, device="cpu").llm_engine.runner.graphs is None
    if torch.cuda.is_available():
        llm = LLM(llama_dir, enforce_eager=True, device="cuda", kv_cache_memory_bytes=64 << 20)
        assert llm.llm_engine.runner.graphs is None


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager(llama_dir, hf_refs):
    """Captured decode graphs (float32, Triton backend) against enforce_eager and transformers,
    with batch sizes that land inside buckets (padding) and shrink as requests finish."""
    from conftest import assert_greedy_matches

    from pagedserve import LLM, SamplingParams

    prompts = [[(13 * i + 5 * j) % 1000 + 4 for j in range(3 + 7 * i)] for i in range(11)]
    params = [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(11)]
    results = {}
    for eager in (False, True):
        llm = LLM(llama_dir, device="cuda", dtype="float32", enforce_eager=eager, max_num_seqs=16, block_size=16,
                  kv_cache_memory_bytes=256 << 20)
        runner = llm.llm_engine.runner
        assert (runner.graphs is None) == eager
        if not eager:
            assert sorted(runner.graphs.graphs) == [1, 2, 4, 8, 16]
            replays = []
            run = runner.graphs.run
            runner.graphs.run = lambda *a: replays.append(len(a[0])) or run(*a)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results[eager] = [o.outputs[0].token_ids for o in outs]
        if not eager:
            assert replays and {3, 5, 11} & set(replays), replays  # sizes strictly inside buckets
        del llm, runner
        gc.collect()
        torch.cuda.empty_cache()
    for eager in (False, True):  # padded GEMM shapes may round differently: compare each with transformers
        for p, sp, got in zip(prompts, params, results[eager]):
            assert_greedy_matches(hf_refs["llama"].greedy(p, sp.max_tokens), got)
