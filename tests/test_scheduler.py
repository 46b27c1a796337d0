"""Scheduler decisions, driven without a model: token budget, chunking, admission, preemption,
stopping and aborts."""

from __future__ import annotations

from pagedserve.engine.kv_cache import KVCacheManager
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams


def _sched(num_blocks=64, block_size=4, max_num_seqs=8, budget=16, max_len=256, chunked=True, caching=True):
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(kv, max_num_seqs, budget, max_len, chunked)


def _req(rid, n, max_tokens=4, base=None, **sp):
    base = 1000 * (1 + sum(map(ord, rid))) if base is None else base  # distinct prompts per id
    r = Request(rid, list(range(base, base + n)), SamplingParams(max_tokens=max_tokens, **sp))
    r.max_tokens = max_tokens
    return r


def _step(s: Scheduler, token: int = 7):
    out = s.schedule()
    sampled = {x.request.request_id: token for x in out.scheduled if x.samples}
    s.update_from_output(out, sampled)
    return {x.request.request_id: x.num_tokens for x in out.scheduled}, out


def test_budget_chunks_long_prompts_and_mixes_decodes():
    s = _sched(budget=16)
    s.add_request(_req("a", 6))
    s.add_request(_req("b", 30))
    got, _ = _step(s)
    assert got == {"a": 6, "b": 10}  # a whole, b's first chunk
    got, _ = _step(s)
    assert got == {"a": 1, "b": 15}  # a decodes beside b's next chunk
    got, _ = _step(s)
    assert got == {"a": 1, "b": 5}  # b's last chunk samples its first token
    assert s.requests["b"].num_output_tokens == 1
    got, _ = _step(s)
    assert got == {"a": 1, "b": 1}


def test_long_prefill_token_threshold_leaves_room_for_others():
    """vLLM's long_prefill_token_threshold: a prompt takes at most 6 tokens a step, so a short
    prompt queued behind a long one gets its first token in the first step."""
    kv = KVCacheManager(64, 4, True)
    s = Scheduler(kv, 8, 16, 256, True, long_prefill_token_threshold=6)
    s.add_request(_req("long", 20))
    s.add_request(_req("short", 4, max_tokens=10))
    got, _ = _step(s)
    assert got == {"long": 6, "short": 4} and s.requests["short"].num_output_tokens == 1
    sizes = [got["long"]]
    while s.requests["long"].num_output_tokens == 0:
        got, _ = _step(s)
        sizes.append(got["long"])
        assert got["short"] == 1  # it decodes meanwhile
    assert sizes == [6, 6, 6, 2] and _step(s)[0] == {"long": 1, "short": 1}
    plain = _sched(budget=16)
    plain.add_request(_req("long", 20))
    plain.add_request(_req("short", 4))
    assert _step(plain)[0] == {"long": 16}  # without it, the long prompt takes the whole budget


def test_no_chunking_waits_for_budget():
    s = _sched(budget=16, chunked=False)
    s.add_request(_req("a", 10))
    s.add_request(_req("b", 12))
    got, _ = _step(s)
    assert got == {"a": 10}  # b does not fit beside a and may not be split
    got, _ = _step(s)
    assert got == {"a": 1, "b": 12}


def test_max_num_seqs_bounds_running():
    s = _sched(max_num_seqs=2, budget=100)
    for i in range(4):
        s.add_request(_req(str(i), 3))
    got, _ = _step(s)
    assert set(got) == {"0", "1"} and s.num_waiting == 2


