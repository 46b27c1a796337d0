"""The phases gpu_check.py runs, each in its own process: device ceilings, the issue's
workload on pagedserve (with batch-1 decode and a breakdown of where a step's time goes) and
on transformers. The kernels phase is gpu_kernels.py."""

from __future__ import annotations

import collections
import gc
import random
import statistics
import time
from typing import Any, Callable

import torch

from gpu_timing import sync, time_median


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


def speculative_batch1(model: str, ns) -> dict:
    """Batch-1 greedy decode of a repetitive prompt (a 32-token phrase four times): plain; with
    n-gram drafts (k = 3; on CUDA the verification steps replay their own graphs); and with
    an oracle proposing the plain run's own next 3 tokens, so that every draft stands (what
    verification costs at full acceptance). Wall time per output token, the drafts that stood,
    and whether the tokens are the plain run's."""
    from pagedserve import LLM, SamplingParams
    from pagedserve.engine.ngram import NgramProposer, SpeculativeConfig

    class Oracle(NgramProposer):
        def __init__(self, tokens: list[int]) -> None:
            super().__init__(SpeculativeConfig(num_speculative_tokens=3))
            self.tokens = tokens

        def propose(self, req, max_tokens: int) -> list[int]:
            done = len(req.output_token_ids)
            return self.tokens[done:done + min(3, max_tokens)]

    prompt = {"prompt_token_ids": [(7 * j) % 500 + 10 for j in range(32)] * 4}
    sp = SamplingParams(temperature=0, max_tokens=ns.batch1_tokens, ignore_eos=True)
    res: dict[str, Any] = {"prompt_len": 128, "output_len": ns.batch1_tokens}
    ngram = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3}}
    for name, kw in (("plain", {}), ("ngram_k3", ngram), ("oracle_k3", ngram)):
        llm = LLM(model, dtype=ns.dtype, seed=0, max_num_seqs=4, **kw)
        sched, runner = llm.llm_engine.scheduler, llm.llm_engine.runner
        if name == "oracle_k3":
            sched.proposer = Oracle(res["plain"]["tokens"])
        llm.generate([prompt], sp, use_tqdm=False)  # warm-up (compiles)
        drafted, accepted = sched.num_draft_tokens, sched.num_accepted_tokens
        sync(ns.device)
        t = time.perf_counter()
        out = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
        sync(ns.device)
        res[name] = {"s_per_token": (time.perf_counter() - t) / len(out.token_ids), "tokens": list(out.token_ids),
                     "draft_tokens": sched.num_draft_tokens - drafted,
                     "accepted_tokens": sched.num_accepted_tokens - accepted,
                     "verify_graphs": runner.verify_graphs is not None and runner.verify_graphs.use_graphs}
        del llm, runner, sched
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for name in ("ngram_k3", "oracle_k3"):
        res[f"{name}_speedup"] = res["plain"]["s_per_token"] / res[name]["s_per_token"]
        res[f"{name}_tokens_equal"] = res["plain"]["tokens"] == res[name]["tokens"]
    return res


# A Qwen3.5-shaped hybrid (Gated DeltaNet in three layers of four, gated attention in the
# fourth), ~0.5B parameters, random bf16 weights; tiny for --dry-run.
HYBRID_MODEL = dict(hidden_size=1024, intermediate_size=3072, num_layers=16, num_heads=8, num_kv_heads=2, head_dim=128,
                    linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=128,
                    linear_value_head_dim=128, vocab_size=32000, max_position_embeddings=4096, tokenizer_vocab=2048)
HYBRID_DRY = dict(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                  vocab_size=2048, max_position_embeddings=512, tokenizer_vocab=512)


