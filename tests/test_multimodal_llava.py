"""Image inputs (LLaVA): a random LlavaForConditionalGeneration against transformers' own on
the same weights and pixels: placeholder expansion, chunked prefill across an image,
several images a prompt, prefix caching keyed by the pixels, preemption, the encoder cache,
both checkpoint name layouts, and the errors."""

from __future__ import annotations

import glob
import os
import shutil

import pytest
import torch

from conftest import Reference, assert_output_matches, image_chat, image_data_url, random_image
from pagedserve import LLM, SamplingParams

pytest.importorskip("PIL")  # a dependency; the GPU machines' image may lack it (its `-m gpu` test then skips)

PROMPT_1 = "USER: <image>\nWhat is in the picture? ASSISTANT:"
PROMPT_2 = "USER: <image>\nand <image>\nWhich of the two is larger? ASSISTANT:"
MAX_TOKENS = 8


class LlavaReference:
    """transformers' LlavaForConditionalGeneration and LlavaProcessor, greedy, float32."""

    def __init__(self, path: str) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor

        self.model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        cfg = self.model.config
        cls_token = int(cfg.vision_config.model_type == "clip_vision_model")
        self.processor = LlavaProcessor(image_processor=AutoImageProcessor.from_pretrained(path),
                                        tokenizer=AutoTokenizer.from_pretrained(path), patch_size=14,
                                        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                        num_additional_image_tokens=cls_token)

    def inputs(self, text: str, images: list) -> tuple[list[int], torch.Tensor]:
        enc = self.processor(text=text, images=images or None, return_tensors="pt")
        return enc["input_ids"][0].tolist(), enc.get("pixel_values")

    @torch.inference_mode()
    def greedy(self, text: str, images: list, max_tokens: int = MAX_TOKENS) -> Reference:
        ids, pixels = self.inputs(text, images)
        tokens, logits = [], []
        for _ in range(max_tokens):
            row = self.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1].float()
            tokens.append(int(row.argmax()))
            logits.append(row)
            ids.append(tokens[-1])
        return Reference(tokens, logits)


@pytest.fixture(scope="module")
def reference(llava_dir) -> LlavaReference:
    return LlavaReference(llava_dir)


def _image(seed: int, size=(50, 40)):
    return random_image(seed, size)


def _params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def test_placeholders_expand_as_transformers_processor_does(llava_dir, reference):
    llm = LLM(llava_dir, block_size=8, max_num_batched_tokens=64)
    images = [_image(1), _image(2, (30, 70))]
    prepared = llm.llm_engine.prepare({"prompt": PROMPT_2, "multi_modal_data": {"image": images}}, _params())
    ids, pixels = reference.inputs(PROMPT_2, images)
    assert prepared["prompt_token_ids"] == ids
    feats = prepared["mm_features"]
    token = llm.llm_engine.mm_processor.token_id
    starts = [i for i, t in enumerate(ids) if t == token and (i == 0 or ids[i - 1] != token)]
    assert len(starts) == 2 and ids.count(token) == 32
    assert [(f.offset, f.length) for f in feats] == [(i, 16) for i in starts]
    torch.testing.assert_close(torch.stack([f.pixel_values for f in feats]), pixels)
    # Ids already expanded are taken as they are.
    again = llm.llm_engine.prepare({"prompt_token_ids": ids, "multi_modal_data": {"image": images}}, _params())
    assert again["prompt_token_ids"] == ids and [f.offset for f in again["mm_features"]] == starts


