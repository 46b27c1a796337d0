"""The runner's persistent block table: rows per request, incremental sync, reuse."""

from pagedserve.worker.block_table import BlockTable


def test_rows_sync_incrementally_and_are_reused():
    bt = BlockTable(max_rows=2, max_blocks_per_row=8)
    ids_a = [5, 9]
    ra = bt.sync("a", ids_a)
    assert bt.table[ra, :2].tolist() == [5, 9]
    ids_a.append(3)
    assert bt.sync("a", ids_a) == ra and bt.table[ra, :3].tolist() == [5, 9, 3]
    rb = bt.sync("b", [1])
    assert rb != ra
    bt.release("a")
    # A preempted request comes back with new blocks: its released row starts afresh.
    rc = bt.sync("a", [7, 8])
    assert bt.table[rc, :2].tolist() == [7, 8]
    bt.release("a")
    bt.release("b")
    assert sorted(bt.free_rows) == [0, 1] and not bt.row_of
