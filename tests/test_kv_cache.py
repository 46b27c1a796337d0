"""Block pool and KV cache manager: allocation, ref counts, prefix hits, eviction order, leaks."""

from __future__ import annotations

import pytest

from pagedserve.engine.kv_cache import BlockPool, KVCacheManager, hash_block_tokens
from pagedserve.engine.request import Request
from pagedserve.sampling_params import SamplingParams


def _req(rid: str, tokens: list[int], salt=None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), cache_salt=salt)


def test_pool_allocate_free_refcounts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert [b.ref_cnt for b in a] == [1, 1, 1] and pool.num_free_blocks == 1
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    pool.touch([a[0]])
    assert a[0].ref_cnt == 2
    pool.free(a)
    assert a[0].ref_cnt == 1 and pool.num_free_blocks == 3
    pool.free([a[0]])
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError):
        pool.free([a[0]])


def test_hash_depends_on_parent_tokens_and_salt():
    h1 = hash_block_tokens(None, [1, 2, 3])
    assert h1 == hash_block_tokens(None, [1, 2, 3])
    assert h1 != hash_block_tokens(None, [1, 2, 4])
    assert hash_block_tokens(h1, [5]) != hash_block_tokens(hash_block_tokens(None, [1, 2, 4]), [5])
    assert h1 != hash_block_tokens(None, [1, 2, 3], "tenant-a")
    assert hash_block_tokens(None, [1, 2, 3], "a") != hash_block_tokens(None, [1, 2, 3], "b")


def test_prefix_hit_after_publish_only():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r1 = _req("a", list(range(10)))
    assert kv.get_computed_blocks(r1) == ([], 0)
    assert kv.allocate_slots(r1, 10)
    assert len(kv.block_ids(r1)) == 3
    r2 = _req("b", list(range(10)))
    # Nothing is published before the KV is written (cache_blocks after the step).
    assert kv.get_computed_blocks(r2) == ([], 0)
    r1.num_computed_tokens = 10
    kv.cache_blocks(r1, 10)
    hits, n = kv.get_computed_blocks(r2)
    assert n == 8 and [b.block_id for b in hits] == kv.block_ids(r1)[:2]
    assert kv.allocate_slots(r2, 2, hits)
    assert kv.block_ids(r2)[:2] == kv.block_ids(r1)[:2]
    assert [kv.pool.blocks[i].ref_cnt for i in kv.block_ids(r1)] == [2, 2, 1]
    kv.free(r1)
    kv.free(r2)
    assert kv.pool.num_free_blocks == 8 and all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_full_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r1 = _req("a", list(range(8)))
    kv.allocate_slots(r1, 8)
    kv.cache_blocks(r1, 8)
    hits, n = kv.get_computed_blocks(_req("b", list(range(8))))
    assert n == 4 and len(hits) == 1  # block 2 would cover the last token: recompute it


def test_freed_blocks_stay_hittable_until_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    r1 = _req("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(r1, 5)
    kv.cache_blocks(r1, 5)  # blocks of [1,2] and [3,4] are published
    ids1 = kv.block_ids(r1)[:]
    kv.free(r1)  # freed tail first: block 2 (partial), then 1, then 0 join the queue
    assert list(kv.pool.free_queue)[-3:] == [ids1[2], ids1[1], ids1[0]]
    hits, n = kv.get_computed_blocks(_req("x", [1, 2, 3, 4, 9]))
    assert n == 4 and [b.block_id for b in hits] == ids1[:2]
    # Allocating the whole pool evicts in LRU order: the never-used block, then the
    # partial block, then [3,4] (the tail of r1's prefix) before [1,2].
    r2 = _req("b", [7, 7, 7, 7, 7, 7, 7])
    kv.allocate_slots(r2, 3)  # 2 blocks: the never-used one and the partial one
    assert kv.pool.lookup(hits[1].block_hash) is not None
    r2.num_computed_tokens = 3
    kv.allocate_slots(r2, 2)  # a third block: [3,4] goes
    assert kv.pool.lookup(hits[0].block_hash) is not None
    assert kv.pool.lookup(hits[1].block_hash) is None
    r2.num_computed_tokens = 5
    kv.allocate_slots(r2, 2)
    assert kv.pool.lookup(hits[0].block_hash) is None
    assert not kv.pool.cached


def test_allocate_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    r1 = _req("a", list(range(20)))
    assert not kv.allocate_slots(r1, 20)
    assert kv.pool.num_free_blocks == 3 and "a" not in kv.req_blocks
    assert kv.allocate_slots(r1, 8)
    r1.num_computed_tokens = 8
    assert not kv.allocate_slots(r1, 8)
    assert len(kv.block_ids(r1)) == 2 and kv.pool.num_free_blocks == 1


def test_cached_block_with_zero_refs_counts_against_free_space():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    r1 = _req("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(r1, 5)
    kv.cache_blocks(r1, 4)
    kv.free(r1)
    r2 = _req("b", [1, 2, 3, 4, 6, 7, 8])
    hits, n = kv.get_computed_blocks(r2)
    assert n == 4
    # 2 hit blocks are in the free queue; 7 tokens need 4 blocks > 3 in the pool.
    assert not kv.allocate_slots(r2, 3, hits)
    assert kv.pool.num_free_blocks == 3 and all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert kv.allocate_slots(r2, 2, hits)  # 6 tokens: 3 blocks
    assert kv.pool.num_free_blocks == 0


def test_cache_salt_partitions_prefix_cache():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    r1 = _req("a", [1, 2, 3, 4, 5], salt="tenant-a")
    kv.allocate_slots(r1, 5)
    kv.cache_blocks(r1, 5)
    assert kv.get_computed_blocks(_req("b", [1, 2, 3, 4, 5], salt="tenant-b"))[1] == 0
    assert kv.get_computed_blocks(_req("c", [1, 2, 3, 4, 5]))[1] == 0
    assert kv.get_computed_blocks(_req("d", [1, 2, 3, 4, 5], salt="tenant-a"))[1] == 4


def test_caching_disabled():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_caching=False)
    r1 = _req("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(r1, 5)
    kv.cache_blocks(r1, 5)
    assert not kv.pool.cached
    assert kv.get_computed_blocks(_req("b", [1, 2, 3, 4, 5])) == ([], 0)
