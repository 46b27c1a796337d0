"""Decode CUDA graphs: bucket choice, padding and static-buffer filling on CPU; the replay
path end to end on CPU with capture=False (same buffers, eager forward, Triton kernels in
the interpreter); capture and replay proper under `-m gpu`."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from pagedserve.worker.cuda_graphs import DecodeBuffers, bucket_for, capture_sizes


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


def test_padded_bucket_matches_unpadded_step(llama_dir):
    """The model on a bucket's padded buffers gives the real rows exactly what the eager,
    unpadded metadata gives, and writes no KV for the padding rows."""
    pytest.importorskip("triton")
    from pagedserve import LLM

    llm = LLM(llama_dir, attention_backend="triton", block_size=4, max_num_seqs=8, dtype="float32")
    runner = llm.llm_engine.runner
    graphs = runner.make_graph_runner(capture=False)
    k_cache = runner.kv_caches[0][0]
    g = torch.Generator().manual_seed(0)
    k_cache.copy_(torch.randn(k_cache.shape, generator=g))  # a cache with history to attend over
    runner.kv_caches[0][1].copy_(torch.randn(k_cache.shape, generator=g))
    for layer_k, layer_v in runner.kv_caches[1:]:
        layer_k.copy_(torch.randn(k_cache.shape, generator=g))
        layer_v.copy_(torch.randn(k_cache.shape, generator=g))
    seq_lens = np.array([5, 1, 12], dtype=np.int32)
    block_rows = np.array([[1, 2, 0], [3, 0, 0], [4, 5, 6]], dtype=np.int32)
    positions = seq_lens.astype(np.int64) - 1
    slots = np.array([block_rows[i, p // 4] * 4 + p % 4 for i, p in enumerate(positions)], dtype=np.int64)
    ids = np.array([7, 8, 9])
    from pagedserve.worker.model_runner import HostInputs

    host = HostInputs(ids, positions, slots, seq_lens.tolist(), [0, 1, 2, 3], block_rows, 3, [0, 1, 2])
    before = [c.clone() for pair in runner.kv_caches for c in pair]
    with torch.inference_mode():
        eager = runner.model(*runner._device_inputs(host)).clone()
        after_eager = [c.clone() for pair in runner.kv_caches for c in pair]
        for a, b in zip(before, [c for pair in runner.kv_caches for c in pair]):
            b.copy_(a)
        padded = graphs.run(ids, positions, slots, seq_lens, block_rows)  # bucket 4: one padding row
    assert graphs.bucket(3) == 4 and padded.shape == eager.shape
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    written.view(-1)[torch.from_numpy(slots)] = True
    for a, b, c in zip(after_eager, [c for pair in runner.kv_caches for c in pair], before):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # same KV for the real rows (GEMM shapes differ)
        assert torch.equal(b[~written], c[~written])  # and none for the padding row


@pytest.mark.parametrize("name", ["llama", "mixtral", "qwen2_moe"])
def test_engine_on_static_buffer_path_matches_transformers(name, model_dirs, hf_refs):
    """Decode steps through DecodeGraphRunner (capture=False) inside the engine: greedy tokens
    still equal transformers', and the path was taken. The MoE models' experts run on the
    fused Triton kernel there (no host sync), which makes them graph-safe."""
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
    prompts = [[(7 * i + 3 * j) % 1000 + 4 for j in range(n)] for i, n in enumerate((5, 17, 9))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert_greedy_matches(hf_refs[name].greedy(p, 6), o.outputs[0].token_ids)
    assert calls and max(calls) == 3


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
