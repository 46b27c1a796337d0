"""A hybrid model (Qwen3-Next: Gated DeltaNet layers) behind the OpenAI-compatible server:
streamed chat, and a second conversation sharing the first's long system prompt, which
resumes from a state saved inside the first one's prefill (usage reports the cached tokens)
and answers exactly as a fresh engine does; and speculative decoding on it, streamed."""

from __future__ import annotations

from server_helpers import metric, openai_client, scrape, serving

from pagedserve import LLM, SamplingParams
from pagedserve.model.random_model import build_random_model

SYSTEM = " ".join(f"Rule {i}: answer in plain words and keep to the facts." for i in range(12))


def _chat(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def test_shared_system_prompt_resumes_from_a_saved_state(tmp_path, tokenizer_dir):
    path = str(tmp_path / "qwen3_next")
    build_random_model(path, "Qwen3NextForCausalLM", num_layers=3, initializer_range=0.5, tokenizer_dir=tokenizer_dir,
                       layer_types=["linear_attention", "full_attention", "linear_attention"])
    with serving(path, "hybrid", engine_kwargs={"block_size": 16}) as srv, openai_client(srv) as client:
        stream = client.chat.completions.create(model="hybrid", messages=_chat("First question?"), max_tokens=8,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        first_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert usage.prompt_tokens > 256 and usage.completion_tokens == 8 and first_text
        second = client.chat.completions.create(model="hybrid", messages=_chat("Second question?"), max_tokens=8,
                                                temperature=0, logprobs=True)
        # The state saved at 256 inside the first prefill; the first prompt's own end (its last
        # block boundary, 352) lies past where the two conversations part.
        assert usage.prompt_tokens == 360 and second.usage.prompt_tokens_details.cached_tokens == 256
    fresh = LLM(path, enable_prefix_caching=False, max_model_len=512)
    want = fresh.chat(_chat("Second question?"), SamplingParams(temperature=0, max_tokens=8, logprobs=0),
                      use_tqdm=False)[0].outputs[0]
    assert second.choices[0].message.content == want.text
    # (the logprobs too: a state resumed wrongly moves them, though the tokens may survive it)
    got = [t.logprob for t in second.choices[0].logprobs.content]
    assert len(got) == 8 and all(abs(a - lp[t].logprob) < 2e-4 for a, t, lp in zip(got, want.token_ids, want.logprobs))


def test_speculative_decoding_streams_plain_decodings_tokens(tmp_path, tokenizer_dir):
    """n-gram drafts (one token of lookup: drafts are proposed often, mostly rejected) on a
    Qwen3.5 model behind the server: the streamed reply is a plain engine's, the drafts ran
    (the server's metrics), and each state was stepped back past the rejected ones."""
    path = str(tmp_path / "qwen3_5")
    build_random_model(path, "Qwen3_5ForCausalLM", num_layers=3, initializer_range=0.5, tokenizer_dir=tokenizer_dir,
                       layer_types=["linear_attention", "full_attention", "linear_attention"])
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    with serving(path, "hybrid", engine_kwargs={"speculative_config": spec}) as srv, openai_client(srv) as client:
        stream = client.chat.completions.create(model="hybrid", messages=_chat("Which rule comes first?"),
                                                max_tokens=32, temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        m = scrape(srv.url)
        assert metric(m, "pagedserve:spec_decode_num_draft_tokens_total") > 0
    want = LLM(path, max_model_len=512).chat(_chat("Which rule comes first?"),
                                             SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    assert text == want.outputs[0].text and text
