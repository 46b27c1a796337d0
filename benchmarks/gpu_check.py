"""Issue 6 in one command for a session with a GPU: the GPU tests, the device's two ceilings,
and the issue's figures on its ~1.1B Llama-shaped random model, all in one process. Writes
gpu_check.json (rewritten after every phase, so a run cut short still leaves what it
measured), the pytest log and junit XML under --out ($OUT on the device machine).

    bash benchmarks/gpu_check.sh              # the full check (tests + workload as the issue states it)
    bash benchmarks/gpu_check.sh --quick      # smoke: 64 requests x 32 output tokens, figures not comparable
    python benchmarks/gpu_check.py --dry-run  # CPU: a tiny model and workload, checks this script end to end

Figures (the issue's goals in brackets):
  throughput_ratio   pagedserve output tok/s over transformers' static-batch generate
                     (batches of 64, left padding) on the same requests  [>= 15]
  e2e_efficiency     2 * params * (input + output tokens) / pagedserve wall time, over the
                     measured bf16 matmul rate (torch, 8192^3)  [>= 0.30]
  batch1_bw_fraction weight bytes read per token (all weights but the embedding table, of
                     which a token reads one row) / batch-1 decode step time, over the measured
                     device-to-device copy bandwidth (bytes read + written)  [>= 0.60]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ISSUE_MODEL = dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                   vocab_size=32000, max_position_embeddings=2048, tokenizer_vocab=2048)
DRY_MODEL = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 vocab_size=2048, max_position_embeddings=512, tokenizer_vocab=512)
GPU_TEST_FILES = ["tests/test_triton_kernels.py", "tests/test_cuda_graphs.py", "tests/test_gpu_engine.py"]
GOALS = {"throughput_ratio": 15.0, "e2e_efficiency": 0.30, "batch1_bw_fraction": 0.60}


class Report:
    """The JSON record, rewritten after each phase."""

    def __init__(self, path: str, record: dict) -> None:
        self.path, self.record, self.t0 = path, record, time.perf_counter()

    def phase(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"== {name} ({time.perf_counter() - self.t0:.0f} s in)", flush=True)
        t = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # a failed phase is a result too; later phases may still run
            result = {"error": f"{type(e).__name__}: {e}"}
            print(f"   {name} failed: {result['error']}", flush=True)
        self.record.setdefault("phase_seconds", {})[name] = round(time.perf_counter() - t, 2)
        self.record[name] = result
        self.save()
        return result

    def save(self) -> None:
        self.record["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        with open(self.path, "w") as f:
            json.dump(self.record, f, indent=2, sort_keys=True, default=str)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_median(fn: Callable[[], None], device: str, warmup: int, iters: int) -> float:
    """Median seconds of fn, with CUDA events on the GPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
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
    t_mm = _time_median(lambda: torch.mm(a, b), device, 3, 20)
    del a, b
    nbytes = (64 << 20) if dry else (2 << 30)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_cp = _time_median(lambda: dst.copy_(src), device, 3, 20)
    del src, dst
    return {"matmul_n": n, "matmul_dtype": str(dtype), "matmul_tflops": 2 * n**3 / t_mm / 1e12,
            "copy_bytes": nbytes, "copy_gbps": 2 * nbytes / t_cp / 1e9}


def gpu_tests(out_dir: str, timeout_s: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE",
           f"--junitxml={os.path.join(out_dir, 'junit_gpu.xml')}", *GPU_TEST_FILES]
    log = os.path.join(out_dir, "pytest_gpu.log")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    lines = open(log).read().splitlines()
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or " error" in ln
                    or " skipped" in ln), lines[-1] if lines else "")
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return {"returncode": rc, "summary": summary.strip("= "), "failures": failures[:30]}


KERNEL_CASES = (("decode_b256_ctx800", 256, 800, 1), ("decode_b1_ctx1024", 1, 1024, 1), ("prefill_8x1024", 8, 1024, 1024))
DRY_KERNEL_CASES = (("decode_b4_ctx40", 4, 40, 1), ("prefill_2x24", 2, 24, 24))


