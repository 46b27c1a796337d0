"""return_token_ids (vLLM's): chat and completion replies carry the prompt's token ids and each
choice's, whole and streamed (the prompt's in the first chunk, each chunk its own), the same
ids the text was detokenized from: what RL rollouts train on without re-tokenizing."""

from __future__ import annotations

import httpx
from server_fixtures import MODEL, client, server  # noqa: F401  (fixtures)

MSGS = [{"role": "user", "content": "Count with me: one two three"}]


def _decode(server, ids):
    r = httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": ids})
    return r.json()["prompt"]


def test_chat_token_ids_whole_and_streamed(server, client):
    kw = dict(model=MODEL, messages=MSGS, max_tokens=8, temperature=0.8, seed=7, n=2,
              extra_body={"return_token_ids": True, "ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    prompt = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": MSGS}).json()["tokens"]
    assert whole.prompt_token_ids == prompt and len(prompt) == whole.usage.prompt_tokens
    for choice in whole.choices:
        assert len(choice.token_ids) == 8 and _decode(server, choice.token_ids) == choice.message.content
    assert sum(len(c.token_ids) for c in whole.choices) == whole.usage.completion_tokens
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].prompt_token_ids == prompt and all(c.prompt_token_ids is None for c in chunks[1:])
    for i, choice in enumerate(whole.choices):
        streamed = [t for c in chunks for ch in c.choices if ch.index == i for t in (ch.token_ids or [])]
        assert streamed == choice.token_ids
    plain = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    assert plain.prompt_token_ids is None and plain.choices[0].token_ids is None


def test_completion_token_ids_whole_and_streamed(server, client):
    kw = dict(model=MODEL, prompt=["one two three", "four five"], max_tokens=6, temperature=0, echo=True,
              extra_body={"return_token_ids": True})
    whole = client.completions.create(**kw)
    for choice, text in zip(whole.choices, ["one two three", "four five"]):
        prompt = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": text}).json()["tokens"]
        assert choice.prompt_token_ids == prompt and len(choice.token_ids) == 6
        assert choice.text == text + _decode(server, choice.token_ids)  # echo: the prompt, then the reply
    stream = list(client.completions.create(stream=True, **kw))
    for i, choice in enumerate(whole.choices):
        mine = [ch for c in stream for ch in c.choices if ch.index == i]
        assert mine[0].prompt_token_ids == choice.prompt_token_ids
        assert all(ch.prompt_token_ids is None for ch in mine[1:])
        assert [t for ch in mine for t in (ch.token_ids or [])] == choice.token_ids


def test_add_special_tokens(llama_dir, tmp_path):
    """vLLM's add_special_tokens: completions add the tokenizer's BOS unless told not to; chat
    adds it only when asked (templates write their own). On a copy whose tokenizer adds a BOS."""
    import shutil

    from server_helpers import openai_client, serving
    from tokenizers import processors
    from transformers import AutoTokenizer

    path = str(tmp_path / "bos")
    shutil.copytree(llama_dir, path)
    tok = AutoTokenizer.from_pretrained(path)
    mark = tok.bos_token or tok.eos_token  # (the test tokenizer has no BOS of its own)
    bos = tok.convert_tokens_to_ids(mark)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single=f"{mark} $A", special_tokens=[(mark, bos)])
    tok.save_pretrained(path)
    with serving(path, MODEL) as srv, openai_client(srv) as client:
        kw = dict(model=MODEL, prompt="one two", max_tokens=1)
        with_bos = client.completions.create(**kw, extra_body={"return_token_ids": True}).choices[0]
        without = client.completions.create(**kw, extra_body={"return_token_ids": True,
                                                              "add_special_tokens": False}).choices[0]
        assert with_bos.prompt_token_ids[0] == bos and without.prompt_token_ids == with_bos.prompt_token_ids[1:]
        chat = dict(model=MODEL, messages=MSGS, max_tokens=1)
        plain = client.chat.completions.create(**chat, extra_body={"return_token_ids": True}).prompt_token_ids
        added = client.chat.completions.create(**chat, extra_body={"return_token_ids": True,
                                                                   "add_special_tokens": True}).prompt_token_ids
        assert added[0] == bos and added[1:] == plain
