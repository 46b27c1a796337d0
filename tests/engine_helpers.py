"""Checks shared by the offline-engine tests."""

from __future__ import annotations

from pagedserve import LLM


def assert_no_leak(llm: LLM) -> None:
    """Nothing is left behind once every request ended: KV blocks, per-request state."""
    eng = llm.llm_engine
    kv = eng.kv
    assert kv.pool.num_free_blocks == kv.num_blocks and not kv.req_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert not eng.has_unfinished_requests() and not eng.output_processor.states
    assert not eng.runner.sampling_states.states


# Two prompts, short and longer than a block, for checks against transformers.
HF_PROMPTS = [[(7 * i + 3 * j) % 900 + 4 for j in range(n)] for i, n in enumerate((6, 21))]


def hf_greedy(hf, prompt: list[int], n: int) -> tuple[list[int], list]:
    """transformers' greedy continuation of `prompt`, and each step's log-softmax row."""
    import torch

    ids, toks, rows = list(prompt), [], []
    with torch.inference_mode():
        for _ in range(n):
            row = hf(torch.tensor([ids])).logits[0, -1].float()
            toks.append(int(row.argmax()))
            rows.append(row.log_softmax(-1))
            ids.append(toks[-1])
    return toks, rows


def assert_greedy_matches_hf(llm: LLM, hf, n: int = 6, tol: float = 2e-4) -> list:
    """The engine's greedy tokens on HF_PROMPTS equal transformers', logprobs within `tol`;
    returns the engine's outputs."""
    from pagedserve import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in HF_PROMPTS],
                        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2), use_tqdm=False)
    for p, o in zip(HF_PROMPTS, outs):
        tokens, rows = hf_greedy(hf, p, n)
        assert o.outputs[0].token_ids == tokens
        for i, t in enumerate(tokens):
            assert abs(o.outputs[0].logprobs[i][t].logprob - float(rows[i][t])) < tol
    return outs


def lora_runs(path: str, adapter: str) -> dict:
    """(tokens, logprobs) per prompt for a quantized checkpoint under an adapter: on the CPU
    path (dequantized layers), the Triton path (layers kept quantized), and the Triton path
    without the adapter; keyed (backend, with adapter)."""
    from pagedserve import SamplingParams
    from pagedserve.lora.request import LoRARequest

    prompts = [{"prompt_token_ids": [(5 * j + i) % 900 + 4 for j in range(n)]} for i, n in enumerate((7, 19))]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    runs = {}
    for backend, lora in (("cpu", True), ("triton", True), ("triton", False)):
        llm = LLM(path, attention_backend=backend, dtype="float32", enable_lora=True)
        outs = llm.generate(prompts, sp, use_tqdm=False, lora_request=LoRARequest("a", 1, adapter) if lora else None)
        runs[backend, lora] = [(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                                        o.outputs[0].token_ids)])
                               for o in outs]
    return runs


def spy_proposals(llm: LLM) -> list:
    """Record every proposal a batched proposer (draft model, EAGLE head) makes: (the
    request's tokens then, the drafts); catch-up-only items (k = 0) are left out."""
    proposer = llm.llm_engine.scheduler.proposer
    calls: list = []
    inner = proposer.propose_batch

    def spy(items):
        seen = [(list(r.all_token_ids), k) for r, _, k in items]
        out = inner(items)
        calls.extend((toks, out[r.request_id]) for (toks, k), (r, _, _) in zip(seen, items) if k)
        assert all(len(out[r.request_id]) == k for r, _, k in items)
        return out

    proposer.propose_batch = spy
    return calls


def state_step_meta(lens: list[int], num_decodes: int, rows: list[int], init: list[bool]):
    """The metadata a state layer (model/layers/state_mixer.py) reads for one step: requests of
    `lens` tokens (the first num_decodes of one), their state rows, and whether each continues
    its row's state."""
    import types

    import torch

    from pagedserve.attention.backend import StateRows

    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    states = StateRows(torch.tensor(rows), torch.tensor(init, dtype=torch.float32), rows, init)
    return types.SimpleNamespace(states=states, num_decodes=num_decodes, num_reqs=len(lens), query_start_loc_cpu=qsl)


def layer_in_pieces_against_whole(ours, hf, hidden: int) -> None:
    """A state layer (its weights those of transformers' layer `hf`) run over two sequences in
    pieces through state rows full of garbage, against `hf` over each whole sequence: a's
    first 37 tokens as a prefill chunk; b's first token (a one-token prompt in a used row, so
    a fresh state) beside a's next 23; a's next token beside the rest of b."""
    import torch

    ours.allocate_state(3, torch.device("cpu"), torch.float32, torch.float32)
    for t in ours.state_tensors():  # a finished request's leftovers, which fresh requests must not read
        t.normal_()
    a, b = torch.randn(80, hidden), torch.randn(70, hidden)
    want_a, want_b = hf(a.unsqueeze(0))[0], hf(b.unsqueeze(0))[0]
    got_a, got_b = [ours(None, a[:37], state_step_meta([37], 0, [2], [False]))], []
    out = ours(None, torch.cat([b[:1], a[37:60]]), state_step_meta([1, 23], 1, [0, 2], [False, True]))
    got_b.append(out[:1])
    got_a.append(out[1:])
    out = ours(None, torch.cat([a[60:61], b[1:70]]), state_step_meta([1, 69], 1, [2, 0], [True, True]))
    got_a.append(out[:1])
    got_b.append(out[1:])
    torch.testing.assert_close(torch.cat(got_a), want_a[:61], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(got_b), want_b, rtol=1e-4, atol=1e-4)


def assert_scan_equals_recurrence(step, inputs: tuple, state, at: int, keep: list[int], out, final, kept) -> None:
    """A scan's results over one sequence (`out` [L, ...], its `final` state, the `kept` states
    before each position of `keep`), from `state` at position `at`, against `step`(*one
    token's inputs, state [1, ...]) -> (out [1, ...], new state) run token by token (float64:
    equal to 1e-10)."""
    import torch

    s, steps, want_kept = state.unsqueeze(0), [], []
    for t in range(len(inputs[0])):
        if at + t in keep:
            want_kept.append(s[0])
        o, s = step(*(x[t:t + 1] for x in inputs), s)
        steps.append(o[0])
    torch.testing.assert_close(out, torch.stack(steps), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, s[0], rtol=1e-10, atol=1e-10)
    assert len(kept) == len(want_kept) == len(keep)
    for got, want in zip(kept, want_kept):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
