"""Mamba-2 (model/layers/mamba2.py, Granite 4.0-H): the chunked scan equals the token-by-token
recurrence; the layer run in prefill chunks and single-token steps through state rows equals
transformers' layer over the whole sequence, a reused row starting fresh."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from engine_helpers import assert_scan_equals_recurrence, layer_in_pieces_against_whole

from pagedserve.model.layers.mamba2 import Mamba2Dims, Mamba2Mixer, ssd_chunked
from pagedserve.ops.state_reference import ssd_step


@pytest.mark.parametrize("length,at", [(1, 0), (15, 0), (16, 0), (17, 0), (50, 0), (50, 5), (40, 16)])
def test_chunked_scan_equals_the_recurrence(length, at):
    g = torch.Generator().manual_seed(length)
    h, p, n = 3, 5, 4
    x = torch.randn(length, h, p, generator=g, dtype=torch.float64)
    dt = torch.rand(length, h, generator=g, dtype=torch.float64)
    b, c = torch.randn(length, h, n, generator=g, dtype=torch.float64), torch.randn(length, h, n, generator=g,
                                                                                      dtype=torch.float64)
    a = -torch.rand(h, generator=g, dtype=torch.float64) * 3
    state = torch.randn(h, n, p, generator=g, dtype=torch.float64)
    keep = [p for p in range(16, at + length, 16) if p > at]
    out, final, kept = ssd_chunked(x, dt, b, c, state, a, at=at, keep=keep, chunk=16)
    assert_scan_equals_recurrence(partial(ssd_step, a=a), (x, dt, b, c), state, at, keep, out, final, kept)


@torch.no_grad()
def test_layer_in_pieces_equals_transformers_whole():
    from transformers import GraniteMoeHybridConfig
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMambaLayer

    cfg = GraniteMoeHybridConfig(hidden_size=64, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16,
                                 mamba_chunk_size=32, num_hidden_layers=1, layer_types=["mamba"])
    torch.manual_seed(0)
    hf = GraniteMoeHybridMambaLayer(cfg, 0).eval()
    ours = Mamba2Mixer(Mamba2Dims.granite(cfg))
    for name, p in hf.named_parameters():
        if name in ("A_log", "dt_bias"):
            p.uniform_(-1.0, 1.0)
        else:
            p.normal_(0.0, 0.5)
        ours.get_parameter(name).copy_(p)
    layer_in_pieces_against_whole(ours, hf, 64)


def test_sequences_together_equal_each_alone():
    from pagedserve.model.layers.mamba2 import ssd_chunks

    g = torch.Generator().manual_seed(3)
    h, p, n = 3, 5, 4
    a = -torch.rand(h, generator=g, dtype=torch.float64) * 3
    cases = [(50, 5, [16, 32, 48]), (3, 31, []), (40, 16, [32])]
    seqs, states, alone = [], [], []
    for length, at, keep in cases:
        seq = (torch.randn(length, h, p, generator=g, dtype=torch.float64),
               torch.rand(length, h, generator=g, dtype=torch.float64),
               torch.randn(length, h, n, generator=g, dtype=torch.float64),
               torch.randn(length, h, n, generator=g, dtype=torch.float64))
        state = torch.randn(h, n, p, generator=g, dtype=torch.float64)
        seqs.append(seq)
        states.append(state)
        alone.append(ssd_chunked(*seq, state, a, at=at, keep=keep, chunk=16))
    outs, finals, kept = ssd_chunks(seqs, torch.stack(states), [c[1] for c in cases], [c[2] for c in cases], a,
                                    chunk=16)
    for i, (out, final, ks) in enumerate(alone):
        torch.testing.assert_close(outs[i], out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(finals[i], final, rtol=1e-10, atol=1e-10)
        for x, y in zip(kept[i], ks, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
