"""KV pool sizing: the worst-case profiling pass that CUDA sizing runs, exercised on CPU
(the pass itself is device-agnostic; only the memory readings need CUDA)."""

from __future__ import annotations

import torch

from pagedserve import LLM
from pagedserve.worker.kv_sizing import block_bytes, cpu_num_blocks


def test_profile_run_covers_a_full_token_budget_across_requests(llama_dir):
    llm = LLM(llama_dir, max_model_len=64, max_num_batched_tokens=200, max_num_seqs=8,
              kv_cache_memory_bytes=4 << 20)
    runner = llm.llm_engine.runner
    seen = []
    forward = runner.model.forward

    def spy(ids, positions, meta):
        seen.append((len(ids), list(meta.seq_lens_cpu), meta.query_start_loc_cpu, positions.max().item(),
                     meta.slot_mapping.unique().numel()))
        return forward(ids, positions, meta)

    runner.model.forward = spy
    cache_before = runner.kv_caches[0][0]
    runner._profile_run()
    (n, lens, qsl, max_pos, distinct_slots), = seen
    # 200 tokens as requests of at most max_model_len, each with its own positions and slots
    assert n == 200 and lens == [64, 64, 64, 8] and qsl == [0, 64, 128, 192, 200]
    assert max_pos == 63 and distinct_slots == 200
    # the pass leaves an empty binding behind (the engine binds the real pool next)
    assert runner.kv_caches[0][0].shape[0] == 0 and cache_before.shape[0] > 0


def test_block_bytes_and_cpu_budget():
    per = block_bytes(22, 16, 4, 64, torch.bfloat16)
    assert per == 22 * 2 * 16 * 4 * 64 * 2
    assert cpu_num_blocks(per, 10) == 10  # capped by what max_num_seqs x max_model_len can use
    assert cpu_num_blocks(1 << 40, 10) == 1  # never zero
