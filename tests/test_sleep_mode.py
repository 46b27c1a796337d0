"""Sleep mode and weight updates, as RL trainers use vLLM: LLM.sleep / wake_up give the
device memory of the weights and KV cache back and take it again with unchanged outputs;
weights from a trainer (collective_rpc, or TRL's driver_worker.model_runner.model path) make
the engine answer as the new checkpoint does in transformers."""

from __future__ import annotations

import pytest
import torch

from conftest import MODEL_SPECS, HFReference, assert_greedy_matches
from pagedserve import LLM, SamplingParams
from pagedserve.errors import EngineSleepingError
from pagedserve.model.random_model import build_random_model

PROMPTS = [[1, 5, 9, 14, 3, 7, 22, 8, 40, 2, 17, 33, 6, 11, 19, 25, 31, 4], [1, 100, 200, 300]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2)


def _run(llm: LLM) -> list[tuple[list[int], list]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in outs]


def _assert_same(a: list, b: list, tol: float = 1e-5) -> None:
    """Same tokens, logprobs equal up to summation order (a prefix-cache hit prefills less)."""
    for (t0, lp0), (t1, lp1) in zip(a, b, strict=True):
        assert t0 == t1
        assert all(abs(x[t].logprob - y[t].logprob) < tol for t, x, y in zip(t0, lp0, lp1))


def _storage_bytes(llm: LLM) -> tuple[int, int]:
    runner = llm.llm_engine.runner
    weights = sum(p.untyped_storage().nbytes() for p in runner.model.parameters())
    kv = sum(t.untyped_storage().nbytes() for pair in runner.kv_caches for t in pair)
    return weights, kv


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(llama_dir, enable_sleep_mode=True, max_model_len=256, seed=0, block_size=4)


def test_sleep_level1_gives_memory_back_and_keeps_outputs(llm):
    before = _run(llm)
    _run(llm)  # the second run hits the prefix cache
    assert llm.llm_engine.kv.pool.cached
    llm.sleep(level=1)
    assert llm.llm_engine.is_sleeping()
    assert _storage_bytes(llm) == (0, 0)
    assert not llm.llm_engine.kv.pool.cached  # the cached prefixes went with the KV cache
    with pytest.raises(EngineSleepingError, match="asleep"):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()  # nothing was left queued
    with pytest.raises(RuntimeError, match="already asleep"):
        llm.sleep(level=1)
    llm.wake_up()
    assert not llm.llm_engine.is_sleeping()
    assert all(b > 0 for b in _storage_bytes(llm))
    _assert_same(_run(llm), before)


def test_sleep_level2_then_reload_weights(llm):
    before = _run(llm)
    llm.sleep(level=2)
    llm.wake_up(tags=["weights"])  # the KV cache stays given back: still asleep
    assert llm.llm_engine.is_sleeping() and llm.llm_engine.runner.sleeping_tags == ["kv_cache"]
    assert _storage_bytes(llm)[1] == 0
    with torch.no_grad():  # what level 2 dropped is gone: make sure the reload is what restores it
        for p in llm.llm_engine.runner.model.parameters():
            p.zero_()
    assert llm.collective_rpc("reload_weights") == [None]
    llm.wake_up(tags=["kv_cache"])
    _assert_same(_run(llm), before)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3_moe", "qwen3_5", "granite_hybrid"])
def test_weights_from_a_trainer_match_the_new_checkpoint(name, model_dirs, tokenizer_dir, tmp_path):
    """A policy update: the engine runs checkpoint A; a trainer's model B (another random
    init of the same config) is pushed in by name, half through collective_rpc, half as TRL
    does (driver_worker.model_runner.model.load_weights, one tensor at a time); the engine
    then answers as transformers does on B (tied embeddings and fused experts included)."""
    from transformers import AutoModelForCausalLM

    arch, kwargs = MODEL_SPECS[name]
    new_dir = str(tmp_path / "b")
    build_random_model(new_dir, arch, initializer_range=0.5, tokenizer_dir=tokenizer_dir, seed=7, **kwargs)
    llm = LLM(model_dirs[name], enable_sleep_mode=True, max_model_len=256, seed=0)
    _run(llm)  # fills the prefix cache with A's keys and values
    trainer = AutoModelForCausalLM.from_pretrained(new_dir, dtype=torch.float32)
    named = list(trainer.named_parameters())
    half = len(named) // 2
    llm.sleep(level=2)
    llm.wake_up(tags=["weights"])
    assert llm.collective_rpc("load_weights", args=([(n, p.detach()) for n, p in named[:half]],)) == [half]
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    for n, p in named[half:]:
        model.load_weights([(n, p)])  # as TRL passes them: parameters that require grad
    assert not any(p.requires_grad for p in model.parameters())
    llm.wake_up(tags=["kv_cache"])
    ref = HFReference(new_dir)
    for prompt, (tokens, logprobs) in zip(PROMPTS, _run(llm)):
        want = ref.greedy(prompt, GREEDY.max_tokens)
        assert_greedy_matches(want, tokens)
        for t, row, lp in zip(tokens, want.logits, logprobs):
            assert abs(lp[t].logprob - float(torch.log_softmax(row, -1)[t])) < 2e-3


