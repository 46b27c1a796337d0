"""bfloat16 on CPU (dtype="bfloat16": CPUs with native bf16 matmuls run it about twice as fast
as float32): greedy tokens follow transformers' own bfloat16 run, parting only at near-ties."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams


def _hf_bf16_greedy(path: str, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids, toks, rows = list(prompt), [], []
    with torch.inference_mode():
        for _ in range(n):
            row = model(torch.tensor([ids])).logits[0, -1].float()
            toks.append(int(row.argmax()))
            rows.append(row)
            ids.append(toks[-1])
    return toks, rows


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen2_moe"])
def test_bf16_greedy_follows_transformers_bf16(name, model_dirs):
    llm = LLM(model_dirs[name], dtype="bfloat16", max_num_batched_tokens=48, block_size=8)
    runner = llm.llm_engine.runner
    assert runner.kv_caches[0][0].dtype == torch.bfloat16 and runner.backend.name == "cpu"
    prompts = [[(7 * i + 13 * j) % 1000 + 4 for j in range(n)] for i, n in enumerate((6, 37, 90))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    agreed = 0
    for p, o in zip(prompts, outs):
        ref, rows = _hf_bf16_greedy(model_dirs[name], p, 16)
        for i, (a, b) in enumerate(zip(o.outputs[0].token_ids, ref)):
            if a != b:  # bf16 round-off may flip a near-tie, after which the runs part
                gap = float(rows[i][b] - rows[i][a])
                # bf16 keeps 8 bits of mantissa: a near-tie is within a few ulps of the logits' scale.
                tol = 0.25 + 0.01 * float(rows[i].abs().max())
                assert gap < tol, f"token {i}: got {a}, transformers' bf16 run chose {b} by {gap:.3g} (> {tol:.3g})"
                break
            agreed += 1
    assert agreed >= 24  # most of the 48 tokens agree: the check above is not vacuous
