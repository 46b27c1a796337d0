"""Image inputs (InternVL3 / 3.5 in the Hugging Face format: InternVLForConditionalGeneration):
a random model against transformers' own on the same weights and pixels: each image's
<IMG_CONTEXT> expanded as InternVLProcessor does (<img>, its tiles' run, </img>), its tiles
(aspect-ratio grids, a thumbnail after several), chunked prefill across images of different
tile counts, prefix caching, preemption, chat, both checkpoint name layouts, mm_processor_kwargs,
a Qwen3 decoder (InternVL3.5), the KV profile's largest image."""

from __future__ import annotations


import pytest
import torch

from conftest import (Reference, assert_cases_match, assert_output_matches, assert_pixels_key_the_cache,
                      cached_greedy, image_chat, image_data_url, random_image)
from pagedserve import LLM, SamplingParams
from pagedserve.errors import ParamError

pytest.importorskip("PIL")

PROMPT_1 = "<|im_start|>user\n<IMG_CONTEXT>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n"
PROMPT_2 = ("<|im_start|>user\n<IMG_CONTEXT>\nand <IMG_CONTEXT>\nWhich of the two is larger?<|im_end|>\n"
            "<|im_start|>assistant\n")
TEXT = "<|im_start|>user\nNo picture here.<|im_end|>\n<|im_start|>assistant\n"
MAX_TOKENS = 6
# 56-pixel tiles, at most 4 a grid: tall 1x2, wide 3x1, square 1 (no thumbnail), 2x2, odd 1x2;
# with the thumbnail 3, 4, 1, 5 and 3 tiles of 4 tokens.
SIZES = [(40, 90), (200, 60), (56, 56), (120, 110), (33, 47)]


class InternVLReference:
    """transformers' InternVLForConditionalGeneration and InternVLProcessor, greedy, float32."""

    def __init__(self, path: str) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, InternVLForConditionalGeneration, InternVLProcessor

        class Processor(InternVLProcessor):
            # Its video processor needs torchvision; images need none (transformers checks it anyway).
            def check_argument_for_proper_class(self, name, arg):
                return None if arg is None else super().check_argument_for_proper_class(name, arg)

        self.model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.processor = Processor(image_processor=AutoImageProcessor.from_pretrained(path),
                                   tokenizer=AutoTokenizer.from_pretrained(path),
                                   image_seq_length=self.model.config.image_seq_length)

    def inputs(self, text: str, images: list, **kwargs) -> dict:
        return self.processor(text=text, images=images or None, return_tensors="pt", **kwargs)

    @torch.inference_mode()
    def greedy(self, text: str, images: list, max_tokens: int = MAX_TOKENS) -> Reference:
        enc = self.inputs(text, images)
        extra = {"pixel_values": enc["pixel_values"]} if "pixel_values" in enc else {}
        return cached_greedy(self.model, enc["input_ids"], max_tokens, **extra)


@pytest.fixture(scope="module")
def internvl_dir(tokenizer_dir, tmp_path_factory) -> str:
    from pagedserve.model.random_model import build_random_internvl

    path = str(tmp_path_factory.mktemp("internvl"))
    return build_random_internvl(path, tokenizer_dir, initializer_range=0.5, max_patches=4)


@pytest.fixture(scope="module")
def reference(internvl_dir) -> InternVLReference:
    return InternVLReference(internvl_dir)


