"""vLLM's smaller LLM methods: encode (a pooling model's outputs as tensors),
reset_prefix_cache, and start_profile / stop_profile (torch's profiler, a trace file)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.profiler import PROFILER_DIR_ENV


def test_encode_returns_the_embeddings_as_tensors(llama_dir):
    llm = LLM(llama_dir, runner="pooling", pooler_config={"pooling_type": "MEAN", "normalize": True})
    prompts = ["a first prompt", "and a second, longer one"]
    embedded = llm.embed(prompts, use_tqdm=False)
    encoded = llm.encode(prompts, use_tqdm=False)
    for e, o in zip(embedded, encoded):
        assert isinstance(o.outputs.data, torch.Tensor) and o.prompt_token_ids == e.prompt_token_ids
        torch.testing.assert_close(o.outputs.data, torch.tensor(e.outputs.embedding))
    with pytest.raises(ValueError, match="pooling_task"):
        llm.encode(prompts, pooling_task="token_embed")


def test_reset_prefix_cache(llama_dir):
    llm = LLM(llama_dir, block_size=8)
    prompt = {"prompt_token_ids": list(range(5, 45))}
    params = SamplingParams(temperature=0, max_tokens=2)
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    assert llm.generate(prompt, params, use_tqdm=False)[0].num_cached_tokens == 32  # four full blocks
    assert llm.reset_prefix_cache()
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == first.outputs[0].token_ids


def test_profiler_writes_a_trace(llama_dir, tmp_path, monkeypatch):
    llm = LLM(llama_dir)
    monkeypatch.delenv(PROFILER_DIR_ENV, raising=False)
    with pytest.raises(RuntimeError, match=PROFILER_DIR_ENV):
        llm.start_profile()
    monkeypatch.setenv(PROFILER_DIR_ENV, str(tmp_path))
    llm._profiler = None  # (the environment is read when profiling starts)
    with pytest.raises(RuntimeError, match="not running"):
        llm.stop_profile()
    llm.start_profile()
    with pytest.raises(RuntimeError, match="already running"):
        llm.start_profile()
    llm.generate("profile me", SamplingParams(max_tokens=3), use_tqdm=False)
    path = llm.stop_profile()
    assert path.startswith(str(tmp_path))
    with open(path) as f:
        names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
    assert any(n.startswith("aten::") for n in names)  # the forward passes' ops are in it


def test_vllm_habits_are_accepted(llama_dir):
    """Arguments a vLLM user passes out of habit: trust_remote_code (no checkpoint code runs
    here either way) and parallel sizes of 1; more than one device is a clear error."""
    from pagedserve.entrypoints.cli import build_parser, engine_args_from

    llm = LLM(llama_dir, trust_remote_code=True, tensor_parallel_size=1, pipeline_parallel_size=1)
    assert llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        with pytest.raises(ValueError, match=f"{name} must be 1"):
            LLM(llama_dir, **{name: 2})
    ns = build_parser().parse_args(["serve", llama_dir, "--trust-remote-code", "-tp", "2"])
    args = engine_args_from(ns, llama_dir)
    assert args.trust_remote_code and args.tensor_parallel_size == 2
    with pytest.raises(ValueError, match="tensor_parallel_size must be 1"):
        args.create_engine_config()


def test_get_metrics_counts_what_ran(llama_dir):
    """LLM(disable_log_stats=False).get_metrics(): the server's metrics as vLLM's reader objects;
    the outputs stay those of a run without metrics (which reports only final outputs)."""
    from pagedserve.metrics_reader import Counter, Gauge, Histogram

    prompts = [{"prompt_token_ids": [1, 5, 9, 14, 3]}, {"prompt_token_ids": [1, 100, 200]}]
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=4, ignore_eos=True)]
    llm = LLM(llama_dir, disable_log_stats=False, max_model_len=64)
    outs = llm.generate(prompts, params, use_tqdm=False)
    plain = LLM(llama_dir, max_model_len=64).generate(prompts, params, use_tqdm=False)
    for a, b in zip(outs, plain):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert a.outputs[0].text == b.outputs[0].text and a.outputs[0].logprobs == b.outputs[0].logprobs
    metrics = {(m.name, tuple(sorted(m.labels.items()))): m for m in llm.get_metrics()}
    model = ("model_name", llm.engine_args.model)

    def get(name: str, *labels: tuple[str, str]):
        return metrics[(f"pagedserve:{name}", tuple(sorted((model, *labels))))]

    assert isinstance(get("prompt_tokens"), Counter) and get("prompt_tokens").value == 8
    assert get("generation_tokens").value == 5 + 2 * 4
    assert get("request_success", ("finished_reason", "length")).value == 3  # samples
    ttft = get("time_to_first_token_seconds")
    assert isinstance(ttft, Histogram) and ttft.count == 2 and ttft.buckets["+Inf"] == 2 and ttft.sum > 0
    assert get("inter_token_latency_seconds").count > 0
    assert get("request_generation_tokens").sum == 13
    assert isinstance(get("num_requests_running"), Gauge) and get("num_requests_running").value == 0
    with pytest.raises(RuntimeError, match="disable_log_stats=False"):
        LLM(llama_dir, max_model_len=64).get_metrics()


def test_copied_vllm_command_lines_parse(llama_dir, caplog):
    """A vLLM serve command with its usual single-GPU flags parses; the moot ones are logged as
    ignored, the ones asking for what is not here are clear errors, --cuda-graph-sizes is used."""
    import logging

    from pagedserve.entrypoints.cli import build_parser, engine_args_from
    from pagedserve.worker.cuda_graphs import graph_sizes

    argv = ["serve", llama_dir, "--swap-space", "16", "--disable-custom-all-reduce", "--max-seq-len-to-capture",
            "8192", "-O3", "--distributed-executor-backend", "mp", "-dp", "1", "--enable-expert-parallel",
            "--preemption-mode", "recompute", "--tokenizer-mode", "auto", "--cuda-graph-sizes", "1", "2", "8",
            "--max-log-len", "100"]
    ns = build_parser().parse_args(argv)
    assert ns.max_log_len == 100
    args = engine_args_from(ns, llama_dir)
    args.max_num_seqs = 4
    with caplog.at_level(logging.INFO, logger="pagedserve"):
        config = args.create_engine_config()
    for name in ("swap_space", "disable_custom_all_reduce", "max_seq_len_to_capture", "compilation_config",
                 "distributed_executor_backend", "enable_expert_parallel"):
        assert f"{name}=" in caplog.text and "accepted and ignored" in caplog.text
    assert graph_sizes(config.max_num_seqs, config.cuda_graph_sizes) == [1, 2]  # none above max_num_seqs
    assert graph_sizes(64, [24]) == [1, 2, 4, 8, 16, 24] and graph_sizes(64, None)[-1] == 64
    runner = LLM(llama_dir, max_model_len=64, max_num_seqs=4, cuda_graph_sizes=[1, 3]).llm_engine.runner
    assert runner.make_graph_runner(capture=False).sizes == [1, 3]
    for bad, match in (({"data_parallel_size": 2}, "data_parallel_size must be 1"),
                       ({"cpu_offload_gb": 4}, "cpu_offload_gb"), ({"preemption_mode": "swap"}, "recompute"),
                       ({"tokenizer_mode": "mistral"}, "tokenizer_mode"), ({"cuda_graph_sizes": [0]}, "positive")):
        with pytest.raises(ValueError, match=match):
            LLM(llama_dir, max_model_len=64, **bad)


def test_truncate_to_the_model_length(llama_dir):
    """vLLM's truncate_prompt_tokens=-1: keep the last max_model_len tokens (an embedding of a
    long document); other values below 1 are errors."""
    from pagedserve.pooling_params import PoolingParams

    llm = LLM(llama_dir, runner="pooling", max_model_len=16, pooler_config={"pooling_type": "MEAN"})
    ids = [(7 * i) % 900 + 4 for i in range(40)]
    whole = llm.embed([{"prompt_token_ids": ids}], PoolingParams(truncate_prompt_tokens=-1), use_tqdm=False)[0]
    tail = llm.embed([{"prompt_token_ids": ids[-16:]}], use_tqdm=False)[0]
    assert whole.prompt_token_ids == ids[-16:]
    torch.testing.assert_close(torch.tensor(whole.outputs.embedding), torch.tensor(tail.outputs.embedding))
    for bad in (-2, 0):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            PoolingParams(truncate_prompt_tokens=bad)
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad)
    assert SamplingParams(truncate_prompt_tokens=-1).truncate_prompt_tokens == -1


def test_metrics_under_vllms_names(llama_dir):
    """metrics_prefix="vllm": /metrics and LLM.get_metrics() carry vLLM's own names (vllm:*),
    so dashboards written for vLLM read them; a request is counted under them."""
    from server_helpers import metric, scrape, serving

    llm = LLM(llama_dir, disable_log_stats=False, max_model_len=64, metrics_prefix="vllm")
    llm.generate([{"prompt_token_ids": [1, 5, 9]}], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    names = {m.name for m in llm.get_metrics()}
    assert {"vllm:generation_tokens", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"} <= names
    assert not [n for n in names if n.startswith("pagedserve:")]
    with serving(llama_dir, engine_kwargs={"metrics_prefix": "vllm"}) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny-llama", "prompt": "hello", "max_tokens": 4,
                                                           "ignore_eos": True})
        assert r.status_code == 200
        samples = scrape(srv.url)
        assert metric(samples, "vllm:generation_tokens_total") == 4
        assert metric(samples, "vllm:request_success_total", finished_reason="length") == 1
        assert not [n for n, _ in samples if n.startswith("pagedserve:")]
    with pytest.raises(ValueError, match="metrics_prefix"):
        LLM(llama_dir, metrics_prefix="sglang")
