"""The benchmark commands run end to end on tiny inputs and report consistent figures."""

from __future__ import annotations

import json

import pytest
from server_helpers import ServerThread, make_async_llm

from pagedserve.bench.datasets import random_requests
from pagedserve.bench.hf_backend import static_batches
from pagedserve.entrypoints.cli import main as cli_main
from pagedserve.entrypoints.openai.api_server import build_app


def test_random_dataset_ranges_prefix_and_seed():
    reqs = random_requests(50, 100, 20, 500, range_ratio=0.5, prefix_len=7, seed=3, special_ids=(0, 1))
    assert all(57 <= r.prompt_len <= 157 and 10 <= r.output_len <= 30 for r in reqs)
    assert len({tuple(r.prompt_token_ids[:7]) for r in reqs}) == 1
    assert all(t not in (0, 1) for r in reqs for t in r.prompt_token_ids)
    assert [r.prompt_token_ids for r in reqs] == [r.prompt_token_ids for r in
                                                   random_requests(50, 100, 20, 500, 0.5, 7, 3, special_ids=(0, 1))]
    exact = random_requests(5, 64, 16, 500, input_min=64, input_max=64, output_min=16, output_max=16)
    assert {(r.prompt_len, r.output_len) for r in exact} == {(64, 16)}
    with pytest.raises(ValueError):
        random_requests(1, 10, 10, 100, range_ratio=1.5)


def test_static_batches_follow_the_hf_rule():
    reqs = random_requests(10, 100, 50, 500, range_ratio=0.5, seed=1)
    batches = static_batches(reqs, max_batch_size=4, max_len=2048)
    assert [len(b) for b in batches] == [4, 4, 2] and sum(batches, []) == reqs
    tight = static_batches(reqs, max_batch_size=64, max_len=160)
    assert all(max(r.prompt_len for r in b) + max(r.output_len for r in b) <= 160 or len(b) == 1 for b in tight)


def test_bench_throughput_compare_writes_json(llama_dir, tmp_path, capsys):
    out = tmp_path / "tp.json"
    rc = cli_main(["bench", "throughput", llama_dir, "--compare", "--num-prompts", "6", "--input-len", "20",
                   "--output-len", "8", "--range-ratio", "0.5", "--no-progress", "--output-json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    pg, hf = rec["results"]["pagedserve"], rec["results"]["hf"]
    assert pg["output_tokens"] == hf["output_tokens"] and pg["num_requests"] == 6
    assert rec["ratio_output_tokens_per_s"] == pytest.approx(pg["output_tokens_per_s"] / hf["output_tokens_per_s"])
    assert "pagedserve / hf output tokens/s" in capsys.readouterr().out


def test_bench_latency(llama_dir, tmp_path):
    out = tmp_path / "lat.json"
    assert cli_main(["bench", "latency", llama_dir, "--batch-size", "2", "--input-len", "8", "--output-len", "4",
                     "--num-iters-warmup", "1", "--num-iters", "2", "--output-json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["pagedserve"]
    assert res["avg_latency_s"] > 0 and res["per_token_latency_ms"] == pytest.approx(res["avg_latency_s"] * 250)


def test_bench_serve_against_a_live_server(llama_dir, tmp_path, capsys):
    llm = make_async_llm(llama_dir)
    srv = ServerThread(build_app(llm, "tiny"))
    try:
        out = tmp_path / "serve.json"
        rc = cli_main(["bench", "serve", "--base-url", srv.url, "--num-prompts", "8", "--input-len", "16",
                       "--output-len", "6", "--max-concurrency", "4", "--no-progress", "--output-json", str(out)])
        res = json.loads(out.read_text())["results"]
        assert rc == 0 and res["successful_requests"] == 8 and res["failed_requests"] == 0
        assert res["total_output_tokens"] == 8 * 6 and res["total_input_tokens"] == 8 * 16
        assert 0 < res["ttft_s"]["mean"] <= res["e2e_s"]["mean"]
        assert "Serving Benchmark Result" in capsys.readouterr().out
    finally:
        srv.stop()
        llm.shutdown()
