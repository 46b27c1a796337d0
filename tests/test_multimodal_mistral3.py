"""Image inputs (Mistral 3: Mistral Small 3.1 / 3.2): a random Mistral3ForConditionalGeneration
against transformers' own on the same weights and pixels: each [IMG] laid out as rows of
[IMG] closed by [IMG_BREAK] / [IMG_END] (the encoder's rows fill the [IMG] positions only),
images at their own sizes, chunks that split an image between its rows, prefix caching,
chat, both checkpoint name layouts, and the errors."""

from __future__ import annotations

import glob
import os
import shutil

import pytest
import torch

from conftest import Reference, assert_output_matches, image_chat, image_data_url, image_prompt, random_image
from pagedserve import LLM, SamplingParams

pytest.importorskip("PIL")  # a dependency; the GPU machines' image may lack it (its `-m gpu` test then skips)

PROMPT_1 = "[INST][IMG]What is in the picture?[/INST]"
PROMPT_2 = "[INST]Look: [IMG] and [IMG]which is larger?[/INST]"
TEXT = "[INST]No picture here.[/INST]"
MAX_TOKENS = 8
MERGED_PATCH = 28  # 14-pixel patches, merged 2 x 2


class Mistral3Reference:
    """transformers' Mistral3ForConditionalGeneration, greedy, float32, with each [IMG] laid
    out as PixtralProcessor lays it out (rows of [IMG] x width, each closed by [IMG_BREAK],
    the last by [IMG_END]; its processor class needs torchvision, so the rule is written here)."""

    def __init__(self, path: str) -> None:
        import transformers

        self.model = transformers.Mistral3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.images = transformers.AutoImageProcessor.from_pretrained(path)

    def inputs(self, text: str, images: list) -> tuple[list[int], dict]:
        if not images:
            return self.tokenizer(text)["input_ids"], {}
        enc = self.images(images=images, patch_size=MERGED_PATCH, return_tensors="pt")
        parts = text.split("[IMG]")
        full = parts[0]
        for (h, w), rest in zip(enc["image_sizes"].tolist(), parts[1:]):
            layout = (["[IMG]"] * (w // MERGED_PATCH) + ["[IMG_BREAK]"]) * (h // MERGED_PATCH)
            layout[-1] = "[IMG_END]"
            full += "".join(layout) + rest
        return self.tokenizer(full)["input_ids"], {"pixel_values": enc["pixel_values"],
                                                   "image_sizes": enc["image_sizes"]}

    @torch.inference_mode()
    def greedy(self, text: str, images: list, max_tokens: int = MAX_TOKENS) -> Reference:
        ids, kw = self.inputs(text, images)
        tokens, logits = [], []
        for _ in range(max_tokens):
            row = self.model(input_ids=torch.tensor([ids]), **kw).logits[0, -1].float()
            tokens.append(int(row.argmax()))
            logits.append(row)
            ids = ids + [tokens[-1]]
        return Reference(tokens, logits)


@pytest.fixture(scope="module")
def mistral3(tokenizer_dir, tmp_path_factory) -> tuple[str, Mistral3Reference]:
    from pagedserve.model.random_model import build_random_mistral3

    path = build_random_mistral3(str(tmp_path_factory.mktemp("mistral3")), tokenizer_dir)
    return path, Mistral3Reference(path)


def _params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def test_images_are_laid_out_in_rows(mistral3):
    path, ref = mistral3
    llm = LLM(path, block_size=8, max_num_batched_tokens=64)
    images = [random_image(1), random_image(2, (40, 130))]  # landscape and portrait: other layouts
    prepared = llm.llm_engine.prepare(image_prompt(PROMPT_2, images), _params())
    ids, kw = ref.inputs(PROMPT_2, images)
    assert prepared["prompt_token_ids"] == ids
    img, brk, end = ref.tokenizer.convert_tokens_to_ids(["[IMG]", "[IMG_BREAK]", "[IMG_END]"])
    for k, (f, (h, w)) in enumerate(zip(prepared["mm_features"], kw["image_sizes"].tolist())):
        span = ids[f.offset:f.offset + f.length]
        rows, cols = h // MERGED_PATCH, w // MERGED_PATCH
        assert f.length == rows * (cols + 1) and span[-1] == end and span.count(brk) == rows - 1
        assert [span[i] for i in f.embed_rows] == [img] * (rows * cols) == [t for t in span if t == img]
        torch.testing.assert_close(f.pixel_values, kw["pixel_values"][k][:, :h, :w])  # (unpadded)
    sizes = [tuple(f.pixel_values.shape[-2:]) for f in prepared["mm_features"]]
    assert sizes == [tuple(s) for s in kw["image_sizes"].tolist()] and sizes[0] != sizes[1]
    again = llm.llm_engine.prepare({"prompt_token_ids": ids, "multi_modal_data": {"image": images}}, _params())
    assert again["prompt_token_ids"] == ids


def test_images_match_transformers(mistral3):
    """Two images of other sizes in one prompt, one image, and a text-only prompt in one batch;
    chunks of 8 end steps inside images, between and within their rows. (Whole prompts in one
    step: the prefix-cache test, at 64.)"""
    path, ref = mistral3
    llm = LLM(path, block_size=8, max_num_batched_tokens=8, enable_prefix_caching=False)
    cases = [(PROMPT_1, [random_image(1)]), (PROMPT_2, [random_image(2), random_image(3, (50, 120))]), (TEXT, [])]
    outs = llm.generate([image_prompt(t, ims) for t, ims in cases], _params(logprobs=0), use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(ref.greedy(text, images), out)
    assert not llm.llm_engine.runner.encoder_cache.embeddings


def test_prefix_cache_chat_and_checkpoint_names(mistral3, tmp_path):
    """The same image hits the cache, another does not past the blocks before it; chat with a
    data URL; transformers 5's names ('model.language_model.', 'model.vision_tower.') load
    to the same model as the hub's ('language_model.model.', 'vision_tower.')."""
    from safetensors.torch import load_file, save_file

    path, ref = mistral3
    llm = LLM(path, block_size=8, max_num_batched_tokens=64)
    a, b = random_image(4), random_image(5)
    first, other, again = (llm.generate(image_prompt(PROMPT_1, [im]), _params(logprobs=0), use_tqdm=False)[0]
                           for im in (a, b, a))
    assert first.outputs[0].token_ids != other.outputs[0].token_ids
    for im, out in ((a, first), (b, other), (a, again)):
        assert_output_matches(ref.greedy(PROMPT_1, [im]), out)
    assert again.num_cached_tokens == (len(first.prompt_token_ids) - 1) // 8 * 8
    img = ref.tokenizer.convert_tokens_to_ids("[IMG]")
    assert other.num_cached_tokens == first.prompt_token_ids.index(img) // 8 * 8
    chat = llm.chat(image_chat([image_data_url(a)]), _params(logprobs=0), use_tqdm=False)[0]
    assert chat.prompt == PROMPT_1
    assert_output_matches(ref.greedy(PROMPT_1, [a]), chat)

    (src,) = glob.glob(os.path.join(path, "*.safetensors"))
    state = load_file(src)
    renamed = {("model.language_model." + k[len("language_model.model."):]) if k.startswith("language_model.model.")
               else ("model." + k) if k.startswith(("vision_tower.", "multi_modal_projector.")) else k: v
               for k, v in state.items()}
    assert renamed.keys() != state.keys()
    for f in os.listdir(path):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(path, f), tmp_path / f)
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    out = LLM(str(tmp_path), block_size=8).generate(image_prompt(PROMPT_2, [a, b]), _params(logprobs=0),
                                                    use_tqdm=False)[0]
    assert_output_matches(ref.greedy(PROMPT_2, [a, b]), out)


def test_bad_inputs(mistral3):
    path, ref = mistral3
    llm = LLM(path, block_size=8)
    img, brk = ref.tokenizer.convert_tokens_to_ids(["[IMG]", "[IMG_BREAK]"])
    bad = [
        (image_prompt(PROMPT_2, [random_image(1)]), "more images"),
        (image_prompt(PROMPT_1, [random_image(1), random_image(2)]), "1 image placeholders"),
        ({"prompt": PROMPT_1}, "more images"),
        ({"prompt_token_ids": [5, img, brk, 7], "multi_modal_data": {"image": [random_image(1)]}}, "match its size"),
    ]
    for prompt, words in bad:
        with pytest.raises(ValueError, match=words):
            llm.generate(prompt, _params(), use_tqdm=False)
    eng = llm.llm_engine
    assert not eng.has_unfinished_requests() and eng.kv.pool.num_free_blocks == eng.kv.num_blocks


def test_random_model_cli_builds_a_mistral3(tmp_path):
    from pagedserve.entrypoints.cli import main as cli_main

    path = str(tmp_path / "mistral3")
    assert cli_main(["random-model", path, "--arch", "Mistral3ForConditionalGeneration"]) == 0
    outs = LLM(path, block_size=8).generate([image_prompt(PROMPT_1, [random_image(1, (40, 40))]),
                                             image_prompt(PROMPT_1, [random_image(2, (200, 200))])], _params(),
                                            use_tqdm=False)
    assert len(outs[0].prompt_token_ids) < len(outs[1].prompt_token_ids)  # a larger image, more tokens
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)


@pytest.mark.gpu
def test_images_on_cuda(mistral3):
    path, ref = mistral3
    llm = LLM(path, device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=16, max_num_seqs=8,
              gpu_memory_utilization=0.3)
    assert llm.llm_engine.runner.graphs is not None
    cases = [(PROMPT_1, [random_image(1)]), (PROMPT_2, [random_image(2), random_image(3, (50, 120))])]
    outs = llm.generate([image_prompt(t, ims) for t, ims in cases], _params(logprobs=0), use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(ref.greedy(text, images), out, lp_tol=2e-2)


def test_ministral3_language_model_is_chosen():
    """Ministral 3 checkpoints are Mistral3ForConditionalGeneration over a "ministral3" text
    config: its decoder class (YaRN and the queries' position scale) serves them."""
    from transformers import Ministral3Config, Mistral3Config

    from pagedserve.model.registry import text_model_config

    cfg = Mistral3Config(text_config=Ministral3Config(num_hidden_layers=2).to_dict())
    cfg.architectures = ["Mistral3ForConditionalGeneration"]
    assert text_model_config(cfg).architectures == ["Ministral3ForCausalLM"]
