"""Gemma 4's KV-sharing layers on the rows whose outputs are read alone (vLLM's
kv_sharing_fast_prefill, on by default here): they run on a prefill's sampled rows only, and
tokens, logprobs and prompt logprobs are those of the full computation."""

from __future__ import annotations

import torch

from pagedserve import LLM, SamplingParams


def _rows_into_last_layer(llm: LLM) -> list[int]:
    seen: list[int] = []
    llm.llm_engine.runner.model.model.layers[-1].register_forward_hook(
        lambda m, args, out: seen.append(args[1].shape[0]))
    return seen


def _same(a, b, prompt: bool) -> None:
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        steps = list(zip(x.outputs[0].logprobs, y.outputs[0].logprobs))
        if prompt:
            steps += list(zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:]))
        for s, t in steps:
            assert s.keys() == t.keys()
            torch.testing.assert_close([v.logprob for v in s.values()], [v.logprob for v in t.values()],
                                       atol=1e-5, rtol=0)


def test_shared_layers_run_on_read_rows_only(model_dirs):
    """Three prompts (9, 30, 50 tokens) in steps of 40 tokens: prefill chunks beside decode rows."""
    path = model_dirs["gemma4"]
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 900 + 4 for j in range(n)]} for i, n in enumerate((9, 30, 50))]
    fast = LLM(path, max_model_len=128, max_num_batched_tokens=40, enable_prefix_caching=False)
    full = LLM(path, max_model_len=128, max_num_batched_tokens=40, enable_prefix_caching=False,
               kv_sharing_fast_prefill=False)
    assert fast.llm_engine.runner.fast_prefill and not full.llm_engine.runner.fast_prefill
    rows = _rows_into_last_layer(fast)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    _same(fast.generate(prompts, params, use_tqdm=False), full.generate(prompts, params, use_tqdm=False), False)
    # The last layer saw only the rows that sample (a request's last chunk row, decode rows),
    # never a whole chunk: 89 prompt tokens and 6 decode steps of 3 rows went in.
    assert max(rows) <= 3 and sum(rows) < 30, rows
    # Prompt logprobs read every prompt row: they go through all the layers.
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    _same(fast.generate(prompts, params, use_tqdm=False), full.generate(prompts, params, use_tqdm=False), True)
