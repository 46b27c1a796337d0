"""The model's recommended sampling defaults (vLLM's --generation-config): generation_config.json's
temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens become the defaults of
requests that leave them unset, offline (LLM.generate without sampling_params) and on the
server; "vllm" ignores them; a request's own values win."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from server_helpers import openai_client, serving

from pagedserve import LLM, SamplingParams
from pagedserve.model.generation_defaults import sampling_defaults

# Greedy (so outputs compare exactly), and a penalty that changes a greedy reply.
GEN = {"temperature": 0.0, "repetition_penalty": 1.8, "max_new_tokens": 7, "top_k": 20, "do_sample": True,
       "eos_token_id": 2}


def _folder(tmp_path, data):
    folder = tmp_path / "gen"
    folder.mkdir(exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(data))
    return str(folder)


def test_defaults_read_mapped_and_overridden(tmp_path):
    folder = _folder(tmp_path, GEN)
    assert sampling_defaults(folder) == {"temperature": 0.0, "repetition_penalty": 1.8, "max_tokens": 7, "top_k": 20}
    assert sampling_defaults("/nowhere", folder) == sampling_defaults(folder)  # a directory as the source
    assert sampling_defaults(folder, "vllm") == {}
    assert sampling_defaults(folder, override={"temperature": 0.5, "max_new_tokens": 3}) == {
        "temperature": 0.5, "repetition_penalty": 1.8, "max_tokens": 3, "top_k": 20}
    assert sampling_defaults(str(tmp_path)) == {}  # no generation_config.json: nothing
    with pytest.raises(ValueError, match="override_generation_config.*do_sample"):
        sampling_defaults(folder, override={"do_sample": False})
    with pytest.raises(ValueError, match="generation_config must be"):
        sampling_defaults(folder, "/no/such/dir")
    (tmp_path / "gen" / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        sampling_defaults(folder)


def test_offline_defaults_follow_the_model(model_dirs, tmp_path):
    model = str(tmp_path / "model")
    shutil.copytree(model_dirs["llama"], model)
    with open(os.path.join(model, "generation_config.json")) as f:
        on_disk = json.load(f)
    with open(os.path.join(model, "generation_config.json"), "w") as f:
        json.dump({**on_disk, **GEN}, f)
    llm = LLM(model, max_model_len=256)
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.repetition_penalty, params.max_tokens) == (0.0, 1.8, 7)
    prompts = ["The capital of", "one two three one two three one two three"]
    implicit = [o.outputs[0].token_ids for o in llm.generate(prompts, use_tqdm=False)]
    explicit = [o.outputs[0].token_ids for o in llm.generate(
        prompts, SamplingParams(temperature=0.0, repetition_penalty=1.8, top_k=20, max_tokens=7), use_tqdm=False)]
    plain = [o.outputs[0].token_ids for o in llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=7), use_tqdm=False)]
    assert implicit == explicit and implicit != plain  # the penalty was applied
    # "vllm" ignores the file; an override goes over it
    assert LLM(model, max_model_len=256, generation_config="vllm").get_default_sampling_params().max_tokens == 16
    over = LLM(model, max_model_len=256, override_generation_config={"max_new_tokens": 3})
    assert [len(o.outputs[0].token_ids) for o in over.generate(prompts, use_tqdm=False)] == [3, 3]
    with pytest.raises(ValueError, match="invalid.*temperature"):
        LLM(model, max_model_len=256, override_generation_config={"temperature": -1.0})


def test_server_requests_take_the_defaults(model_dirs, tmp_path):
    folder = _folder(tmp_path, GEN)
    msgs = [{"role": "user", "content": "one two three one two three one two three"}]
    with serving(model_dirs["llama"], "m", {"generation_config": folder}) as srv, openai_client(srv) as c:
        implicit = c.chat.completions.create(model="m", messages=msgs)
        explicit = c.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=7,
                                             extra_body={"repetition_penalty": 1.8, "top_k": 20})
        sampled = c.chat.completions.create(model="m", messages=msgs, max_tokens=3, temperature=1.0, seed=0)
        assert implicit.usage.completion_tokens <= 7 and implicit.choices[0].finish_reason in ("length", "stop")
        assert implicit.choices[0].message.content == explicit.choices[0].message.content
        # the request's own values win: sampled, 3 tokens (not the default's greedy 7)
        assert sampled.usage.completion_tokens == 3
        greedy = c.chat.completions.create(model="m", messages=msgs, max_tokens=3, temperature=0)
        assert sampled.choices[0].message.content != greedy.choices[0].message.content
        # completions: max_tokens keeps OpenAI's default of 16; the sampling defaults apply
        text = c.completions.create(model="m", prompt="one two three one two three", max_tokens=7)
        same = c.completions.create(model="m", prompt="one two three one two three", max_tokens=7, temperature=0,
                                    extra_body={"repetition_penalty": 1.8, "top_k": 20})
        assert text.choices[0].text == same.choices[0].text
