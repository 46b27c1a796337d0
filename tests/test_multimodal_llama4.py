"""Image inputs (Llama 4: Scout, Maverick): a random Llama4ForConditionalGeneration against
transformers' own on the same weights and pixels: each <|image|> laid out as Llama4Processor
lays it out (tiles of <|patch|> between separators, <|image|> and the whole-image tile, inside
<|image_start|> ... <|image_end|>; the encoder's rows fill the <|patch|> positions only), a
tiled and an untiled image across prefill chunks (and across the decoder's attention chunks
of 16), prefix caching, chat, the budget errors, and the image processor against
transformers' (which needs torchvision: skipped without it)."""

from __future__ import annotations

import pytest
import torch

from conftest import Reference, assert_output_matches, image_chat, image_data_url, image_prompt, random_image
from pagedserve import LLM, SamplingParams

pytest.importorskip("PIL")

TURN = "<|header_start|>user<|header_end|>\n\n{}<|eot|><|header_start|>assistant<|header_end|>\n\n"
PROMPT_1 = TURN.format("<|image|>What is in the picture?")
PROMPT_2 = TURN.format("Look: <|image|> and <|image|>which is larger?")
TEXT = TURN.format("No picture here.")
MAX_TOKENS = 6
TILED = (1, (90, 60))  # (seed, (width, height)): 2 x 2 tiles and the whole-image tile, 27 tokens
FLAT = (2, (20, 20))  # one tile: <|image_start|><|image|> 4 x <|patch|> <|image_end|>
TALL = (3, (30, 200))  # 4 x 1 tiles
SMALL = (5, (40, 41))  # 2 x 2 tiles, the image padded, not upscaled, onto them


def _images(spec: list) -> list:
    return [random_image(seed, size) for seed, size in spec]


