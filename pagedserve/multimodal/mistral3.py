"""Mistral 3's image path (Mistral Small 3.1 / 3.2, Ministral 3): the Pixtral vision tower
(transformers' own, with its 2-D RoPE) over each image at its own size, and Mistral 3's
projector (norm, 2x2 patch merger, two linear layers). An image written `[IMG]` becomes
its rows of [IMG] tokens, each row closed by [IMG_BREAK] and the last by [IMG_END] (as
PixtralProcessor lays it out): the encoder's rows fill the [IMG] positions only."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from pagedserve.errors import ParamError
from pagedserve.multimodal.inputs import ImageFeature
from pagedserve.multimodal.llava import LlavaImageEncoder


def image_layout(rows: int, cols: int, img: int, brk: int, end: int) -> list[int]:
    """An image of rows x cols merged patches as tokens."""
    ids = ([img] * cols + [brk]) * rows
    ids[-1] = end
    return ids


def expand_images(ids: list[int], layouts: list[list[int]], img: int, brk: int, end: int,
                  field: str) -> tuple[list[int], list[int]]:
    """(ids with each image's layout in place, each image's first position). An image is one
    [IMG] token, or its layout already written out (up to its [IMG_END]); a break or end token
    outside a whole layout is an error."""
    out: list[int] = []
    starts: list[int] = []
    i = k = 0
    while i < len(ids):
        if ids[i] in (brk, end):
            raise ParamError(field, f"image {max(k - 1, 0)}'s placeholders do not match its size: write one [IMG] "
                             "per image.")
        if ids[i] != img:
            out.append(ids[i])
            i += 1
            continue
        if k == len(layouts):
            raise ParamError(field, f"the prompt has more images ([IMG] placeholders) than the {len(layouts)} given.")
        starts.append(len(out))
        layout = layouts[k]
        i += len(layout) if ids[i:i + len(layout)] == layout else 1  # already expanded, or its marker
        out += layout
        k += 1
    if k != len(layouts):
        raise ParamError(field, f"the prompt has {k} image placeholders ([IMG]) for {len(layouts)} images.")
    return out, starts


class Mistral3ImageEncoder(LlavaImageEncoder):
    """The Pixtral tower (loaded as LLaVA's is: the same checkpoint names) and Mistral 3's projector."""

    def __init__(self, cfg: Any) -> None:
        from transformers import AutoModel
        from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

        torch.nn.Module.__init__(self)
        self.config = cfg
        self.vision_tower = AutoModel.from_config(cfg.vision_config)
        self.multi_modal_projector = Mistral3MultiModalProjector(cfg)

    def encode(self, features: Sequence[ImageFeature]) -> list[torch.Tensor]:
        """All the images in one pass, each at its own size: padded to the largest (the tower
        reads each image's own patches only, by its size)."""
        param = next(self.parameters())
        sizes = [tuple(f.pixel_values.shape[-2:]) for f in features]
        h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        pixels = torch.stack([F.pad(f.pixel_values, (0, w - f.pixel_values.shape[-1], 0, h - f.pixel_values.shape[-2]))
                              for f in features]).to(param.device, param.dtype)
        cfg = self.config
        out = self.vision_tower(pixels, image_sizes=torch.tensor(sizes), output_hidden_states=True, return_dict=True)
        layers = cfg.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        chosen = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        merged = self.multi_modal_projector(chosen.squeeze(0), torch.tensor(sizes))
        return list(merged.split([f.num_embeds for f in features]))

    def profile_features(self, max_tokens: int) -> list[ImageFeature]:
        """The largest image the tower takes (its image_size square)."""
        size = self.config.vision_config.image_size
        side = size // (self.config.vision_config.patch_size * self.config.spatial_merge_size)
        n = side * side
        return [ImageFeature(0, n, torch.zeros(3, size, size), "profile", embed_rows=tuple(range(n)))]
