"""Image inputs (Gemma 3): a random Gemma3ForConditionalGeneration against transformers' own on
the same weights and pixels: <start_of_image> expanded as Gemma3Processor expands it (the
newlines it adds merged with those around it), an image's tokens attending to each other
both ways (sliding-window and full layers), chunks that never split an image, the Triton
path (interpreted), and the errors."""

from __future__ import annotations

import pytest
import torch

from conftest import Reference, assert_output_matches, image_chat, image_data_url, image_prompt, random_image
from pagedserve import LLM, SamplingParams

pytest.importorskip("PIL")  # a dependency; the GPU machines' image may lack it (its `-m gpu` test then skips)

TURN = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
PROMPT_1 = TURN.format("<start_of_image>What is in the picture?")
PROMPT_2 = TURN.format("Look:\n<start_of_image>\nand <start_of_image> which is larger?")
TEXT = TURN.format("No picture here.")
MAX_TOKENS = 8
IMAGE_TOKENS = 16


class Gemma3Reference:
    """transformers' Gemma3ForConditionalGeneration, greedy, float32, with the prompt expanded
    as Gemma3Processor does it: each <start_of_image> -> "\\n\\n<start_of_image>" + the image
    tokens + "<end_of_image>\\n\\n" in the text, then tokenized."""

    def __init__(self, path: str) -> None:
        import transformers

        self.model = transformers.Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.images = transformers.AutoImageProcessor.from_pretrained(path)
        self.image_token = self.model.config.image_token_index

    def ids(self, text: str) -> list[int]:
        full = "\n\n<start_of_image>" + "<image_soft_token>" * IMAGE_TOKENS + "<end_of_image>\n\n"
        return self.tokenizer(text.replace("<start_of_image>", full))["input_ids"]

    @torch.inference_mode()
    def greedy(self, text: str, images: list, max_tokens: int = MAX_TOKENS) -> Reference:
        ids = self.ids(text)
        pixels = self.images(images=images, return_tensors="pt")["pixel_values"] if images else None
        tokens, logits = [], []
        for _ in range(max_tokens):  # the whole sequence each step: the image mask from token_type_ids
            types = torch.tensor([[int(t == self.image_token) for t in ids]])
            row = self.model(input_ids=torch.tensor([ids]), pixel_values=pixels, token_type_ids=types).logits[0, -1]
            tokens.append(int(row.argmax()))
            logits.append(row.float())
            ids = ids + [tokens[-1]]
        return Reference(tokens, logits)


@pytest.fixture(scope="module")
def gemma3(tokenizer_dir, tmp_path_factory) -> tuple[str, Gemma3Reference]:
    from pagedserve.model.random_model import build_random_gemma3_vl

    path = build_random_gemma3_vl(str(tmp_path_factory.mktemp("gemma3vl")), tokenizer_dir,
                                  tokens_per_image=IMAGE_TOKENS)
    return path, Gemma3Reference(path)


def _params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def test_image_markers_expand_as_the_processor_does(gemma3):
    """The "\\n\\n" around each image merges with the prompt's own newlines as tokenizing the
    expanded text would merge them; expanded ids are taken as they are."""
    path, ref = gemma3
    llm = LLM(path, block_size=8, max_num_batched_tokens=64)
    images = [random_image(1), random_image(2, (40, 130))]
    prepared = llm.llm_engine.prepare(image_prompt(PROMPT_2, images), _params())
    ids = ref.ids(PROMPT_2)
    assert prepared["prompt_token_ids"] == ids
    assert [f.length for f in prepared["mm_features"]] == [IMAGE_TOKENS] * 2
    assert all(ids[f.offset:f.offset + f.length] == [ref.image_token] * IMAGE_TOKENS for f in prepared["mm_features"])
    torch.testing.assert_close(torch.stack([f.pixel_values for f in prepared["mm_features"]]),
                               ref.images(images=images, return_tensors="pt")["pixel_values"])
    again = llm.llm_engine.prepare({"prompt_token_ids": ids, "multi_modal_data": {"image": images}}, _params())
    assert again["prompt_token_ids"] == ids


