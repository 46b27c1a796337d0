"""The phases gpu_check.py runs, each in its own process: device ceilings, attention kernel
timings, the issue's workload on pagedserve (with batch-1 decode and a breakdown of where a
step's time goes) and on transformers."""

from __future__ import annotations

import collections
import gc
import random
import statistics
import time
from typing import Any, Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_median(fn: Callable[[], None], device: str, warmup: int, iters: int) -> float:
    """Median seconds of fn, with CUDA events on the GPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def device_rates(device: str, dry: bool) -> dict:
    """bf16 matmul rate (8192^3, random data) and device-to-device copy bandwidth (2 GiB, bytes
    read + written), the ceilings the figures are fractions of."""
    n = 512 if dry else 8192
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    t_mm = time_median(lambda: torch.mm(a, b), device, 3, 20)
    del a, b
    nbytes = (64 << 20) if dry else (2 << 30)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_cp = time_median(lambda: dst.copy_(src), device, 3, 20)
    return {"matmul_n": n, "matmul_dtype": str(dtype), "matmul_tflops": 2 * n**3 / t_mm / 1e12,
            "copy_bytes": nbytes, "copy_gbps": 2 * nbytes / t_cp / 1e9}


KERNEL_CASES = (("decode_b256_ctx800", 256, 800, 1), ("decode_b64_ctx1024", 64, 1024, 1),
                ("decode_b1_ctx1024", 1, 1024, 1), ("prefill_8x1024", 8, 1024, 1024))
DRY_KERNEL_CASES = (("decode_b4_ctx40", 4, 40, 1), ("prefill_2x24", 2, 24, 24))


ATTN_SHAPE = (32, 4, 64, 16)  # query heads, KV heads, head dim, block size: the benchmark model's


def _attention_case(device: str, g: torch.Generator, batch: int, ctx: int, q_len: int) -> tuple:
    """(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc) in bf16 for `batch`
    requests of `ctx` keys each, the last q_len of them queries, pages scattered."""
    hq, kvh, d, bs = ATTN_SHAPE
    nb = batch * -(-ctx // bs)
    kc = torch.randn(nb, bs, kvh, d, device=device, generator=g).to(torch.bfloat16)
    vc = torch.randn(nb, bs, kvh, d, device=device, generator=g).to(torch.bfloat16)
    bt = torch.randperm(nb, device=device, generator=g).to(torch.int32).view(batch, -1)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device) * q_len
    q = torch.randn(batch * q_len, hq, d, device=device, generator=g).to(torch.bfloat16)
    return q, kc, vc, bt, seq_lens, qsl


def kernel_timings(device: str, dry: bool, save: Callable[[dict], None] = lambda res: None) -> dict:
    """The attention kernels alone on the benchmark model's attention shape (32 query heads,
    4 KV heads, head dim 64, bf16, block 16): median time, K/V bytes read once over that time
    (compare with device_rates.copy_gbps) and attention FLOP/s (causal prefill counts half);
    then the decode launch-shape and GEMV sweeps. `save` gets the results so far after each
    part (a phase cut off by its time limit keeps them)."""
    from pagedserve.ops.paged_attention import decode_segments, paged_attention
    from pagedserve.ops.reshape_and_cache import reshape_and_cache

    hq, kvh, d, bs = ATTN_SHAPE
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 4
    g = torch.Generator(device=device).manual_seed(0)
    res: dict[str, Any] = {}
    for name, batch, ctx, q_len in (DRY_KERNEL_CASES if dry else KERNEL_CASES):
        q, kc, vc, bt, seq_lens, qsl = _attention_case(device, g, batch, ctx, q_len)
        nb = kc.shape[0]
        out = torch.empty_like(q)
        decode = q_len == 1
        segs = decode_segments(batch, kvh, sms) if decode else 1

        for k_rows in (False, True):  # the two K-tile layouts (see paged_attention.K_ROWS_DEFAULT)
            def fn():
                paged_attention(q, kc, vc, bt, seq_lens, qsl, batch, batch * q_len, 0.125, out=out, decode=decode,
                                num_segments=segs, k_rows=k_rows)

            ms = _bench_ms(fn, device)
            kv_bytes = 2 * batch * ctx * kvh * d * 2
            flops = 4 * batch * q_len * ctx * hq * d / (1 if decode else 2)
            res[name + ("_krows" if k_rows else "")] = {"ms": ms, "segments": segs, "kv_gbps": kv_bytes / ms / 1e6,
                                                        "tflops": flops / ms / 1e9}
        if not decode:  # the KV write of the same tokens
            k_new = torch.randn(batch * q_len, kvh, d, device=device, generator=g).to(torch.bfloat16)
            slots = torch.randperm(nb * bs, device=device, generator=g)[: batch * q_len]
            ms = _bench_ms(lambda: reshape_and_cache(k_new, k_new, kc, vc, slots), device)
            res[f"reshape_and_cache_{batch * q_len}"] = {"ms": ms, "gbps": 4 * k_new.numel() * 2 / ms / 1e6}
        del kc, vc
    # The engine run takes the layout that is faster on the decode step that dominates it.
    name = (DRY_KERNEL_CASES if dry else KERNEL_CASES)[0][0]
    res["best_k_rows"] = res[name + "_krows"]["ms"] < res[name]["ms"]
    res["argmax"] = argmax_timings(device, dry)
    res["decode_rope"] = decode_rope_timings(device, dry, sms)
    save(res)
    res.update(decode_config_sweep(device, dry, res["best_k_rows"], sms))
    save(res)
    res.update(gemv_sweep(device, dry, save=lambda part: save({**res, **part})))
    return res


def decode_rope_timings(device: str, dry: bool, sms: int) -> dict:
    """A decode step's attention for one layer, as the engine ran it before (the RoPE + KV
    write kernel, then attention) and as it runs now (one kernel, paged_attention's rope),
    each timed as 22 calls in a CUDA graph; and how far apart their outputs are."""
    from pagedserve.ops.paged_attention import DecodeRope, decode_segments, paged_attention
    from pagedserve.ops.rotary import rotary_embedding_and_cache

    hq, kvh, d, bs = ATTN_SHAPE
    g = torch.Generator(device=device).manual_seed(4)
    out: dict[str, Any] = {}
    for batch, ctx in ((2, 40),) if dry else ((1, 1024), (1, 200), (256, 800)):
        q, kc, vc, bt, seq_lens, qsl = _attention_case(device, g, batch, ctx, 1)
        qkv = torch.randn(batch, (hq + 2 * kvh) * d, device=device, generator=g).to(q.dtype)
        qv, kv, vv = (x.view(batch, -1, d) for x in qkv.split([hq * d, kvh * d, kvh * d], dim=-1))
        pos = (seq_lens - 1).long()
        slots = bt[torch.arange(batch, device=device), pos // bs].long() * bs + pos % bs
        cos_sin = torch.randn(ctx, d, device=device, generator=g)
        segs = decode_segments(batch, kvh, sms)
        o_sep, o_fused = torch.empty_like(q), torch.empty_like(q)

        def separate():
            qr, kr = qv.clone(), kv.clone()  # the kernel rotates in place: keep the inputs
            rotary_embedding_and_cache(pos, qr, kr, vv, cos_sin, kc, vc, slots)
            paged_attention(qr, kc, vc, bt, seq_lens, qsl, batch, batch, 0.125, out=o_sep, decode=True,
                            num_segments=segs)

        def fused():
            paged_attention(qv, kc, vc, bt, seq_lens, qsl, batch, batch, 0.125, out=o_fused, decode=True,
                            num_segments=segs, rope=DecodeRope(pos, cos_sin, kv, vv, slots))

        separate()
        fused()
        chain = 2 if dry else GEMV_CHAIN
        t_sep = _bench_chain_ms([separate] * chain, device)
        t_fused = _bench_chain_ms([fused] * chain, device)
        out[f"b{batch}_ctx{ctx}"] = {"separate_ms": t_sep, "fused_ms": t_fused, "speedup": t_sep / t_fused,
                                     "max_abs_diff": float((o_sep.float() - o_fused.float()).abs().max())}
    return out


def argmax_timings(device: str, dry: bool) -> dict:
    """Greedy argmax of 1 and 4 rows of bf16 logits over the model's vocabulary: torch.argmax
    against the Triton kernel (ops/argmax.py), each timed as 22 calls in a CUDA graph."""
    from pagedserve.ops.argmax import argmax_rows

    vocab = 512 if dry else 32000
    dtype = torch.float32 if dry else torch.bfloat16
    out = {}
    for rows in (1, 4):
        xs = [torch.randn(rows, vocab, device=device).to(dtype) for _ in range(2 if dry else GEMV_CHAIN)]
        same = all(argmax_rows(x).tolist() == x.argmax(dim=-1).tolist() for x in xs[:2])
        t_torch = _bench_chain_ms([lambda x=x: x.argmax(dim=-1) for x in xs], device)
        t_triton = _bench_chain_ms([lambda x=x: argmax_rows(x) for x in xs], device)
        out[f"rows{rows}"] = {"torch_ms": t_torch, "triton_ms": t_triton, "speedup": t_torch / t_triton,
                              "same_tokens": same}
    return out


# The benchmark model's projections: (name, out, in, what runs with them). With the GEMV
# kernel qkv and gate_up also take the RMSNorm before them, and down the SiLU-and-mul.
GEMV_LAYERS = (("qkv", 2560, 2048, "norm"), ("o", 2048, 2048, "plain"), ("gate_up", 11264, 2048, "norm"),
               ("down", 2048, 5632, "silu"), ("lm_head", 32000, 2048, "plain"))
# (BLOCK_N, BLOCK_K, warps, stages, dot) per role. The H100 sweeps found the tensor-core path
# (dot 1) 2-10x slower than the CUDA-core one with a norm or SiLU prologue, and BLOCK_K 512+
# or 8 warps slower on it; it won only the plain lm_head. CUDA-core shapes, from sm_90
# builds (registers at one row, norm / SiLU / plain): dot 0 (input read per column) 32
# weight elements per thread, ~168 / 96 / 74; dot 2 (input once, broadcast) with BLOCK_K / 8
# = the program's threads, so that each thread holds every row of its 8 K columns and x
# needs no shuffle (no barrier in the loop): (2, 1024) 56 / 40 / 40 and no spill at four
# rows, (4, 1024) 94 / 64 / 64; (4, 2048, 8 warps) reads a K=2048 slice in one step.
_FMA = ((8, 512, 4, 3, 0), (4, 1024, 4, 2, 0), (16, 1024, 8, 3, 0))
_BCAST = ((2, 1024, 4, 2, 2), (4, 1024, 4, 2, 2), (4, 512, 2, 3, 2), (4, 2048, 8, 1, 2))
GEMV_CONFIGS = {"plain": ((64, 256, 4, 3, 1), (32, 512, 4, 3, 1)) + _FMA + _BCAST,
                "norm": _FMA + _BCAST, "silu": _FMA + _BCAST}
# Distinct weight matrices per layer in a timed chain, as the model has layers: the small
# layers' weights (8-10 MB) would otherwise be read from the 50 MB L2 after the first call.
GEMV_CHAIN = 22


def _pdl_available(device: str) -> bool:
    from pagedserve.ops import pdl

    return device == "cuda" and pdl.gdc_wait is not None and torch.cuda.get_device_capability()[0] >= 9


def _gemv_case(role: str, m: int, k: int, nw: torch.Tensor, dtype: torch.dtype, device: str, g: torch.Generator):
    """(baseline(w), fused(cfg, w), want(w)) for a projection of `role` at m rows: cuBLAS after
    the separate RMSNorm / SiLU-and-mul kernel, the GEMV kernel with that step fused, and the
    float64 reference."""
    from pagedserve.ops.activation import silu_and_mul
    from pagedserve.ops.gemv import gemv
    from pagedserve.ops.reference import rms_norm_ref, silu_and_mul_ref
    from pagedserve.ops.rms_norm import rms_norm

    linear = torch.nn.functional.linear
    x = torch.randn(m, 2 * k if role == "silu" else k, device=device, generator=g).to(dtype)
    res = torch.randn(m, k, device=device, generator=g).to(dtype)
    if role == "norm":
        inp = rms_norm_ref(x, nw, 1e-5, residual=res)[0].double()
        return (lambda w: linear(rms_norm(x, nw, 1e-5, res)[0], w),
                lambda cfg, w: gemv(x, w, None, cfg, norm=(res, nw, 1e-5))[0], lambda w: linear(inp, w.double()))
    if role == "silu":
        inp = silu_and_mul_ref(x).double()
        return (lambda w: linear(silu_and_mul(x), w), lambda cfg, w: gemv(x, w, None, cfg, silu_mul=True),
                lambda w: linear(inp, w.double()))
    return lambda w: linear(x, w), lambda cfg, w: gemv(x, w, None, cfg), lambda w: linear(x.double(), w.double())


def gemv_sweep(device: str, dry: bool, save: Callable[[dict], None] = lambda res: None) -> dict:
    """Each projection as the engine runs it: cuBLAS (F.linear) after the separate RMSNorm /
    SiLU-and-mul kernel, against the Triton GEMV kernel with that step fused, in each launch
    shape at 1 row, without and (where the GPU has it) with PDL (ops/pdl.py: each call's first
    weight tiles load while the call before it finishes); the fastest shape also at 4 rows.
    Each timing is a chain of GEMV_CHAIN calls on distinct weights replayed from one CUDA
    graph, like a decode graph's layers. A shape goes into `gemv_env` (PAGEDSERVE_GEMV for the
    default engine run, no PDL) when it beats the baseline by 3% at 1 row: for up to 4 rows
    if it is not slower at 4 rows, else for batch 1 only (max_rows 1). `gemv_all_env` and
    `gemv_all_pdl_env`: every layer on its fastest shape at 1 row, without and with PDL, won
    or not (the batch-1 variants: with every layer in Triton, PDL can overlap the whole
    chain). Results that disagree with the float64 reference, and shapes that cannot launch,
    are dropped. `save` gets the results so far after each layer."""
    from pagedserve.ops import pdl

    layers = (("a", 40, 64, "norm"), ("b", 64, 96, "silu"), ("c", 48, 64, "plain")) if dry else GEMV_LAYERS
    dtype = torch.float32 if dry else torch.bfloat16
    with_pdl = _pdl_available(device)
    g = torch.Generator(device=device).manual_seed(2)
    table, chosen, every, every_pdl = {}, [], [], []

    def result() -> dict:
        return {"gemv": table, "gemv_env": ";".join(chosen), "gemv_all_env": ";".join(every),
                "gemv_all_pdl_env": ";".join(every_pdl)}

    def timed(row: dict, key: str, fused, ws, want, cfg, use_pdl: bool = False) -> float:
        """The chain's ms per call, inf (with the reason in row["failed"]) when the shape
        cannot launch, is wrong, or (PDL) cannot be captured."""
        saved, pdl.REQUESTED = pdl.REQUESTED, use_pdl  # explicit either way (not a tuned file's choice)
        try:  # a launch shape can need more shared memory than the GPU has
            ref = want(ws[0])
            if (fused(cfg, ws[0]).double() - ref).abs().max() > 2 ** -6 * ref.abs().max():
                row.setdefault("failed", {})[key] = "wrong result"
                return float("inf")
            return _bench_chain_ms([lambda w=w: fused(cfg, w) for w in ws], device)
        except Exception as e:  # noqa: BLE001 (Triton's OutOfResources and kin)
            row.setdefault("failed", {})[key] = f"{type(e).__name__}: {str(e)[:120]}"
            return float("inf")
        finally:
            pdl.REQUESTED = saved

    for name, n, k, role in layers:
        configs = GEMV_CONFIGS[role][:1] + _BCAST[:1] if dry else GEMV_CONFIGS[role]
        copies = 2 if dry else 4 if n * k * 2 > (64 << 20) else GEMV_CHAIN  # lm_head alone outgrows L2
        ws = [torch.randn(n, k, device=device, generator=g).to(dtype) for _ in range(copies)]
        nw = (1 + 0.1 * torch.randn(k, device=device, generator=g)).to(dtype)
        row: dict[str, Any] = {"shape": f"{n}x{k}", "role": role, "chain": copies, "pdl": with_pdl}
        base1, fused1, want1 = _gemv_case(role, 1, k, nw, dtype, device, g)
        row["cublas_m1"] = _bench_chain_ms([lambda w=w: base1(w) for w in ws], device)
        for cfg in configs:
            key = ",".join(map(str, cfg))
            row[f"{key}_m1"] = timed(row, f"{key}_m1", fused1, ws, want1, cfg)
            if with_pdl and row[f"{key}_m1"] < float("inf"):
                row[f"{key}_m1_pdl"] = timed(row, f"{key}_m1_pdl", fused1, ws, want1, cfg, use_pdl=True)

        def best_of(suffix: str) -> tuple[str, float]:
            times = {",".join(map(str, c)): row.get(f"{','.join(map(str, c))}_m1{suffix}", float("inf"))
                     for c in configs}
            best = min(times, key=times.get)
            return best, times[best]

        key, t1 = best_of("")
        row["best"], row["speedup_m1"] = key, row["cublas_m1"] / t1
        nbytes = ws[0].numel() * ws[0].element_size()
        row["weight_gbps_m1"] = {"baseline": nbytes / row["cublas_m1"] / 1e6, "gemv": nbytes / t1 / 1e6}
        if t1 < float("inf"):
            every.append(f"{n}x{k}:{key},1")
            if row["speedup_m1"] > 1.03:  # batch 1 gains; up to 4 rows only if 4 rows do not lose
                base4, fused4, want4 = _gemv_case(role, 4, k, nw, dtype, device, g)
                row["cublas_m4"] = _bench_chain_ms([lambda w=w: base4(w) for w in ws], device)
                cfg = tuple(int(v) for v in key.split(","))
                row[f"{key}_m4"] = timed(row, f"{key}_m4", fused4, ws, want4, cfg)
                row["speedup_m4"] = row["cublas_m4"] / row[f"{key}_m4"]
                chosen.append(f"{n}x{k}:{key},{4 if row['speedup_m4'] >= 1.0 else 1}")
        if with_pdl:
            key_pdl, t_pdl = best_of("_pdl")
            row["best_pdl"], row["speedup_m1_pdl"] = key_pdl, row["cublas_m1"] / t_pdl
            row["weight_gbps_m1"]["gemv_pdl"] = nbytes / t_pdl / 1e6
            if t_pdl < float("inf"):
                every_pdl.append(f"{n}x{k}:{key_pdl},1")
        table[name] = row
        del ws
        save(result())
    return result()


# (TILE_N, num_warps, num_stages) tried for the decode variant; the first is the default
# shape (TILE_N 32 and 4 warps at head dim 64; Triton's default 3 stages).
DECODE_CONFIGS = ((32, 4, 3), (32, 4, 4), (32, 2, 3), (64, 4, 3), (64, 2, 3), (64, 8, 3), (128, 4, 3),
                  (16, 4, 3), (32, 8, 3))


def decode_config_sweep(device: str, dry: bool, k_rows: bool, sms: int) -> dict:
    """The decode kernel at batch 256 x 800 keys (the engine's dominant step) in each launch
    shape: times, and the fastest, which gpu_check passes to the engine run."""
    from pagedserve.ops.paged_attention import decode_segments, paged_attention

    batch, ctx = (4, 40) if dry else (256, 800)
    q, kc, vc, bt, seq_lens, qsl = _attention_case(device, torch.Generator(device=device).manual_seed(1), batch, ctx, 1)
    out, ref = torch.empty_like(q), None
    segs = decode_segments(batch, ATTN_SHAPE[1], sms)
    times = {}
    for tile_n, warps, stages in DECODE_CONFIGS[:2] if dry else DECODE_CONFIGS:
        def fn():
            paged_attention(q, kc, vc, bt, seq_lens, qsl, batch, batch, 0.125, out=out, decode=True,
                            num_segments=segs, k_rows=k_rows, tile_n=tile_n, num_warps=warps, num_stages=stages)

        fn()
        if ref is None:
            ref = out.clone()
        key = f"{tile_n},{warps},{stages}"
        if not torch.allclose(out, ref, rtol=2e-2, atol=2e-2):  # every shape must compute the same thing
            times[key] = float("inf")
            continue
        times[key] = _bench_ms(fn, device)
    best = min(times, key=times.get)
    return {"decode_configs_ms": times, "best_decode_config": best,
            "best_decode_speedup": times[next(iter(times))] / times[best]}


def _bench_chain_ms(calls: list[Callable[[], Any]], device: str) -> float:
    """Milliseconds per call of `calls` run back to back, replayed from one CUDA graph as the
    engine's decode graphs run them (eager timing of a few-microsecond kernel measures its
    launch from Python instead: the first sweep saw every small layer at ~10 us)."""
    if device != "cuda":
        return _bench_ms(lambda: [c() for c in calls], device) / len(calls)
    import triton.testing

    for c in calls:  # compiles, and cuBLAS picks its kernels, outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    ms = triton.testing.do_bench(graph.replay, warmup=5, rep=20, return_mode="median") / len(calls)
    del graph
    return ms


def _bench_ms(fn: Callable[[], None], device: str, rep: int = 100) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=min(25, rep), rep=rep, return_mode="median")
    return 1000 * time_median(fn, device, 1, 2)


def workload(ns) -> list:
    from transformers import AutoConfig

    from pagedserve.bench.datasets import random_requests

    cfg = AutoConfig.from_pretrained(ns.model_dir, local_files_only=True)
    special = tuple(t for t in (cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id) if isinstance(t, int))
    return random_requests(ns.num_prompts, 0, ns.output_len, cfg.vocab_size, input_min=ns.input_min,
                           input_max=ns.input_max, output_min=ns.output_len, output_max=ns.output_len, seed=0,
                           special_ids=special)


def run_pagedserve(model: str, reqs, ns) -> dict:
    from pagedserve import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model, dtype=ns.dtype, seed=0)
    init_s = time.perf_counter() - t
    runner = llm.llm_engine.runner
    params = sum(p.numel() for p in runner.model.parameters())
    embed = runner.model.model.embed_tokens.weight
    info: dict[str, Any] = {
        "init_s": init_s, "params": params, **kernel_settings(runner.device), "dtype": str(runner.config.dtype),
        "backend": runner.backend.name,
        "cuda_graphs": runner.graphs is not None and runner.graphs.use_graphs,
        "graph_sizes": runner.graphs.sizes if runner.graphs is not None else None,
        "num_kv_blocks": runner.config.num_gpu_blocks, "block_size": runner.config.block_size,
        "max_num_seqs": runner.config.max_num_seqs, "max_num_batched_tokens": runner.config.max_num_batched_tokens,
        "weight_bytes_per_token": (params - embed.numel()) * embed.element_size()}
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    # Warm-up: compiles the prefill kernel and exercises mixed steps; then a clean prefix cache.
    llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.kv.reset_prefix_cache()
    sps = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
    steps = _StepTimer(llm.llm_engine)
    steps.take(ns.device)  # the allocator's state before the timed runs
    compiled = triton_variants()
    info["async_scheduling"] = llm.llm_engine.async_scheduling

    def timed_run() -> tuple[float, list]:
        llm.llm_engine.kv.reset_prefix_cache()
        sync(ns.device)
        t = time.perf_counter()
        outs = llm.generate(prompts, sps, use_tqdm=False)
        sync(ns.device)
        return time.perf_counter() - t, outs

    info["elapsed_s"], outs = timed_run()  # the engine's default mode (async on CUDA)
    info["triton_variants_before_after"] = [compiled, triton_variants()]  # equal: no compile while timed
    info["steps"] = steps.count
    info["step_times"] = {"first_run": steps.take(ns.device)}
    info["output_tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
    info["input_tokens"] = sum(r.prompt_len for r in reqs)
    info["output_tokens_per_s"] = info["output_tokens"] / info["elapsed_s"]
    # The same run in each scheduling mode, for the ratio (same engine, same process); the
    # batches are the same step for step (ignore_eos, fixed lengths), so are the tokens.
    runs = both_modes(llm, lambda: (timed_run(), steps.take(ns.device)))
    info["step_times"].update({f"{mode}_run": st for mode, (_, st) in runs.items()})
    runs = {mode: r for mode, (r, _) in runs.items()}
    steps.close()
    info["elapsed_s_by_mode"] = {mode: t for mode, (t, _) in runs.items()}
    info["async_sync_tokens_equal"] = [o.outputs[0].token_ids for o in runs["async"][1]] == \
        [o.outputs[0].token_ids for o in runs["sync"][1]]
    del runs
    info["batch1"] = batch1_decode(llm, vocab=runner.config.vocab_size, steps=ns.batch1_tokens)
    info["batch1_by_mode"] = both_modes(llm, lambda: batch1_decode(llm, runner.config.vocab_size, ns.batch1_tokens))
    vocab = runner.config.vocab_size
    info["breakdown"] = {}
    for batch, plen in ((min(256, runner.config.max_num_seqs), 512), (1, 128)):
        if ns.dry_run:
            batch, plen = min(batch, 4), 16
        info["breakdown"][f"decode_b{batch}_p{plen}"] = step_breakdown(llm, batch, plen, vocab, ns.device,
                                                                      steps=8 if ns.dry_run else 30)
    info["profile_prefill"] = prefill_profile(llm, vocab, ns.device, n=2 if ns.dry_run else 8,
                                              plen=16 if ns.dry_run else 1024)
    del llm, runner, outs
    gc.collect()
    return info


def kernel_settings(device: torch.device) -> dict:
    """The kernel settings an engine on `device` runs with (environment, else the GPU model's
    tuned file, else built-in), and the tuned file found, if any."""
    from pagedserve.ops import gemv, paged_attention as pa, pdl, tuned

    return {"gemv_shapes": {f"{n}x{k}": c for (n, k), c in gemv.shapes_for(device).items()},
            "pdl": pdl.pdl_enabled(device),
            "attn_k_rows": tuned.resolve(pa.K_ROWS, "attn_k_rows", device, pa.K_ROWS_DEFAULT),
            "attn_decode_config": tuned.resolve(pa.DECODE_CONFIG, "attn_decode_config", device, None),
            "tuned_file": tuned.file_name(torch.cuda.get_device_name(device)) if tuned.for_device(device) else None}


def triton_variants() -> dict:
    """Compiled variants of each Triton kernel so far (a compile inside a timed region shows
    as a change)."""
    from pagedserve.ops import activation, argmax, gemv, paged_attention, reshape_and_cache, rms_norm, rotary

    kernels = {"attention": paged_attention._paged_attention_kernel,
               "kv_write": reshape_and_cache._reshape_and_cache_kernel, "rms_norm": rms_norm._rms_norm_kernel,
               "rotary": rotary._rotary_kernel, "rotary_kv_write": rotary._rotary_and_cache_kernel,
               "gemv": gemv._gemv_kernel, "argmax": argmax._argmax_kernel,
               "silu_mul": activation._silu_and_mul_kernel}
    out = {}
    for name, k in kernels.items():
        try:
            out[name] = sum(len(c[0]) for c in k.device_caches.values())
        except Exception:  # the interpreter, or another Triton layout
            out[name] = None
    return out


class _StepTimer:
    """Wraps eng.step: counts calls and keeps each call's wall time since the last take()."""

    def __init__(self, eng) -> None:
        self.eng, self.count, self.times, step = eng, 0, [], eng.step

        def timed():
            t = time.perf_counter()
            out = step()
            self.times.append(time.perf_counter() - t)
            self.count += 1
            return out

        eng.step = timed

    def close(self) -> None:
        """Unwrap: later measurements (batch 1, the breakdown) call the engine's own step."""
        del self.eng.step

    def take(self, device: str) -> dict:
        """The step() calls since the last take: how many, their total and spread, the slowest
        (which call, ms), and CUDA allocator growth over them (a first run that is slower than
        the next shows up here as a few slow steps or new device segments)."""
        times, self.times = self.times, []
        res: dict[str, Any] = {}
        if times:
            ranked = sorted(range(len(times)), key=times.__getitem__, reverse=True)
            res = {"calls": len(times), "total_s": sum(times), "median_ms": 1000 * statistics.median(times),
                   "slowest_ms": [(i, round(1000 * times[i], 2)) for i in ranked[:8]]}
        if device == "cuda":
            stats = torch.cuda.memory_stats()
            res["device_segments"] = stats.get("segment.all.allocated", 0)
            res["device_reserved_bytes"] = stats.get("reserved_bytes.all.current", 0)
        return res