def test_preemption_of_latest_request_and_recompute():
    s = _sched(num_blocks=6, block_size=4, budget=64, max_len=64)
    s.add_request(_req("a", 8, max_tokens=8))
    s.add_request(_req("b", 8, max_tokens=8))
    s.add_request(_req("c", 4, max_tokens=8))
    got, _ = _step(s)  # a: 2 blocks, b: 2 blocks, c: 1 block (+1 token each next step)
    assert got == {"a": 8, "b": 8, "c": 4}
    got, out = _step(s)  # 6 blocks: a and b need a 3rd block each; c has room
    assert [r.request_id for r in out.preempted] == ["c"]
    assert got == {"a": 1, "b": 1}
    c = s.waiting[0]
    assert c.request_id == "c" and c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert c.num_output_tokens == 1  # its token survives; it will be recomputed, not resampled
    assert s.kv.block_ids(c) == []
    # A preempted request comes back first, recomputing its prompt and output together.
    while "c" not in got:
        got, out = _step(s)
    assert got["c"] == 5 - out.scheduled[-1].start


def test_preempting_itself_when_alone():
    s = _sched(num_blocks=3, block_size=4, budget=64, max_len=64)
    s.add_request(_req("a", 12, max_tokens=4))
    _step(s)
    got, out = _step(s)  # needs a 4th block that does not exist... and nobody else to evict
    assert out.preempted and out.preempted[0].request_id == "a" and got == {}
    assert s.kv.pool.num_free_blocks == 3


def test_finish_on_max_tokens_and_stop_token():
    s = _sched()
    s.add_request(_req("a", 3, max_tokens=2))
    s.add_request(_req("b", 3, max_tokens=10, stop_token_ids=[7]))
    _step(s, token=5)
    assert s.requests["b"].num_output_tokens == 1
    _step(s, token=7)
    assert not s.has_unfinished_requests()
    assert s.kv.pool.num_free_blocks == s.kv.num_blocks


def test_min_tokens_defers_stop_and_eos():
    s = _sched()
    r = _req("a", 3, max_tokens=10, min_tokens=3, stop_token_ids=[7])
    r.sampling_params._eos_token_ids = frozenset({9})
    s.add_request(r)
    _step(s, token=7)
    _step(s, token=9)
    assert not r.is_finished()
    _step(s, token=9)
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason is None


def test_abort_running_and_waiting_frees_everything():
    s = _sched(max_num_seqs=1)
    s.add_request(_req("a", 9))
    s.add_request(_req("b", 9))
    _step(s)
    done = s.finish_requests(["a", "b", "missing"], RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in done} == {"a", "b"}
    assert not s.has_unfinished_requests() and s.kv.pool.num_free_blocks == s.kv.num_blocks
    out = s.schedule()
    assert out.is_empty() and s.pop_finished_ids() == {"a", "b"}


def test_prefix_hit_skips_computed_tokens():
    s = _sched(block_size=4, budget=64)
    s.add_request(_req("a", 10, base=5))
    _step(s)
    s.add_request(_req("b", 10, base=5))
    got, _ = _step(s)
    assert got["b"] == 2 and s.requests["b"].num_cached_tokens == 8


def test_n_siblings_fork_share_and_survive_preemption():
    s = _sched(num_blocks=7, block_size=4, budget=64, max_len=64)
    leader = _req("0_x", 9, max_tokens=8)
    sibs = [_req(f"{i}_x", 9, max_tokens=8, base=1000 * (1 + sum(map(ord, "0_x")))) for i in (1, 2)]
    leader.pending_siblings = sibs
    s.add_request(leader)
    got, _ = _step(s)
    assert got == {"0_x": 9}
    # Forked at the leader's first token: each sibling holds the 2 full prompt blocks.
    assert [s.kv.block_ids(x)[:2] for x in sibs] == [s.kv.block_ids(leader)[:2]] * 2
    assert all(s.kv.pool.blocks[b].ref_cnt == 3 for b in s.kv.block_ids(leader)[:2])
    got, _ = _step(s)
    assert got == {"0_x": 1, "1_x": 1, "2_x": 1}  # only the last prompt token is computed
    steps = 0
    while s.has_unfinished_requests() and steps < 100:
        _step(s)
        steps += 1
    assert not s.has_unfinished_requests() and s.num_preemptions > 0
    assert all(r.num_output_tokens == 8 for r in [leader] + sibs)
    assert s.kv.pool.num_free_blocks == 7 and all(b.ref_cnt == 0 for b in s.kv.pool.blocks)