def kernel_timings(device: str, cases) -> dict:
    """The attention kernels alone on the benchmark model's attention shape (32 query heads,
    4 KV heads, head dim 64, bf16, block 16): median time, K/V bytes read once over that time
    (compare with device_rates.copy_gbps) and attention FLOP/s (causal prefill counts half)."""
    from pagedserve.ops.paged_attention import decode_segments, paged_attention

    hq, kvh, d, bs = 32, 4, 64, 16
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 4
    g = torch.Generator(device=device).manual_seed(0)
    res = {}
    for name, batch, ctx, q_len in cases:
        nb = batch * -(-ctx // bs)
        kc = torch.randn(nb, bs, kvh, d, device=device, generator=g).to(torch.bfloat16)
        vc = torch.randn(nb, bs, kvh, d, device=device, generator=g).to(torch.bfloat16)
        bt = torch.randperm(nb, device=device, generator=g).to(torch.int32).view(batch, -1)
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=device) * q_len
        q = torch.randn(batch * q_len, hq, d, device=device, generator=g).to(torch.bfloat16)
        out = torch.empty_like(q)
        decode = q_len == 1
        segs = decode_segments(batch, kvh, sms) if decode else 1

        def fn():
            paged_attention(q, kc, vc, bt, seq_lens, qsl, batch, batch * q_len, 0.125, out=out, decode=decode,
                            num_segments=segs)

        if device == "cuda":
            import triton.testing

            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        else:
            ms = 1000 * _time_median(fn, device, 1, 2)
        kv_bytes = 2 * batch * ctx * kvh * d * 2
        flops = 4 * batch * q_len * ctx * hq * d / (1 if decode else 2)
        res[name] = {"ms": ms, "segments": segs, "kv_gbps": kv_bytes / ms / 1e6, "tflops": flops / ms / 1e9}
        del kc, vc
    return res


def build_model(path: str, dry: bool) -> dict:
    from pagedserve.model.random_model import build_random_model

    shape = DRY_MODEL if dry else ISSUE_MODEL
    if not os.path.isfile(os.path.join(path, "config.json")):
        build_random_model(path, "LlamaForCausalLM", seed=0, dtype="float32" if dry else "bfloat16", **shape)
    return {"path": path, "shape": shape}


def workload(vocab: int, special: tuple[int, ...], ns) -> list:
    from pagedserve.bench.datasets import random_requests

    return random_requests(ns.num_prompts, 0, ns.output_len, vocab, input_min=ns.input_min, input_max=ns.input_max,
                           output_min=ns.output_len, output_max=ns.output_len, seed=0, special_ids=special)


