"""Checks shared by the offline-engine tests."""

from __future__ import annotations

from pagedserve import LLM


def assert_no_leak(llm: LLM) -> None:
    """Nothing is left behind once every request ended: KV blocks, per-request state."""
    eng = llm.llm_engine
    kv = eng.kv
    assert kv.pool.num_free_blocks == kv.num_blocks and not kv.req_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert not eng.has_unfinished_requests() and not eng.output_processor.states
    assert not eng.runner.sampling_states.states
