"""Image inputs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): random checkpoints against transformers' own models
on the same weights and pixels: per-image placeholder counts from the resized image, M-RoPE
positions (transformers' get_rope_index), Qwen3-VL's interleaved M-RoPE and DeepStack
features, chunked prefill across images, prefix caching,
preemption, chat, the Triton path (interpreted), and the errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import Reference, assert_output_matches, image_chat, image_data_url, image_prompt, random_image
from pagedserve import LLM, SamplingParams

pytest.importorskip("PIL")  # a dependency; the GPU machines' image may lack it (its `-m gpu` test then skips)

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT_1 = f"<|im_start|>user\n{IMAGE}What is in the picture?<|im_end|>\n<|im_start|>assistant\n"
PROMPT_2 = f"<|im_start|>user\n{IMAGE} and {IMAGE}Which one is larger?<|im_end|>\n<|im_start|>assistant\n"
TEXT = "<|im_start|>user\nNo picture here.<|im_end|>\n<|im_start|>assistant\n"
MAX_TOKENS = 8
# Random weights this large make attention sharp enough that a wrong position changes tokens.
INIT = 0.3


class QwenVLReference:
    """transformers' Qwen2(.5)-VL, greedy, float32; placeholders expanded from the image
    processor's grids (its full processor would need torchvision for videos)."""

    def __init__(self, path: str) -> None:
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(path)
        cls = getattr(transformers, cfg.architectures[0])
        self.model = cls.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.images = transformers.AutoImageProcessor.from_pretrained(path)
        self.pad = cfg.image_token_id
        self.merge = cfg.vision_config.spatial_merge_size

    def inputs(self, text: str, images: list) -> dict:
        enc = self.images(images=images, return_tensors="pt") if images else {}
        grids = enc["image_grid_thw"].tolist() if images else []
        ids, types, k = [], [], 0
        for t in self.tokenizer(text)["input_ids"]:
            n = 1
            if t == self.pad:
                n = int(np.prod(grids[k])) // self.merge**2
                k += 1
            ids += [t] * n
            types += [int(t == self.pad)] * n
        return {"input_ids": ids, "mm_token_type_ids": types, "pixel_values": enc.get("pixel_values"),
                "image_grid_thw": enc.get("image_grid_thw")}

    @torch.inference_mode()
    def greedy(self, text: str, images: list, max_tokens: int = MAX_TOKENS) -> Reference:
        inp = self.inputs(text, images)
        ids, types = inp["input_ids"], inp["mm_token_type_ids"]
        tokens, logits = [], []
        for _ in range(max_tokens):  # the whole sequence each step: positions from get_rope_index alone
            kw = {"pixel_values": inp["pixel_values"], "image_grid_thw": inp["image_grid_thw"],
                  "mm_token_type_ids": torch.tensor([types])} if images else {}
            row = self.model(input_ids=torch.tensor([ids]), **kw).logits[0, -1].float()
            tokens.append(int(row.argmax()))
            logits.append(row)
            ids, types = ids + [tokens[-1]], types + [0]
        return Reference(tokens, logits)


def _build(root, tokenizer_dir, version: str) -> str:
    """version "2", "2.5", "3", "3-moe" (Qwen3-VL-MoE), "3.5" or "3.5-moe" (hybrid linear attention)."""
    from pagedserve.model.random_model import build_random_qwen2_vl

    return build_random_qwen2_vl(str(root.mktemp(f"qwen{version}vl")), tokenizer_dir, version=version.split("-")[0],
                                 moe=version.endswith("moe"), initializer_range=INIT)


@pytest.fixture(scope="module", params=["2", "2.5", "3", "3-moe", "3.5", "3.5-moe"])
def vl(request, tokenizer_dir, tmp_path_factory) -> tuple[str, QwenVLReference]:
    path = _build(tmp_path_factory, tokenizer_dir, request.param)
    return path, QwenVLReference(path)