def _params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def test_placeholders_and_tiles_follow_transformers(internvl_dir, reference):
    llm = LLM(internvl_dir, block_size=8, max_num_batched_tokens=64)
    proc = llm.llm_engine.mm_processor
    token = proc.token_id
    tiles = set()
    feats = []
    for a, b in zip(SIZES, SIZES[1:] + SIZES[:1]):
        images = [random_image(1, a), random_image(2, b)]
        prepared = llm.llm_engine.prepare({"prompt": PROMPT_2, "multi_modal_data": {"image": images}}, _params())
        enc = reference.inputs(PROMPT_2, images)
        ids = enc["input_ids"][0].tolist()
        assert prepared["prompt_token_ids"] == ids
        feats = prepared["mm_features"]
        # Each feature spans its <IMG_CONTEXT> run only, between <img> and </img>.
        for f in feats:
            assert ids[f.offset - 1] == proc.image_start and ids[f.offset + f.length] == proc.image_end
            assert set(ids[f.offset:f.offset + f.length]) == {token}
            assert f.length == 4 * f.pixel_values.shape[0]
            tiles.add(f.pixel_values.shape[0])
        torch.testing.assert_close(torch.cat([f.pixel_values for f in feats]), enc["pixel_values"], rtol=0, atol=0)
        # The prompt written out already (InternVLProcessor's ids) is taken as it is.
        again = llm.llm_engine.prepare({"prompt_token_ids": ids, "multi_modal_data": {"image": images}}, _params())
        assert again["prompt_token_ids"] == ids
        assert [(f.offset, f.length) for f in again["mm_features"]] == [(f.offset, f.length) for f in feats]
    assert tiles == {1, 3, 4, 5}
    with pytest.raises(ParamError, match="runs of image placeholder"):
        llm.llm_engine.prepare({"prompt": PROMPT_2, "multi_modal_data": {"image": [random_image(1)]}}, _params())
    # The encoder gives each image exactly its placeholders, and the profile image is the largest.
    enc = llm.llm_engine.runner.encoder_cache.encoder
    (profile,) = enc.profile_features(10 ** 6)
    assert profile.pixel_values.shape[0] == 5 and profile.length == 20
    assert [e.shape[0] for e in enc.encode([profile, *feats])] == [profile.length, *[f.length for f in feats]]


def test_mm_processor_kwargs(internvl_dir, reference):
    """max_patches and crop_to_patches (mm_processor_kwargs) change the tiles as they do
    InternVLProcessor's, and the KV profile's largest image with them."""
    images = [random_image(3, SIZES[3]), random_image(4, SIZES[1])]
    for kwargs, most in [({"max_patches": 2}, 3), ({"crop_to_patches": False}, 1)]:
        llm = LLM(internvl_dir, block_size=8, mm_processor_kwargs=kwargs)
        prepared = llm.llm_engine.prepare({"prompt": PROMPT_2, "multi_modal_data": {"image": images}}, _params())
        assert prepared["prompt_token_ids"] == reference.inputs(PROMPT_2, images, **kwargs)["input_ids"][0].tolist()
        (profile,) = llm.llm_engine.runner.encoder_cache.encoder.profile_features(10 ** 6)
        assert profile.pixel_values.shape[0] == most
        assert max(f.pixel_values.shape[0] for f in prepared["mm_features"]) == most
    with pytest.raises(ValueError, match="tiles are"):  # the pixel shuffle needs the tower's grid
        LLM(internvl_dir, mm_processor_kwargs={"size": {"height": 28, "width": 28}})