def test_siglip_tower_full_features_qwen2_decoder(tokenizer_dir, tmp_path):
    """A SigLIP tower (no class token), every feature kept ("full"), two feature layers
    concatenated, on a Qwen2 decoder."""
    from pagedserve.model.random_model import build_random_llava

    path = build_random_llava(str(tmp_path), tokenizer_dir, text_model_type="qwen2", vision="siglip", image_size=42,
                              select_strategy="full", feature_layer=[-2, -1], initializer_range=0.5)
    ref = LlavaReference(path)
    llm = LLM(path, block_size=8, max_num_batched_tokens=16)
    images = [_image(1), _image(2)]
    out = llm.generate({"prompt": PROMPT_2, "multi_modal_data": {"image": images}}, _params(logprobs=0),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids.count(llm.llm_engine.mm_processor.token_id) == 2 * 9  # 3 x 3 patches each
    assert_output_matches(ref.greedy(PROMPT_2, images), out)


@pytest.mark.parametrize("chunk", [8, 64])
def test_images_match_transformers(llava_dir, reference, chunk):
    """One and two images a prompt, mixed with a text-only prompt in one batch; chunk 8 splits
    every image's 16 placeholders across prefill steps (and 1-token chunks never occur)."""
    llm = LLM(llava_dir, block_size=8, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    cases = [(PROMPT_1, [_image(1)]), (PROMPT_2, [_image(2), _image(3, (90, 30))]),
             ("USER: no picture here. ASSISTANT:", [])]
    prompts = [{"prompt": t, "multi_modal_data": {"image": ims}} if ims else t for t, ims in cases]
    outs = llm.generate(prompts, _params(logprobs=0), use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(reference.greedy(text, images), out)
    assert not llm.llm_engine.runner.encoder_cache.embeddings  # released with their requests


def test_the_image_decides_the_output_and_keys_the_prefix_cache(llava_dir, reference):
    llm = LLM(llava_dir, block_size=8, max_num_batched_tokens=64)
    a, b = _image(4), _image(5)
    first = llm.generate({"prompt": PROMPT_1, "multi_modal_data": {"image": a}}, _params(logprobs=0),
                         use_tqdm=False)[0]
    # Same tokens, other pixels: no block after the first placeholder may come from the cache.
    other = llm.generate({"prompt": PROMPT_1, "multi_modal_data": {"image": b}}, _params(logprobs=0),
                         use_tqdm=False)[0]
    again = llm.generate({"prompt": PROMPT_1, "multi_modal_data": {"image": a}}, _params(logprobs=0),
                         use_tqdm=False)[0]
    assert first.outputs[0].token_ids != other.outputs[0].token_ids
    assert_output_matches(reference.greedy(PROMPT_1, [a]), first)
    assert_output_matches(reference.greedy(PROMPT_1, [b]), other)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    start = first.prompt_token_ids.index(llm.llm_engine.mm_processor.token_id)
    assert other.num_cached_tokens == (start // 8) * 8  # the blocks before the image only
    assert again.num_cached_tokens == (len(first.prompt_token_ids) - 1) // 8 * 8


def test_preempted_requests_recompute_their_images(llava_dir, reference):
    probe = LLM(llava_dir, block_size=8, max_num_batched_tokens=64)
    block = probe.llm_engine.runner.kv_block_bytes()
    del probe
    # 12 blocks of 8 tokens: three ~40-token prompts growing by 8 cannot all stay.
    llm = LLM(llava_dir, block_size=8, max_num_batched_tokens=64, kv_cache_memory_bytes=12 * block,
              enable_prefix_caching=False)
    images = [_image(10 + i) for i in range(3)]
    outs = llm.generate([{"prompt": PROMPT_1, "multi_modal_data": {"image": im}} for im in images],
                        _params(logprobs=0), use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for im, out in zip(images, outs):
        assert_output_matches(reference.greedy(PROMPT_1, [im]), out)
    assert not llm.llm_engine.runner.encoder_cache.embeddings


def test_memory_profile_covers_the_busiest_encoder_step(llava_dir):
    """A step encodes every new image its chunks touch, in one pass: the memory profile's
    encoder pass must be at least that large (worker/encoder_cache.py profile_images)."""
    from pagedserve.worker.encoder_cache import profile_images

    llm = LLM(llava_dir, max_num_batched_tokens=64, max_num_seqs=8)
    encoder = llm.llm_engine.runner.encoder_cache.encoder
    passes, real = [], encoder.encode
    encoder.encode = lambda feats: passes.append(sum(f.num_embeds for f in feats)) or real(feats)
    prompts = [{"prompt": PROMPT_2, "multi_modal_data": {"image": [_image(40 + i), _image(60 + i)]}} for i in range(8)]
    llm.generate(prompts, _params(), use_tqdm=False)
    largest = sum(f.num_embeds for f in encoder.profile_features(llm.llm_engine.config.max_model_len))
    assert max(passes) > largest  # the busiest step encoded several images at once
    assert max(passes) <= sum(f.num_embeds for f in profile_images(encoder, llm.llm_engine.config))


def test_chat_with_image_parts(llava_dir, reference):
    img = _image(7)
    llm = LLM(llava_dir, block_size=8, max_num_batched_tokens=64)
    out = llm.chat(image_chat([image_data_url(img)]), _params(logprobs=0), use_tqdm=False)[0]
    pil = llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": img},
                                                  {"type": "text", "text": "What is in the picture?"}]}],
                   _params(), use_tqdm=False)[0]
    text = "USER: <image>\nWhat is in the picture?\nASSISTANT:"
    assert out.prompt == text
    assert_output_matches(reference.greedy(text, [img]), out)
    assert pil.outputs[0].token_ids == out.outputs[0].token_ids


def test_hub_checkpoint_names(llava_dir, reference, tmp_path):
    """llava-hf checkpoints name the tower 'vision_tower.vision_model...' and the decoder
    'language_model.model...'; transformers 5 saves 'model.vision_tower...' or drops
    'vision_model.'. Each layout loads to the same model."""
    from safetensors.torch import load_file, save_file

    (src,) = glob.glob(os.path.join(llava_dir, "*.safetensors"))
    state = load_file(src)
    renamed = {}
    for k, v in state.items():
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower."):]
        elif k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model."):]
        elif k.startswith("multi_modal_projector."):
            k = "model." + k
        renamed[k] = v
    assert renamed.keys() != state.keys()
    for f in os.listdir(llava_dir):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(llava_dir, f), tmp_path / f)
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    llm = LLM(str(tmp_path), block_size=8)
    out = llm.generate({"prompt": PROMPT_1, "multi_modal_data": {"image": _image(1)}}, _params(logprobs=0),
                       use_tqdm=False)[0]
    assert_output_matches(reference.greedy(PROMPT_1, [_image(1)]), out)


