"""Gemma 3's pan-and-scan (do_pan_and_scan): a wide or tall image also gets crops, each an image
of its own. Prompt ids and pixels against transformers' Gemma3Processor, greedy outputs and
logprobs against Gemma3ForConditionalGeneration fed the processor's input_ids, pixel_values and
token_type_ids, with the setting from mm_processor_kwargs and from preprocessor_config.json."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import Reference, assert_output_matches, image_prompt, random_image
from pagedserve import LLM, SamplingParams

pytest.importorskip("PIL")

TURN = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
PROMPT = TURN.format("Look:\n<start_of_image>\nand <start_of_image> which is larger?")
MAX_TOKENS = 6
IMAGE_TOKENS = 16
# Crops of at least 20 pixels: the test's small images get some (Gemma3Processor's default is 256).
SMALL_CROPS = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 20}
WIDE, SQUARE, TALL = (130, 40), (60, 60), (30, 100)  # (width, height): 3, 0 and 3 crops with SMALL_CROPS


class PanAndScanReference:
    """transformers' Gemma3Processor and Gemma3ForConditionalGeneration (greedy, float32)."""

    def __init__(self, path: str) -> None:
        import transformers

        self.model = transformers.Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        marks = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, extra_special_tokens=marks)
        # The random model's own settings (no pan-and-scan): Gemma3Processor ignores the file's
        # do_pan_and_scan anyway (its call defaults win), so the tests pass the settings here.
        images = transformers.AutoImageProcessor.from_pretrained(path)
        self.processor = transformers.Gemma3Processor(images, tokenizer, image_seq_length=IMAGE_TOKENS)

    def inputs(self, text: str, images: list, kwargs: dict) -> dict:
        return self.processor(text=text, images=images or None, return_tensors="pt", **kwargs)

    @torch.inference_mode()
    def greedy(self, text: str, images: list, kwargs: dict) -> Reference:
        inputs = self.inputs(text, images, kwargs)
        ids, pixels, types = inputs["input_ids"], inputs.get("pixel_values"), inputs["token_type_ids"]
        tokens, logits = [], []
        for _ in range(MAX_TOKENS):  # the whole sequence each step (the image groups from token_type_ids)
            row = self.model(input_ids=ids, pixel_values=pixels, token_type_ids=types).logits[0, -1]
            tokens.append(int(row.argmax()))
            logits.append(row.float())
            ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], 1)
            types = torch.cat([types, torch.zeros(1, 1, dtype=types.dtype)], 1)
        return Reference(tokens, logits)


@pytest.fixture(scope="module")
def gemma3(tokenizer_dir, tmp_path_factory) -> tuple[str, PanAndScanReference]:
    from pagedserve.model.random_model import build_random_gemma3_vl

    path = build_random_gemma3_vl(str(tmp_path_factory.mktemp("gemma3pas")), tokenizer_dir,
                                  tokens_per_image=IMAGE_TOKENS)
    return path, PanAndScanReference(path)


def _params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def _processor(path: str, kwargs: dict):
    """pagedserve's image processor alone (what LLM(..., mm_processor_kwargs=kwargs) builds)."""
    from transformers import AutoTokenizer

    from pagedserve.multimodal.processor import ImageInputProcessor

    return ImageInputProcessor(path, 4, kwargs, AutoTokenizer.from_pretrained(path))


def _check_prepared(processor, ref: PanAndScanReference, text: str, images: list, kwargs: dict) -> list:
    """pagedserve's prompt ids, pixels and image runs (from the text's ids, or the engine's
    LLM) are the processor's; its features."""
    want = ref.inputs(text, images, kwargs)
    ids = want["input_ids"][0].tolist()
    if isinstance(processor, LLM):
        prepared = processor.llm_engine.prepare(image_prompt(text, images), _params())
        got, features = prepared["prompt_token_ids"], prepared["mm_features"]
        processor = processor.llm_engine.mm_processor
    else:
        got, features = processor.process(processor.tokenizer(text)["input_ids"], images)
    assert got == ids
    torch.testing.assert_close(torch.stack([f.pixel_values for f in features]), want["pixel_values"])
    # One feature per image and per crop, each exactly one of the processor's runs of image tokens.
    types = want["token_type_ids"][0].tolist()
    runs = [i for i, t in enumerate(types) if t and (i == 0 or not types[i - 1])]
    assert [(f.offset, f.length) for f in features] == [(r, IMAGE_TOKENS) for r in runs]
    assert all(sum(types[f.offset:f.offset + f.length]) == IMAGE_TOKENS for f in features)
    assert processor.process(ids, images)[0] == ids  # the processor's ids are taken as they are
    return features