def hybrid(ns) -> dict:
    """Not a goal of issue 6: the hybrid path on the GPU. Output tokens/s on the issue's kind of
    workload (its request count and lengths), batch-1 decode, whether decode ran in CUDA
    graphs, and a prefix-cache hit resuming from a saved state against the same prompt cold."""
    import os

    from pagedserve import LLM, SamplingParams
    from pagedserve.bench.datasets import random_requests
    from pagedserve.model.random_model import build_random_model

    shape = HYBRID_DRY if ns.dry_run else HYBRID_MODEL
    path = os.path.join("/tmp", "pagedserve-hybrid-dry" if ns.dry_run else "pagedserve-hybrid-qwen3_5")
    layers = ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * (shape["num_layers"] // 4)
    if not os.path.isfile(os.path.join(path, ".complete")):
        build_random_model(path, "Qwen3_5ForCausalLM", seed=0, dtype=ns.dtype, layer_types=layers, **shape)
        open(os.path.join(path, ".complete"), "w").close()
    llm = LLM(path, dtype=ns.dtype, seed=0)
    runner = llm.llm_engine.runner
    res: dict[str, Any] = {"shape": shape, "params": sum(p.numel() for p in runner.model.parameters()),
                           "cuda_graphs": runner.graphs is not None and runner.graphs.use_graphs}
    reqs = random_requests(ns.num_prompts, 0, ns.output_len, shape["vocab_size"], input_min=ns.input_min,
                           input_max=ns.input_max, output_min=ns.output_len, output_max=ns.output_len, seed=0,
                           special_ids=(0, 1, 2, 3))
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.kv.reset_prefix_cache()
    sync(ns.device)
    t = time.perf_counter()
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
                                  for r in reqs], use_tqdm=False)
    sync(ns.device)
    res["elapsed_s"] = time.perf_counter() - t
    res["output_tokens_per_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / res["elapsed_s"]
    res["batch1"] = batch1_decode(llm, vocab=shape["vocab_size"], steps=ns.batch1_tokens)
    res["batch1"].pop("tokens", None)
    # A long prompt cold, then the same prompt plus a new tail: the second resumes from a state
    # saved inside the first's prefill.
    rng = random.Random(2)
    base = [rng.randrange(4, shape["vocab_size"]) for _ in range(2000 if not ns.dry_run else 300)]
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for tag, prompt in (("cold", base + [5]), ("hit", base + [6, 7])):
        sync(ns.device)
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], one, use_tqdm=False)[0]
        sync(ns.device)
        res[f"prefill_{tag}_s"], res[f"prefill_{tag}_cached_tokens"] = time.perf_counter() - t, out.num_cached_tokens
    res["state_layer_decode"] = state_layer_decode(runner, shape["hidden_size"], ns)
    return res


def state_layer_decode(runner, hidden: int, ns) -> dict:
    """One Gated DeltaNet layer (eager, outside the engine) with its Triton kernels
    (ops/state_decode.py, ops/gated_norm.py, ops/chunk_scan.py) against the same layer on its
    PyTorch twins: a decode step at a few batch sizes, one prompt's prefill, and a speculative
    verification of 16 requests x 4 tokens (the kernels' one-call form, to set against 4
    decode steps of 16); median microseconds and the ratios."""
    import types

    from pagedserve.attention.backend import StateRows

    layer = runner.state_layers[0]
    switches = [m for m in layer.modules() if hasattr(m, "use_triton")]
    dtype = runner.config.dtype
    out: dict[str, Any] = {"layer": type(layer).__name__}

    def both(tag: str, meta, tokens: int) -> None:
        """The layer over `tokens` rows of meta, on its kernels and on its twins."""
        x = torch.randn(tokens, hidden, device=ns.device).to(dtype)
        pos = torch.zeros(tokens, dtype=torch.long, device=ns.device)
        for use in (True, False):
            for m in switches:
                m.use_triton = use
            with torch.inference_mode():
                us = time_median(lambda: layer(pos, x, meta), ns.device, *((1, 2) if ns.dry_run else (5, 30))) * 1e6
            out[f"{tag}_{'triton' if use else 'torch'}_us"] = us
        out[f"{tag}_speedup"] = out[f"{tag}_torch_us"] / out[f"{tag}_triton_us"]

    prompt = 128 if ns.dry_run else 2048
    for batch in (1, 16, 64, 0):  # 0: the prefill
        n, tokens = (batch, batch) if batch else (1, prompt)
        states = StateRows(torch.arange(n, device=ns.device), torch.ones(n, device=ns.device), list(range(n)),
                           [bool(batch)] * n)
        both(f"b{batch}" if batch else f"prefill{prompt}",
             types.SimpleNamespace(states=states, num_decodes=batch, num_reqs=n, seq_lens_cpu=[tokens] * n,
                                   query_start_loc_cpu=list(range(n + 1)) if batch else [0, tokens]), tokens)
    # A verification (StateMixer._verify_rows), the layer's snapshots swapped for
    # verification slots meanwhile.
    n, q = 16, 4
    saved = layer.snapshots, layer.verify_base, layer.verify_k
    layer.allocate_snapshots(0, n, q - 1)
    states = StateRows(torch.arange(n, device=ns.device), torch.ones(n, device=ns.device), list(range(n)),
                       [True] * n, verify=n)
    both(f"verify{n}x{q}", types.SimpleNamespace(states=states, num_decodes=0, num_reqs=n, max_query_len=q,
                                                 seq_lens_cpu=[64] * n,
                                                 query_start_loc_cpu=list(range(0, n * q + 1, q))), n * q)
    layer.snapshots, layer.verify_base, layer.verify_k = saved
    for m in switches:
        m.use_triton = True
    return out
