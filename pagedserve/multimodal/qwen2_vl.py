"""Qwen2-VL's, Qwen2.5-VL's, Qwen3-VL's and Qwen3.5's image path: the vision transformer (transformers' own module,
run once per image outside the paged decoder) over each image's flattened patches, its 2x2
patch merger into the decoder's embeddings, and the decoder's M-RoPE positions for a prompt
with images (transformers' `get_rope_index`)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pagedserve.multimodal.inputs import ImageFeature
from pagedserve.multimodal.processor import load_image_processor, max_image_pixels

_VISION_MODULES = {
    "Qwen2VLForConditionalGeneration": ("transformers.models.qwen2_vl.modeling_qwen2_vl",
                                        "Qwen2VisionTransformerPretrainedModel"),
    "Qwen2_5_VLForConditionalGeneration": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
                                           "Qwen2_5_VisionTransformerPretrainedModel"),
    "Qwen3VLForConditionalGeneration": ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionModel"),
    "Qwen3VLMoeForConditionalGeneration": ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
                                           "Qwen3VLMoeVisionModel"),
    # Qwen3.5: Qwen3-VL's tower without DeepStack, before the hybrid decoder (model/qwen3_next.py).
    "Qwen3_5ForConditionalGeneration": ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5VisionModel"),
    "Qwen3_5MoeForConditionalGeneration": ("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
                                           "Qwen3_5MoeVisionModel"),
}


def mrope_positions(num_prompt: int, features: Sequence[ImageFeature], merge: int) -> tuple[np.ndarray, int]:
    """([3, num_prompt] (time, height, width) positions, delta) of a prompt whose images are
    `features`: text tokens count on from the last position, each of the three the same; an
    image's tokens sit on its merged patch grid starting there, and the text after it starts
    past the grid's larger side. Generated token i then has position i + delta everywhere."""
    pos = np.empty((3, num_prompt), dtype=np.int64)
    cur = at = 0
    for f in sorted(features, key=lambda f: f.offset):
        pos[:, at:f.offset] = cur + np.arange(f.offset - at)
        cur += f.offset - at
        t, h, w = f.grid_thw[0], f.grid_thw[1] // merge, f.grid_thw[2] // merge
        grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)
        pos[:, f.offset:f.offset + f.length] = cur + grid
        cur += max(h, w)
        at = f.offset + f.length
    pos[:, at:] = cur + np.arange(num_prompt - at)
    cur += num_prompt - at
    return pos, cur - num_prompt


class Qwen2VLImageEncoder(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        import importlib

        module, name = _VISION_MODULES[cfg.architectures[0]]
        self.config = cfg
        self.merge = int(cfg.vision_config.spatial_merge_size)
        self.visual = getattr(importlib.import_module(module), name)._from_config(cfg.vision_config)
        self.max_pixels = 0  # the image processor's, read at load


    @classmethod
    def load(cls, cfg: Any, model_dir: str, dtype: torch.dtype, device: torch.device,
             processor_kwargs: Optional[dict] = None) -> "Qwen2VLImageEncoder":
        from pagedserve.multimodal.encoder import build_in, load_vision_weights

        enc = build_in(cls, cfg, dtype, device)
        # "visual." in hub checkpoints, "model.visual." as transformers 5 names the module.
        load_vision_weights(enc, model_dir, dtype, device, ("visual.", "model.visual."), cfg.architectures[0])
        enc.max_pixels = max_image_pixels(load_image_processor(model_dir, processor_kwargs or {}))
        return enc.to(dtype).eval().requires_grad_(False)

    def encode(self, features: Sequence[ImageFeature]) -> list[torch.Tensor]:
        """Each image's embeddings [its placeholders, text hidden size], all the images in one
        pass (the vision attention keeps to each image by its grid). Qwen3-VL's DeepStack
        features follow on the same rows: [placeholders, (1 + levels) * hidden], level k for
        the output of decoder layer k (the runner splits them)."""
        param = next(self.visual.parameters())
        pixels = torch.cat([f.pixel_values for f in features]).to(param.device, param.dtype)
        grid = torch.tensor([f.grid_thw for f in features], device=param.device)
        out = self.visual(pixels, grid_thw=grid)
        if isinstance(out, torch.Tensor):  # transformers 4's Qwen2-VL: the merged rows
            merged, deep = out, []
        elif isinstance(out, tuple):  # transformers 4's Qwen3-VL: (merged, DeepStack levels)
            merged, deep = out[0], list(out[1] or [])
        else:
            merged, deep = out.pooler_output, list(getattr(out, "deepstack_features", None) or [])
        return list(torch.cat([merged, *deep], dim=-1).split([f.length for f in features]))

    def profile_features(self, max_tokens: int) -> list[ImageFeature]:
        """The largest image the image processor makes (its max_pixels), at most `max_tokens`
        placeholders: a square grid of merged patches."""
        vc = self.config.vision_config
        if self.max_pixels:
            max_tokens = min(max_tokens, self.max_pixels // (vc.patch_size * self.merge) ** 2)
        side = max(1, int(max_tokens ** 0.5)) * self.merge
        dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        pixels = torch.zeros(side * side, dim)
        return [ImageFeature(0, (side // self.merge) ** 2, pixels, "profile", (1, side, side))]

    def rope_positions(self, num_prompt: int, features: Sequence[ImageFeature]) -> tuple[np.ndarray, int]:
        return mrope_positions(num_prompt, features, self.merge)