@pytest.fixture(scope="module")
def qwen2_vl(tokenizer_dir, tmp_path_factory) -> tuple[str, QwenVLReference]:
    path = _build(tmp_path_factory, tokenizer_dir, "2")
    return path, QwenVLReference(path)


def _params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def test_placeholders_and_positions_follow_transformers(qwen2_vl):
    """Each image's placeholders number its resized grid / 4, pixels and grids are the image
    processor's, and the M-RoPE positions and delta equal transformers' get_rope_index."""
    from pagedserve.multimodal.qwen2_vl import mrope_positions

    path, ref = qwen2_vl
    llm = LLM(path, block_size=8, max_num_batched_tokens=64)
    images = [random_image(1), random_image(2, (40, 130))]  # landscape and portrait: other grids
    prepared = llm.llm_engine.prepare(image_prompt(PROMPT_2, images), _params())
    inp = ref.inputs(PROMPT_2, images)
    ids = inp["input_ids"]
    assert prepared["prompt_token_ids"] == ids
    feats = prepared["mm_features"]
    grids = [tuple(g) for g in inp["image_grid_thw"].tolist()]
    assert [f.grid_thw for f in feats] == grids and grids[0] != grids[1]
    assert [f.length for f in feats] == [int(np.prod(g)) // 4 for g in grids]
    assert [ids[f.offset:f.offset + f.length] for f in feats] == [[ref.pad] * f.length for f in feats]
    torch.testing.assert_close(torch.cat([f.pixel_values for f in feats]), inp["pixel_values"])
    pos, delta = mrope_positions(len(ids), feats, 2)
    want, want_delta = ref.model.model.get_rope_index(torch.tensor([ids]), torch.tensor([inp["mm_token_type_ids"]]),
                                                      image_grid_thw=inp["image_grid_thw"])
    np.testing.assert_array_equal(pos, want[:, 0].numpy())
    assert delta == int(want_delta) and delta < 0  # an image's tokens take fewer positions than tokens
    # Ids already expanded are taken as they are.
    again = llm.llm_engine.prepare({"prompt_token_ids": ids, "multi_modal_data": {"image": images}}, _params())
    assert again["prompt_token_ids"] == ids and [f.offset for f in again["mm_features"]] == [f.offset for f in feats]


def test_images_match_transformers(vl):
    """One and two images a prompt with a text-only prompt in one batch, greedy tokens and
    logprobs; chunks of 8 split images across prefill steps, so steps mix image rows, text rows
    after an image (positions shifted by the delta) and decode rows. (Whole prompts in one
    step: the prefix-cache and chat tests, at 64.)"""
    path, ref = vl
    llm = LLM(path, block_size=8, max_num_batched_tokens=8, enable_prefix_caching=False)
    cases = [(PROMPT_1, [random_image(1)]), (PROMPT_2, [random_image(2), random_image(3, (50, 120))]), (TEXT, [])]
    outs = llm.generate([image_prompt(t, ims) for t, ims in cases], _params(logprobs=0), use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(ref.greedy(text, images), out)
    cache = llm.llm_engine.runner.encoder_cache
    assert not cache.embeddings and not cache.positions  # released with their requests


def test_prefix_cache_and_preemption_keep_positions(qwen2_vl):
    """A cached prefix with the same image skips its prefill and keeps the shifted positions
    of what follows; another image reuses only the blocks before it; preempted requests
    recompute their images and positions with unchanged outputs."""
    path, ref = qwen2_vl
    llm = LLM(path, block_size=8, max_num_batched_tokens=64)
    a, b = random_image(4), random_image(5)
    first, other, again = (llm.generate(image_prompt(PROMPT_1, [im]), _params(logprobs=0), use_tqdm=False)[0]
                           for im in (a, b, a))
    assert first.outputs[0].token_ids != other.outputs[0].token_ids
    assert_output_matches(ref.greedy(PROMPT_1, [a]), first)
    assert_output_matches(ref.greedy(PROMPT_1, [b]), other)
    assert_output_matches(ref.greedy(PROMPT_1, [a]), again)
    start = first.prompt_token_ids.index(ref.pad)
    assert other.num_cached_tokens == (start // 8) * 8
    assert again.num_cached_tokens == (len(first.prompt_token_ids) - 1) // 8 * 8

    # Room for two prompts but not for both to grow by MAX_TOKENS.
    blocks = 2 * -(-len(first.prompt_token_ids) // 8) + 1
    small = LLM(path, block_size=8, max_num_batched_tokens=64,
                kv_cache_memory_bytes=blocks * llm.llm_engine.runner.kv_block_bytes(), enable_prefix_caching=False)
    images = [random_image(10 + i) for i in range(3)]
    outs = small.generate([image_prompt(PROMPT_1, [im]) for im in images], _params(logprobs=0), use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions > 0
    for im, out in zip(images, outs):
        assert_output_matches(ref.greedy(PROMPT_1, [im]), out)


def test_hub_config_layout(qwen2_vl, tmp_path):
    """Qwen2-VL's hub config.json is flat (the decoder's fields at the top, RoPE as
    rope_scaling {"type": "mrope", ...}) and its preprocessor_config.json names min_pixels /
    max_pixels: that layout loads to the same model."""
    import json
    import shutil

    path, ref = qwen2_vl
    for f in os.listdir(path):
        shutil.copy(os.path.join(path, f), tmp_path / f)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    cfg.update(text, model_type="qwen2_vl", rope_theta=rope["rope_theta"],
               rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with open(os.path.join(path, "preprocessor_config.json")) as f:
        pre = json.load(f)
    size = pre.pop("size")
    pre.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    llm = LLM(str(tmp_path), block_size=8, max_num_batched_tokens=16)
    assert llm.llm_engine.runner.encoder_cache.encoder.max_pixels == size["longest_edge"]
    out = llm.generate(image_prompt(PROMPT_2, [random_image(2), random_image(3, (50, 120))]), _params(logprobs=0), use_tqdm=False)[0]
    assert_output_matches(ref.greedy(PROMPT_2, [random_image(2), random_image(3, (50, 120))]), out)


def test_qwen3_vl_moe_hub_expert_layout(tokenizer_dir, tmp_path_factory, tmp_path):
    """Qwen3-VL-MoE's hub checkpoints stack each layer's experts as gate_up_proj [E, hidden, 2I]
    and down_proj [E, I, hidden] (transformers 5 saves its modules' transposes): both load
    to the same model, and the LM head stays untied as the top config says (its text
    config says tied)."""
    import glob
    import shutil

    from safetensors.torch import load_file, save_file

    path = _build(tmp_path_factory, tokenizer_dir, "3-moe")
    ref = QwenVLReference(path)
    (src,) = glob.glob(os.path.join(path, "*.safetensors"))
    state = load_file(src)
    hub = {k: (v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v)
           for k, v in state.items()}
    assert any(hub[k].shape != state[k].shape for k in state)
    for f in os.listdir(path):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(path, f), tmp_path / f)
    save_file(hub, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    images = [random_image(2), random_image(3, (50, 120))]
    for d in (path, str(tmp_path)):
        llm = LLM(d, block_size=8, max_num_batched_tokens=16)
        assert not llm.llm_engine.runner.model.tie_word_embeddings
        assert_output_matches(ref.greedy(PROMPT_2, images), llm.generate(image_prompt(PROMPT_2, images), _params(logprobs=0),
                                                           use_tqdm=False)[0])


def test_mm_processor_kwargs_cap_the_image_size(qwen2_vl):
    """mm_processor_kwargs={"max_pixels": ...} (vLLM's) resizes images smaller: fewer
    placeholders, the outputs of transformers given the same setting; an unknown key is named."""
    import transformers

    path, ref = qwen2_vl
    big = random_image(8, (200, 150))
    cap = 28 * 28 * 9
    llm = LLM(path, block_size=8, mm_processor_kwargs={"max_pixels": cap})
    assert llm.llm_engine.runner.encoder_cache.encoder.max_pixels == cap
    out = llm.generate(image_prompt(PROMPT_1, [big]), _params(logprobs=0), use_tqdm=False)[0]
    full = LLM(path, block_size=8).generate(image_prompt(PROMPT_1, [big]), _params(), use_tqdm=False)[0]
    assert 0 < out.prompt_token_ids.count(ref.pad) <= 9 < full.prompt_token_ids.count(ref.pad)
    capped = QwenVLReference(path)
    capped.images = transformers.AutoImageProcessor.from_pretrained(path, max_pixels=cap)
    assert_output_matches(capped.greedy(PROMPT_1, [big]), out)
    with pytest.raises(ValueError, match="max_pixel"):
        LLM(path, mm_processor_kwargs={"max_pixel": cap})


def test_chat_with_an_image_url(qwen2_vl):
    path, ref = qwen2_vl
    img = random_image(7, (70, 70))
    llm = LLM(path, block_size=8, max_num_batched_tokens=64)
    out = llm.chat(image_chat([image_data_url(img)]), _params(logprobs=0), use_tqdm=False)[0]
    assert out.prompt == PROMPT_1
    assert_output_matches(ref.greedy(PROMPT_1, [img]), out)


def test_triton_path_matches_transformers(qwen2_vl):
    """The Triton backend (interpreted on CPU): RoPE fused into the KV write with a table per
    image step, and decode steps on the shifted 1-D positions through the fused decode kernel."""
    pytest.importorskip("triton")
    path, ref = qwen2_vl
    llm = LLM(path, attention_backend="triton", block_size=8, max_num_batched_tokens=16, max_num_seqs=4,
              dtype="float32")
    cases = [(PROMPT_2, [random_image(2), random_image(3, (50, 120))]), (TEXT, [])]
    outs = llm.generate([image_prompt(t, ims) for t, ims in cases], _params(logprobs=0), use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(ref.greedy(text, images), out)


def test_mrope_rotary_equals_transformers():
    """MRotaryEmbedding on [3, T] positions equals transformers' multimodal RoPE (Qwen2-VL's
    sections, Qwen3-VL's interleaving), and on equal components (or 1-D positions) plain RoPE."""
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl import modeling_qwen2_vl as hf

    from pagedserve.model.layers.rotary import MRotaryEmbedding, RotaryEmbedding, make_rotary

    cfg = Qwen2VLTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    rope = make_rotary(cfg, 16, 64)
    assert isinstance(rope, MRotaryEmbedding)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(10, 4, 16, generator=g), torch.randn(10, 2, 16, generator=g)
    pos = torch.randint(0, 60, (3, 10), generator=g)
    cos, sin = hf.Qwen2VLRotaryEmbedding(cfg)(q, pos[:, None, :])
    want_q, want_k = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    got_q, got_k = rope(pos, q, k)
    torch.testing.assert_close(got_q, want_q[0].transpose(0, 1))
    torch.testing.assert_close(got_k, want_k[0].transpose(0, 1))
    # Qwen3-VL: the three components' frequencies interleaved.
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl import modeling_qwen3_vl as hf3

    cfg3 = Qwen3VLTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                              "mrope_interleaved": True})
    rope3 = make_rotary(cfg3, 16, 64)
    assert rope3.interleaved
    cos, sin = hf3.Qwen3VLTextRotaryEmbedding(cfg3)(q, pos[:, None, :])
    want_q, want_k = hf3.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    got_q, got_k = rope3(pos, q, k)
    torch.testing.assert_close(got_q, want_q[0].transpose(0, 1))
    torch.testing.assert_close(got_k, want_k[0].transpose(0, 1))
    plain = RotaryEmbedding(cfg, 16, 64)
    same = pos[0].expand(3, -1)
    for a, b in zip(rope(same, q, k), plain(pos[0], q, k)):
        torch.testing.assert_close(a, b)
    for a, b in zip(rope(pos[0], q, k), plain(pos[0], q, k)):
        torch.testing.assert_close(a, b)


def test_bad_inputs_and_text_only(qwen2_vl):
    path, ref = qwen2_vl
    llm = LLM(path, block_size=8)
    eng = llm.llm_engine
    bad = [
        (image_prompt(PROMPT_2, [random_image(1)]), "runs of image placeholder"),
        (image_prompt(PROMPT_1, [random_image(1), random_image(2)]), "runs of image placeholder"),
        ({"prompt": PROMPT_1}, "placeholders"),
        ({"prompt_token_ids": [ref.pad] * 3, "multi_modal_data": {"image": [random_image(1)]}}, "runs of image"),
    ]
    for prompt, words in bad:
        with pytest.raises(ValueError, match=words):
            llm.generate(prompt, _params(), use_tqdm=False)
    assert not eng.has_unfinished_requests() and eng.kv.pool.num_free_blocks == eng.kv.num_blocks
    # Without images (limit 0: no vision tower at all) a text prompt runs as a Qwen2 model.
    text_only = LLM(path, block_size=8, limit_mm_per_prompt={"image": 0})
    assert text_only.llm_engine.runner.encoder_cache is None
    assert_output_matches(ref.greedy(TEXT, []), text_only.generate(TEXT, _params(logprobs=0), use_tqdm=False)[0])


def test_random_model_cli_builds_a_qwen2_vl(tmp_path):
    from pagedserve.entrypoints.cli import main as cli_main

    path = str(tmp_path / "qwen")
    assert cli_main(["random-model", path, "--arch", "Qwen2_5_VLForConditionalGeneration"]) == 0
    llm = LLM(path, block_size=8)
    outs = llm.generate([image_prompt(PROMPT_1, [random_image(1)]), image_prompt(PROMPT_1, [random_image(2, (200, 200))])],
                        _params(), use_tqdm=False)
    counts = [o.prompt_token_ids.count(llm.llm_engine.mm_processor.token_id) for o in outs]
    assert counts[0] < counts[1]  # a larger image, more placeholders
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)


@pytest.mark.gpu
def test_images_on_cuda_with_graphs(qwen2_vl):
    """On CUDA: the Triton backend with decode graphs on shifted positions (image steps run
    eagerly), the KV pool sized with the largest image through the encoder, float32
    against transformers on CPU."""
    path, ref = qwen2_vl
    llm = LLM(path, device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=16, max_num_seqs=8,
              gpu_memory_utilization=0.3)
    assert llm.llm_engine.runner.graphs is not None
    cases = [(PROMPT_1, [random_image(1)]), (PROMPT_2, [random_image(2), random_image(3, (50, 120))])]
    outs = llm.generate([image_prompt(t, ims) for t, ims in cases], _params(logprobs=0), use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(ref.greedy(text, images), out, lp_tol=2e-2)


def test_a_draft_model_beside_m_rope(qwen2_vl):
    """The Qwen2-VL's own language model as a text draft: its rows go at plain positions, the
    target's drafts and verification at M-RoPE's (shifted after each image); outputs are
    transformers' with the images, and drafts stand."""
    path, ref = qwen2_vl
    llm = LLM(path, block_size=8, max_num_batched_tokens=64,
              speculative_config={"model": path, "num_speculative_tokens": 3})
    cases = [(PROMPT_1, [random_image(1)]), (PROMPT_2, [random_image(2), random_image(3, (50, 120))]), (TEXT, [])]
    outs = llm.generate([image_prompt(t, ims) for t, ims in cases], _params(logprobs=0), use_tqdm=False)
    for (text, images), out in zip(cases, outs):
        assert_output_matches(ref.greedy(text, images), out)
    assert llm.llm_engine.scheduler.num_accepted_tokens > 0
