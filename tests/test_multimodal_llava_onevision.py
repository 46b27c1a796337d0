"""Image inputs (LLaVA-OneVision): a random LlavaOnevisionForConditionalGeneration (SigLIP tower,
Qwen2 decoder, "full" features, anyres_max_2) against transformers' own on the same weights and
pixels: each image's placeholder count by its size (LlavaOnevisionProcessor's, the anyres_max
downscale included), a prompt's several images one square tile each, chunked prefill, prefix
caching, chat, the hub's checkpoint names, the KV profile's largest images; videos refused."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import (Reference, assert_cases_match, assert_output_matches, assert_pixels_key_the_cache,
                      cached_greedy, image_chat, image_data_url, random_image)
from pagedserve import LLM, SamplingParams

pytest.importorskip("PIL")

# Tiles of 28 pixels in 7-pixel patches (4x4 features a tile): 1x2, 2x1, 2x2. With anyres_max_2 an
# unpadded grid of more than 1.1^2 * 32 features (2x2's 8x8, most of its unpadded ones) is downscaled.
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
KV_BYTES = 4 << 20  # 2048 blocks of 8 tokens (the default pool takes seconds to set up on CPU)
PROMPT_1 = "USER: <image>\nWhat is in the picture? ASSISTANT:"
PROMPT_2 = "USER: <image>\nand <image>\nWhich of the two is larger? ASSISTANT:"
MAX_TOKENS = 6
# (width, height): wide, tall, square, odd-sized (the last four downscaled), and large ones.
SIZES = [(90, 40), (30, 90), (60, 60), (47, 33), (300, 200), (200, 300), (500, 500)]
LARGE = SIZES[4:]


class OnevisionReference:
    """transformers' LlavaOnevisionForConditionalGeneration and LlavaOnevisionProcessor, greedy,
    float32; a prompt's images passed as one group (as its chat template path passes them)."""

    def __init__(self, path: str) -> None:
        from transformers import (AutoImageProcessor, AutoTokenizer, LlavaOnevisionForConditionalGeneration,
                                  LlavaOnevisionProcessor)

        class ImagesOnly(LlavaOnevisionProcessor):  # its video processor needs torchvision
            @classmethod
            def get_attributes(cls) -> list[str]:
                return ["image_processor", "tokenizer"]

        self.model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        cfg = self.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self.processor = ImagesOnly(image_processor=AutoImageProcessor.from_pretrained(path),
                                    tokenizer=AutoTokenizer.from_pretrained(path), num_image_tokens=side * side,
                                    vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                    vision_aspect_ratio=cfg.vision_aspect_ratio)

    def inputs(self, text: str, images: list) -> dict:
        return self.processor(text=[text], images=[images] if images else None, return_tensors="pt")

    @torch.inference_mode()
    def greedy(self, text: str, images: list, max_tokens: int = MAX_TOKENS) -> Reference:
        enc = self.inputs(text, images)
        extra = {k: enc[k] for k in ("pixel_values", "image_sizes", "batch_num_images") if k in enc}
        return cached_greedy(self.model, enc["input_ids"], max_tokens, **extra)


@pytest.fixture(scope="module")
def ov_dir(tokenizer_dir, tmp_path_factory) -> str:
    from pagedserve.model.random_model import build_random_llava

    path = str(tmp_path_factory.mktemp("llava_onevision"))
    return build_random_llava(path, tokenizer_dir, text_model_type="qwen2", image_size=28, patch_size=7,
                              select_strategy="full", feature_layer=-1, vision="siglip", initializer_range=0.5,
                              pinpoints=PINPOINTS, max_patches=2)


@pytest.fixture(scope="module")
def reference(ov_dir) -> OnevisionReference:
    return OnevisionReference(ov_dir)


def _params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def _llm(path: str, **kw) -> LLM:
    return LLM(path, block_size=8, kv_cache_memory_bytes=KV_BYTES, **kw)


