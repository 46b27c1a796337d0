"""A persistent block table on the host: each scheduled request owns a row while it runs, and
a step copies in only the block ids appended since the last step (so building a step's
inputs costs O(batch), not O(total context))."""

from __future__ import annotations

import numpy as np


class BlockTable:
    def __init__(self, max_rows: int, max_blocks_per_row: int) -> None:
        self.table = np.zeros((max_rows, max_blocks_per_row), dtype=np.int32)
        self.filled = [0] * max_rows  # a list: read at every step, numpy scalars are slow
        self.row_of: dict[str, int] = {}
        self.free_rows = list(range(max_rows - 1, -1, -1))

    def sync(self, request_id: str, block_ids: list[int]) -> int:
        """The request's row, brought up to date with its (append-only) block list."""
        row = self.row_of.get(request_id)
        if row is None:
            row = self.free_rows.pop()
            self.row_of[request_id] = row
            self.filled[row] = 0
        n, done = len(block_ids), self.filled[row]
        if n > done:
            self.table[row, done:n] = block_ids[done:n]
            self.filled[row] = n
        return row

    def release(self, request_id: str) -> None:
        """Forget a request that finished or was preempted (its blocks were freed)."""
        row = self.row_of.pop(request_id, None)
        if row is not None:
            self.free_rows.append(row)