def test_bad_image_inputs_are_named(llava_dir, llama_dir):
    llm = LLM(llava_dir, block_size=8, limit_mm_per_prompt={"image": 1})
    eng = llm.llm_engine
    bad = [
        ({"prompt": PROMPT_1, "multi_modal_data": {"image": [_image(1), _image(2)]}}, "at most 1 images"),
        ({"prompt": PROMPT_1}, "placeholders"),  # a placeholder without its image
        ({"prompt": "USER: hi ASSISTANT:", "multi_modal_data": {"image": _image(1)}}, "placeholder"),
        ({"prompt": PROMPT_1, "multi_modal_data": {"image": "data:image/png;base64,!!"}}, "base64"),
        ({"prompt": PROMPT_1, "multi_modal_data": {"image": b"not an image"}}, "decode"),
        ({"prompt": PROMPT_1, "multi_modal_data": {"image": "file:///etc/passwd"}}, "data: URL or an http"),
        ({"prompt": PROMPT_1, "multi_modal_data": {"video": []}}, "multi_modal_data"),
    ]
    for prompt, words in bad:
        with pytest.raises(ValueError, match=words):
            llm.generate(prompt, _params(), use_tqdm=False)
    with pytest.raises(ValueError, match="truncated"):
        llm.generate({"prompt": PROMPT_1, "multi_modal_data": {"image": _image(1)}},
                     _params(truncate_prompt_tokens=10), use_tqdm=False)
    from pagedserve.sampling_params import BeamSearchParams

    with pytest.raises(ValueError, match="text generation only"):
        llm.beam_search([{"prompt": PROMPT_1, "multi_modal_data": {"image": _image(1)}}],
                        BeamSearchParams(beam_width=2, max_tokens=2))
    assert not eng.has_unfinished_requests() and eng.kv.pool.num_free_blocks == eng.kv.num_blocks
    text_only = LLM(llama_dir, block_size=8)
    with pytest.raises(ValueError, match="takes no images"):
        text_only.generate({"prompt": "a picture", "multi_modal_data": {"image": _image(1)}}, _params(),
                           use_tqdm=False)
    with pytest.raises(ValueError, match="limit_mm_per_prompt"):
        LLM(llava_dir, limit_mm_per_prompt={"video": 1})