def _check_prepared(llm: LLM, reference: OnevisionReference, text: str, images: list) -> list:
    """The prompt's ids and each image's tiles and size as transformers' processor makes them."""
    prepared = llm.llm_engine.prepare({"prompt": text, "multi_modal_data": {"image": images}}, _params())
    enc = reference.inputs(text, images)
    ids = enc["input_ids"][0].tolist()
    assert prepared["prompt_token_ids"] == ids
    feats = prepared["mm_features"]
    assert sum(f.length for f in feats) == ids.count(llm.llm_engine.mm_processor.token_id)
    for f, pixels, im in zip(feats, enc["pixel_values"], images, strict=True):
        assert f.image_size == im.size[::-1]
        torch.testing.assert_close(f.pixel_values, pixels[:len(f.pixel_values)])  # the rest is batch padding
        assert not pixels[len(f.pixel_values):].any()
    return feats


def test_placeholders_and_tiles_follow_transformers(ov_dir, reference):
    from pagedserve.multimodal.llava_onevision import num_image_tokens

    llm = _llm(ov_dir, max_num_batched_tokens=64)
    singles = [_check_prepared(llm, reference, PROMPT_1, [random_image(i, s)])[0] for i, s in enumerate(SIZES)]
    assert len({f.length for f in singles}) >= 4  # the counts follow the sizes
    assert all(len(f.pixel_values) > 1 for f in singles)  # tiled
    # A prompt's two images: one square-padded tile and one newline each, whatever their sizes.
    pairs = [f for a, b in zip(SIZES, SIZES[1:]) for f in _check_prepared(
        llm, reference, PROMPT_2, [random_image(1, a), random_image(2, b)])]
    assert {(len(f.pixel_values), f.length) for f in pairs} == {(1, 17)}
    # The encoder gives each image exactly its placeholders; the profile has the largest image by
    # tiles (2x2, downscaled to 5x5 features) and the one by placeholders (a 2x1 grid's 8x4).
    enc = llm.llm_engine.runner.encoder_cache.encoder
    profile = enc.profile_features(10 ** 6)
    sizes = torch.randint(1, 200, (3000, 2), generator=torch.Generator().manual_seed(0)).tolist()
    most = max(num_image_tokens(enc.config, h, w) for h, w in sizes + [p.image_size for p in profile])
    assert [(len(p.pixel_values), p.length) for p in profile] == [(5, 16 + 25 + 5), (3, most)]
    feats = [*profile, *singles, *pairs[:2]]
    assert [e.shape[0] for e in enc.encode(feats)] == [f.length for f in feats]


