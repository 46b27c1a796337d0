"""Image inputs (Gemma 4): a random Gemma4ForConditionalGeneration against transformers' own on
the same weights and pixels: each <|image|> expanded as Gemma4Processor expands it (a run as
long as the image's resized size gives, between <start_of_image> and <end_of_image>), the
vision tower's padded patches and their positions, an image's tokens attending to each other
both ways, the per-layer embeddings of image rows, the prefix cache and chat, the Triton path
(interpreted)."""

from __future__ import annotations

import pytest
import torch

from conftest import Reference, assert_output_matches, image_chat, image_data_url, image_prompt, random_image
from pagedserve import LLM, SamplingParams

pytest.importorskip("PIL")

TURN = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
PROMPT_1 = TURN.format("<|image|>What is in the picture?")
PROMPT_2 = TURN.format("Look: <|image|> and <|image|> which is larger?")
TEXT = TURN.format("No picture here.")
MAX_TOKENS = 6


class Gemma4Reference:
    """transformers' Gemma4ForConditionalGeneration, greedy, float32, the whole sequence each
    step (its two-way image mask from mm_token_type_ids)."""

    def __init__(self, path: str) -> None:
        import transformers

        self.model = transformers.Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.images = transformers.AutoImageProcessor.from_pretrained(path)
        cfg = self.model.config
        self.image_token, self.boi, self.eoi = cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id

    def ids(self, text: str, images: list) -> list[int]:
        counts = self.images(images=images, return_tensors="pt")["num_soft_tokens_per_image"].tolist() if images else []
        parts = text.split("<|image|>")
        full = parts[0] + "".join(f"<start_of_image>{'<|image|>' * n}<end_of_image>" + rest
                                  for n, rest in zip(counts, parts[1:]))
        return self.tokenizer(full)["input_ids"]

    @torch.inference_mode()
    def greedy(self, text: str, images: list, max_tokens: int = MAX_TOKENS) -> Reference:
        ids = self.ids(text, images)
        inputs = {}
        if images:
            out = self.images(images=images, return_tensors="pt")
            inputs = {"pixel_values": out["pixel_values"], "image_position_ids": out["image_position_ids"]}
        tokens, logits = [], []
        for _ in range(max_tokens):
            types = torch.tensor([[int(t == self.image_token) for t in ids]])
            row = self.model(input_ids=torch.tensor([ids]), mm_token_type_ids=types, **inputs).logits[0, -1]
            tokens.append(int(row.argmax()))
            logits.append(row.float())
            ids = ids + [tokens[-1]]
        return Reference(tokens, logits)


@pytest.fixture(scope="module")
def gemma4(tokenizer_dir, tmp_path_factory) -> tuple[str, Gemma4Reference]:
    from pagedserve.model.random_model import build_random_gemma4_vl

    path = build_random_gemma4_vl(str(tmp_path_factory.mktemp("gemma4vl")), tokenizer_dir)
    return path, Gemma4Reference(path)


def _params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


CASES = [(PROMPT_1, [1]), (PROMPT_2, [2, (3, (30, 30))]), (TEXT, [])]


def _images(spec: list) -> list:
    return [random_image(*s) if isinstance(s, tuple) else random_image(s) for s in spec]


def test_placeholders_expand_as_the_processor_does(gemma4):
    path, ref = gemma4
    llm = LLM(path, block_size=8, max_num_batched_tokens=128)
    images = _images([2, (3, (30, 30))])
    prepared = llm.llm_engine.prepare(image_prompt(PROMPT_2, images), _params())
    ids = ref.ids(PROMPT_2, images)
    assert prepared["prompt_token_ids"] == ids
    lengths = [f.length for f in prepared["mm_features"]]
    assert len(set(lengths)) == 2  # (each image's run follows its size)
    for f in prepared["mm_features"]:
        assert ids[f.offset - 1] == ref.boi and ids[f.offset + f.length] == ref.eoi
        assert ids[f.offset:f.offset + f.length] == [ref.image_token] * f.length
    again = llm.llm_engine.prepare({"prompt_token_ids": ids, "multi_modal_data": {"image": images}}, _params())
    assert again["prompt_token_ids"] == ids


def test_images_match_transformers(gemma4):
    """Chunks of 72 tokens would end inside an image: the scheduler ends them before it instead."""
    path, ref = gemma4
    llm = LLM(path, block_size=8, max_num_batched_tokens=72, enable_prefix_caching=False)
    outs = llm.generate([image_prompt(t, _images(s)) for t, s in CASES], _params(logprobs=0), use_tqdm=False)
    for (text, spec), out in zip(CASES, outs):
        assert_output_matches(ref.greedy(text, _images(spec)), out)


def test_prefix_cache_and_chat(gemma4):
    path, ref = gemma4
    llm = LLM(path, block_size=8, max_num_batched_tokens=128)
    a, b = random_image(4), random_image(5)
    first, other, again = (llm.generate(image_prompt(PROMPT_1, [im]), _params(logprobs=0), use_tqdm=False)[0]
                           for im in (a, b, a))
    assert_output_matches(ref.greedy(PROMPT_1, [a]), first)
    assert_output_matches(ref.greedy(PROMPT_1, [b]), other)
    assert_output_matches(ref.greedy(PROMPT_1, [a]), again)
    assert again.num_cached_tokens == (len(first.prompt_token_ids) - 1) // 8 * 8
    chat = llm.chat(image_chat([image_data_url(a)]), _params(logprobs=0), use_tqdm=False)[0]
    assert chat.prompt == PROMPT_1
    assert_output_matches(ref.greedy(PROMPT_1, [a]), chat)


def test_triton_path_matches_transformers(gemma4):
    pytest.importorskip("triton")
    path, ref = gemma4
    llm = LLM(path, attention_backend="triton", block_size=8, max_num_batched_tokens=80, max_num_seqs=4,
              dtype="float32")
    cases = CASES[1:2]
    outs = llm.generate([image_prompt(t, _images(s)) for t, s in cases], _params(logprobs=0), use_tqdm=False)
    for (text, spec), out in zip(cases, outs):
        assert_output_matches(ref.greedy(text, _images(spec)), out)


def test_chunk_must_hold_an_image(gemma4):
    path, _ = gemma4
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(path, max_num_batched_tokens=64, max_model_len=64)
    with pytest.raises(ValueError, match="140 tokens"):  # (images of up to 140 tokens, vLLM's setting)
        LLM(path, max_num_batched_tokens=72, mm_processor_kwargs={"max_soft_tokens": 140})
