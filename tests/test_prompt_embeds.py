"""Prompts given as input embeddings (vLLM's EmbedsPrompt, --enable-prompt-embeds): greedy
tokens and logprobs equal transformers' `model(inputs_embeds=...)` on embeddings that are no
token's, equal prefixes of embeddings share KV blocks, and the server's base64 form gives
the offline engine's output."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
import torch

from pagedserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, logprobs=2, ignore_eos=True)
IDS = [[1, 5, 9, 14, 3, 7, 22, 8, 40, 2, 17, 33, 6, 11, 19, 25, 31, 4, 9, 12], [1, 100, 200]]


@pytest.fixture(scope="module")
def hf(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(llama_dir, enable_prompt_embeds=True, max_model_len=128, block_size=4, seed=0)


def _embeds(hf, ids: list[int], noise: float, seed: int) -> torch.Tensor:
    """The prompt's token embeddings, moved off every token by `noise` (what a soft prompt is)."""
    with torch.no_grad():
        e = hf.get_input_embeddings()(torch.tensor(ids))
    return e + noise * torch.randn(e.shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hf_greedy(hf, embeds: torch.Tensor, n: int) -> tuple[list[int], list[torch.Tensor]]:
    x, tokens, rows = embeds[None], [], []
    for _ in range(n):
        row = hf(inputs_embeds=x).logits[0, -1].log_softmax(-1)
        tokens.append(int(row.argmax()))
        rows.append(row)
        x = torch.cat([x, hf.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], dim=1)
    return tokens, rows


def _check(out, want: tuple[list[int], list[torch.Tensor]]) -> None:
    tokens, rows = want
    got = out.outputs[0]
    assert list(got.token_ids) == tokens
    for t, row, lp in zip(tokens, rows, got.logprobs):
        assert abs(lp[t].logprob - float(row[t])) < 2e-4


def test_embeddings_match_transformers(llm, hf):
    embeds = [_embeds(hf, ids, 0.3, i) for i, ids in enumerate(IDS)]
    embeds[1] = embeds[1].to(torch.bfloat16)  # any float dtype, and [1, n, hidden] too
    prompts = [{"prompt_embeds": embeds[0]}, {"prompt_embeds": embeds[1][None]}]
    embeds[1] = embeds[1].float()
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for e, out in zip(embeds, outs):
        _check(out, _hf_greedy(hf, e, GREEDY.max_tokens))
        assert out.prompt_token_ids is None and out.prompt is None and out.num_prompt_tokens == len(e)
    # A token's own embeddings give what its ids give.
    plain = llm.generate([{"prompt_token_ids": IDS[0]}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    same = llm.generate([{"prompt_embeds": _embeds(hf, IDS[0], 0.0, 0)}], GREEDY, use_tqdm=False)[0]
    assert same.outputs[0].token_ids == plain


def test_equal_embedding_prefixes_share_blocks(llm, hf):
    base = _embeds(hf, IDS[0], 0.3, 5)
    other = base.clone()
    other[-3:] += 0.5  # the same first 16 embeddings (4 blocks), other last ones
    changed = base.clone()
    changed[0] += 0.5  # other first embeddings: nothing is shared
    llm.reset_prefix_cache()
    first = llm.generate([{"prompt_embeds": base}], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    hit = llm.generate([{"prompt_embeds": other}], GREEDY, use_tqdm=False)[0]
    assert hit.num_cached_tokens == 16
    _check(hit, _hf_greedy(hf, other, GREEDY.max_tokens))
    miss = llm.generate([{"prompt_embeds": changed}], GREEDY, use_tqdm=False)[0]
    assert miss.num_cached_tokens == 0
    # Penalties count the reply only, as transformers' generate(inputs_embeds=...) does. A
    # bias makes the placeholder id (0) the first choice by a hair, so a penalty that counted
    # the placeholders as prompt tokens would change that choice.
    with torch.no_grad():
        first = hf(inputs_embeds=base[None]).logits[0, -1]
    top = float(first.max())
    assert top > 0.1
    bias = {0: top - float(first[0]) + 0.05}
    pen = SamplingParams(temperature=0.0, max_tokens=5, repetition_penalty=1.5, ignore_eos=True, logit_bias=bias)
    out = llm.generate([{"prompt_embeds": base}], pen, use_tqdm=False)[0]
    tokens, x = [], base[None]
    with torch.no_grad():
        for _ in range(5):
            row = hf(inputs_embeds=x).logits[0, -1]
            row[0] += bias[0]
            for t in set(tokens):
                row[t] = row[t] / 1.5 if row[t] > 0 else row[t] * 1.5
            tokens.append(int(row.argmax()))
            x = torch.cat([x, hf.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], dim=1)
    assert list(out.outputs[0].token_ids) == tokens and tokens[0] == 0


def test_bad_embeddings_are_clear_errors(llm, llama_dir, hf):
    e = _embeds(hf, IDS[1], 0.1, 0)
    cases = [
        ({"prompt_embeds": e[:, :10]}, "shape"),
        ({"prompt_embeds": e[:0]}, "shape"),
        ({"prompt_embeds": e.long()}, "float32"),
        ({"prompt_embeds": e * float("nan")}, "NaN"),
        ({"prompt_embeds": e.tolist()}, "torch.Tensor"),
        ({"prompt_embeds": e, "prompt": "hi"}, "nothing else"),
    ]
    for prompt, match in cases:
        with pytest.raises(ValueError, match=match):
            llm.generate([prompt], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate([{"prompt_embeds": e}], SamplingParams(prompt_logprobs=1), use_tqdm=False)
    with pytest.raises(ValueError, match="truncate"):
        llm.generate([{"prompt_embeds": e}], SamplingParams(truncate_prompt_tokens=2), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="enable_prompt_embeds=True"):
        LLM(llama_dir, max_model_len=64).generate([{"prompt_embeds": e}], GREEDY, use_tqdm=False)


@pytest.mark.parametrize("name", ["qwen3", "gemma", "gemma2", "gemma3", "granite", "cohere", "olmo2", "smollm3",
                                  "phi3", "glm4", "gpt_oss", "deepseek_v2", "deepseek_v3", "mixtral", "qwen3_moe",
                                  "glm4_moe", "mistral_swa"])
def test_other_decoders(model_dirs, name):
    """Every other decoder family through the same path: q/k norms and a tied LM head (Qwen3);
    the Gemma families, whose embedding layer scales its output (the embeddings given are
    used as they are, as transformers uses them); Granite's embedding multiplier; sliding
    windows, softcaps, sinks, latent attention and experts."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dirs[name], dtype=torch.float32).eval()
    llm = LLM(model_dirs[name], enable_prompt_embeds=True, max_model_len=64)
    e = _embeds(hf, IDS[0], 0.3, 9)
    _check(llm.generate([{"prompt_embeds": e}], GREEDY, use_tqdm=False)[0], _hf_greedy(hf, e, GREEDY.max_tokens))


def test_server_completions_take_base64_embeddings(llama_dir, hf):
    from server_helpers import openai_client, scrape, serving

    def b64(t: torch.Tensor) -> str:
        buf = io.BytesIO()
        torch.save(t, buf)
        return base64.b64encode(buf.getvalue()).decode()

    e = _embeds(hf, IDS[0], 0.3, 3)
    want, _ = _hf_greedy(hf, e, 4)
    with serving(llama_dir, engine_kwargs={"enable_prompt_embeds": True}) as srv, openai_client(srv) as client:
        # vLLM's client example sends prompt="" beside the embeddings; a text prompt runs after them.
        extra = {"prompt_embeds": b64(e), "ignore_eos": True, "return_token_ids": True}
        r = client.completions.create(model="tiny-llama", prompt="", max_tokens=4, temperature=0, extra_body=extra)
        assert r.choices[0].token_ids == want and r.choices[0].prompt_token_ids is None
        assert r.usage.prompt_tokens == len(IDS[0])
        counted = scrape(srv.url)[("pagedserve:prompt_tokens_total", frozenset({("model_name", "tiny-llama")}))]
        assert counted == len(IDS[0])  # the metrics count embeddings as prompt positions
        r = client.completions.create(model="tiny-llama", prompt="hello", max_tokens=4, temperature=0,
                                      extra_body={"prompt_embeds": [b64(e)], "ignore_eos": True})
        assert len(r.choices) == 2

        for body, match in (({"prompt_embeds": "%%%"}, "base64"),
                            ({"prompt_embeds": base64.b64encode(b"not a tensor").decode()}, "torch.save"),
                            ({"prompt_embeds": b64(e), "echo": True}, "echo"),
                            ({"prompt_embeds": b64(e[:, :7])}, "shape"),
                            ({}, "prompt is required")):
            res = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny-llama", "max_tokens": 2, **body})
            assert res.status_code == 400 and match in res.json()["error"]["message"], res.text
    with serving(llama_dir) as srv:
        res = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny-llama", "prompt_embeds": b64(e)})
        assert res.status_code == 400 and "enable-prompt-embeds" in res.json()["error"]["message"]


def test_pooling_runner_refused(llama_dir):
    with pytest.raises(ValueError, match="text generation"):
        LLM(llama_dir, enable_prompt_embeds=True, runner="pooling")


def test_chunked_prefill_and_preemption(llama_dir, hf):
    """Embeddings cut across prefill chunks of 8 and recomputed after preemption (a 12-block
    cache for three 8-block requests) still give transformers' tokens."""
    llm = LLM(llama_dir, enable_prompt_embeds=True, max_model_len=64, block_size=4, max_num_batched_tokens=8,
              kv_cache_memory_bytes=12 * llm_block_bytes(llama_dir), enable_prefix_caching=False)
    embeds = [_embeds(hf, IDS[0], 0.3, 20 + i) for i in range(3)]
    assert llm.llm_engine.config.num_gpu_blocks == 12
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2, ignore_eos=True)
    outs = llm.generate([{"prompt_embeds": e} for e in embeds], params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for e, out in zip(embeds, outs):
        _check(out, _hf_greedy(hf, e, 12))
    assert not llm.llm_engine.runner.encoder_cache.embeddings  # released with their requests


def llm_block_bytes(model_dir: str) -> int:
    """Bytes of one 4-token KV block of the test Llama (2 layers, K and V, 2 heads of 16, fp32)."""
    import json

    cfg = json.load(open(f"{model_dir}/config.json"))
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * 4 * cfg["num_key_value_heads"] * head_dim * 4