@pytest.mark.parametrize("chunk", [16, 24, 64])
def test_images_match_transformers(gemma3, chunk):
    """Two-way attention within each image, in sliding-window and full layers. Chunks of 16 and
    24 would end inside an image: the scheduler ends them before it instead (an image's 16
    tokens fit a step), so every image token is computed with its whole image in the cache."""
    path, ref = gemma3
    llm = LLM(path, block_size=8, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    cases = [(PROMPT_1, [random_image(1)]), (PROMPT_2, [random_image(2), random_image(3, (50, 120))]), (TEXT, [])]
    outs = llm.generate([image_prompt(t, ims) for t, ims in cases], _params(logprobs=0), use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(ref.greedy(text, images), out)
    assert not llm.llm_engine.runner.encoder_cache.embeddings


def test_prefix_cache_and_chat(gemma3):
    path, ref = gemma3
    llm = LLM(path, block_size=8, max_num_batched_tokens=64)
    a, b = random_image(4), random_image(5)
    first, other, again = (llm.generate(image_prompt(PROMPT_1, [im]), _params(logprobs=0), use_tqdm=False)[0]
                           for im in (a, b, a))
    assert_output_matches(ref.greedy(PROMPT_1, [a]), first)
    assert_output_matches(ref.greedy(PROMPT_1, [b]), other)
    assert_output_matches(ref.greedy(PROMPT_1, [a]), again)
    assert first.outputs[0].token_ids != other.outputs[0].token_ids
    assert again.num_cached_tokens == (len(first.prompt_token_ids) - 1) // 8 * 8
    assert other.num_cached_tokens < first.prompt_token_ids.index(ref.image_token) + 1
    chat = llm.chat(image_chat([image_data_url(a)]), _params(logprobs=0), use_tqdm=False)[0]
    assert chat.prompt == PROMPT_1
    assert_output_matches(ref.greedy(PROMPT_1, [a]), chat)


def test_triton_path_matches_transformers(gemma3):
    """The Triton backend (interpreted): the prefill kernel reads each image row's key bound
    (kv_limit), decode steps run as for text."""
    pytest.importorskip("triton")
    path, ref = gemma3
    llm = LLM(path, attention_backend="triton", block_size=8, max_num_batched_tokens=24, max_num_seqs=4,
              dtype="float32")
    cases = [(PROMPT_2, [random_image(2), random_image(3, (50, 120))]), (TEXT, [])]
    outs = llm.generate([image_prompt(t, ims) for t, ims in cases], _params(logprobs=0), use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(ref.greedy(text, images), out)


def test_errors(gemma3, tmp_path):
    import os
    import shutil

    path, ref = gemma3
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(path, max_num_batched_tokens=8, max_model_len=64)
    with pytest.raises(ValueError, match="pan_and_scan_max_crops"):  # (pan-and-scan: its own test file)
        LLM(path, mm_processor_kwargs={"do_pan_and_scan": True, "pan_and_scan_max_crops": 2})
    llm = LLM(path, block_size=8)
    for prompt, words in [(image_prompt(PROMPT_2, [random_image(1)]), "runs of image placeholder"),
                          ({"prompt": PROMPT_1}, "placeholders")]:
        with pytest.raises(ValueError, match=words):
            llm.generate(prompt, _params(), use_tqdm=False)
    eng = llm.llm_engine
    assert not eng.has_unfinished_requests() and eng.kv.pool.num_free_blocks == eng.kv.num_blocks
    # A copy without the image processor's settings is served text-only (an explicit limit
    # makes that an error).
    for f in os.listdir(path):
        if f != "preprocessor_config.json":
            shutil.copy(os.path.join(path, f), tmp_path / f)
    text_only = LLM(str(tmp_path), block_size=8)
    assert text_only.llm_engine.mm_processor is None
    assert_output_matches(ref.greedy(TEXT, []), text_only.generate(TEXT, _params(logprobs=0), use_tqdm=False)[0])
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        LLM(str(tmp_path), limit_mm_per_prompt={"image": 1})


@pytest.mark.gpu
def test_images_on_cuda(gemma3):
    """On CUDA: decode graphs, image steps eagerly with the kernel's per-row key bounds, the
    encoder in the KV pool's profile pass; float32 against transformers on CPU."""
    path, ref = gemma3
    llm = LLM(path, device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=32, max_num_seqs=8,
              gpu_memory_utilization=0.3)
    assert llm.llm_engine.runner.graphs is not None
    cases = [(PROMPT_1, [random_image(1)]), (PROMPT_2, [random_image(2), random_image(3, (50, 120))])]
    outs = llm.generate([image_prompt(t, ims) for t, ims in cases], _params(logprobs=0), use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(ref.greedy(text, images), out, lp_tol=2e-2)