@pytest.mark.parametrize("chunk", [8])
def test_images_match_transformers(ov_dir, reference, chunk):
    """A downscaled and a wide image alone, two images of other sizes in one prompt, a text-only
    prompt; chunks of 8 split every image's placeholders across prefill steps."""
    llm = _llm(ov_dir, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    cases = [(PROMPT_1, [random_image(1, LARGE[0])]), (PROMPT_1, [random_image(2, SIZES[0])]),
             (PROMPT_2, [random_image(3, SIZES[1]), random_image(4, SIZES[3])]),
             ("USER: no picture here. ASSISTANT:", [])]
    assert_cases_match(llm, reference, cases, _params(logprobs=0))


def test_prefix_cache_and_chat(ov_dir, reference):
    probe = _llm(ov_dir, max_num_batched_tokens=64)
    a, b = random_image(4, SIZES[2]), random_image(5, SIZES[2])
    first, _ = assert_pixels_key_the_cache(probe, reference, PROMPT_1, a, b, _params(logprobs=0))
    start = first.prompt_token_ids.index(probe.llm_engine.mm_processor.token_id)
    # The same image alone (tiled) and beside another (one tile): other embeddings, not reused.
    pair = probe.generate({"prompt": PROMPT_2, "multi_modal_data": {"image": [a, b]}}, _params(logprobs=0),
                          use_tqdm=False)[0]
    assert pair.num_cached_tokens == (start // 8) * 8
    assert_output_matches(reference.greedy(PROMPT_2, [a, b]), pair)
    chat = probe.chat(image_chat([image_data_url(a)]), _params(logprobs=0), use_tqdm=False)[0]
    assert_output_matches(reference.greedy("USER: <image>\nWhat is in the picture?\nASSISTANT:", [a]), chat)
    chat = probe.chat(image_chat([image_data_url(a), image_data_url(b)]), _params(logprobs=0), use_tqdm=False)[0]
    assert_output_matches(reference.greedy("USER: <image>\n<image>\nWhat is in the picture?\nASSISTANT:", [a, b]),
                          chat)


def test_checkpoint_names(ov_dir, reference, tmp_path):
    """The builder's checkpoint has the hub's names ('image_newline', 'language_model.model...'
    at the top); transformers 5's module names ('model.image_newline', 'model.language_model...',
    'lm_head') and the tower under 'vision_model.' load to the same model."""
    from llava_checkpoints import write_transformers5_names

    hub, moved = write_transformers5_names(ov_dir, str(tmp_path))
    assert {"image_newline", "language_model.lm_head.weight"} <= hub and "model.image_newline" in moved
    image = random_image(6, LARGE[1])
    out = _llm(str(tmp_path)).generate({"prompt": PROMPT_1, "multi_modal_data": {"image": image}},
                                                    _params(logprobs=0), use_tqdm=False)[0]
    assert_output_matches(reference.greedy(PROMPT_1, [image]), out)


def test_random_model_cli_videos_and_bad_configs(tmp_path):
    import json

    from pagedserve.entrypoints.cli import main as cli_main
    from pagedserve.multimodal.processor import ImageInputProcessor

    path = str(tmp_path / "onevision")
    assert cli_main(["random-model", path, "--arch", "LlavaOnevisionForConditionalGeneration"]) == 0
    llm = _llm(path)
    outs = llm.generate([{"prompt": PROMPT_1, "multi_modal_data": {"image": random_image(i, s)}}
                         for i, s in enumerate([SIZES[0], SIZES[1], LARGE[2]])], _params(), use_tqdm=False)
    token = llm.llm_engine.mm_processor.token_id
    assert len({o.prompt_token_ids.count(token) for o in outs}) == 3  # wide, tall, and 2x2 downscaled
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)
    with pytest.raises(ValueError, match="video"):  # the <video> token: no video path to take it
        llm.generate("USER: <video>\nWhat happens? ASSISTANT:", _params(), use_tqdm=False)
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate({"prompt": PROMPT_1, "multi_modal_data": {"video": [random_image(0)]}}, _params(),
                     use_tqdm=False)
    for name, settings, match in [("preprocessor_config.json", {"image_grid_pinpoints": [[56, 56]]},
                                   "image_grid_pinpoints"),
                                  ("config.json", {"vision_aspect_ratio": "anyres"}, "vision_aspect_ratio"),
                                  ("config.json", {"vision_feature_select_strategy": "default"}, "whole rows")]:
        conf = os.path.join(path, name)
        with open(conf) as f:
            old = json.load(f)
        with open(conf, "w") as f:
            json.dump({**old, **settings}, f)
        with pytest.raises(ValueError, match=match):
            ImageInputProcessor(path, max_images=1)
        with open(conf, "w") as f:
            json.dump(old, f)


@pytest.mark.gpu
def test_images_on_cuda(ov_dir, reference):
    """On CUDA: decode graphs, image steps eagerly, the encoder's largest images in the KV pool's
    profile pass; float32 against transformers on CPU."""
    llm = LLM(ov_dir, device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=32, max_num_seqs=8,
              gpu_memory_utilization=0.3)
    assert llm.llm_engine.runner.graphs is not None
    cases = [(PROMPT_1, [random_image(1, LARGE[0])]), (PROMPT_1, [random_image(2, SIZES[3])]),
             (PROMPT_2, [random_image(3, SIZES[1]), random_image(4)])]
    outs = llm.generate([{"prompt": t, "multi_modal_data": {"image": ims}} for t, ims in cases], _params(logprobs=0),
                        use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(reference.greedy(text, images), out, lp_tol=2e-2)
