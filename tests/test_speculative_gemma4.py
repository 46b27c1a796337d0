"""Speculative decoding with a Gemma 4 assistant (model/gemma4_assistant.py,
worker/assistant_proposer.py), given as a draft model: every proposal is what transformers'
own Gemma4AssistantForCausalLM gives, fed as its candidate generator feeds it (the target's
embedding of the last token and its last hidden state, the target's "store" layers' keys and
values over the accepted tokens, one position for every draft); outputs are plain decoding's;
nothing leaks; a target other than Gemma 4 is refused."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import assert_no_leak, spy_proposals

from pagedserve import LLM, SamplingParams
from pagedserve.model.random_model import build_random_gemma4_assistant


class AssistantTwin:
    def __init__(self, target_dir: str, assistant_dir: str) -> None:
        import transformers

        self.target = transformers.AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
        self.assistant = transformers.Gemma4AssistantForCausalLM.from_pretrained(assistant_dir,
                                                                                 dtype=torch.float32).eval()

    @torch.inference_mode()
    def drafts(self, tokens: list[int], k: int) -> list[int]:
        n = len(tokens)
        out = self.target(torch.tensor([tokens[:-1]]), output_hidden_states=True, return_shared_kv_states=True)
        hidden, kv = out.hidden_states[-1][:, -1:], out.shared_kv_states
        last, pos, drafts = torch.tensor([[tokens[-1]]]), torch.tensor([[n - 1]]), []
        for _ in range(k):
            embeds = torch.cat([self.target.get_input_embeddings()(last), hidden], dim=-1)
            o = self.assistant(inputs_embeds=embeds, position_ids=pos, shared_kv_states=kv)
            last, hidden = o.logits.argmax(-1), o.last_hidden_state
            drafts.append(int(last))
        return drafts


def _prompts(n: int) -> list[list[int]]:
    return [[(13 * i + 5 * j) % 900 + 4 for j in range(6 + 17 * i)] for i in range(n)]


def _tokens(outs) -> list:
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_assistant_drafts_are_transformers(model_dirs, tmp_path):
    """k = 3 over a Gemma 4 target with KV-sharing layers, experts and per-layer inputs;
    prompts longer than its 19-token window; the centroid-masked logits (the graph test below
    takes the plain LM head)."""
    target = model_dirs["gemma4"]
    head = build_random_gemma4_assistant(str(tmp_path / "assistant"), target, seed=1)
    twin = AssistantTwin(target, head)
    plain = LLM(target, max_model_len=256, async_scheduling=False)
    llm = LLM(target, max_model_len=256, max_num_batched_tokens=16, max_num_seqs=4,
              speculative_config={"model": head, "num_speculative_tokens": 3})
    runner = llm.llm_engine.runner
    assert type(runner.draft).__name__ == "AssistantProposer"
    assert runner.draft.kv_block_bytes() == 0  # (it reads the target's KV)
    # kv_sharing_fast_prefill stays on: the assistant reads sampled rows' features only.
    narrowed = []
    needed_rows = runner._needed_rows
    runner._needed_rows = lambda host: narrowed.append(len(host.needed_rows)) or needed_rows(host)
    calls = spy_proposals(llm)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts(3)]
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == _tokens(plain.generate(prompts, params,
                                                                                             use_tqdm=False))
    assert len(calls) > 6 and runner.fast_prefill and narrowed
    for toks, drafts in calls:
        assert drafts == twin.drafts(toks, len(drafts)), len(toks)
    assert_no_leak(llm)
    sampled = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True, seed=3, n=2)
    assert all(len(c.token_ids) == 10 for o in llm.generate(prompts, sampled, use_tqdm=False) for c in o.outputs)
    assert_no_leak(llm)


def test_assistant_needs_a_gemma4_target(model_dirs, tmp_path):
    head = build_random_gemma4_assistant(str(tmp_path / "assistant"), model_dirs["gemma4"])
    with pytest.raises(ValueError, match="drafts for Gemma 4"):
        LLM(model_dirs["llama"], max_model_len=64, speculative_config={"model": head, "num_speculative_tokens": 2})


def test_graph_passes_on_static_buffers(model_dirs, tmp_path):
    """The assistant's CUDA-graph passes (one row a request) on their static buffers, replayed
    eagerly here (capture=False) on the Triton backend: every proposal the twin's, the outputs
    plain decoding's."""
    pytest.importorskip("triton")
    target = model_dirs["gemma4"]
    head = build_random_gemma4_assistant(str(tmp_path / "assistant"), target, ordered=False, seed=2)
    twin = AssistantTwin(target, head)
    plain = LLM(target, max_model_len=64, async_scheduling=False)
    llm = LLM(target, attention_backend="triton", dtype="float32", block_size=8, max_num_seqs=4, max_model_len=64,
              speculative_config={"model": head, "num_speculative_tokens": 2})
    runner = llm.llm_engine.runner
    made = runner.draft.make_graphs(lambda fn, q: runner.make_graph_runner(capture=False, model=fn, query_len=q))
    assert [g.query_len for g in made] == [1]
    rows: list[int] = []
    run = made[0].run
    made[0].run = lambda *a: rows.append(len(a[0])) or run(*a)
    calls = spy_proposals(llm)
    prompts = [{"prompt_token_ids": p} for p in ([5, 9, 2], [7, 1, 4, 8, 9, 10, 11], [3, 3])]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == _tokens(plain.generate(prompts, params,
                                                                                             use_tqdm=False))
    assert rows and len(calls) > 4
    for toks, drafts in calls:
        assert drafts == twin.drafts(toks, len(drafts))