def test_bad_calls_are_clear_errors(llm, llama_dir):
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        LLM(llama_dir, max_model_len=64).sleep()
    with pytest.raises(ValueError, match="sleep level"):
        llm.sleep(level=3)
    assert not llm.llm_engine.is_sleeping()
    with pytest.raises(ValueError, match="wake_up tags"):
        llm.wake_up(tags=["optimizer"])
    with pytest.raises(ValueError, match="unknown worker method 'nope'.*load_weights"):
        llm.collective_rpc("nope")
    with pytest.raises(ValueError, match="unknown worker method '_engine'"):
        llm.collective_rpc("_engine")
    w = llm.llm_engine.runner.model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="has no place"):
        llm.collective_rpc("load_weights", args=([("model.nonexistent.weight", w)],))
    with pytest.raises(ValueError, match="shape"):
        llm.collective_rpc("load_weights", args=([("model.embed_tokens.weight", w[:3])],))
    with pytest.raises(ValueError, match=r"\(name, tensor\) pairs"):
        llm.collective_rpc("load_weights", args=([("model.embed_tokens.weight", [1.0])],))
    # A callable gets the worker, as vLLM's collective_rpc gives it.
    assert llm.collective_rpc(lambda w: w.device.type) == ["cpu"]
    # Sleeping or updating under running requests is refused, and they still finish.
    engine = llm.llm_engine
    engine.add_request("busy", {"prompt_token_ids": PROMPTS[1]}, GREEDY)
    for call in (lambda: llm.sleep(), lambda: llm.collective_rpc("reload_weights")):
        with pytest.raises(RuntimeError, match="idle engine: 1 requests"):
            call()
    assert not engine.is_sleeping()
    while engine.has_unfinished_requests():
        engine.step()


def test_quantized_models_refuse_weight_updates(llama_dir):
    llm = LLM(llama_dir, quantization="fp8", max_model_len=64)
    w = llm.llm_engine.runner.model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="unquantized"):
        llm.collective_rpc("load_weights", args=([("model.embed_tokens.weight", w)],))


def test_server_dev_routes(llama_dir):
    """vLLM's dev-mode endpoints: behind the API key, off unless asked for, and a request
    while asleep is a 503 with an OpenAI error body, not a hang."""
    import httpx

    from server_helpers import serving

    auth = {"Authorization": "Bearer k"}
    body = {"model": "tiny-llama", "prompt": [1, 5, 9], "max_tokens": 3, "temperature": 0}
    with serving(llama_dir, engine_kwargs={"enable_sleep_mode": True}, api_key="k", dev_mode=True) as srv:
        with httpx.Client(base_url=srv.url, headers=auth, timeout=30) as c:
            before = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
            assert httpx.post(f"{srv.url}/sleep").status_code == 401
            assert c.get("/is_sleeping").json() == {"is_sleeping": False}
            assert c.post("/sleep", params={"level": 1}).status_code == 200
            assert c.get("/is_sleeping").json() == {"is_sleeping": True}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 503 and "asleep" in r.json()["error"]["message"]
            r = c.post("/sleep")
            assert r.status_code == 409 and "already asleep" in r.json()["error"]["message"]
            assert c.post("/wake_up", params=[("tags", "weights")]).status_code == 200
            assert c.get("/is_sleeping").json() == {"is_sleeping": True}
            assert c.post("/wake_up", params=[("tags", "kv_cache")]).status_code == 200
            assert c.get("/is_sleeping").json() == {"is_sleeping": False}
            assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == before
            assert c.post("/collective_rpc", json={"method": "reload_weights"}).json() == {"results": [None]}
            r = c.post("/collective_rpc", json={"method": "nope"})
            assert r.status_code == 400 and "unknown worker method" in r.json()["error"]["message"]
            r = c.post("/wake_up", params=[("tags", "gpu")])
            assert r.status_code == 400 and "wake_up tags" in r.json()["error"]["message"]
            assert c.post("/reset_prefix_cache").status_code == 200
            assert c.get("/get_world_size").json() == {"world_size": 1}
    with serving(llama_dir, dev_mode=False) as srv:
        assert httpx.post(f"{srv.url}/sleep").status_code == 404


