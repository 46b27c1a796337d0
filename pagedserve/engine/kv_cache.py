"""The KV block pool: ref-counted fixed-size blocks, an LRU free queue and the prefix cache.

Only block *ids* live here; the tensors they index are owned by the model runner. The
scheduler talks to KVCacheManager through a narrow surface: get_computed_blocks,
allocate_slots, cache_blocks, free.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from pagedserve.engine.request import Request
from pagedserve.engine.state_cache import StateCache


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: Optional[bytes] = None  # set while the block is published in the prefix cache


def hash_block_tokens(parent_hash: Optional[bytes], token_ids: Sequence[int], extra: Optional[str] = None) -> bytes:
    """Hash of a full block: (parent hash, its token ids, extra keys such as a cache salt).

    SHA-256, so a hit can be trusted without comparing tokens and hashes cannot be steered
    into collisions across tenants."""
    h = hashlib.sha256(parent_hash or b"root")
    h.update(array("q", token_ids).tobytes())
    if extra is not None:
        h.update(b"\x00salt\x00" + extra.encode("utf-8", "surrogatepass"))
    return h.digest()


class BlockPool:
    """All blocks of the cache. Unreferenced blocks sit in `free_queue` in eviction order
    (least recently used first); a freed block keeps its hash until it is reused, so a later
    request can still hit it."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: bytes) -> Optional[KVBlock]:
        return self.cached.get(block_hash)

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks found in the prefix cache."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self.free_queue[b.block_id]
            b.ref_cnt += 1

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            _, b = self.free_queue.popitem(last=False)
            if b.block_hash is not None:  # evict it from the prefix cache
                if self.cached.get(b.block_hash) is b:
                    del self.cached[b.block_hash]
                b.block_hash = None
            b.ref_cnt = 1
            out.append(b)
        return out

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; unreferenced ones join the back of the queue
        in the order given (callers pass a request's blocks tail first, so its last blocks,
        least likely to be shared, are evicted first)."""
        for b in blocks:
            b.ref_cnt -= 1
            if b.ref_cnt < 0:
                raise RuntimeError(f"block {b.block_id} freed more often than referenced")
            if b.ref_cnt == 0:
                self.free_queue[b.block_id] = b

    def publish(self, block: KVBlock, block_hash: bytes) -> None:
        """Make a block whose KV is fully written findable by its hash."""
        if block.block_hash is not None or block_hash in self.cached:
            return  # already published, or an identical block is (keep the first)
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget all cached hashes; refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for b in self.blocks:
            b.block_hash = None
        self.cached.clear()
        return True


class KVCacheManager:
    """Per-request block lists on top of the pool, plus prefix-cache lookups."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, window: int = 0) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        # Sliding window of every attention layer (0: some layer sees the whole context): blocks
        # wholly before the window of a request's next token are given back (release_out_of_window).
        self.window = window
        self.pool = BlockPool(num_blocks)
        # A request's blocks, None where an out-of-window block was given back.
        self.req_blocks: dict[str, list[Optional[KVBlock]]] = {}
        self.req_block_ids: dict[str, list[int]] = {}  # the same, as ids, for the model runner
        self.req_released: dict[str, int] = {}  # leading blocks given back, per request
        # Counters for metrics: prompt tokens looked up / found in the prefix cache.
        self.prefix_queries = 0
        self.prefix_hits = 0
        # Models with per-request states (engine/state_cache.py): a prefix hit must also end
        # where a state was saved. None: KV blocks alone resume a request.
        self.state_cache: Optional[StateCache] = None

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def update_hashes(self, req: Request, upto_tokens: int) -> list[bytes]:
        """The request's block hashes, extended over its full blocks within `upto_tokens` of
        its known tokens."""
        upto_tokens = min(upto_tokens, len(req.all_token_ids))  # (a token still in flight is not known)
        hashes = req.block_hashes
        bs = self.block_size
        tokens = req.all_token_ids
        while (len(hashes) + 1) * bs <= upto_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs], req.block_hash_extra(i, bs)))
        return hashes

    def get_computed_blocks(self, req: Request) -> tuple[list[KVBlock], int]:
        """Blocks of the request's prefix already in the cache, and the tokens they cover.
        At least one token is always left to compute, so the step yields logits."""
        if not self.enable_caching or req.skip_prefix_cache:
            return [], 0
        max_hit_tokens = req.num_tokens - 1
        hashes = self.update_hashes(req, max_hit_tokens)
        hits: list[KVBlock] = []
        for h in hashes[: max_hit_tokens // self.block_size]:
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        if self.state_cache is not None:  # (only prefixes whose state was saved can be resumed)
            k = len(hits)
            while k and not self.state_cache.has(hashes[k - 1]):
                k -= 1
            hits = hits[:k]
            req.state_resume = hashes[k - 1] if k else None
        return hits, len(hits) * self.block_size

    def count_prefix_lookup(self, req: Request, num_hit: int) -> None:
        """Count an admitted request's lookup in the hit-rate metrics (once: a request refused
        for room looks up again at the next step)."""
        if self.enable_caching and not req.skip_prefix_cache:
            self.prefix_queries += req.num_tokens
            self.prefix_hits += num_hit

    def allocate_slots(self, req: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVBlock] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens after the request's computed ones
        (and after `new_computed_blocks`, its prefix-cache hits). False, with nothing
        changed, when the pool cannot supply the blocks."""
        if not new_computed_blocks:  # the common decode step: usually its last block has room
            held = self.req_blocks.get(req.request_id)
            if held and -(-(req.num_computed_tokens + num_new_tokens) // self.block_size) <= len(held):
                return True
        blocks = self.req_blocks.setdefault(req.request_id, [])
        ids = self.req_block_ids.setdefault(req.request_id, [])
        num_computed = req.num_computed_tokens + len(new_computed_blocks) * self.block_size
        needed = -(-(num_computed + num_new_tokens) // self.block_size) - len(blocks) - len(new_computed_blocks)
        # Cache hits with no reference are still in the free queue; touching removes them.
        revived = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if needed > self.pool.num_free_blocks - revived:
            if not blocks:
                del self.req_blocks[req.request_id], self.req_block_ids[req.request_id]
            return False
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
            ids.extend(b.block_id for b in new_computed_blocks)
            req.num_published_blocks = len(blocks)
        if needed > 0:
            new = self.pool.allocate(needed)
            blocks.extend(new)
            ids.extend(b.block_id for b in new)
        return True

    def fork(self, src: Request, dst: Request, num_blocks: int) -> None:
        """Give `dst` (which holds no blocks) references to `src`'s first `num_blocks` blocks,
        whose KV is written: a sibling sample sharing its prompt, copy-free (blocks `src` gave
        back as out of window stay given back: `dst` starts where `src` is)."""
        blocks = self.req_blocks[src.request_id][:num_blocks]
        self.pool.touch(b for b in blocks if b is not None)
        self.req_blocks[dst.request_id] = list(blocks)
        self.req_block_ids[dst.request_id] = list(self.req_block_ids[src.request_id][:num_blocks])
        self.req_released[dst.request_id] = min(self.req_released.get(src.request_id, 0), num_blocks)
        dst.num_published_blocks = min(num_blocks, src.num_published_blocks)

    def release_out_of_window(self, req: Request, first_position: int) -> None:
        """Give back the request's blocks that no token from `first_position` on can see: every
        layer's window ends before them. Their table entries keep a stale id, which attention
        never reads unmasked (keys before the window are masked or skipped) and no slot maps
        to. They stay in the prefix cache, evictable."""
        if not self.window:
            return
        rid = req.request_id
        blocks = self.req_blocks.get(rid)
        cut = min((first_position - self.window + 1) // self.block_size, len(blocks or ()))
        if self.enable_caching and not req.skip_prefix_cache:
            # Not before their hashes are published (with async scheduling the step that wrote
            # them may not have landed yet), so that the prefix cache keeps them.
            cut = min(cut, req.num_published_blocks)
        start = self.req_released.get(rid, 0)
        if not blocks or cut <= start:
            return
        gone = [b for b in blocks[start:cut] if b is not None]
        blocks[start:cut] = [None] * (cut - start)
        self.req_released[rid] = cut
        self.pool.free(gone)

    def holds_blocks(self, req: Request) -> bool:
        return bool(self.req_blocks.get(req.request_id))

    def cache_blocks(self, req: Request, num_computed_tokens: int) -> None:
        """Publish the request's full blocks whose KV has now been written."""
        if not self.enable_caching or req.skip_prefix_cache:
            return
        blocks = self.req_blocks.get(req.request_id)
        if not blocks:
            return
        num_full = min(num_computed_tokens // self.block_size, len(blocks))
        start = req.num_published_blocks
        if num_full <= start:
            return
        hashes = self.update_hashes(req, num_full * self.block_size)
        for i in range(start, num_full):
            if blocks[i] is not None:  # (one given back unpublished stays so)
                self.pool.publish(blocks[i], hashes[i])
        req.num_published_blocks = num_full

    def free(self, req: Request) -> None:
        blocks = self.req_blocks.pop(req.request_id, None)
        self.req_block_ids.pop(req.request_id, None)
        self.req_released.pop(req.request_id, None)
        req.num_published_blocks = 0
        if blocks:
            self.pool.free(b for b in reversed(blocks) if b is not None)

    def block_ids(self, req: Request) -> list[int]:
        """The request's block table (a live list: read it, do not change it)."""
        return self.req_block_ids.get(req.request_id, [])

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def max_blocks_held(self, num_tokens: int, max_chunk: int) -> int:
        """The most blocks a request of `num_tokens` holds at once, computed `max_chunk` tokens
        a step at most: all of them, or with a window, what is behind a chunk and the chunk. A
        request alone in the cache always fits if this does (no livelock of self-preemption)."""
        blocks = self.num_blocks_needed(num_tokens)
        if not self.window:
            return blocks
        # Behind the chunk: the window's keys; with prefix caching, blocks go back once published,
        # which with async scheduling may be a step (a chunk) late.
        behind = max(self.window - 1, max_chunk) if self.enable_caching else self.window - 1
        return min(blocks, (behind + max_chunk) // self.block_size + 2)

    def reset_prefix_cache(self) -> bool:
        if not self.pool.reset_prefix_cache():
            return False
        if self.state_cache is not None:
            self.state_cache.reset()
        return True