class Llama4Reference:
    """transformers' Llama4ForConditionalGeneration, greedy, float32, the whole sequence each
    step, with the prompt laid out by Llama4Processor's own _prompt_split_image (its image
    processor needs torchvision; the pixels are pagedserve's, checked against it apart)."""

    def __init__(self, path: str) -> None:
        import transformers

        from pagedserve.multimodal.llama4_images import Llama4ImageProcessor

        self.model = transformers.Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.images = Llama4ImageProcessor.from_pretrained(path, {})
        vc = self.model.config.vision_config
        self.per_tile = (vc.image_size // vc.patch_size) ** 2 // 4  # Llama4Processor's num_patches_per_chunk

    def inputs(self, text: str, images: list) -> tuple[list[int], dict]:
        from transformers import Llama4Processor

        prepared = self.images(images)
        parts = text.split("<|image|>")
        full = parts[0] + "".join(Llama4Processor._prompt_split_image(None, ratio, self.per_tile) + rest
                                  for (_, ratio), rest in zip(prepared, parts[1:]))
        pixels = {"pixel_values": torch.cat([p for p, _ in prepared])} if images else {}
        return self.tokenizer(full)["input_ids"], pixels

    @torch.inference_mode()
    def logits(self, ids: list[int], pixel_values: torch.Tensor = None) -> torch.Tensor:
        """Llama4ForConditionalGeneration.forward's own steps (its forward itself fails in this
        transformers at its return, reading `image_outputs` off the language model's output)."""
        m, x = self.model, torch.tensor([ids])
        embeds = m.get_input_embeddings()(x)
        if pixel_values is not None:
            feats = m.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
            rows = m.multi_modal_projector(feats.view(-1, feats.size(-1)))
            embeds = embeds.masked_scatter(m.get_placeholder_mask(x, embeds, rows), rows)
        return m.language_model(inputs_embeds=embeds).logits[0, -1].float()

    def greedy(self, text: str, images: list, max_tokens: int = MAX_TOKENS) -> Reference:
        ids, kw = self.inputs(text, images)
        tokens, logits = [], []
        for _ in range(max_tokens):
            row = self.logits(ids, kw.get("pixel_values"))
            tokens.append(int(row.argmax()))
            logits.append(row)
            ids = ids + [tokens[-1]]
        return Reference(tokens, logits)


@pytest.fixture(scope="module")
def llama4(tokenizer_dir, tmp_path_factory) -> tuple[str, Llama4Reference]:
    from pagedserve.model.random_model import build_random_llama4_vl

    path = build_random_llama4_vl(str(tmp_path_factory.mktemp("llama4vl")), tokenizer_dir)
    return path, Llama4Reference(path)


@pytest.fixture(scope="module")
def llm(llama4) -> LLM:
    return LLM(llama4[0], block_size=8, max_num_batched_tokens=128)


def _params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def test_prompt_is_laid_out_as_the_processor_does(llama4, llm):
    """Tiled (2 x 2, 4 x 1) and untiled images: the ids equal Llama4Processor's layout; the
    rows fill the <|patch|> positions; an already expanded prompt is taken as it is."""
    path, ref = llama4
    tok = ref.tokenizer
    patch, start, end, image = tok.convert_tokens_to_ids(["<|patch|>", "<|image_start|>", "<|image_end|>",
                                                          "<|image|>"])
    for spec, ratios in (([TILED, FLAT], [(2, 2), (1, 1)]), ([FLAT, TALL], [(1, 1), (4, 1)])):
        images = _images(spec)
        prepared = llm.llm_engine.prepare(image_prompt(PROMPT_2, images), _params())
        ids, kw = ref.inputs(PROMPT_2, images)
        assert prepared["prompt_token_ids"] == ids
        assert [r for _, r in ref.images(images)] == ratios
        for f, (rows, cols) in zip(prepared["mm_features"], ratios):
            span = ids[f.offset:f.offset + f.length]
            assert span[0] == start and span[-1] == end and span.count(image) == 1
            n = rows * cols + (rows * cols > 1)  # tiles and the whole-image tile
            assert [span[i] for i in f.embed_rows] == [patch] * (4 * n) == [t for t in span if t == patch]
            assert f.pixel_values.shape == (n, 3, 28, 28)
        torch.testing.assert_close(torch.cat([f.pixel_values for f in prepared["mm_features"]]), kw["pixel_values"])
        again = llm.llm_engine.prepare({"prompt_token_ids": ids, "multi_modal_data": {"image": images}}, _params())
        assert again["prompt_token_ids"] == ids
    # mm_processor_kwargs: fewer tiles; a key the processor lacks is refused
    from pagedserve.multimodal.llama4_images import Llama4ImageProcessor

    assert [r for _, r in Llama4ImageProcessor.from_pretrained(path, {"max_patches": 2})(_images([TILED]))] == [(1, 2)]
    with pytest.raises(ValueError, match="bogus"):
        Llama4ImageProcessor.from_pretrained(path, {"bogus": 1})
    # The memory profile's image: max_patches tiles and the whole-image tile, through the tower.
    encoder = llm.llm_engine.runner.encoder_cache.encoder
    (largest,) = encoder.profile_features(llm.llm_engine.config.max_model_len)
    assert largest.num_embeds == 5 * 4 and encoder.encode([largest])[0].shape == (20, 64)


def test_pixels_and_ids_match_transformers_processor(llama4, llm):
    """pagedserve's Llama4ImageProcessor (torch only) against transformers' (torchvision): the
    same tiles, exactly, for tiled, untiled, wide, tall, large and tiny images; the prompt's
    ids and pixels against Llama4Processor's whole call."""
    pytest.importorskip("torchvision")
    from transformers import Llama4ImageProcessor as HFProcessor
    from transformers import Llama4Processor

    from pagedserve.multimodal.llama4_images import DEFAULTS, Llama4ImageProcessor

    path, ref = llama4
    proc = Llama4Processor(image_processor=HFProcessor.from_pretrained(path), tokenizer=ref.tokenizer, patch_size=7)
    images = _images([TALL, FLAT])
    want = proc(text=PROMPT_2, images=images, return_tensors="pt")
    prepared = llm.llm_engine.prepare(image_prompt(PROMPT_2, images), _params())
    assert prepared["prompt_token_ids"] == want["input_ids"][0].tolist()
    assert torch.equal(torch.cat([f.pixel_values for f in prepared["mm_features"]]), want["pixel_values"].float())

    for tile, most, to_max in ((28, 4, False), (56, 6, True)):
        settings = dict(size={"height": tile, "width": tile}, max_patches=most, resize_to_max_canvas=to_max)
        hf, ours = HFProcessor(**settings), Llama4ImageProcessor(dict(DEFAULTS, **settings))
        for seed, size in enumerate([(90, 60), (20, 20), (30, 200), (513, 301), (7, 300), (800, 200), (50, 40)]):
            im = random_image(seed, size)
            if size == (50, 40):  # transparency, composited onto white
                im.putalpha(im.getchannel(0))
            want = hf(images=[im], return_tensors="pt")
            pixels, ratio = ours.one(im)
            assert ratio == tuple(want["aspect_ratios"][0].tolist())
            assert torch.equal(pixels, want["pixel_values"].float()), (tile, size)


# transformers' Llama4ImageProcessor (28-pixel tiles, at most 4) on TILED, TALL, FLAT and SMALL, made
# with torchvision: each tile's sum, and its sums weighted by row and by column (/ 28).
GOLDEN = {TILED: ((2, 2), [[-14.51, -6.0, -8.23], [2.53, -4.15, 6.4], [-1608.19, -1029.09, -775.83],
                           [-1568.13, -1023.16, -762.02], [0.7, 1.48, 5.28]]),
          TALL: ((4, 1), [[-1019.84, -485.78, -776.43], [-999.51, -481.61, -771.01], [-1009.71, -496.8, -776.24],
                          [-1018.4, -490.68, -779.26], [-6.65, -4.49, -5.74]]),
          FLAT: ((1, 1), [[-18.47, -26.16, -16.55]]),
          SMALL: ((2, 2), [[-11.16, -11.68, -1.37], [-1331.12, -640.41, -933.06], [-1274.69, -899.44, -611.9],
                           [-1898.77, -1037.17, -1047.88], [-10.45, -10.17, -2.05]])}


def test_pixels_match_transformers_golden(llama4):
    """Without torchvision: the tiles' sums and first moments against transformers' own,
    recorded (the tile order, the whole-image tile, the resize, the bfloat16 normalisation)."""
    _, ref = llama4
    weight = torch.arange(28.0) / 28
    for spec, (ratio, sums) in GOLDEN.items():
        ((pixels, got),) = ref.images(_images([spec]))
        assert got == ratio
        moments = torch.stack([pixels.sum((1, 2, 3)), (pixels * weight[:, None]).sum((1, 2, 3)),
                               (pixels * weight).sum((1, 2, 3))], dim=1)
        torch.testing.assert_close(moments, torch.tensor(sums), atol=0.05, rtol=0)


CASES = [(PROMPT_1, [TILED]), (PROMPT_2, [TALL, FLAT]), (TEXT, [])]


def test_images_match_transformers(llama4):
    """A tiled image, a tall one and an untiled one, and a text prompt in one batch; chunks of 8
    tokens end steps inside images (between tiles and inside runs)."""
    path, ref = llama4
    llm = LLM(path, block_size=8, max_num_batched_tokens=8, enable_prefix_caching=False)
    outs = llm.generate([image_prompt(t, _images(s)) for t, s in CASES], _params(logprobs=0), use_tqdm=False)
    for (text, spec), out in zip(CASES, outs):
        assert_output_matches(ref.greedy(text, _images(spec)), out)
    assert not llm.llm_engine.runner.encoder_cache.embeddings


def test_prefix_cache_and_chat(llama4, llm):
    """The same image hits the cache, another reuses only the blocks before it; chat with a
    data URL renders the template's <|image|>."""
    path, ref = llama4
    a, b = _images([TILED, (4, (90, 60))])
    first, other, again = (llm.generate(image_prompt(PROMPT_1, [im]), _params(logprobs=0), use_tqdm=False)[0]
                           for im in (a, b, a))
    assert first.outputs[0].token_ids != other.outputs[0].token_ids
    for im, out in ((a, first), (b, other), (a, again)):
        assert_output_matches(ref.greedy(PROMPT_1, [im]), out)
    assert again.num_cached_tokens == (len(first.prompt_token_ids) - 1) // 8 * 8
    start = ref.tokenizer.convert_tokens_to_ids("<|image_start|>")
    assert other.num_cached_tokens == first.prompt_token_ids.index(start) // 8 * 8
    chat = llm.chat(image_chat([image_data_url(a)]), _params(logprobs=0), use_tqdm=False)[0]
    assert chat.prompt == PROMPT_1
    assert_output_matches(ref.greedy(PROMPT_1, [a]), chat)


def test_bad_inputs_and_budget(llama4, llm):
    """Clear ValueErrors naming what is wrong, and no KV block kept: too many tokens for
    max_model_len once the image is laid out, images and placeholders that do not pair up,
    an image's tokens written wrongly, more images than limit_mm_per_prompt."""
    path, ref = llama4
    patch = ref.tokenizer.convert_tokens_to_ids("<|patch|>")
    small = LLM(path, block_size=8, max_model_len=40, limit_mm_per_prompt={"image": 1})
    out = small.generate(image_prompt(PROMPT_1, _images([FLAT])), _params(), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_TOKENS  # (an untiled image fits)
    with pytest.raises(ValueError, match="maximum model length of 40"):
        small.generate(image_prompt(PROMPT_1, _images([TILED])), _params(), use_tqdm=False)
    with pytest.raises(ValueError, match="at most 1 images"):
        small.generate(image_prompt(PROMPT_2, _images([FLAT, FLAT])), _params(), use_tqdm=False)
    bad = [
        (image_prompt(PROMPT_2, _images([FLAT])), "more images"),
        (image_prompt(PROMPT_1, _images([FLAT, TILED])), "1 image placeholders"),
        ({"prompt": PROMPT_1}, "more images"),
        ({"prompt_token_ids": [5, patch, patch, 7], "multi_modal_data": {"image": _images([FLAT])}}, "match its size"),
    ]
    for prompt, words in bad:
        with pytest.raises(ValueError, match=words):
            llm.generate(prompt, _params(), use_tqdm=False)
    for eng in (llm.llm_engine, small.llm_engine):
        assert not eng.has_unfinished_requests() and eng.kv.pool.num_free_blocks == eng.kv.num_blocks


def test_budget_error_is_a_400_on_the_server(llama4):
    import openai
    from server_helpers import openai_client, serving

    path, _ = llama4
    with serving(path, "tiny-llama4", engine_kwargs={"block_size": 8, "max_model_len": 40}) as srv, \
            openai_client(srv) as client:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-llama4", messages=image_chat([image_data_url(
                random_image(*TILED))]), max_tokens=4)
        assert "maximum model length" in e.value.body["message"]
        eng = srv.llm.engine
        assert eng.kv.pool.num_free_blocks == eng.kv.num_blocks


def test_random_model_cli_builds_a_llama4(tmp_path):
    from pagedserve.entrypoints.cli import main as cli_main

    path = str(tmp_path / "llama4")
    assert cli_main(["random-model", path, "--arch", "Llama4ForConditionalGeneration"]) == 0
    outs = LLM(path, block_size=8).generate([image_prompt(PROMPT_1, _images([FLAT])),
                                             image_prompt(PROMPT_1, _images([TILED]))], _params(), use_tqdm=False)
    assert len(outs[0].prompt_token_ids) < len(outs[1].prompt_token_ids)  # tiles: more tokens
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)


@pytest.mark.gpu
def test_images_on_cuda(llama4):
    path, ref = llama4
    llm = LLM(path, device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=16, max_num_seqs=8,
              gpu_memory_utilization=0.3)
    assert llm.llm_engine.runner.graphs is not None
    outs = llm.generate([image_prompt(t, _images(s)) for t, s in CASES], _params(logprobs=0), use_tqdm=False)
    for (text, spec), out in zip(CASES, outs):
        assert_output_matches(ref.greedy(text, _images(spec)), out, lp_tol=2e-2)
