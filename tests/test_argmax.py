"""The greedy argmax kernel (ops/argmax.py) against torch.argmax, its twin: lowest index on
ties, rows longer than one chunk, -inf entries. Without CUDA it runs in Triton's
interpreter on small rows; `-m gpu` checks the benchmark model's vocabulary."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.ops.argmax import argmax_rows  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v, block", [(300, 64), (37, 64), (256, 256)])
def test_argmax_matches_torch(dtype, v, block):
    g = torch.Generator(device=DEV).manual_seed(v)
    x = (torch.randn(5, v, generator=g, device=DEV) * 4).to(dtype)
    x[1, : v // 2] = float("-inf")
    x[2, 3] = x[2, 3 + block * ((v - 4) // block)] = x[2].max() + 1  # a tie in one lane across chunks
    x[3, 10] = x[3, 11] = x[3].max() + 1  # a tie within a chunk
    x[4] = 0.5  # every entry equal: index 0
    got = argmax_rows(x, block=block)
    assert got.dtype == torch.int64
    assert got.tolist() == x.argmax(dim=-1).tolist()
    assert got[2].item() == 3 and got[3].item() == 10 and got[4].item() == 0


def test_argmax_of_a_row_slice():
    """Rows with a stride (a slice of a wider tensor) and no rows at all."""
    x = torch.randn(3, 200, device=DEV)[:, :150]
    assert argmax_rows(x, block=64).tolist() == x.argmax(dim=-1).tolist()
    assert argmax_rows(x[:0]).shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_argmax_on_gpu_vocab_sizes():
    g = torch.Generator(device="cuda").manual_seed(0)
    for rows in (1, 3, 8):
        for v in (32000, 151936):
            x = torch.randn(rows, v, generator=g, device="cuda").to(torch.bfloat16)
            x[0, 7] = x[0, v - 1] = x[0].max() + 1
            assert argmax_rows(x).tolist() == x.argmax(dim=-1).tolist()
