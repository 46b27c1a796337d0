"""Image inputs (LLaVA-NeXT, "anyres"): a random LlavaNextForConditionalGeneration against
transformers' own on the same weights and pixels: each image's placeholder count by its size
(LlavaNextProcessor's), its tiles, chunked prefill across images of different sizes, prefix
caching, preemption, chat, the hub's checkpoint names, the KV profile's largest image."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import (Reference, assert_cases_match, assert_output_matches, assert_pixels_key_the_cache,
                      cached_greedy, image_chat, image_data_url, random_image)
from pagedserve import LLM, SamplingParams

pytest.importorskip("PIL")

PINPOINTS = [[28, 56], [56, 28], [56, 56]]  # tiles of 28 pixels: 1x2, 2x1, 2x2 (plus the whole image)
PROMPT_1 = "USER: <image>\nWhat is in the picture? ASSISTANT:"
PROMPT_2 = "USER: <image>\nand <image>\nWhich of the two is larger? ASSISTANT:"
MAX_TOKENS = 6
# Wide, tall, square and odd-sized images: each grid shape, with padding cut on either side.
SIZES = [(40, 90), (90, 30), (60, 60), (33, 47)]


class NextReference:
    """transformers' LlavaNextForConditionalGeneration and LlavaNextProcessor, greedy, float32."""

    def __init__(self, path: str) -> None:
        from transformers import (AutoImageProcessor, AutoTokenizer, LlavaNextForConditionalGeneration,
                                  LlavaNextProcessor)

        self.model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        cfg = self.model.config
        self.processor = LlavaNextProcessor(image_processor=AutoImageProcessor.from_pretrained(path),
                                            tokenizer=AutoTokenizer.from_pretrained(path), patch_size=14,
                                            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                            num_additional_image_tokens=1)

    def inputs(self, text: str, images: list) -> dict:
        return self.processor(text=text, images=images or None, return_tensors="pt")

    @torch.inference_mode()
    def greedy(self, text: str, images: list, max_tokens: int = MAX_TOKENS) -> Reference:
        enc = self.inputs(text, images)
        extra = {k: enc[k] for k in ("pixel_values", "image_sizes") if k in enc}
        return cached_greedy(self.model, enc["input_ids"], max_tokens, **extra)


@pytest.fixture(scope="module")
def next_dir(tokenizer_dir, tmp_path_factory) -> str:
    from pagedserve.model.random_model import build_random_llava

    path = str(tmp_path_factory.mktemp("llava_next"))
    return build_random_llava(path, tokenizer_dir, image_size=28, initializer_range=0.5, pinpoints=PINPOINTS)


@pytest.fixture(scope="module")
def reference(next_dir) -> NextReference:
    return NextReference(next_dir)


def _params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def test_placeholders_and_tiles_follow_transformers(next_dir, reference):
    llm = LLM(next_dir, block_size=8, max_num_batched_tokens=64)
    token = llm.llm_engine.mm_processor.token_id
    counts = set()
    for a, b in zip(SIZES, SIZES[1:] + SIZES[:1]):
        images = [random_image(1, a), random_image(2, b)]
        prepared = llm.llm_engine.prepare({"prompt": PROMPT_2, "multi_modal_data": {"image": images}}, _params())
        enc = reference.inputs(PROMPT_2, images)
        ids = enc["input_ids"][0].tolist()
        assert prepared["prompt_token_ids"] == ids
        feats = prepared["mm_features"]
        assert sum(f.length for f in feats) == ids.count(token)
        for f, pixels, (w, h) in zip(feats, enc["pixel_values"], images and [im.size for im in images]):
            assert f.image_size == (h, w)
            torch.testing.assert_close(f.pixel_values, pixels[:len(f.pixel_values)])  # the rest is batch padding
            assert not pixels[len(f.pixel_values):].any()
            counts.add(f.length)
    assert len(counts) >= 3  # the counts follow the sizes
    # The encoder gives each image exactly its placeholders, and the profile image is the largest.
    enc = llm.llm_engine.runner.encoder_cache.encoder
    (profile,) = enc.profile_features(10 ** 6)
    assert profile.length >= max(counts)
    assert [e.shape[0] for e in enc.encode([profile, *feats])] == [profile.length, *[f.length for f in feats]]


