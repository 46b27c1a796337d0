"""scheduling_policy="priority" (vLLM's): the queue and the running batch ordered by (priority,
arrival), the lowest-priority request preempted when KV runs dry, lower-priority running requests
preempted for a higher-priority one; outputs unchanged by it. Errors for a priority the engine
would ignore."""

from __future__ import annotations

import openai
import pytest
from server_helpers import ServerThread, make_async_llm, no_requests_left, openai_client, serving

from pagedserve import LLM, SamplingParams
from pagedserve.engine.kv_cache import KVCacheManager
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.scheduler import Scheduler
from pagedserve.entrypoints.openai.api_server import build_app

PER_BLOCK_8 = 2 * 2 * 8 * 2 * 16 * 4  # the tiny llama's layers * (k, v) * block 8 * kv heads * head dim * fp32


def _sched(policy="priority", num_blocks=64, max_num_seqs=8, budget=64):
    return Scheduler(KVCacheManager(num_blocks, 4, True), max_num_seqs, budget, 256, policy=policy)


def _req(rid, n, priority=0, arrival=None, max_tokens=8):
    base = 1000 * (1 + sum(map(ord, rid)))
    r = Request(rid, list(range(base, base + n)), SamplingParams(max_tokens=max_tokens), arrival, priority=priority)
    r.max_tokens = max_tokens
    return r


def _step(s: Scheduler):
    out = s.schedule()
    s.update_from_output(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
    return [x.request.request_id for x in out.scheduled], [r.request_id for r in out.preempted]


@pytest.mark.parametrize("policy,order", [("fcfs", "abcd"), ("priority", "bdca")])
def test_queue_order(policy, order):
    s = _sched(policy, max_num_seqs=1)
    for rid, prio, t in [("a", 3, 0.0), ("b", -1, 1.0), ("c", 2, 2.0), ("d", -1, 3.0)]:
        s.add_request(_req(rid, 3, prio if policy == "priority" else 0, t, max_tokens=1))
    ran = [_step(s)[0] for _ in range(4)]
    assert ran == [[r] for r in order]  # lower priority value first, ties by arrival
    assert not s.has_unfinished_requests()


def test_higher_priority_preempts_when_seqs_are_full():
    s = _sched(max_num_seqs=2)
    s.add_request(_req("a", 5, priority=5, arrival=0.0))
    s.add_request(_req("b", 5, priority=5, arrival=1.0))
    assert _step(s) == (["a", "b"], [])
    s.add_request(_req("same", 5, priority=5, arrival=2.0))
    assert _step(s) == (["a", "b"], [])  # equal priority waits its turn
    s.add_request(_req("urgent", 5, priority=0, arrival=3.0))
    ran, preempted = _step(s)
    assert preempted == ["b"] and ran == ["a", "urgent"]  # the latest of the lowest priority goes
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and not s.kv.holds_blocks(b)
    assert [r.request_id for r in s.waiting] == ["b", "same"]  # it resumes before its later equal
    # Under FCFS the same arrival waits.
    f = _sched("fcfs", max_num_seqs=2)
    for r in (_req("a", 5), _req("b", 5)):
        f.add_request(r)
    _step(f)
    f.add_request(_req("urgent", 5))
    assert _step(f) == (["a", "b"], [])


def test_higher_priority_preempts_for_kv_blocks():
    s = _sched(num_blocks=6)  # 4-token blocks
    s.add_request(_req("low", 12, priority=2))  # 3 blocks + 1 to decode
    _step(s)
    _step(s)
    s.add_request(_req("high", 12, priority=1))  # 3 blocks: 2 free
    ran, preempted = _step(s)
    assert preempted == ["low"] and ran == ["high"]
    for _ in range(20):
        _step(s)
    assert not s.has_unfinished_requests() and s.kv.pool.num_free_blocks == 6


def test_pool_dry_preempts_lowest_priority_not_latest():
    # Both hold a full block and need a second to decode; only one is free.
    for policy, victim in [("fcfs", "x"), ("priority", "y")]:
        s = _sched(policy, num_blocks=3)
        s.add_request(_req("y", 4, priority=9 if policy == "priority" else 0, arrival=0.0))
        _step(s)  # y admitted first
        s.add_request(_req("x", 4, priority=0, arrival=1.0))
        _step(s)
        ran, preempted = _step(s)
        assert preempted == [victim] and ran == [{"x": "y", "y": "x"}[victim]]


def test_outputs_unchanged_under_priority_preemption(llama_dir):
    prompts = [[11 + 3 * i + j for j in range(20 + 7 * i)] for i in range(6)]
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ref = LLM(model=llama_dir, max_model_len=256, seed=0, block_size=8)
    want = [o.outputs[0].token_ids for o in ref.generate([{"prompt_token_ids": p} for p in prompts], sp,
                                                         use_tqdm=False)]
    llm = LLM(model=llama_dir, max_model_len=256, seed=0, block_size=8, scheduling_policy="priority",
              max_num_seqs=3, kv_cache_memory_bytes=16 * PER_BLOCK_8)
    engine = llm.llm_engine
    # Low-priority requests run; higher ones arrive while they decode and displace them.
    for i in range(3):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompts[i]}, sp, priority=5)
    finished, steps = {}, 0
    while engine.has_unfinished_requests() or steps < 3:
        if steps == 3:
            for i in range(3, 6):
                engine.add_request(f"r{i}", {"prompt_token_ids": prompts[i]}, sp, priority=i - 3)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        steps += 1
    assert engine.scheduler.num_preemptions > 0
    assert [finished[f"r{i}"] for i in range(6)] == want
    assert engine.kv.pool.num_free_blocks == engine.kv.num_blocks


