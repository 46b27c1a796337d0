"""Prefix caching for models whose layers keep a per-request state (linear attention, Mamba-2,
short convolutions): KV blocks alone cannot resume such a request part-way into its prompt, so
the engine also saves copies of the state at some block boundaries: every SAVE_STRIDE tokens of
a sequence, prompt and generated tokens alike (a shared system prompt or document hits; so does
the next turn of a conversation, whose prompt extends this one with its reply), and the prompt's
last boundary before its final token (`boundary`); a later request resumes from the longest
cached prefix that ends at a saved state.

This object is the host-side index: which prefix hash (the hash of the block ending at the
boundary, so the whole prefix) has a snapshot, in which slot of the layers' snapshot tensors,
least recently used first. The runner copies states in and out of the slots; the scheduler
cuts a prompt's chunk at its boundary so that a step ends there."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

SAVE_STRIDE = 256  # a multiple of the layers' scan blocks (64), so their states are at hand there


def boundary(num_prompt_tokens: int, block_size: int) -> int:
    """The last prompt position whose state is saved: the last block boundary before the
    prompt's final token (0: the prompt has no full block before it, nothing is saved)."""
    return (num_prompt_tokens - 1) // block_size * block_size


def save_positions(start: int, end: int, num_prompt_tokens: int, block_size: int) -> list[int]:
    """The positions in (start, end] whose state a chunk [start, end) saves, in order: multiples
    of the stride (and of the block size), and the prompt's boundary."""
    last = boundary(num_prompt_tokens, block_size)
    stride = math.lcm(SAVE_STRIDE, block_size)
    out = list(range((start // stride + 1) * stride, end + 1, stride))
    if start < last <= end and last not in out:
        out.append(last)
        out.sort()
    return out


class StateCache:
    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"state_cache_slots must be at least 1, got {slots}.")
        self.num_slots = slots
        self._slot_of: OrderedDict[bytes, int] = OrderedDict()
        self._free = list(range(slots - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._slot_of)

    def has(self, prefix_hash: bytes) -> bool:
        return prefix_hash in self._slot_of

    def lookup(self, prefix_hash: bytes) -> Optional[int]:
        """The slot holding this prefix's state (now most recently used), or None."""
        slot = self._slot_of.get(prefix_hash)
        if slot is not None:
            self._slot_of.move_to_end(prefix_hash)
        return slot

    def insert(self, prefix_hash: bytes) -> Optional[int]:
        """A slot to save this prefix's state into (a free one, else the least recently used
        entry's), or None when it is saved already."""
        if prefix_hash in self._slot_of:
            self._slot_of.move_to_end(prefix_hash)
            return None
        slot = self.reserve()
        self._slot_of[prefix_hash] = slot
        return slot

    def reserve(self) -> int:
        """A slot for a state whose prefix hash is not known yet (its last token is still being
        sampled): no lookup finds it until `register`; `give_back` if it never is."""
        return self._free.pop() if self._free else self._slot_of.popitem(last=False)[1]

    def register(self, prefix_hash: bytes, slot: int) -> None:
        if prefix_hash in self._slot_of:  # saved meanwhile: keep that one
            self._slot_of.move_to_end(prefix_hash)
            self._free.append(slot)
        else:
            self._slot_of[prefix_hash] = slot

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    def reset(self) -> None:
        """Forget every saved state (reserved slots stay with their holders)."""
        self._free.extend(self._slot_of.values())
        self._slot_of.clear()
