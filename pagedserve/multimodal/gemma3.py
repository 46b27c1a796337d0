"""Gemma 3's image path: each image is written `<start_of_image>` in the prompt and becomes
"\\n\\n<start_of_image>" + 256 `<image_soft_token>` + "<end_of_image>\\n\\n" (transformers'
Gemma3Processor); the SigLIP tower's patches are average-pooled to those 256 rows, normed
and projected (Gemma3MultiModalProjector). The image's tokens attend to each other both
ways in the decoder (AttentionMetadata.kv_limit)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from pagedserve.multimodal.inputs import ImageFeature
from pagedserve.multimodal.llava import LlavaImageEncoder


def expand_image_markers(ids: list[int], tokenizer: Any, cfg: Any) -> list[int]:
    """Each `<start_of_image>` not followed by image tokens already, expanded as Gemma3Processor
    expands it in the text. The "\\n\\n" it adds may merge with the newlines around it, so the
    text between the neighbouring added tokens (which split text before the tokenizer runs,
    in the processor's tokenization too) is decoded and encoded again with them."""
    boi, eoi, image = cfg.boi_token_index, cfg.eoi_token_index, cfg.image_token_index
    if boi not in ids:
        return ids
    split = set(tokenizer.added_tokens_decoder) | {boi, eoi, image}
    block = [boi] + [image] * int(cfg.mm_tokens_per_image) + [eoi]
    out: list[int] = []
    run: list[int] = []
    after_image = False

    def flush(before_image: bool) -> None:
        nonlocal after_image
        if after_image or before_image:
            text = ("\n\n" if after_image else "") + tokenizer.decode(run) + ("\n\n" if before_image else "")
            out.extend(tokenizer.encode(text, add_special_tokens=False))
        else:
            out.extend(run)
        run.clear()
        after_image = False

    for i, t in enumerate(ids):
        if t not in split:
            run.append(t)
            continue
        expand = t == boi and not (i + 1 < len(ids) and ids[i + 1] == image)
        flush(before_image=expand)
        if expand:
            out.extend(block)
            after_image = True
        else:
            out.append(t)
    flush(before_image=False)
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
