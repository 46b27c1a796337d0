"""Mamba-1 (model/layers/mamba1.py: Mamba, Falcon Mamba, Jamba): the batched scan over several
sequences equals each one's token recurrence, with the states asked for kept; the layer run in
prefill chunks and single-token steps through state rows equals transformers' layer over the
whole sequence, a reused row starting fresh. (Whole models against transformers:
test_correctness, test_cuda_graphs.)"""

from __future__ import annotations

from functools import partial

import torch
from engine_helpers import assert_scan_equals_recurrence, layer_in_pieces_against_whole

from pagedserve.model.layers.mamba1 import selective_scan, selective_scan_one
from pagedserve.model.mamba import mamba1_mixer
from pagedserve.ops.state_reference import selective_step


def _seq(length: int, c: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    f64 = dict(generator=g, dtype=torch.float64)
    return torch.randn(length, c, **f64), torch.rand(length, c, **f64), torch.randn(length, n, **f64), \
        torch.randn(length, n, **f64)


def test_scan_of_several_sequences_equals_the_recurrence():
    g = torch.Generator().manual_seed(0)
    c, n = 6, 4
    a = -torch.rand(c, n, generator=g, dtype=torch.float64) * 3
    cases = [(150, 5, [64, 128]), (3, 31, []), (70, 0, [64])]  # (length, first position, keep)
    seqs = [_seq(length, c, n, g) for length, _, _ in cases]
    states = torch.randn(len(cases), c, n, generator=g, dtype=torch.float64)
    ys, finals, kept = selective_scan(seqs, states, [at for _, at, _ in cases], [k for _, _, k in cases], a)
    for r, ((_, at, keep), seq) in enumerate(zip(cases, seqs)):
        assert_scan_equals_recurrence(partial(selective_step, a=a), seq, states[r], at, keep, ys[r], finals[r],
                                      kept[r])
    one = selective_scan_one(*seqs[1], states[1], a)  # the one-sequence form, the same numbers
    torch.testing.assert_close(one[0], ys[1], rtol=0, atol=0)


@torch.no_grad()
def test_layer_in_pieces_equals_transformers_whole():
    from transformers import FalconMambaConfig
    from transformers.models.falcon_mamba.modeling_falcon_mamba import FalconMambaMixer

    cfg = FalconMambaConfig(hidden_size=32, state_size=8, num_hidden_layers=1, time_step_rank=4)
    torch.manual_seed(0)
    hf = FalconMambaMixer(cfg, 0, initialize_mixer_weights=False).eval()  # (its init reads norms not yet made)
    ours = mamba1_mixer(cfg, "plain", cfg.mixer_rms_eps)
    for name, p in hf.named_parameters():
        p.normal_(0.0, 0.5) if name != "A_log" else p.uniform_(-1.0, 1.0)
        ours.get_parameter(name).copy_(p)
    layer_in_pieces_against_whole(ours, hf, 32)


def test_other_activations_refused():
    import pytest
    from transformers import JambaConfig

    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        mamba1_mixer(JambaConfig(hidden_act="gelu", num_hidden_layers=1), "weighted", 1e-6, inner=8192)