def run_pagedserve(model: str, reqs, ns, dtype: str) -> dict:
    from pagedserve import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, seed=0)
    runner = llm.llm_engine.runner
    params = sum(p.numel() for p in runner.model.parameters())
    embed = runner.model.model.embed_tokens.weight
    info = {"params": params, "dtype": str(runner.config.dtype), "backend": runner.backend.name,
            "cuda_graphs": runner.graphs is not None and runner.graphs.use_graphs,
            "num_kv_blocks": runner.config.num_gpu_blocks, "block_size": runner.config.block_size,
            "max_num_seqs": runner.config.max_num_seqs, "max_num_batched_tokens": runner.config.max_num_batched_tokens,
            "weight_bytes_per_token": (params - embed.numel()) * embed.element_size()}
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    # Warm-up: compiles the prefill kernel and exercises mixed steps; then a clean prefix cache.
    llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.kv.reset_prefix_cache()
    sps = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
    _sync(ns.device)
    t = time.perf_counter()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    _sync(ns.device)
    info["elapsed_s"] = time.perf_counter() - t
    info["output_tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
    info["input_tokens"] = sum(r.prompt_len for r in reqs)
    info["output_tokens_per_s"] = info["output_tokens"] / info["elapsed_s"]
    info["batch1"] = batch1_decode(llm, vocab=runner.config.vocab_size, steps=ns.batch1_tokens)
    del llm, runner, outs
    gc.collect()
    if ns.device == "cuda":
        torch.cuda.empty_cache()
        info["cuda_allocated_after_free"] = torch.cuda.memory_allocated()
    return info


def batch1_decode(llm, vocab: int, steps: int) -> dict:
    """One request, 128-token prompt: wall time of each engine step after the prefill."""
    from pagedserve import SamplingParams

    eng = llm.llm_engine
    rng = random.Random(1)
    times = []
    for rep in range(2):  # the first repetition is a warm-up
        eng.add_request(f"b1-{rep}", {"prompt_token_ids": [rng.randrange(4, vocab) for _ in range(128)]},
                        SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
        eng.step()  # prefill + first token
        while eng.has_unfinished_requests():
            t = time.perf_counter()
            eng.step()  # step() returns after the sampled token reached the host
            if rep:
                times.append(time.perf_counter() - t)
    return {"prompt_len": 128, "decode_steps": len(times), "step_s_median": statistics.median(times),
            "step_s_mean": statistics.fmean(times)}


def run_hf(model: str, reqs, ns, dtype: torch.dtype) -> dict:
    from pagedserve.bench.hf_backend import hf_generate_batch, load_hf_model, run_hf as run_batches

    hf, _, pad = load_hf_model(model, dtype, ns.device)
    hf_generate_batch(hf, reqs[:2], pad, ns.device, max_new_tokens=4)  # warm-up
    elapsed = run_batches(hf, reqs, ns.hf_batch_size, hf.config.max_position_embeddings, pad, ns.device,
                          progress=False)
    out_tokens = sum(r.output_len for r in reqs)
    del hf
    gc.collect()
    if ns.device == "cuda":
        torch.cuda.empty_cache()
    return {"elapsed_s": elapsed, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / elapsed,
            "batch_size": ns.hf_batch_size}


def figures(rec: dict) -> dict:
    rates, ps, hf = rec.get("device_rates", {}), rec.get("pagedserve", {}), rec.get("hf", {})
    fig: dict = {}
    if "output_tokens_per_s" in ps and "output_tokens_per_s" in hf:
        fig["throughput_ratio"] = ps["output_tokens_per_s"] / hf["output_tokens_per_s"]
    if "elapsed_s" in ps and "matmul_tflops" in rates:
        flops = 2 * ps["params"] * (ps["input_tokens"] + ps["output_tokens"])
        fig["e2e_tflops"] = flops / ps["elapsed_s"] / 1e12
        fig["e2e_efficiency"] = fig["e2e_tflops"] / rates["matmul_tflops"]
    b1 = ps.get("batch1", {})
    if "step_s_median" in b1 and "copy_gbps" in rates:
        fig["batch1_ms_per_token"] = 1000 * b1["step_s_median"]
        fig["batch1_weight_gbps"] = ps["weight_bytes_per_token"] / b1["step_s_median"] / 1e9
        fig["batch1_bw_fraction"] = fig["batch1_weight_gbps"] / rates["copy_gbps"]
    fig["goals"] = {k: {"goal": g, "met": fig[k] >= g} for k, g in GOALS.items() if k in fig}
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 requests x 32 output tokens")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model and workload: checks the script")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--tests-timeout", type=int, default=300)
    ap.add_argument("--model-dir", default=None)
    ns = ap.parse_args()
    ns.device = "cpu" if ns.dry_run else "cuda"
    if ns.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
        return 2
    ns.num_prompts, ns.input_min, ns.input_max, ns.output_len = 256, 100, 1024, 256  # the issue's workload
    ns.hf_batch_size, ns.batch1_tokens = 64, 128
    if ns.quick:
        ns.num_prompts, ns.output_len, ns.batch1_tokens = 64, 32, 32
    if ns.dry_run:
        ns.num_prompts, ns.input_min, ns.input_max, ns.output_len = 12, 10, 60, 8
        ns.hf_batch_size, ns.batch1_tokens = 4, 8
    os.makedirs(ns.out, exist_ok=True)
    mode = "dry-run" if ns.dry_run else "quick" if ns.quick else "full"
    rec = {"issue": 6, "mode": mode, "command": " ".join(sys.argv), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if ns.device == "cuda" else "cpu",
           "workload": {k: getattr(ns, k) for k in ("num_prompts", "input_min", "input_max", "output_len",
                                                     "hf_batch_size", "batch1_tokens")}}
    try:
        import triton

        rec["triton"] = triton.__version__
    except ImportError:
        rec["triton"] = None
    rep = Report(os.path.join(ns.out, "gpu_check.json"), rec)
    rep.phase("device_rates", lambda: device_rates(ns.device, ns.dry_run))
    if not ns.skip_tests:
        rep.phase("gpu_tests", lambda: gpu_tests(ns.out, ns.tests_timeout))
    if ns.device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        rep.phase("kernel_timings", lambda: kernel_timings(ns.device, DRY_KERNEL_CASES if ns.dry_run else KERNEL_CASES))
    path = ns.model_dir or os.path.join("/tmp", "pagedserve-dry-llama" if ns.dry_run else "pagedserve-issue6-llama-1.1b")
    model = rep.phase("model", lambda: build_model(path, ns.dry_run))
    if "error" in model:
        return 1
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    special = tuple(t for t in (cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id) if isinstance(t, int))
    reqs = workload(cfg.vocab_size, special, ns)
    dtype = "float32" if ns.dry_run else "bfloat16"
    rep.phase("pagedserve", lambda: run_pagedserve(path, reqs, ns, dtype))
    if not ns.skip_hf:
        rep.phase("hf", lambda: run_hf(path, reqs, ns, getattr(torch, dtype)))
    rec["figures"] = figures(rec)
    rep.save()
    print(json.dumps({"device": rec["device"], "mode": mode, "figures": rec["figures"],
                      "device_rates": rec["device_rates"], "gpu_tests": rec.get("gpu_tests", {}).get("summary")},
                     indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
