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