@pytest.mark.gpu
def test_sleep_frees_cuda_memory_and_graphs_come_back(llama_dir):
    """On CUDA: sleep gives the weights' and the KV cache's memory back to the driver, and
    after wake-up the decode CUDA graphs (captured again: the old ones held freed addresses)
    give the same greedy tokens and logprobs."""
    llm = LLM(llama_dir, device="cuda", dtype="float32", enable_sleep_mode=True, max_model_len=256,
              kv_cache_memory_bytes=64 << 20, max_num_seqs=8)
    runner = llm.llm_engine.runner
    assert runner.graphs is not None
    before = _run(llm)
    weights, kv = _storage_bytes(llm)
    held = torch.cuda.memory_allocated()
    llm.sleep(level=1)
    assert held - torch.cuda.memory_allocated() >= weights + kv
    assert runner.graphs is None
    llm.wake_up()
    assert runner.graphs is not None
    _assert_same(_run(llm), before, tol=1e-4)


def test_dummy_weights_need_no_checkpoint(llama_dir, tmp_path):
    """load_format='dummy' (vLLM's): a config.json and tokenizer suffice; weights uniform in
    [-1e-3, 1e-3], the same for the same seed; a quantized model and other formats refused."""
    import json
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(llama_dir, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLM(str(bare), max_model_len=64)
    llm = LLM(str(bare), load_format="dummy", max_model_len=64, seed=3)
    params = list(llm.llm_engine.runner.model.parameters())
    assert all(float(p.abs().max()) <= 1e-3 for p in params) and float(params[0].std()) > 1e-4
    out = llm.generate(["hello"], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    again = LLM(str(bare), load_format="dummy", max_model_len=64, seed=3).llm_engine.runner.model.parameters()
    assert all(torch.equal(a, b) for a, b in zip(params, again))
    with pytest.raises(ValueError, match="cannot be reloaded"):
        llm.collective_rpc("reload_weights")
    with pytest.raises(ValueError, match="load_format must be one of"):
        LLM(str(bare), load_format="pt")
    with pytest.raises(ValueError, match="quantized model"):
        LLM(str(bare), load_format="dummy", quantization="fp8")
    cfg = json.loads((bare / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": None, "activation_scheme": "dynamic"}
    (bare / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantized model"):
        LLM(str(bare), load_format="dummy")


class ParamStats:
    """A worker extension, as an RL library brings one (vLLM's worker_extension_cls)."""

    def param_sum(self, name: str) -> float:
        return float(dict(self.get_model().named_parameters())[name].sum())

    def scale_param(self, name: str, factor: float) -> None:
        with torch.no_grad():
            dict(self.model_runner.model.named_parameters())[name].mul_(factor)


class Clashing:
    def load_weights(self, weights) -> None:
        pass


def test_worker_extension_and_apply_model(llama_dir):
    llm = LLM(llama_dir, worker_extension_cls=f"{__name__}.ParamStats", max_model_len=64)
    name = "model.norm.weight"
    before = llm.collective_rpc("param_sum", args=(name,))
    assert before == llm.apply_model(lambda m: float(m.model.norm.weight.sum()))
    llm.collective_rpc("scale_param", kwargs={"name": name, "factor": 2.0})
    assert llm.collective_rpc("param_sum", args=(name,))[0] == pytest.approx(2 * before[0])
    with pytest.raises(ValueError, match="could not be imported"):
        LLM(llama_dir, worker_extension_cls="no_such_module.Thing", max_model_len=64)
    with pytest.raises(ValueError, match=r"redefines the worker's \['load_weights'\]"):
        LLM(llama_dir, worker_extension_cls=f"{__name__}.Clashing", max_model_len=64)
    assert llm.llm_engine.reset_prefix_cache()


def _stream_tokens(url: str, body: dict, got: list, done: list) -> None:
    """A streamed completion's token ids into `got` as they come; its finish reason into `done`."""
    import json

    import httpx

    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                got.extend(choice.get("token_ids") or [])
                if choice.get("finish_reason"):
                    done.append(choice["finish_reason"])


def _settled(got: list, quiet_s: float = 0.4, timeout_s: float = 10.0) -> int:
    """How many tokens a paused stream ends with: tokens sampled before the pause may still be
    on their way to the client, so wait until none has come for `quiet_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    n = -1
    while n != len(got):
        n = len(got)
        time.sleep(quiet_s)
        assert time.monotonic() < deadline, "the stream did not stop"
    return n


def test_pause_and_resume_generation(llama_dir):
    """vLLM's /pause and /resume (dev mode): "keep" freezes a streaming request and, with
    clear_cache, makes it recompute on resume with the same greedy tokens; "abort" ends it; "wait"
    returns once it has finished. A request that arrives while paused waits for the resume."""
    import threading
    import time

    import httpx

    from server_helpers import serving, wait_for

    body = {"model": "tiny-llama", "prompt": [1, 5, 9, 14], "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    with serving(llama_dir, engine_kwargs={"max_model_len": 512}, dev_mode=True) as srv:
        c = httpx.Client(base_url=srv.url, timeout=60)
        want = c.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]
        for mode in ("keep", "abort", "wait"):
            got, done = [], []
            t = threading.Thread(target=_stream_tokens, args=(srv.url, body, got, done))
            t.start()
            wait_for(lambda: len(got) >= 5, 30, "the stream started")
            assert c.post("/pause", params={"mode": mode}).status_code == 200
            assert c.get("/is_paused").json() == {"is_paused": True}
            if mode == "wait":  # returned only once the request had finished
                t.join(5)
                assert done == ["length"] and got == want
            else:
                frozen = _settled(got)
                time.sleep(0.3)
                assert len(got) == frozen < len(want)  # nothing generated while paused
            late_got, late_done = [], []
            late = threading.Thread(target=_stream_tokens, args=(srv.url, {**body, "max_tokens": 3}, late_got,
                                                                 late_done))
            late.start()
            time.sleep(0.3)
            assert not late_done  # queued, not run
            assert c.post("/resume").status_code == 200
            assert c.get("/is_paused").json() == {"is_paused": False}
            t.join(30)
            late.join(30)
            assert late_done == ["length"] and late_got == want[:3]
            if mode == "keep":  # recomputed after the pause (clear_cache), with the same tokens
                assert done == ["length"] and got == want and srv.llm.engine.scheduler.num_preemptions == 1
            elif mode == "abort":
                assert done == ["abort"] and got == want[:len(got)]
        r = c.post("/pause", params={"mode": "later"})
        assert r.status_code == 400 and "pause mode" in r.json()["error"]["message"]


def test_weights_pushed_while_paused_take_over(llama_dir, tokenizer_dir, tmp_path):
    """The async-RL loop: pause ("keep"), push new weights into the frozen engine, resume. The
    tokens before the pause came from the old weights; the rest are the new model's greedy
    continuation of them (clear_cache: recomputed, not read from the old KV)."""
    import asyncio
    import threading

    import httpx

    from server_helpers import serving, wait_for

    arch, kwargs = MODEL_SPECS["llama"]
    new_dir = str(tmp_path / "new")
    build_random_model(new_dir, arch, initializer_range=0.5, tokenizer_dir=tokenizer_dir, seed=9, **kwargs)
    from pagedserve.model.loader import iterate_safetensors

    weights = list(iterate_safetensors(new_dir, torch.float32, torch.device("cpu")))
    body = {"model": "tiny-llama", "prompt": [1, 5, 9, 14], "max_tokens": 150, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    with serving(llama_dir, engine_kwargs={"max_model_len": 512}, dev_mode=True) as srv:
        got, done = [], []
        t = threading.Thread(target=_stream_tokens, args=(srv.url, body, got, done))
        t.start()
        wait_for(lambda: len(got) >= 5, 30, "the stream started")
        assert httpx.post(f"{srv.url}/pause", params={"mode": "keep"}).status_code == 200
        frozen = _settled(got)
        pushed = asyncio.run(srv.llm.call_engine(lambda e: e.collective_rpc("load_weights", args=(weights,))))
        assert pushed == [len(weights)]
        assert httpx.post(f"{srv.url}/resume").status_code == 200
        t.join(30)
    assert done == ["length"] and frozen < len(got) == 150
    new = LLM(new_dir, max_model_len=512)
    rest = new.generate([{"prompt_token_ids": body["prompt"] + got[:frozen]}],
                        SamplingParams(temperature=0, max_tokens=150 - frozen, ignore_eos=True), use_tqdm=False)
    assert got[frozen:] == list(rest[0].outputs[0].token_ids)
