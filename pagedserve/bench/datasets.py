"""Benchmark request sets: random token prompts with spread lengths, optionally sharing a
prefix (vLLM's "random" dataset, seeded)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def _bounds(center: int, ratio: float, lo: Optional[int], hi: Optional[int]) -> tuple[int, int]:
    a = lo if lo is not None else max(1, int(center * (1 - ratio)))
    b = hi if hi is not None else max(a, int(center * (1 + ratio)))
    if a < 1 or b < a:
        raise ValueError(f"bad length range [{a}, {b}]")
    return a, b


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int = 0,
    input_min: Optional[int] = None,
    input_max: Optional[int] = None,
    output_min: Optional[int] = None,
    output_max: Optional[int] = None,
    special_ids: tuple[int, ...] = (),
) -> list[BenchRequest]:
    """Prompts of uniform random length (input_len * (1 +- range_ratio), or [input_min,
    input_max]) after a shared prefix of `prefix_len` tokens; random token ids that avoid
    `special_ids` (EOS and friends)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    in_lo, in_hi = _bounds(input_len, range_ratio, input_min, input_max)
    out_lo, out_hi = _bounds(output_len, range_ratio, output_min, output_max)
    banned = set(special_ids)

    def tok() -> int:
        while True:
            t = rng.randrange(vocab_size)
            if t not in banned:
                return t

    prefix = [tok() for _ in range(prefix_len)]
    return [BenchRequest(prefix + [tok() for _ in range(rng.randint(in_lo, in_hi))], rng.randint(out_lo, out_hi))
            for _ in range(num_prompts)]