def _random_prompt(rng: random.Random, n: int, vocab: int) -> dict:
    return {"prompt_token_ids": [rng.randrange(4, vocab) for _ in range(n)]}


def batch1_decode(llm, vocab: int, steps: int) -> dict:
    """One request, 128-token prompt: once its first token is back, the wall time to its last
    over the tokens in between (with async scheduling a step() call returns one step late,
    so per-call times are not per-token times), and the median step() call."""
    from pagedserve import SamplingParams

    eng = llm.llm_engine
    rng = random.Random(1)
    res: dict[str, Any] = {"prompt_len": 128, "async_scheduling": eng.async_scheduling}
    for rep in range(2):  # the first repetition is a warm-up
        rid = f"b1-{eng.async_scheduling}-{rep}"
        eng.add_request(rid, _random_prompt(rng, 128, vocab),
                        SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
        req = eng.scheduler.requests[rid]
        while req.num_output_tokens < 1:  # prefill and first token
            eng.step()
        sync("cuda" if torch.cuda.is_available() else "cpu")
        first, times = req.num_output_tokens, []
        t0 = time.perf_counter()
        while eng.has_unfinished_requests():
            t = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        res.update(decode_tokens=req.num_output_tokens - first, step_calls=len(times),
                   s_per_token=total / (req.num_output_tokens - first), step_s_median=statistics.median(times),
                   tokens=list(req.output_token_ids))
    return res


def batch1_variant(model: str, ns) -> dict:
    """Batch-1 decode alone, on an engine built under this process's PAGEDSERVE_GEMV and
    PAGEDSERVE_PDL (gpu_check sets them per variant: they are read at import)."""
    from pagedserve import LLM

    llm = LLM(model, dtype=ns.dtype, seed=0, max_num_seqs=4)  # graphs for batch 1, 2 and 4 only
    runner = llm.llm_engine.runner
    res = {**kernel_settings(runner.device),
           "batch1": batch1_decode(llm, vocab=runner.config.vocab_size, steps=ns.batch1_tokens)}
    # Where its time goes: the kernels of three decode steps at batch 1.
    ids = _decoding_batch(llm, 1, 128, runner.config.vocab_size, 16, "b1v")
    res["profile"] = profile_table(lambda: [llm.llm_engine.step() for _ in range(3)], ns.device, rows=20)
    llm.llm_engine.abort_request(ids)
    del llm, runner
    gc.collect()
    return res


def both_modes(llm, fn: Callable[[], Any]) -> dict:
    """fn() with async scheduling on, then off (the same engine: the mode is read per step)."""
    eng = llm.llm_engine
    default = eng.async_scheduling
    out = {}
    for mode in (True, False):
        eng.async_scheduling = mode
        out["async" if mode else "sync"] = fn()
    eng.async_scheduling = default
    return out


def _decoding_batch(llm, batch: int, plen: int, vocab: int, max_tokens: int, tag: str) -> list[str]:
    """`batch` requests past their prefill (every later step is decode-only)."""
    from pagedserve import SamplingParams

    eng = llm.llm_engine
    rng = random.Random(2)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for rid in ids:
        eng.add_request(rid, _random_prompt(rng, plen, vocab),
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    sched = eng.scheduler
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        eng.step()
    return ids


def step_breakdown(llm, batch: int, plen: int, vocab: int, device: str, steps: int) -> dict:
    """Decode-only steps of `batch` requests: wall ms per step with CUDA graphs and eagerly,
    then each part of a step timed alone (a sync after every GPU part), and a profiler table
    of the GPU kernels."""
    eng = llm.llm_engine
    runner = eng.runner
    ids = _decoding_batch(llm, batch, plen, vocab, 6 * steps + 16, f"bd{batch}")

    def wall(n: int) -> float:
        eng.step()
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            eng.step()
        sync(device)
        return 1000 * (time.perf_counter() - t) / n

    res: dict[str, Any] = {"batch": batch, "prompt_len": plen, "ms_per_step": wall(steps),
                           "ms_per_step_by_mode": both_modes(llm, lambda: wall(steps))}
    graphs, runner.graphs = runner.graphs, None
    res["ms_per_step_eager"] = wall(steps)
    runner.graphs = graphs
    parts: dict[str, float] = collections.defaultdict(float)
    undo = []

    def wrap(obj, name: str, label: str, gpu: bool) -> None:
        f = getattr(obj, name)
        undo.append((obj, name, f, name in vars(obj)))

        def timed(*a, **k):
            t = time.perf_counter()
            r = f(*a, **k)
            if gpu:
                sync(device)
            parts[label] += time.perf_counter() - t
            return r

        setattr(obj, name, timed)

    wrap(eng.scheduler, "schedule", "schedule", False)
    wrap(runner, "_host_inputs", "host_inputs", False)
    wrap(runner, "_forward", "forward (gpu)", True)
    wrap(runner.model, "compute_logits", "logits (gpu)", True)
    wrap(runner.sampling_states, "build", "sampling_batch", False)
    wrap(runner, "sampler", "sampler (gpu)", True)
    wrap(runner, "_collect_samples", "collect_samples", False)
    wrap(eng.scheduler, "update_from_output", "update", False)
    wrap(eng.output_processor, "process", "process_outputs", False)
    total = wall(steps)
    for obj, name, f, own in undo:  # an instance attribute goes back; a method's shadow goes away
        if own:
            setattr(obj, name, f)
        else:
            delattr(obj, name)
    res["parts_ms"] = {k: 1000 * v / (steps + 1) for k, v in parts.items()}
    res["parts_ms"]["total_synced"] = total
    res["parts_ms"]["other"] = total - sum(v for k, v in res["parts_ms"].items() if k != "total_synced")
    res["profile"] = profile_table(lambda: [eng.step() for _ in range(3)], device)
    eng.abort_request(ids)
    return res


def prefill_profile(llm, vocab: int, device: str, n: int, plen: int) -> dict:
    """One step of n fresh prompts (n * plen tokens): wall ms and a profiler table."""
    eng = llm.llm_engine
    from pagedserve import SamplingParams

    rng = random.Random(3)
    res: dict[str, Any] = {"tokens": n * plen}
    for label in ("timed", "profiled"):
        ids = [f"pf-{label}-{i}" for i in range(n)]
        for rid in ids:
            eng.add_request(rid, _random_prompt(rng, plen, vocab), SamplingParams(max_tokens=2, ignore_eos=True))
        if label == "timed":
            sync(device)
            t = time.perf_counter()
            eng.step()
            sync(device)
            res["ms"] = 1000 * (time.perf_counter() - t)
        else:
            res["profile"] = profile_table(eng.step, device)
        eng.abort_request(ids)
    return res


def profile_table(fn: Callable[[], Any], device: str, rows: int = 14) -> str:
    """torch.profiler's per-kernel table (GPU time) of fn, printed and returned."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    except Exception:  # older/newer key names
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows,
                                          max_name_column_width=60)
    print(table, flush=True)
    return table


def run_hf(model: str, reqs, ns) -> dict:
    from pagedserve.bench.hf_backend import hf_generate_batch, load_hf_model, run_hf as run_batches

    dtype = getattr(torch, ns.dtype)
    hf, _, pad = load_hf_model(model, dtype, ns.device)
    hf_generate_batch(hf, reqs[:2], pad, ns.device, max_new_tokens=4)  # warm-up
    elapsed = run_batches(hf, reqs, ns.hf_batch_size, hf.config.max_position_embeddings, pad, ns.device,
                          progress=False)
    out_tokens = sum(r.output_len for r in reqs)
    return {"elapsed_s": elapsed, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / elapsed,
            "batch_size": ns.hf_batch_size, "transformers": __import__("transformers").__version__}