def test_limit_zero_serves_text_only(llava_dir, reference):
    llm = LLM(llava_dir, block_size=8, limit_mm_per_prompt={"image": 0})
    assert llm.llm_engine.runner.encoder_cache is None and llm.llm_engine.mm_processor is None
    with pytest.raises(ValueError, match="limit_mm_per_prompt is 0"):
        llm.generate({"prompt": PROMPT_1, "multi_modal_data": {"image": _image(1)}}, _params(), use_tqdm=False)
    out = llm.generate("USER: no picture here. ASSISTANT:", _params(logprobs=0), use_tqdm=False)[0]
    assert_output_matches(reference.greedy("USER: no picture here. ASSISTANT:", []), out)


def test_random_model_cli_builds_a_llava(tmp_path, capsys):
    from pagedserve.entrypoints.cli import main as cli_main

    path = str(tmp_path / "llava")
    assert cli_main(["random-model", path, "--arch", "LlavaForConditionalGeneration"]) == 0
    llm = LLM(path, block_size=8)
    outs = llm.generate([{"prompt": PROMPT_1, "multi_modal_data": {"image": _image(i)}} for i in (1, 2)], _params(),
                        use_tqdm=False)
    assert all(o.prompt_token_ids.count(llm.llm_engine.mm_processor.token_id) == 16 for o in outs)
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)


@pytest.mark.gpu
def test_images_on_cuda_with_graphs(llava_dir, reference):
    """On CUDA: the Triton backend with decode graphs (image steps run eagerly), the KV pool
    sized by a profile pass that includes the encoder, float32 against transformers on CPU."""
    llm = LLM(llava_dir, device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=16,
              max_num_seqs=8, gpu_memory_utilization=0.3)
    assert llm.llm_engine.runner.graphs is not None
    cases = [(PROMPT_1, [_image(1)]), (PROMPT_2, [_image(2), _image(3, (90, 30))])]
    outs = llm.generate([{"prompt": t, "multi_modal_data": {"image": ims}} for t, ims in cases], _params(logprobs=0),
                        use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(reference.greedy(text, images), out, lp_tol=2e-2)


@pytest.mark.parametrize("draft", ["llava", "llama"])
def test_a_draft_model_beside_images(llava_dir, llama_dir, reference, draft):
    """A text draft model (a Llama with the tokenizer, or the LLaVA's own language model)
    drafts for a vision-language target: it reads image placeholders as tokens, so its drafts
    near an image are worse, never wrong: outputs are transformers' with the images."""
    path = llava_dir if draft == "llava" else llama_dir
    llm = LLM(llava_dir, block_size=8, max_num_batched_tokens=64,
              speculative_config={"model": path, "num_speculative_tokens": 3})
    cases = [(PROMPT_1, [_image(1)]), (PROMPT_2, [_image(2), _image(3, (90, 30))])]
    outs = llm.generate([{"prompt": t, "multi_modal_data": {"image": ims}} for t, ims in cases],
                        _params(logprobs=0), use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(reference.greedy(text, images), out)
    sched = llm.llm_engine.scheduler
    assert sched.num_draft_tokens > 0 and (draft == "llama" or sched.num_accepted_tokens > 0)
