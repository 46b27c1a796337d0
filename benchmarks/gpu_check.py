"""Issue 6 in one command for a session with a GPU: the device's two ceilings, the attention
kernels' speed, the issue's figures on its ~1.1B Llama-shaped random model, a breakdown of
where a step's time goes, and the GPU tests. Each phase runs in its own process with its own
time limit (a CUDA fault in one cannot poison the others; a slow one cannot eat the lease),
inside one overall --budget. Writes under --out ($OUT on the device machine):
gpu_check.json (rewritten after every phase, so a run cut short still keeps what it
measured), pytest_gpu.log, and the console log via gpu_check.sh.

    bash benchmarks/gpu_check.sh              # the full check (the workload as the issue states it)
    bash benchmarks/gpu_check.sh --quick      # smoke: 64 requests x 32 output tokens, figures not comparable
    python benchmarks/gpu_check.py --dry-run  # CPU: a tiny model and workload, checks this script end to end

Figures (the issue's goals in brackets):
  throughput_ratio   pagedserve output tok/s over transformers' static-batch generate
                     (batches of 64, left padding) on the same requests  [>= 15]
  e2e_efficiency     2 * params * (input + output tokens) / pagedserve wall time, over the
                     measured bf16 matmul rate (torch, 8192^3)  [>= 0.30]
  batch1_bw_fraction weight bytes read per token (all weights but the embedding table, of
                     which a token reads one row) / batch-1 decode wall time per token, over the
                     measured device-to-device copy bandwidth (bytes read + written)  [>= 0.60]
  async_speedup_*    the same run with synchronous scheduling over async (the default on CUDA)
  batch1_gemv*_bw_fraction  batch1_bw_fraction of an engine with every layer on the Triton
                     GEMV kernel, without and with programmatic dependent launch
                     (PAGEDSERVE_PDL=1), each on the sweep's fastest shapes for its mode;
                     pdl_tokens_equal: the two decode the same tokens (when the shapes match)
Not goals of the issue: the "moe" and "quant" phases time the fused MoE kernels and the FP8
and GPTQ / AWQ weight-only GEMMs (benchmarks/gpu_moe.py, gpu_quant.py); "speculative", last
and only with time left, batch-1 decode with n-gram drafts and with drafts that all stand,
against plain (ngram_k3_batch1_speedup, oracle_k3_batch1_speedup, *_tokens_equal); "hybrid",
after it with time left, a ~0.5B Qwen3.5-shaped model (gpu_phases.hybrid): output tok/s on the
issue's kind of workload, batch-1 decode, whether decode ran in CUDA graphs, and a 2000-token
prompt cold against a prefix-cache hit resuming from a saved state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

ISSUE_MODEL = dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                   vocab_size=32000, max_position_embeddings=2048, tokenizer_vocab=2048)
DRY_MODEL = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 vocab_size=2048, max_position_embeddings=512, tokenizer_vocab=512)
GPU_TEST_FILES = ["tests/test_triton_kernels.py", "tests/test_fused_ops.py", "tests/test_gemv.py",
                  "tests/test_cuda_graphs.py", "tests/test_gpu_engine.py", "tests/test_pdl.py", "tests/test_argmax.py",
                  "tests/test_decode_rope.py", "tests/test_fused_moe.py", "tests/test_fp8.py",
                  "tests/test_kv_fp8.py", "tests/test_int_quant.py", "tests/test_attention_sinks.py",
                  "tests/test_gpt_oss.py", "tests/test_multimodal_llava.py", "tests/test_multimodal_qwen2_vl.py",
                  "tests/test_multimodal_gemma3.py", "tests/test_multimodal_mistral3.py",
                  "tests/test_multimodal_llava_next.py", "tests/test_multimodal_llava_onevision.py",
                  "tests/test_multimodal_internvl.py"]
GOALS = {"throughput_ratio": 15.0, "e2e_efficiency": 0.30, "batch1_bw_fraction": 0.60}
# Batch-1 engines besides the default, each in its own process: every layer on the Triton
# GEMV kernel, without and with PDL (ops/pdl.py), each on the sweep's fastest shapes for
# that mode: phase -> (the sweep's PAGEDSERVE_GEMV key, PAGEDSERVE_PDL).
BATCH1_VARIANTS = {"batch1_gemv": ("gemv_all_env", "0"), "batch1_gemv_pdl": ("gemv_all_pdl_env", "1")}
# Phase time limits (seconds), each further capped by what is left of --budget.
LIMITS = {"device_rates": 60, "kernels": 180, "pagedserve": 240, "hf": 180, "moe": 90, "quant": 90,
          "gpu_tests": 240, "speculative": 90, "hybrid": 120}


def settings(ns: argparse.Namespace) -> argparse.Namespace:
    """The workload and model for the mode (full, quick, dry-run)."""
    ns.device = "cpu" if ns.dry_run else "cuda"
    ns.num_prompts, ns.input_min, ns.input_max, ns.output_len = 256, 100, 1024, 256  # the issue's workload
    ns.hf_batch_size, ns.batch1_tokens = 64, 128
    if ns.quick:
        ns.num_prompts, ns.output_len, ns.batch1_tokens = 64, 32, 32
    if ns.dry_run:
        ns.num_prompts, ns.input_min, ns.input_max, ns.output_len = 12, 10, 60, 8
        ns.hf_batch_size, ns.batch1_tokens = 4, 8
    ns.mode = "dry-run" if ns.dry_run else "quick" if ns.quick else "full"
    ns.model_dir = ns.model_dir or os.path.join(
        "/tmp", "pagedserve-dry-llama" if ns.dry_run else "pagedserve-issue6-llama-1.1b")
    ns.dtype = "float32" if ns.dry_run else "bfloat16"
    return ns


def build_model(path: str, dry: bool) -> dict:
    from pagedserve.model.random_model import build_random_model

    shape = DRY_MODEL if dry else ISSUE_MODEL
    done = os.path.join(path, ".complete")
    if not os.path.isfile(done):
        t = time.perf_counter()
        build_random_model(path, "LlamaForCausalLM", seed=0, dtype="float32" if dry else "bfloat16", **shape)
        open(done, "w").close()
        return {"path": path, "shape": shape, "build_s": round(time.perf_counter() - t, 1)}
    return {"path": path, "shape": shape, "build_s": 0.0}


def _write_phase(ns: argparse.Namespace, res: dict) -> None:
    with open(os.path.join(ns.out, f"{ns.phase}.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)


def run_phase(ns: argparse.Namespace) -> dict:
    """One phase, inside its own process (--phase NAME)."""
    import gpu_phases

    if ns.phase == "build_model":
        return build_model(ns.model_dir, ns.dry_run)
    if ns.phase == "device_rates":
        return gpu_phases.device_rates(ns.device, ns.dry_run)
    if ns.phase == "kernels":
        import gpu_kernels

        return gpu_kernels.kernel_timings(ns.device, ns.dry_run, save=lambda res: _write_phase(ns, res))
    if ns.phase == "moe":
        import gpu_moe

        return gpu_moe.moe_timings(ns.device, ns.dry_run)
    if ns.phase == "quant":
        import gpu_quant

        return gpu_quant.quant_timings(ns.device, ns.dry_run)
    if ns.phase == "hybrid":  # (its own model and requests)
        return gpu_phases.hybrid(ns)
    reqs = gpu_phases.workload(ns)
    if ns.phase == "pagedserve":
        return gpu_phases.run_pagedserve(ns.model_dir, reqs, ns)
    if ns.phase in BATCH1_VARIANTS:
        return gpu_phases.batch1_variant(ns.model_dir, ns)
    if ns.phase == "hf":
        return gpu_phases.run_hf(ns.model_dir, reqs, ns)
    if ns.phase == "speculative":
        return gpu_phases.speculative_batch1(ns.model_dir, ns)
    raise SystemExit(f"unknown phase {ns.phase}")


class Orchestrator:
    """Runs each phase as `python gpu_check.py --phase NAME` under a time limit and merges
    its JSON into gpu_check.json."""

    def __init__(self, ns: argparse.Namespace, record: dict) -> None:
        self.ns, self.record, self.t0 = ns, record, time.perf_counter()
        self.untuned = False
        self.path = os.path.join(ns.out, "gpu_check.json")
        self.tmp = os.path.join("/tmp", f"gpu_check_phases_{os.getpid()}")
        os.makedirs(self.tmp, exist_ok=True)

    def left(self) -> float:
        return self.ns.budget - (time.perf_counter() - self.t0)

    def _argv(self, phase: str) -> list[str]:
        argv = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--out", self.tmp,
                "--model-dir", self.ns.model_dir]
        return argv + (["--quick"] if self.ns.quick else []) + (["--dry-run"] if self.ns.dry_run else [])

    def start(self, phase: str, extra_env: "dict | None" = None) -> subprocess.Popen:
        return subprocess.Popen(self._argv(phase), cwd=ROOT, env={**self.env(), **(extra_env or {})})

    def env(self) -> dict:
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if self.untuned:  # the run with the measured tuning failed: the defaults
            env.update(PAGEDSERVE_ATTN_DECODE_CONFIG="", PAGEDSERVE_GEMV="")
            return env
        best = self.record.get("kernels", {}).get("best_k_rows")
        if best is not None and "PAGEDSERVE_ATTN_K_ROWS" not in os.environ:  # the faster K layout measured
            env["PAGEDSERVE_ATTN_K_ROWS"] = "1" if best else "0"
        shape = self.record.get("kernels", {}).get("best_decode_config")
        if shape is not None and "PAGEDSERVE_ATTN_DECODE_CONFIG" not in os.environ:  # the fastest decode shape
            env["PAGEDSERVE_ATTN_DECODE_CONFIG"] = shape
        gemv_env = self.record.get("kernels", {}).get("gemv_env")
        if gemv_env and "PAGEDSERVE_GEMV" not in os.environ:  # layer shapes where the GEMV kernel won
            env["PAGEDSERVE_GEMV"] = gemv_env
        return env

    def run(self, phase: str, proc: "subprocess.Popen | None" = None, extra_env: "dict | None" = None) -> dict:
        limit = min(LIMITS.get(phase, 120), self.left() - 5)
        print(f"== {phase} ({time.perf_counter() - self.t0:.0f} s in, limit {limit:.0f} s)", flush=True)
        t = time.perf_counter()
        if limit < 10:
            result = {"error": "skipped: the budget is spent"}
        else:
            proc = proc or self.start(phase, extra_env)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = "timeout"
            result = self._read(phase, rc)
        if "error" in result:
            print(f"   {phase} failed: {result['error']}", flush=True)
        self.record.setdefault("phase_seconds", {})[phase] = round(time.perf_counter() - t, 2)
        self.record[phase] = result
        self.save()
        return result

    def _read(self, phase: str, rc) -> dict:
        path = os.path.join(self.tmp, f"{phase}.json")
        partial = {}
        if os.path.isfile(path):
            with open(path) as f:
                partial = json.load(f)
        if rc != 0:
            partial["error"] = partial.get("error") or f"exit status {rc} (traceback in the log above)"
        return partial

    def save(self) -> None:
        self.record["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        self.record["figures"] = figures(self.record)
        with open(self.path, "w") as f:
            json.dump(self.record, f, indent=2, sort_keys=True, default=str)
        for name, data in tuned_candidates(self.record).items():
            with open(os.path.join(self.ns.out, name), "w") as f:
                json.dump(data, f, indent=2)


def tuned_candidates(rec: dict) -> dict:
    """Tuned files (pagedserve/ops/tuned.py) for this GPU model from what this run measured,
    to be committed as pagedserve/ops/tuned/<device>.json once reviewed:
    tuned_candidate.json holds the settings the main engine run used (the sweep's winners);
    tuned_candidate_pdl.json, where the PDL batch-1 variant beat that engine at batch 1, the
    variant's settings (PDL on, every layer on the GEMV kernel at batch 1)."""
    kernels, fig = rec.get("kernels", {}), rec.get("figures", {})
    if "pagedserve" not in rec or "error" in rec["pagedserve"] or "batch1_bw_fraction" not in fig:
        return {}
    base = {"device": rec.get("device")}
    if "best_decode_config" in kernels:
        base["attn_decode_config"] = kernels["best_decode_config"]
    if "best_k_rows" in kernels:
        base["attn_k_rows"] = bool(kernels["best_k_rows"])
    main = {**base, "gemv": kernels.get("gemv_env", ""),
            "measured": {k: fig.get(k) for k in ("batch1_bw_fraction", "e2e_efficiency", "throughput_ratio")}}
    out = {"tuned_candidate.json": main}
    if fig.get("batch1_gemv_pdl_bw_fraction", 0) > fig["batch1_bw_fraction"]:
        out["tuned_candidate_pdl.json"] = {**base, "gemv": kernels.get("gemv_all_pdl_env", ""), "pdl": True,
                                           "measured": {"batch1_bw_fraction": fig["batch1_gemv_pdl_bw_fraction"]}}
    return out


def gpu_tests(out_dir: str, timeout_s: float, workers: int, files: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE", *files]
    try:
        import xdist  # noqa: F401  (the device image has pytest-xdist: compiles run in parallel)

        cmd += ["-n", str(workers)]
    except ImportError:
        pass
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
    res = {"files": files, "returncode": rc, "summary": summary.strip("= "), "failures": failures[:30]}
    if rc != 0:
        res["error"] = f"pytest returned {rc}"
    return res


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
    if "s_per_token" in b1 and "copy_gbps" in rates:
        fig["batch1_ms_per_token"] = 1000 * b1["s_per_token"]
        fig["batch1_weight_gbps"] = ps["weight_bytes_per_token"] / b1["s_per_token"] / 1e9
        fig["batch1_bw_fraction"] = fig["batch1_weight_gbps"] / rates["copy_gbps"]
    by_mode = ps.get("elapsed_s_by_mode", {})
    if "sync" in by_mode and "async" in by_mode:
        fig["async_speedup_e2e"] = by_mode["sync"] / by_mode["async"]
        fig["async_sync_tokens_equal"] = ps.get("async_sync_tokens_equal")
    b1m = ps.get("batch1_by_mode", {})
    if "sync" in b1m and "async" in b1m:
        fig["async_speedup_batch1"] = b1m["sync"]["s_per_token"] / b1m["async"]["s_per_token"]
    for phase in BATCH1_VARIANTS:  # the same figure for the batch-1 variants
        v = rec.get(phase, {}).get("batch1", {})
        if "s_per_token" in v and "weight_bytes_per_token" in ps and "copy_gbps" in rates:
            fig[f"{phase}_ms_per_token"] = 1000 * v["s_per_token"]
            fig[f"{phase}_bw_fraction"] = ps["weight_bytes_per_token"] / v["s_per_token"] / 1e9 / rates["copy_gbps"]
    variants = [rec.get(p, {}) for p in BATCH1_VARIANTS]
    toks = [v.get("batch1", {}).get("tokens") for v in variants]
    if all(toks) and variants[0].get("gemv_shapes") == variants[1].get("gemv_shapes"):
        # PDL changes when kernels start, not what they compute (with other launch shapes the
        # sums run in another order: tests/test_pdl.py checks bit-identity on one shape)
        fig["pdl_tokens_equal"] = toks[0] == toks[1]
    spec = rec.get("speculative", {})
    for name in ("ngram_k3", "oracle_k3"):
        if f"{name}_speedup" in spec:
            fig[f"{name}_batch1_speedup"] = spec[f"{name}_speedup"]
            fig[f"{name}_tokens_equal"] = spec[f"{name}_tokens_equal"]
    fig["goals"] = {k: {"goal": g, "met": fig[k] >= g} for k, g in GOALS.items() if k in fig}
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 requests x 32 output tokens")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model and workload: checks the script")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--budget", type=float, default=540, help="seconds for everything (phases are cut to fit)")
    ap.add_argument("--test-workers", type=int, default=4)
    ap.add_argument("--test-files", nargs="+", default=GPU_TEST_FILES, help="the GPU test files to run")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ns = settings(ap.parse_args())
    os.makedirs(ns.out, exist_ok=True)
    if ns.phase:
        _write_phase(ns, run_phase(ns))
        return 0

    import torch

    if ns.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
        return 2
    rec = {"issue": 6, "mode": ns.mode, "command": " ".join(sys.argv), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if ns.device == "cuda" else "cpu",
           "workload": {k: getattr(ns, k) for k in ("num_prompts", "input_min", "input_max", "output_len",
                                                     "hf_batch_size", "batch1_tokens")}}
    try:
        import triton

        rec["triton"] = triton.__version__
    except ImportError:
        rec["triton"] = None
    orch = Orchestrator(ns, rec)
    builder = orch.start("build_model")  # CPU work, overlapping the GPU phases before it is needed
    orch.run("device_rates")
    if ns.device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        orch.run("kernels")
    model = orch.run("build_model", builder)
    if "error" not in model:
        ps = orch.run("pagedserve")
        kernels = rec.get("kernels", {})
        if "error" in ps and (kernels.get("gemv_env") or kernels.get("best_decode_config")):
            rec["pagedserve_tuned_error"] = ps["error"]  # keep why, and measure with the defaults
            orch.untuned = True
            orch.run("pagedserve")
        for phase, (key, pdl) in BATCH1_VARIANTS.items():
            shapes = rec.get("kernels", {}).get(key)
            if shapes and "error" not in rec["pagedserve"]:
                orch.run(phase, extra_env={"PAGEDSERVE_GEMV": shapes, "PAGEDSERVE_PDL": pdl})
        if not ns.skip_hf:
            orch.run("hf")
    else:
        builder.kill()
    if ns.device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        orch.run("moe")  # the fused MoE kernels against the PyTorch expert path (gpu_moe.py)
        orch.run("quant")  # the FP8 and GPTQ / AWQ weight-only GEMMs against bf16 cuBLAS (gpu_quant.py)
    if not ns.skip_tests:
        print(f"== gpu_tests ({time.perf_counter() - orch.t0:.0f} s in)", flush=True)
        t = time.perf_counter()
        rec["gpu_tests"] = gpu_tests(ns.out, max(10.0, min(LIMITS["gpu_tests"], orch.left() - 5)), ns.test_workers,
                                     ns.test_files)
        rec.setdefault("phase_seconds", {})["gpu_tests"] = round(time.perf_counter() - t, 2)
    if "error" not in model and orch.left() > 45:  # not a goal: only with time left over
        orch.run("speculative")
    if orch.left() > 60:  # not a goal either: the hybrid models' path (Qwen3.5-shaped)
        orch.run("hybrid")
    orch.save()
    print(json.dumps({"device": rec["device"], "mode": ns.mode, "figures": rec["figures"],
                      "device_rates": rec.get("device_rates"), "gpu_tests": rec.get("gpu_tests", {}).get("summary"),
                      "phase_seconds": rec.get("phase_seconds")}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
