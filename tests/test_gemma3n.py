"""Gemma 3n's KV-sharing layers on the rows whose outputs are read alone (kv_sharing_fast_prefill,
as Gemma 4's, tests/test_gemma4.py): everything after its shared layers is per token (AltUp's
copies, their unembedding), so tokens, logprobs and prompt logprobs equal the full computation's."""

from __future__ import annotations

from pagedserve import LLM, SamplingParams
from test_gemma4 import _same


def test_shared_layers_run_on_read_rows_only(model_dirs):
    """Three prompts (9, 30, 50 tokens) in steps of 40 tokens: prefill chunks beside decode rows."""
    path = model_dirs["gemma3n"]
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 900 + 4 for j in range(n)]} for i, n in enumerate((9, 30, 50))]
    fast = LLM(path, max_model_len=128, max_num_batched_tokens=40, enable_prefix_caching=False)
    full = LLM(path, max_model_len=128, max_num_batched_tokens=40, enable_prefix_caching=False,
               kv_sharing_fast_prefill=False)
    assert fast.llm_engine.runner.fast_prefill and not full.llm_engine.runner.fast_prefill
    rows: list[int] = []  # (a layer's input: the AltUp copies, [copies, rows, hidden])
    fast.llm_engine.runner.model.model.layers[-1].register_forward_hook(
        lambda m, args, out: rows.append(args[1].shape[1]))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    _same(fast.generate(prompts, params, use_tqdm=False), full.generate(prompts, params, use_tqdm=False), False)
    # The last layer saw only the rows that sample, never a whole chunk.
    assert max(rows) <= 3 and sum(rows) < 30, rows
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    _same(fast.generate(prompts, params, use_tqdm=False), full.generate(prompts, params, use_tqdm=False), True)
