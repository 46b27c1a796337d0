"""benchmarks/gpu_check.py end to end on CPU (--dry-run: a tiny model, Triton's interpreter):
a GPU session has minutes of device time, so the script must not first fail there. Every
phase runs, the figures come out, and the tuned-settings candidate it writes is a valid
tuned file (pagedserve/ops/tuned.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    from pagedserve.ops import tuned

    out = tmp_path / "out"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    for var in ("PAGEDSERVE_GEMV", "PAGEDSERVE_PDL", "PAGEDSERVE_ATTN_DECODE_CONFIG", "PAGEDSERVE_ATTN_K_ROWS"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--skip-tests", "--skip-hf",
                           "--out", str(out), "--model-dir", str(tmp_path / "model")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads((out / "gpu_check.json").read_text())
    failed = {p: r["error"] for p, r in rec.items() if isinstance(r, dict) and "error" in r}
    assert not failed, failed
    fig = rec["figures"]
    assert fig["batch1_bw_fraction"] > 0 and fig["e2e_efficiency"] > 0 and fig["async_sync_tokens_equal"]
    spec = rec["speculative"]  # the same tokens with drafts; the oracle's all stand
    assert fig["ngram_k3_tokens_equal"] and fig["oracle_k3_tokens_equal"] and fig["oracle_k3_batch1_speedup"] > 0
    assert spec["oracle_k3"]["accepted_tokens"] == spec["oracle_k3"]["draft_tokens"] > 0
    gemv = rec["kernels"]["gemv"]
    assert {r["role"] for r in gemv.values()} == {"norm", "silu", "plain"}
    assert all(r["chain"] > 1 and r["speedup_m1"] > 0 for r in gemv.values())
    # The batch-1 variant ran with every layer on the kernel, at batch 1 only.
    variant = rec["batch1_gemv"]
    assert variant["gemv_shapes"] and all(c[-1] == 1 for c in variant["gemv_shapes"].values())
    assert fig["batch1_gemv_bw_fraction"] > 0 and len(variant["batch1"]["tokens"]) > 1 and variant["profile"]
    assert rec["moe"] and all(r["fused_ms"] > 0 and r["torch_ms"] > 0 and r["int4_ms"] > 0
                              for r in rec["moe"].values())
    assert rec["quant"] and all(r[f"{kind}_ms"] > 0 for r in rec["quant"].values()
                                for kind in ("fp8", "int4", "int4_act_order", "int8", "bf16"))
    # The hybrid phase timed a state layer's decode step (and a verification) on the kernels
    # and on PyTorch.
    decode = rec["hybrid"]["state_layer_decode"]
    assert decode["layer"] == "GatedDeltaNet" and all(decode[f"{t}_speedup"] > 0 for t in ("b1", "b16", "b64",
                                                                                             "prefill128", "verify16x4"))
    # The candidate holds the settings the engine run used, in a tuned file's syntax.
    cand = tuned.load(str(out / "tuned_candidate.json"))
    assert cand["attn_decode_config"] == tuple(int(v) for v in rec["kernels"]["best_decode_config"].split(","))
    assert cand["attn_k_rows"] == rec["pagedserve"]["attn_k_rows"]
