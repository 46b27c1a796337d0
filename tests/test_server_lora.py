"""LoRA adapters through the OpenAI server: each served under its own model name, listed in
/v1/models, and giving the offline engine's output for that adapter."""

from __future__ import annotations

import pytest
from server_helpers import openai_client, serving

from pagedserve import LLM, SamplingParams
from pagedserve.entrypoints.cli import main
from pagedserve.entrypoints.openai.api_server import parse_lora_modules
from pagedserve.lora.random_adapter import make_adapter
from pagedserve.lora.request import LoRARequest


@pytest.fixture(scope="module")
def adapter_dirs(llama_dir, tmp_path_factory):
    return [make_adapter(llama_dir, str(tmp_path_factory.mktemp(f"srv_lora{i}")), seed=10 + i)[0] for i in range(2)]


@pytest.fixture(scope="module")
def lora_server(llama_dir, adapter_dirs):
    loras = parse_lora_modules([f"sql={adapter_dirs[0]}", f'{{"name": "poet", "path": "{adapter_dirs[1]}"}}'])
    with serving(llama_dir, "tiny-llama", engine_kwargs=dict(enable_lora=True, max_loras=2),
                 lora_modules=loras) as srv:
        for lora in loras:
            srv.llm.engine.check_lora(lora)
        yield srv


def test_adapters_are_models(lora_server, llama_dir, adapter_dirs):
    offline = LLM(llama_dir, max_model_len=512, enable_lora=True, max_loras=2)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompt = "The capital of France is"
    with openai_client(lora_server) as client:
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"tiny-llama", "sql", "poet"}
        assert models["sql"].parent == "tiny-llama" and models["sql"].root == adapter_dirs[0]
        texts = {}
        for name, lora in (("tiny-llama", None), ("sql", LoRARequest("sql", 1, adapter_dirs[0])),
                           ("poet", LoRARequest("poet", 2, adapter_dirs[1]))):
            got = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0,
                                            extra_body={"ignore_eos": True})
            want = offline.generate(prompt, sp, use_tqdm=False, lora_request=lora)[0].outputs[0].text
            assert got.model == name and got.choices[0].text == want
            texts[name] = want
            stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=8, temperature=0, stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            whole = offline.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=8),
                                 use_tqdm=False, lora_request=lora)[0].outputs[0].text
            assert streamed == whole
        assert len(set(texts.values())) == 3  # the adapters change the output
        import openai

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="prose", prompt=prompt, max_tokens=2)


def test_lora_module_flags():
    assert parse_lora_modules(["a=/x", '{"name": "b", "path": "/y"}']) == [LoRARequest("a", 1, "/x"),
                                                                           LoRARequest("b", 2, "/y")]
    for bad, match in ((["a"], "name=path"), (["a=/x", "a=/y"], "given twice"), (['{"name": "a"}'], "path")):
        with pytest.raises(ValueError, match=match):
            parse_lora_modules(bad)


def test_serve_refuses_lora_modules_without_enable_lora(llama_dir, capsys):
    assert main(["serve", llama_dir, "--lora-modules", "a=/nowhere"]) == 2
    assert "--enable-lora" in capsys.readouterr().err


def test_runtime_load_and_unload(llama_dir, adapter_dirs, tmp_path):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: a loaded adapter is a model
    at once, with the offline engine's output; unloaded, it is a 404; bad adapters and names
    are 400s that serve nothing. Without the operator's permission the paths do not exist."""
    import httpx

    offline = LLM(llama_dir, max_model_len=512, enable_lora=True, max_loras=2)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = "The capital of France is"
    want = [offline.generate(prompt, sp, use_tqdm=False, lora_request=LoRARequest(f"a{i}", i + 1, d))[0].outputs[0].text
            for i, d in enumerate(adapter_dirs)]
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with serving(llama_dir, "tiny-llama", engine_kwargs=dict(enable_lora=True, max_loras=2),
                 allow_runtime_lora=True) as srv:
        url = srv.url
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": adapter_dirs[0]})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql' added successfully.", r.text
        assert "sql" in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        r = httpx.post(f"{url}/v1/completions", json={"model": "sql", **body})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want[0], r.text
        # Again under the same name: refused; in place: the other adapter under that name.
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": adapter_dirs[1]})
        assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"], r.text
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": adapter_dirs[1],
                                                              "load_inplace": True})
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/v1/completions", json={"model": "sql", **body})
        assert r.json()["choices"][0]["text"] == want[1], r.text
        for bad, param in (({"lora_name": "x", "lora_path": str(tmp_path)}, "lora_path"),
                           ({"lora_name": "tiny-llama", "lora_path": adapter_dirs[0]}, "lora_name")):
            r = httpx.post(f"{url}/v1/load_lora_adapter", json=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]} == {"tiny-llama", "sql"}
        r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "sql"})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql' removed successfully.", r.text
        r = httpx.post(f"{url}/v1/completions", json={"model": "sql", **body})
        assert r.status_code == 404, r.text
        r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "sql"})
        assert r.status_code == 404, r.text
    with serving(llama_dir, "tiny-llama", engine_kwargs=dict(enable_lora=True)) as srv:
        r = httpx.post(f"{srv.url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": adapter_dirs[0]})
        assert r.status_code == 404, r.text


def test_runtime_lora_permission_comes_from_the_environment(monkeypatch):
    from pagedserve.entrypoints.openai.serving_lora import runtime_lora_allowed

    for var in ("PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        monkeypatch.delenv(var, raising=False)
    assert not runtime_lora_allowed()
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    assert runtime_lora_allowed()
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0")
    monkeypatch.setenv("PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING", "1")
    assert runtime_lora_allowed()