@pytest.mark.parametrize("chunk", [8])
def test_images_match_transformers(internvl_dir, reference, chunk):
    """Images of several tile counts, two in one prompt, beside a text-only prompt; chunks of 8
    split every image's run (and its <img> / </img>) across prefill steps."""
    llm = LLM(internvl_dir, block_size=8, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    cases = [(PROMPT_1, [random_image(1, SIZES[0])]),
             (PROMPT_2, [random_image(2, SIZES[3]), random_image(3, SIZES[1])]),
             (TEXT, [])]
    assert_cases_match(llm, reference, cases, _params(logprobs=0))


def test_prefix_cache_preemption_and_chat(internvl_dir, reference):
    probe = LLM(internvl_dir, block_size=8, max_num_batched_tokens=64)
    block = probe.llm_engine.runner.kv_block_bytes()
    a, b = random_image(4, SIZES[1]), random_image(5, SIZES[1])
    first, other = assert_pixels_key_the_cache(probe, reference, PROMPT_1, a, b, _params(logprobs=0))
    assert first.prompt_token_ids == other.prompt_token_ids
    chat = probe.chat(image_chat([image_data_url(a)]), _params(logprobs=0), use_tqdm=False)[0]
    assert chat.prompt_token_ids == first.prompt_token_ids
    assert_output_matches(reference.greedy(PROMPT_1, [a]), chat)
    del probe
    # 10 blocks of 8 tokens: three prompts of 28 to 40 tokens growing by 6 cannot all stay.
    llm = LLM(internvl_dir, block_size=8, max_num_batched_tokens=64, kv_cache_memory_bytes=10 * block,
              enable_prefix_caching=False)
    images = [random_image(10 + i, s) for i, s in enumerate([SIZES[0], SIZES[1], SIZES[3]])]
    outs = llm.generate([{"prompt": PROMPT_1, "multi_modal_data": {"image": im}} for im in images],
                        _params(logprobs=0), use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for im, out in zip(images, outs):
        assert_output_matches(reference.greedy(PROMPT_1, [im]), out)


def test_checkpoint_names(internvl_dir, reference, tmp_path):
    """The builder's checkpoint has the hub's names ('vision_tower.', 'multi_modal_projector.',
    'language_model.model...', 'language_model.lm_head' at the top); transformers 5's module
    names ('model.vision_tower...', 'model.language_model...', 'lm_head') load to the same model."""
    from llava_checkpoints import write_transformers5_names

    hub, _ = write_transformers5_names(internvl_dir, str(tmp_path), tower="model.vision_tower.")
    assert "language_model.lm_head.weight" in hub and "multi_modal_projector.linear_1.weight" in hub
    assert any(k.startswith("vision_tower.encoder.") for k in hub)
    image = random_image(6, SIZES[4])
    out = LLM(str(tmp_path), block_size=8).generate({"prompt": PROMPT_1, "multi_modal_data": {"image": image}},
                                                    _params(logprobs=0), use_tqdm=False)[0]
    assert_output_matches(reference.greedy(PROMPT_1, [image]), out)


def test_qwen3_decoder(tokenizer_dir, tmp_path):
    """InternVL3.5's decoder is Qwen3 (text_config.model_type "qwen3")."""
    from pagedserve.model.random_model import build_random_internvl

    path = build_random_internvl(str(tmp_path), tokenizer_dir, text_model_type="qwen3", initializer_range=0.5)
    ref = InternVLReference(path)
    assert ref.model.config.text_config.model_type == "qwen3"
    images = [random_image(7, SIZES[0]), random_image(8, SIZES[2])]
    out = LLM(path, block_size=8, max_num_batched_tokens=16).generate(
        {"prompt": PROMPT_2, "multi_modal_data": {"image": images}}, _params(logprobs=0), use_tqdm=False)[0]
    assert_output_matches(ref.greedy(PROMPT_2, images), out)


def test_random_model_cli(tmp_path):
    from pagedserve.entrypoints.cli import main as cli_main

    path = str(tmp_path / "internvl")
    assert cli_main(["random-model", path, "--arch", "InternVLForConditionalGeneration"]) == 0
    llm = LLM(path, block_size=8)
    outs = llm.generate([{"prompt": PROMPT_1, "multi_modal_data": {"image": random_image(i, s)}}
                         for i, s in enumerate(SIZES[:3])], _params(), use_tqdm=False)
    token = llm.llm_engine.mm_processor.token_id
    assert len({o.prompt_token_ids.count(token) for o in outs}) == 3  # tall, wide and square: other tile counts
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)


@pytest.mark.gpu
def test_images_on_cuda(internvl_dir, reference):
    """On CUDA: decode graphs, image steps eagerly, the encoder's largest image in the KV pool's
    profile pass; float32 against transformers on CPU."""
    llm = LLM(internvl_dir, device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=32, max_num_seqs=8,
              gpu_memory_utilization=0.3)
    assert llm.llm_engine.runner.graphs is not None
    cases = [(PROMPT_1, [random_image(1, SIZES[0])]),
             (PROMPT_2, [random_image(2, SIZES[1]), random_image(3, SIZES[3])])]
    outs = llm.generate([{"prompt": t, "multi_modal_data": {"image": ims}} for t, ims in cases], _params(logprobs=0),
                        use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(reference.greedy(text, images), out, lp_tol=2e-2)
