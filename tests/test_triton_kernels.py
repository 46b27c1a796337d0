"""Triton kernels against their pure-PyTorch twins (pagedserve/ops/reference.py).

Without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), on
small shapes; `-m gpu` runs the same checks on CUDA over larger shapes. Every cache slot no
request may read holds NaN, so a kernel that reads past a sequence, or a wrong page, fails."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.attention.backend import AttentionMetadata  # noqa: E402
from pagedserve.ops.paged_attention import paged_attention  # noqa: E402
from pagedserve.ops.reference import paged_attention_ref, reshape_and_cache_ref  # noqa: E402
from pagedserve.ops.reshape_and_cache import reshape_and_cache  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (relative error norm, max abs error) against a float64 reference
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 5e-2)}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Batch:
    query: torch.Tensor  # [T (+ extra rows), Hq, D]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    qsl: torch.Tensor
    seq_lens_cpu: list[int]
    qsl_cpu: list[int]
    num_decodes: int

    @property
    def num_tokens(self) -> int:
        return self.qsl_cpu[-1]


def make_batch(reqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype, seed: int = 0, extra_rows: int = 0, poison: bool = True) -> Batch:
    """reqs: (q_len, seq_len) per request, decodes (q_len 1) first. Pages are scattered; every
    slot outside [0, seq_len) of some request is NaN when poison is set."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(_cdiv(s, block_size) for _, s in reqs) + 3
    shape = (num_blocks, block_size, kv_heads, head_dim)
    kc = torch.full(shape, float("nan")) if poison else torch.randn(shape, generator=g)
    vc = torch.full(shape, float("nan")) if poison else torch.randn(shape, generator=g)
    perm = torch.randperm(num_blocks, generator=g)
    bt = torch.zeros(len(reqs), max(_cdiv(s, block_size) for _, s in reqs) or 1, dtype=torch.int32)
    valid = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    used = 0
    for r, (_, s) in enumerate(reqs):
        nb = _cdiv(s, block_size)
        bt[r, :nb] = perm[used: used + nb]
        used += nb
        pos = torch.arange(s)
        valid[bt[r, pos // block_size].long(), pos % block_size] = True
    n_valid = int(valid.sum())
    kc[valid] = torch.randn(n_valid, kv_heads, head_dim, generator=g)
    vc[valid] = torch.randn(n_valid, kv_heads, head_dim, generator=g)
    qsl = [0]
    for q, _ in reqs:
        qsl.append(qsl[-1] + q)
    query = torch.randn(qsl[-1] + extra_rows, heads, head_dim, generator=g)
    num_decodes = next((i for i, (q, _) in enumerate(reqs) if q != 1), len(reqs))
    seq_lens = [s for _, s in reqs]
    to = dict(device=DEV)
    return Batch(query.to(dtype).to(**to), kc.to(dtype).to(**to), vc.to(dtype).to(**to), bt.to(**to),
                 torch.tensor(seq_lens, dtype=torch.int32, **to), torch.tensor(qsl, dtype=torch.int32, **to),
                 seq_lens, qsl, num_decodes)


def run_kernels(b: Batch, out: torch.Tensor, scale: float, segments: int = 1, block_m=None, tile_n=None,
                k_rows=None, **opts) -> None:
    """The backend's two launches: decodes (optionally split), then the prefill chunks. opts:
    window, softcap."""
    nd, nr = b.num_decodes, len(b.seq_lens_cpu)
    if nd:
        paged_attention(b.query, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.qsl, nd, nd, scale, out=out,
                        decode=True, num_segments=segments, tile_n=tile_n, k_rows=k_rows, **opts)
    if nr > nd:
        paged_attention(b.query, b.k_cache, b.v_cache, b.block_tables[nd:], b.seq_lens[nd:], b.qsl[nd:], nr - nd,
                        b.num_tokens - b.qsl_cpu[nd], scale, out=out, block_m=block_m, tile_n=tile_n, k_rows=k_rows,
                        **opts)


def reference(b: Batch, scale: float, **opts) -> torch.Tensor:
    return paged_attention_ref(b.query.cpu(), b.k_cache.cpu(), b.v_cache.cpu(), b.block_tables.cpu(),
                               b.seq_lens_cpu, b.qsl_cpu, scale, compute_dtype=torch.float64, **opts)


def assert_attention_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    got = got.cpu().double()
    assert torch.isfinite(got).all(), "NaN/inf in the output: an unwritten row or a read of a poisoned slot"
    rel_tol, abs_tol = TOL[dtype]
    rel = float((got - ref).norm() / ref.norm().clamp(min=1e-30))
    err = float((got - ref).abs().max())
    assert rel < rel_tol and err < abs_tol, f"relative error {rel:.3g}, max abs error {err:.3g}"


def mixed_requests(bs: int) -> list[tuple[int, int]]:
    """Decodes at and across page boundaries, then a fresh prompt, a prefix-cached chunk
    (context > 0), a mid-prompt chunk and a 2-token chunk."""
    return [(1, 1), (1, bs), (1, bs + 1), (1, 3 * bs - 1),
            (2 * bs + 5, 2 * bs + 5), (7, 3 * bs + 2), (bs + 1, 2 * bs + 1), (2, 5)]


def check_mixed(heads, kv_heads, head_dim, block_size, dtype, segments=1, block_m=None, tile_n=None, seed=0,
                reqs=None, k_rows=None, scale=None, **opts):
    b = make_batch(reqs or mixed_requests(block_size), heads, kv_heads, head_dim, block_size, dtype, seed=seed)
    scale = scale or head_dim**-0.5
    out = torch.full_like(b.query, float("nan"))
    run_kernels(b, out, scale, segments, block_m, tile_n, k_rows, **opts)
    assert_attention_close(out, reference(b, scale, **opts), dtype)


# ---- interpreter-sized checks (CPU in CI; also run on CUDA where present) ----------------------

SHAPES = [(4, 4, 16), (4, 1, 32), (8, 2, 64), (6, 2, 32), (4, 2, 24)]  # MHA, MQA, GQA 4, group 3, odd head dim


# Every shape at both block sizes in fp32; bf16 (its rounding) at block size 16.
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size, dtype", [
    pytest.param(*shape, bs, dt, id=f"{dn}-{bs}-{'-'.join(map(str, shape))}") for shape in SHAPES
    for bs, dt, dn in ((8, torch.float32, "fp32"), (16, torch.float32, "fp32"), (16, torch.bfloat16, "bf16"))])