@pytest.mark.parametrize("kwargs, crops", [
    (SMALL_CROPS, [3, 0, 3]),
    ({"do_pan_and_scan": True}, [0, 0, 0]),  # Gemma3Processor's 256-pixel crops: these images are too small
    ({**SMALL_CROPS, "pan_and_scan_max_num_crops": 2}, [2, 0, 2]),
    ({**SMALL_CROPS, "pan_and_scan_min_ratio_to_activate": 3.3}, [0, 0, 3]),  # 130/40 < 3.3 < 100/30
])
def test_prompt_ids_match_the_processor(gemma3, kwargs, crops):
    path, ref = gemma3
    processor = _processor(path, kwargs)
    text = TURN.format("<start_of_image> wide,\n<start_of_image>\n\nsquare and<start_of_image>tall.")
    images = [random_image(1, WIDE), random_image(2, SQUARE), random_image(3, TALL)]
    features = _check_prepared(processor, ref, text, images, kwargs)
    assert len(features) == len(images) + sum(crops)
    ids = processor.process(processor.tokenizer(text)["input_ids"], images)[0]
    assert processor.tokenizer.decode(ids).count("here are some crops") == sum(c > 0 for c in crops)


def test_default_crop_size(gemma3):
    """Gemma3Processor's defaults fill the settings left unset: a 700x260 image gets two 350-pixel
    crops (three by its ratio, but crops of at least 256 pixels)."""
    path, ref = gemma3
    kwargs = {"do_pan_and_scan": True}
    features = _check_prepared(_processor(path, kwargs), ref, TURN.format("<start_of_image>What is it?"),
                               [random_image(4, (700, 260))], kwargs)
    assert len(features) == 3


def test_outputs_match_transformers(gemma3):
    """A cropped image and a square one, in chunks of 64 that hold several crops, each with its
    own two-way span. (Chunks that hold one image or crop at a time: the config-file test.)"""
    path, ref = gemma3
    llm = LLM(path, block_size=8, max_num_batched_tokens=64, mm_processor_kwargs=SMALL_CROPS,
              enable_prefix_caching=False)
    cases = [(PROMPT, [random_image(5, WIDE), random_image(6, SQUARE)]),
             (TURN.format("<start_of_image>Describe."), [random_image(7, TALL)])]
    outs = llm.generate([image_prompt(t, ims) for t, ims in cases], _params(logprobs=0), use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(ref.greedy(text, images, SMALL_CROPS), out)
    assert not llm.llm_engine.runner.encoder_cache.embeddings


def test_prefix_cache(gemma3):
    """The same cropped image again is served from the prefix cache; another one is not."""
    path, ref = gemma3
    llm = LLM(path, block_size=8, max_num_batched_tokens=64, mm_processor_kwargs=SMALL_CROPS)
    text = TURN.format("<start_of_image>Describe.")
    a, b = random_image(8, WIDE), random_image(9, WIDE)
    first, other, again = (llm.generate(image_prompt(text, [im]), _params(logprobs=0), use_tqdm=False)[0]
                           for im in (a, b, a))
    want_a = ref.greedy(text, [a], SMALL_CROPS)
    assert_output_matches(want_a, first)
    assert_output_matches(want_a, again)
    assert again.num_cached_tokens == (len(first.prompt_token_ids) - 1) // 8 * 8
    assert other.num_cached_tokens < len(first.prompt_token_ids) // 2


def test_setting_in_preprocessor_config(gemma3, tmp_path):
    """do_pan_and_scan and a crop size written in preprocessor_config.json turn it on (as the image
    processor alone reads them; Gemma3Processor would override them with its call defaults)."""
    path, ref = gemma3
    for f in os.listdir(path):
        shutil.copy(os.path.join(path, f), tmp_path / f)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, **SMALL_CROPS}))
    llm = LLM(str(tmp_path), block_size=8, max_num_batched_tokens=24)
    images = [random_image(10, WIDE), random_image(11, SQUARE)]
    assert len(_check_prepared(llm, ref, PROMPT, images, SMALL_CROPS)) == 5
    out = llm.generate(image_prompt(PROMPT, images), _params(logprobs=0), use_tqdm=False)[0]
    assert_output_matches(ref.greedy(PROMPT, images, SMALL_CROPS), out)
    off = _processor(str(tmp_path), {"do_pan_and_scan": False})
    assert len(_check_prepared(off, ref, PROMPT, images, {})) == 2


def test_memory_profile_counts_the_crops(gemma3):
    """One request with one wide image is four encoder images (the image and 3 crops), encoded
    in one pass: the memory profile caps its copies at requests x images x (1 + max crops)."""
    from pagedserve.worker.encoder_cache import profile_images

    path, _ = gemma3
    llm = LLM(path, block_size=8, max_num_batched_tokens=256, max_num_seqs=1, limit_mm_per_prompt={"image": 1},
              mm_processor_kwargs=SMALL_CROPS)
    encoder = llm.llm_engine.runner.encoder_cache.encoder
    assert encoder.images_per_image == 5  # (pan_and_scan_max_num_crops 4)
    passes, real = [], encoder.encode
    encoder.encode = lambda feats: passes.append(sum(f.num_embeds for f in feats)) or real(feats)
    llm.generate(image_prompt(TURN.format("<start_of_image>Describe."), [random_image(12, WIDE)]), _params(),
                 use_tqdm=False)
    assert passes == [4 * IMAGE_TOKENS]
    assert max(passes) <= sum(f.num_embeds for f in profile_images(encoder, llm.llm_engine.config))