@pytest.mark.parametrize("chunk", [8])
def test_images_match_transformers(next_dir, reference, chunk):
    """Images of several shapes, two in one prompt, beside a text-only prompt; chunks of 8
    split every image's placeholders across prefill steps."""
    llm = LLM(next_dir, block_size=8, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    cases = [(PROMPT_1, [random_image(1, SIZES[0])]),
             (PROMPT_2, [random_image(2, SIZES[1]), random_image(3, SIZES[3])]),
             ("USER: no picture here. ASSISTANT:", [])]
    assert_cases_match(llm, reference, cases, _params(logprobs=0))


def test_prefix_cache_preemption_and_chat(next_dir, reference):
    probe = LLM(next_dir, block_size=8, max_num_batched_tokens=64)
    block = probe.llm_engine.runner.kv_block_bytes()
    a, b = random_image(4, SIZES[2]), random_image(5, SIZES[2])
    assert_pixels_key_the_cache(probe, reference, PROMPT_1, a, b, _params(logprobs=0))
    chat = probe.chat(image_chat([image_data_url(a)]), _params(logprobs=0), use_tqdm=False)[0]
    assert_output_matches(reference.greedy("USER: <image>\nWhat is in the picture?\nASSISTANT:", [a]), chat)
    del probe
    # 10 blocks of 8 tokens: three prompts of 30 to 40 tokens growing by 6 cannot all stay.
    llm = LLM(next_dir, block_size=8, max_num_batched_tokens=64, kv_cache_memory_bytes=10 * block,
              enable_prefix_caching=False)
    images = [random_image(10 + i, s) for i, s in enumerate(SIZES[:3])]
    outs = llm.generate([{"prompt": PROMPT_1, "multi_modal_data": {"image": im}} for im in images],
                        _params(logprobs=0), use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for im, out in zip(images, outs):
        assert_output_matches(reference.greedy(PROMPT_1, [im]), out)


def test_checkpoint_names(next_dir, reference, tmp_path):
    """The builder's checkpoint has the hub's names ('image_newline', 'language_model.model...'
    at the top); transformers 5's module names ('model.image_newline', 'model.language_model...',
    'lm_head') and the tower under 'vision_model.' load to the same model."""
    from llava_checkpoints import write_transformers5_names

    hub, moved = write_transformers5_names(next_dir, str(tmp_path))
    assert {"image_newline", "language_model.lm_head.weight"} <= hub and "model.image_newline" in moved
    image = random_image(6, SIZES[0])
    out = LLM(str(tmp_path), block_size=8).generate({"prompt": PROMPT_1, "multi_modal_data": {"image": image}},
                                                    _params(logprobs=0), use_tqdm=False)[0]
    assert_output_matches(reference.greedy(PROMPT_1, [image]), out)


def test_random_model_cli_and_mismatched_pinpoints(tmp_path):
    import json

    from pagedserve.entrypoints.cli import main as cli_main

    path = str(tmp_path / "next")
    assert cli_main(["random-model", path, "--arch", "LlavaNextForConditionalGeneration"]) == 0
    llm = LLM(path, block_size=8)
    outs = llm.generate([{"prompt": PROMPT_1, "multi_modal_data": {"image": random_image(i, s)}}
                         for i, s in enumerate(SIZES[:2])], _params(), use_tqdm=False)
    token = llm.llm_engine.mm_processor.token_id
    assert len({o.prompt_token_ids.count(token) for o in outs}) == 2  # a wide and a tall image
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)
    conf = os.path.join(path, "preprocessor_config.json")
    with open(conf) as f:
        settings = json.load(f)
    with open(conf, "w") as f:
        json.dump({**settings, "image_grid_pinpoints": [[56, 56]]}, f)
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        LLM(path)


@pytest.mark.gpu
def test_images_on_cuda(next_dir, reference):
    """On CUDA: decode graphs, image steps eagerly, the encoder's largest image in the KV pool's
    profile pass; float32 against transformers on CPU."""
    llm = LLM(next_dir, device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=32, max_num_seqs=8,
              gpu_memory_utilization=0.3)
    assert llm.llm_engine.runner.graphs is not None
    cases = [(PROMPT_1, [random_image(1, SIZES[0])]), (PROMPT_2, [random_image(2, SIZES[1]), random_image(3)])]
    outs = llm.generate([{"prompt": t, "multi_modal_data": {"image": ims}} for t, ims in cases], _params(logprobs=0),
                        use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(reference.greedy(text, images), out, lp_tol=2e-2)
