"""Gemma 3's image path: each image is written `<start_of_image>` in the prompt and becomes
"\\n\\n<start_of_image>" + 256 `<image_soft_token>` + "<end_of_image>\\n\\n" (transformers'
Gemma3Processor); the SigLIP tower's patches are average-pooled to those 256 rows, normed
and projected (Gemma3MultiModalProjector). The image's tokens attend to each other both
ways in the decoder (AttentionMetadata.kv_limit). With pan-and-scan (do_pan_and_scan), a wide
or tall image also gets crops: "Here is the original image" + its block + "and here are some
crops..." + a block per crop; each crop is an image of its own (its own ImageFeature, run of
tokens and two-way span), as transformers' model sees it (one group per run of image tokens)."""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

import torch

from pagedserve.multimodal.inputs import ImageFeature
from pagedserve.multimodal.llava import LlavaImageEncoder


# Gemma3Processor's settings of pan-and-scan that Gemma 3's preprocessor_config.json leaves null.
PAN_AND_SCAN_DEFAULTS = {"pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                         "pan_and_scan_min_ratio_to_activate": 1.2}
# Gemma3Processor's text around an image with pan-and-scan crops (replace_image_token).
ORIGINAL_TEXT = "Here is the original image "
CROPS_TEXT = " and here are some crops to help you see better "


def images_per_image(model_dir: str, processor_kwargs: Optional[dict]) -> int:
    """Encoder images one prompt image may become: itself, and with pan-and-scan up to
    pan_and_scan_max_num_crops crops (the memory profile's cap counts them)."""
    from pagedserve.multimodal.processor import load_image_processor

    settings = pan_and_scan_kwargs(load_image_processor(model_dir, processor_kwargs or {}))
    return 1 + int(settings["pan_and_scan_max_num_crops"]) if settings else 1


def pan_and_scan_kwargs(hf: Any) -> dict:
    """The image processor's call settings: with do_pan_and_scan, its crop settings, null ones
    given Gemma3Processor's defaults (the image processor alone fails on them); else none."""
    if not getattr(hf, "do_pan_and_scan", False):
        return {}
    out: dict = {"do_pan_and_scan": True}
    for key, default in PAN_AND_SCAN_DEFAULTS.items():
        value = getattr(hf, key, None)
        out[key] = default if value is None else value
    return out


def prepare_images(hf: Any, cfg: Any, images: list,
                   pan_and_scan: dict) -> tuple[list[tuple[torch.Tensor, int, None]], list[int]]:
    """(pixels, placeholder tokens, None) of each image followed by its pan-and-scan crops
    (each crop a whole image to the tower), and each image's number of crops."""
    if not images:
        return [], []
    out = hf(images=images, return_tensors="pt", **pan_and_scan)
    n = int(cfg.mm_tokens_per_image)
    return [(p, n, None) for p in out["pixel_values"]], [int(c) for c in out["num_crops"]]


def image_texts(num_crops: int) -> list[str]:
    """The text before, between and after an image's blocks (the image's, then one per crop)
    as Gemma3Processor writes it: "\\n\\n" + block + "\\n\\n" without crops, else "Here is the
    original image " + block + " and here are some crops..." + the crops' blocks, space-joined."""
    if not num_crops:
        return ["\n\n", "\n\n"]
    return [ORIGINAL_TEXT + "\n\n", "\n\n" + CROPS_TEXT + "\n\n"] + ["\n\n \n\n"] * (num_crops - 1) + ["\n\n"]


def expand_image_markers(ids: list[int], tokenizer: Any, cfg: Any, crops: Sequence[int] = ()) -> list[int]:
    """Each `<start_of_image>` not followed by image tokens already, expanded as Gemma3Processor
    expands it in the text (crops[k]: the k-th image's pan-and-scan crops, a block each). The
    text it adds may merge with the text around it, so the text between the neighbouring added
    tokens (which split text before the tokenizer runs, in the processor's tokenization too)
    is decoded and encoded again with it."""
    boi, eoi, image = cfg.boi_token_index, cfg.eoi_token_index, cfg.image_token_index
    if boi not in ids:
        return ids
    split = set(tokenizer.added_tokens_decoder) | {boi, eoi, image}
    block = [boi] + [image] * int(cfg.mm_tokens_per_image) + [eoi]
    # The block index each image starts at (blocks written out already count one each).
    starts = dict(zip(itertools.accumulate((1 + c for c in crops), initial=0), crops))
    out: list[int] = []
    run: list[int] = []
    tail = ""  # the text after the last block, to merge with the run after it

    def flush(lead: str) -> None:
        nonlocal tail
        if tail or lead:
            out.extend(tokenizer.encode(tail + tokenizer.decode(run) + lead, add_special_tokens=False))
        else:
            out.extend(run)
        run.clear()
        tail = ""

    blocks = 0
    for i, t in enumerate(ids):
        if t not in split:
            run.append(t)
            continue
        if t != boi or (i + 1 < len(ids) and ids[i + 1] == image):
            flush("")
            out.append(t)
            blocks += t == boi
            continue
        texts = image_texts(starts.get(blocks, 0))
        flush(texts[0])
        for gap in texts[1:-1]:  # between two blocks: text of its own
            out.extend(block + tokenizer.encode(gap, add_special_tokens=False))
        out.extend(block)
        tail = texts[-1]
        blocks += len(texts) - 1
    flush("")
    return out


class Gemma3ImageEncoder(LlavaImageEncoder):
    """The SigLIP tower (loaded as LLaVA's is: the same checkpoint names) and Gemma 3's projector."""

    bidirectional = True  # an image's tokens attend to each other both ways

    def __init__(self, cfg: Any) -> None:
        from transformers import AutoModel
        from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

        torch.nn.Module.__init__(self)
        self.config = cfg
        self.vision_tower = AutoModel.from_config(cfg.vision_config)
        self.multi_modal_projector = Gemma3MultiModalProjector(cfg)

    def profile_features(self, max_tokens: int) -> list[ImageFeature]:
        size = self.config.vision_config.image_size
        return [ImageFeature(0, int(self.config.mm_tokens_per_image), torch.zeros(3, size, size), "profile")]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, mm_tokens_per_image, text hidden size], as transformers'
        Gemma3Model.get_image_features."""
        return self.multi_modal_projector(self.vision_tower(pixel_values=pixel_values).last_hidden_state)

    def rope_positions(self, num_prompt: int, features: Sequence[ImageFeature]) -> None:
        return None