def test_llm_generate_priority(llama_dir):
    llm = LLM(model=llama_dir, max_model_len=256, seed=0, scheduling_policy="priority", max_num_seqs=1)
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outs = llm.generate(["one", "two", "three"], sp, use_tqdm=False, priority=[2, 0, 1])
    assert [o.prompt for o in outs] == ["one", "two", "three"]  # results in prompt order
    ttft = [o.metrics.first_scheduled_time for o in outs]
    assert ttft[1] < ttft[2] < ttft[0]  # served in priority order
    with pytest.raises(ValueError, match="one value per prompt"):
        llm.generate(["a", "b"], sp, priority=[1])
    with pytest.raises(ValueError, match="priority must be an integer"):
        llm.generate(["a"], sp, priority=[0.5])
    assert not llm.llm_engine.has_unfinished_requests()


def test_priority_needs_the_policy(llama_dir):
    llm = LLM(model=llama_dir, max_model_len=256, seed=0)
    with pytest.raises(ValueError, match="scheduling_policy='priority'"):
        llm.generate(["a", "b"], SamplingParams(max_tokens=2), priority=[0, 1])
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate(["a"], SamplingParams(max_tokens=2), priority=[0], use_tqdm=False)  # 0 is the default
    with pytest.raises(ValueError, match="scheduling_policy must be"):
        LLM(model=llama_dir, max_model_len=256, scheduling_policy="lifo")


def test_server_takes_priority(llama_dir):
    llm = make_async_llm(llama_dir, scheduling_policy="priority")
    srv = ServerThread(build_app(llm, "m"))
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x")
        kw = dict(model="m", max_tokens=4, temperature=0.0, extra_body={"ignore_eos": True})
        plain = client.completions.create(prompt="hello there", **kw)
        urgent = client.completions.create(prompt="hello there", **{**kw, "extra_body": {"ignore_eos": True,
                                                                                          "priority": -3}})
        assert urgent.choices[0].text == plain.choices[0].text
        chat = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], stream=True,
                                              **{**kw, "extra_body": {"priority": 7}})
        assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
        resp = client.responses.create(model="m", input="hi", max_output_tokens=3, extra_body={"priority": 1})
        assert resp.status in ("completed", "incomplete")
        assert no_requests_left(llm)
    finally:
        srv.stop()
        llm.shutdown()


def test_embeddings_take_priority(base_dir):
    """/v1/embeddings (and /classify, /score, /rerank, which share its path) take `priority`: a
    400 naming it under FCFS, the same vectors under the priority policy."""
    with serving(base_dir, "e") as fcfs, openai_client(fcfs) as client:
        plain = client.embeddings.create(model="e", input="hello there").data[0].embedding
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model="e", input="hello there", extra_body={"priority": 2})
        assert e.value.body["param"] == "priority"
    with serving(base_dir, "e", engine_kwargs={"scheduling_policy": "priority"}) as srv, openai_client(srv) as client:
        got = client.embeddings.create(model="e", input=["hello there", "x"], extra_body={"priority": -1}).data
        assert got[0].embedding == pytest.approx(plain, rel=1e-5, abs=1e-6)
        assert no_requests_left(srv.llm)