def test_attention_mixed_batch(heads, kv_heads, head_dim, block_size, dtype):
    # 16-wide query blocks and key tiles: several per request, crossing pages both ways.
    check_mixed(heads, kv_heads, head_dim, block_size, dtype, block_m=16, tile_n=16)


@pytest.mark.parametrize("k_rows", [False, True], ids=["k_dmajor", "k_rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_both_k_layouts(k_rows, dtype):
    check_mixed(8, 2, 64, 16, dtype, k_rows=k_rows)
    check_mixed(8, 2, 64, 16, dtype, segments=4, k_rows=k_rows)


@pytest.mark.parametrize("block_size", [4, 32])
def test_attention_default_tiles(block_size):
    # The launch's own BLOCK_M / TILE_N (64): tiles wider than a page, or spanning half of one.
    check_mixed(8, 2, 32, block_size, torch.float32)


def test_attention_fp16():
    check_mixed(8, 2, 32, 16, torch.float16, block_m=16, tile_n=16)


@pytest.mark.parametrize("segments", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_split_kv(segments, dtype):
    # 8 segments over at most 5 tiles: some segments are empty and must merge as nothing.
    reqs = [(1, n) for n in (1, 9, 16, 17, 40, 77)]
    check_mixed(8, 2, 32, 8, dtype, segments=segments, tile_n=16, reqs=reqs)


@pytest.mark.parametrize("window, softcap", [(5, 0.0), (0, 2.0), (19, 1.5), (1, 0.0), (-16, 0.0), (-5, 1.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_sliding_window_and_softcap(window, softcap, dtype):
    """Windows shorter than a tile, across tiles and pages, of one key; softcaps that bite
    (scale 1 makes the scores large); chunked local attention (window < 0) in chunks of a
    tile and of 5 keys: query blocks and split decodes against the twin."""
    check_mixed(8, 2, 32, 8, dtype, block_m=16, tile_n=16, scale=1.0, window=window, softcap=softcap)
    check_mixed(8, 2, 32, 8, dtype, segments=4, tile_n=16, scale=1.0, window=window, softcap=softcap,
                reqs=[(1, n) for n in (1, 9, 16, 17, 40, 77)])


@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_kv_limit(window, dtype):
    """Per-query key bounds (Gemma 3's two-way image spans): spans inside a chunk, one reaching
    its last token, one after cached context, across query blocks and tiles; with decode rows
    before them and a sliding window, against the twin."""
    reqs = [(1, 9), (1, 20), (30, 30), (13, 40), (5, 5)]
    b = make_batch(reqs, 8, 2, 32, 8, dtype)
    limit = []
    for q, n in reqs:
        lim = list(range(n - q + 1, n + 1))  # causal
        if q > 1:  # a span of the chunk whose tokens see to its end
            a, e = q // 3, q - q // 4
            lim[a:e] = [n - q + e] * (e - a)
        limit += lim
    limit_t = torch.tensor(limit, dtype=torch.int32, device=DEV)
    out = torch.full_like(b.query, float("nan"))
    nd = b.num_decodes
    paged_attention(b.query, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.qsl, nd, nd, 1.0, out=out,
                    decode=True, window=window)
    paged_attention(b.query, b.k_cache, b.v_cache, b.block_tables[nd:], b.seq_lens[nd:], b.qsl[nd:],
                    len(reqs) - nd, b.num_tokens - b.qsl_cpu[nd], 1.0, out=out, block_m=16, tile_n=16, window=window,
                    kv_limit=limit_t)
    want = reference(b, 1.0, window=window, kv_limit=limit)
    assert_attention_close(out, want, dtype)
    assert not torch.allclose(want, reference(b, 1.0, window=window))  # the bounds matter


def test_prefill_only_and_decode_only():
    check_mixed(4, 2, 32, 8, torch.float32, block_m=16, tile_n=16, reqs=[(30, 30), (17, 40)])
    check_mixed(4, 2, 32, 8, torch.float32, tile_n=16, reqs=[(1, 3), (1, 33)])


def test_empty_rows_give_zero_and_rows_outside_requests_stay_unwritten():
    # CUDA-graph padding: decode rows with seq_len 0 see no key and must give 0, not NaN;
    # rows past the last request are not the kernel's to write.
    b = make_batch([(1, 20), (1, 0), (1, 0)], 4, 2, 32, 8, torch.float32, extra_rows=2)
    out = torch.full_like(b.query, float("nan"))
    for segments in (1, 4):
        run_kernels(b, out, 0.2, segments)
        torch.testing.assert_close(out[:3].cpu().double(), reference(b, 0.2)[:3], rtol=1e-5, atol=1e-5)
        assert (out[1:3] == 0).all() and out[3:].isnan().all()


def _kv_views(t: int, kvh: int, d: int, dtype, g) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as column slices of one fused projection output, as the model hands them over."""
    fused = torch.randn(t, 3 * kvh * d, generator=g).to(dtype).to(DEV)
    return fused[:, kvh * d: 2 * kvh * d].view(t, kvh, d), fused[:, 2 * kvh * d:].view(t, kvh, d)


def check_reshape_and_cache(t, kvh, d, block_size, num_blocks, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    key, value = _kv_views(t, kvh, d, dtype, g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]
    slots[torch.randperm(t, generator=g)[: t // 4]] = -1  # padding rows
    slots = slots.to(DEV)
    kc = torch.randn(num_blocks, block_size, kvh, d, generator=g).to(dtype).to(DEV)
    vc = torch.randn(num_blocks, block_size, kvh, d, generator=g).to(dtype).to(DEV)
    k_ref, v_ref = kc.clone(), vc.clone()
    reshape_and_cache(key, value, kc, vc, slots)
    reshape_and_cache_ref(key, value, k_ref, v_ref, slots)
    assert torch.equal(kc, k_ref) and torch.equal(vc, v_ref)  # written rows exact, the rest untouched


@pytest.mark.parametrize("t, kvh, d, block_size, dtype", [
    (13, 2, 16, 8, torch.float32), (9, 1, 32, 16, torch.bfloat16), (11, 4, 24, 4, torch.float16)])
def test_reshape_and_cache(t, kvh, d, block_size, dtype):
    check_reshape_and_cache(t, kvh, d, block_size, 6, dtype)


def test_backend_matches_torch_backend():
    """TritonAttentionBackend (write_kv + attend) against the reference backend on one step's
    metadata, with trailing padding tokens (slot -1)."""
    from pagedserve.attention.torch_backend import TorchAttentionBackend
    from pagedserve.attention.triton_backend import TritonAttentionBackend

    bs, kvh, d = 8, 2, 32
    b = make_batch(mixed_requests(bs), 8, kvh, d, bs, torch.float32, poison=False, extra_rows=3)
    g = torch.Generator().manual_seed(1)
    t = b.query.shape[0]
    key, value = _kv_views(t, kvh, d, torch.float32, g)
    slots = torch.full((t,), -1, dtype=torch.long)
    for r, (qs, qe) in enumerate(zip(b.qsl_cpu, b.qsl_cpu[1:])):  # the new tokens' own slots
        for i, p in enumerate(range(b.seq_lens_cpu[r] - (qe - qs), b.seq_lens_cpu[r])):
            slots[qs + i] = int(b.block_tables[r, p // bs]) * bs + p % bs
    meta = AttentionMetadata(
        num_tokens=t, num_actual_tokens=b.num_tokens, num_reqs=len(b.seq_lens_cpu), num_decodes=b.num_decodes,
        slot_mapping=slots.to(DEV), block_tables=b.block_tables, seq_lens=b.seq_lens, query_start_loc=b.qsl,
        max_query_len=max(q - p for p, q in zip(b.qsl_cpu, b.qsl_cpu[1:])), max_seq_len=max(b.seq_lens_cpu),
        seq_lens_cpu=b.seq_lens_cpu, query_start_loc_cpu=b.qsl_cpu, block_size=bs)
    outs, caches = [], []
    for backend in (TritonAttentionBackend(), TorchAttentionBackend()):
        kc, vc = b.k_cache.clone(), b.v_cache.clone()
        backend.write_kv(key, value, kc, vc, meta)
        outs.append(backend.attend(b.query, kc, vc, meta, d**-0.5, key, value)[: b.num_tokens])
        caches.append((kc, vc))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_engine_with_triton_backend_matches_transformers(llama_dir, hf_refs):
    """The whole engine on the Triton backend (interpreted on CPU): greedy tokens equal
    transformers' through chunked prefill (64-token budget), decodes and a prefix-cache hit."""
    from conftest import assert_greedy_matches

    from pagedserve import LLM, SamplingParams

    llm = LLM(llama_dir, attention_backend="triton", max_num_batched_tokens=64, block_size=8, dtype="float32")
    assert llm.llm_engine.runner.backend.name == "triton"
    prompts = [[(11 * i + 5 * j) % 1000 + 4 for j in range(n)] for i, n in enumerate((3, 30, 90))]
    prompts.append(prompts[2][:40] + [7, 8, 9])  # shares 5 full blocks with prompt 2
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert_greedy_matches(hf_refs["llama"].greedy(p, 8), o.outputs[0].token_ids)


def test_decode_launch_config_env(monkeypatch):
    """PAGEDSERVE_ATTN_DECODE_CONFIG (what gpu_check sets from its sweep) is parsed strictly
    and changes the decode launch without changing its result."""
    from pagedserve.ops import paged_attention as pa

    assert pa.parse_decode_config(None) is None and pa.parse_decode_config("32,2,4") == (32, 2, 4)
    for bad in ("64,4", "48,4,3", "64,3,3", "x,4,3", "8,4,3"):
        with pytest.raises(ValueError, match="PAGEDSERVE_ATTN_DECODE_CONFIG"):
            pa.parse_decode_config(bad)
    b = make_batch([(1, 45), (1, 7), (1, 70)], 8, 2, 32, 8, torch.float32)
    for cfg in ((16, 2, 2), (128, 4, 4)):
        monkeypatch.setattr(pa, "DECODE_CONFIG", cfg)
        for segments in (1, 2):
            got = torch.full_like(b.query, float("nan"))
            run_kernels(b, got, 0.17, segments)
            assert_attention_close(got, reference(b, 0.17), torch.float32)


def test_decode_segments_heuristic():
    # About two programs per multiprocessor; one segment once the batch fills the GPU.
    from pagedserve.ops.paged_attention import decode_segments

    assert [decode_segments(n, 4, 132) for n in (1, 8, 16, 24, 32, 33, 256)] == [16, 16, 8, 4, 4, 1, 1]


# ---- CUDA: the same checks over the shapes that matter -------------------------------------------

GPU_CASES = [  # (heads, kv_heads, head_dim, block_size, dtype)
    (32, 4, 64, 16, torch.bfloat16),  # the benchmark model's attention
    (32, 8, 128, 16, torch.bfloat16),
    (16, 16, 128, 32, torch.bfloat16),
    (28, 4, 128, 64, torch.bfloat16),  # group 7
    (32, 4, 64, 32, torch.float16),
    (8, 1, 128, 16, torch.float16),
    (32, 4, 64, 16, torch.float32),
    (12, 4, 80, 16, torch.float32),  # non-power-of-two head dim
]


def gpu_requests(bs: int) -> list[tuple[int, int]]:
    return ([(1, n) for n in (1, bs - 1, bs, bs + 1, 100, 513, 1024, 2047)]
            + [(1000, 1000), (317, 317 + 5 * bs), (bs + 1, 900), (64, 64), (3, 1500)])


@pytest.mark.gpu
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size, dtype", GPU_CASES)
def test_attention_gpu(heads, kv_heads, head_dim, block_size, dtype):
    for k_rows in (False, True):
        check_mixed(heads, kv_heads, head_dim, block_size, dtype, reqs=gpu_requests(block_size), seed=1,
                    k_rows=k_rows)


@pytest.mark.gpu
@pytest.mark.parametrize("segments", [2, 16])
def test_decode_split_kv_gpu(segments):
    reqs = [(1, n) for n in (1, 15, 16, 17, 255, 1000, 4097)]
    check_mixed(32, 4, 64, 16, torch.bfloat16, segments=segments, reqs=reqs)
    check_mixed(32, 8, 128, 16, torch.float32, segments=segments, reqs=reqs)


@pytest.mark.gpu
@pytest.mark.parametrize("kvh, d, block_size, dtype", [(4, 64, 16, torch.bfloat16), (8, 128, 32, torch.float16),
                                                       (2, 80, 64, torch.float32)])
def test_reshape_and_cache_gpu(kvh, d, block_size, dtype):
    check_reshape_and_cache(5000, kvh, d, block_size, 600, dtype)
