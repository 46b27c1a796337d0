"""Images over the OpenAI-compatible server: chat completions with image_url parts (data URLs
and http URLs) through the official openai client, whole and streamed, equal to the offline
LLM.chat on the same model; /tokenize counts the expanded placeholders; bad images are 400s."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import threading

import httpx
import openai
import pytest
from conftest import image_chat, image_data_url, png_bytes, random_image
from server_helpers import openai_client, serving

from pagedserve import LLM, SamplingParams

MODEL = "tiny-llava"
QUESTION = "What is in the picture?"


def _png(seed: int) -> bytes:
    return png_bytes(random_image(seed, (50, 40)))


def _data_url(seed: int) -> str:
    return image_data_url(random_image(seed, (50, 40)))


def _messages(url: str) -> list[dict]:
    return image_chat([url], QUESTION)


@pytest.fixture(scope="module")
def server(llava_dir):
    with serving(llava_dir, MODEL, engine_kwargs={"block_size": 8}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server) as c:
        yield c


@pytest.fixture(scope="module")
def offline(llava_dir):
    return LLM(llava_dir, max_model_len=512, block_size=8)


@contextlib.contextmanager
def _http_files(files: dict[str, bytes]):
    """A local HTTP server answering GET /<name> with files[name]."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            body = files.get(self.path.lstrip("/"))
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()


@functools.lru_cache(maxsize=None)
def _offline_reply(offline, seed: int) -> tuple[str, int]:
    out = offline.chat(_messages(_data_url(seed)), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    return out.outputs[0].text, len(out.prompt_token_ids)


def test_chat_with_an_image_matches_offline(client, offline):
    want, n_prompt = _offline_reply(offline, 1)
    r = client.chat.completions.create(model=MODEL, messages=_messages(_data_url(1)), max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == n_prompt  # the 16 placeholders counted
    stream = client.chat.completions.create(model=MODEL, messages=_messages(_data_url(1)), max_tokens=8,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    other, _ = _offline_reply(offline, 2)
    assert other != want  # the picture matters
    r = client.chat.completions.create(model=MODEL, messages=_messages(_data_url(2)), max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == other


def test_http_image_urls_are_fetched(client, offline):
    want, _ = _offline_reply(offline, 3)
    with _http_files({"cat.png": _png(3)}) as base:
        r = client.chat.completions.create(model=MODEL, messages=_messages(f"{base}/cat.png"), max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == want
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=_messages(f"{base}/missing.png"), max_tokens=8)
        assert "could not fetch" in e.value.body["message"] and e.value.body["param"] == "messages"


def test_tokenize_counts_expanded_placeholders(server, offline):
    _, n_prompt = _offline_reply(offline, 1)
    r = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": _messages(_data_url(1))})
    assert r.status_code == 200 and r.json()["count"] == n_prompt


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64,%%%", "base64"),
    ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "decode"),
    ("file:///etc/passwd", "data: URL or an http"),
])
def test_bad_images_are_400s(client, server, url, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=_messages(url), max_tokens=8)
    assert words in e.value.body["message"] and e.value.body["param"] == "messages"
    assert server.llm.engine.kv.pool.num_free_blocks == server.llm.engine.kv.num_blocks


def test_an_image_for_a_text_model_is_a_400(llama_dir):
    with serving(llama_dir, "tiny-llama") as srv, openai_client(srv) as c:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny-llama", messages=_messages(_data_url(1)), max_tokens=4)
        assert "takes no images" in e.value.body["message"]


def test_responses_input_image(client, offline, server):
    want = offline.chat(_messages(_data_url(4)), SamplingParams(temperature=0, max_tokens=8),
                        use_tqdm=False)[0].outputs[0].text
    content = [{"type": "input_image", "image_url": _data_url(4)}, {"type": "input_text", "text": QUESTION}]
    r = client.responses.create(model=MODEL, input=[{"role": "user", "content": content}], max_output_tokens=8,
                                temperature=0)
    assert r.output_text == want
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_image", "file_id": "file-123"}, {"type": "input_text", "text": QUESTION}]}])
    assert "file_id" in e.value.body["message"] and e.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64,%%%"}]}])
    assert "base64" in e.value.body["message"]
    assert server.llm.engine.kv.pool.num_free_blocks == server.llm.engine.kv.num_blocks


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "mistral3"])
def test_other_families_chat_with_two_images(tokenizer_dir, tmp_path, family):
    """Qwen2-VL (each image's placeholders follow its size, M-RoPE positions shifted after it),
    Gemma 3 (<start_of_image> expanded with its newlines, two-way image attention) and Mistral 3
    (rows of [IMG] with breaks) over the server, whole and streamed, equal to the offline LLM.chat."""
    from pagedserve.model.random_model import build_random_gemma3_vl, build_random_mistral3, build_random_qwen2_vl

    build = {"qwen2_vl": build_random_qwen2_vl, "gemma3": build_random_gemma3_vl,
             "mistral3": build_random_mistral3}[family]
    path = build(str(tmp_path), tokenizer_dir, initializer_range=0.3)
    messages = image_chat([_data_url(1), image_data_url(random_image(5, (130, 40)))], QUESTION)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = LLM(path, block_size=8).chat(messages, params, use_tqdm=False)[0]
    with serving(path, "tiny-qwen2-vl", engine_kwargs={"block_size": 8, "max_num_batched_tokens": 24}) as srv, \
            openai_client(srv) as c:
        r = c.chat.completions.create(model="tiny-qwen2-vl", messages=messages, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == want.outputs[0].text
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)
        stream = c.chat.completions.create(model="tiny-qwen2-vl", messages=messages, max_tokens=8, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == want.outputs[0].text
        tok = httpx.post(f"{srv.url}/tokenize", json={"model": "tiny-qwen2-vl", "messages": messages})
        assert tok.json()["count"] == len(want.prompt_token_ids)
