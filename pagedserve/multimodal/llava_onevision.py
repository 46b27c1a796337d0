"""LLaVA-OneVision's images: LLaVA-NeXT's "anyres" tiles (multimodal/llava_next.py) on a Qwen2
decoder, with two differences. An unpadded tile grid larger than `vision_aspect_ratio`'s
"anyres_max_N" allows (N tiles' patches, by more than 10% a side) is downscaled (bilinear)
before its row-end newlines are added; and a prompt with several images gives each just the
whole image padded to a square, plus one newline (LlavaOnevisionProcessor with a prompt's
images grouped, as its chat template path groups them). Videos are not supported.
The tower, projector and packing are transformers' own (LlavaOnevisionModel.pack_image_features)."""

from __future__ import annotations

import math
from typing import Any

import torch

from pagedserve.multimodal.inputs import ImageFeature
from pagedserve.multimodal.llava_next import LlavaNextImageEncoder, unpadded_grid
from pagedserve.multimodal.processor import tokens_per_image

_ASPECT_PREFIX = "anyres_max_"


def max_num_patches(cfg: Any) -> int:
    """N of vision_aspect_ratio "anyres_max_N": the most tiles' patches an image keeps."""
    value = str(getattr(cfg, "vision_aspect_ratio", ""))
    n = value[len(_ASPECT_PREFIX):]
    if not value.startswith(_ASPECT_PREFIX) or not n.isdigit() or int(n) < 1:
        raise ValueError(f"vision_aspect_ratio {value!r} is not supported: 'anyres_max_<n>' only.")
    return int(n)


def check_config(cfg: Any) -> None:
    """What transformers' packing needs: a whole-image tile of exactly side x side rows."""
    max_num_patches(cfg)
    size = cfg.vision_config.image_size
    side = size // cfg.vision_config.patch_size
    if tokens_per_image(cfg, size, size) != side * side:
        raise ValueError(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} with a "
                         f"{cfg.vision_config.model_type} tower is not supported: its tiles are not whole rows.")


def packed_grid(cfg: Any, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of an image's tile-grid features after unpadding and the anyres_max
    downscale (LlavaOnevisionProcessor._get_unpadded_features)."""
    rows, cols = unpadded_grid(cfg, height, width)
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    ratio = math.sqrt(rows * cols / (max_num_patches(cfg) * side ** 2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def num_tiles(cfg: Any, height: int, width: int, alone: bool = True) -> int:
    """Tiles of an image: its best-fit grid's plus the whole image; one where it shares the prompt."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    if not alone:
        return 1
    return int(image_size_to_num_patches((height, width), cfg.image_grid_pinpoints, cfg.vision_config.image_size))


def num_image_tokens(cfg: Any, height: int, width: int, alone: bool = True) -> int:
    """An image's placeholders: the whole image's rows, then its packed grid with one newline a
    row; where it shares the prompt with other images, the whole image's rows and one newline."""
    size = cfg.vision_config.image_size
    if not alone:
        return tokens_per_image(cfg, size, size) + 1
    rows, cols = packed_grid(cfg, height, width)
    return tokens_per_image(cfg, size, size) + rows * cols + rows


def largest_images(cfg: Any) -> list[tuple[int, int]]:
    """(height, width) of the image with the most tiles (the largest pinpoint) and of the one
    with the most placeholders. The downscale makes them differ: a grid just under its 10%
    margin keeps more features than a larger one cut down, so the second is searched over each
    pinpoint's full height (width) at every unpadded width (height)."""
    size = cfg.vision_config.image_size
    side = size // cfg.vision_config.patch_size
    pins = [(int(h), int(w)) for h, w in cfg.image_grid_pinpoints]
    most_tiles = max(pins, key=lambda hw: (num_tiles(cfg, *hw), num_image_tokens(cfg, *hw)))
    candidates = set(pins)
    for h, w in pins:
        cols, rows = side * (w // size), side * (h // size)
        candidates.update((h, -(-k * w // cols)) for k in range(1, cols + 1))
        candidates.update((-(-k * h // rows), w) for k in range(1, rows + 1))
    most_tokens = max(sorted(candidates), key=lambda hw: num_image_tokens(cfg, *hw))
    if num_image_tokens(cfg, *most_tokens) == num_image_tokens(cfg, *most_tiles):
        return [most_tiles]
    return [most_tiles, most_tokens]


def prepared_image(cfg: Any, pixels: torch.Tensor, image_size: tuple[int, int],
                   alone: bool) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """(its tiles, cut back from the batch's padding; its placeholder count; its size)."""
    return pixels[:num_tiles(cfg, *image_size, alone)], num_image_tokens(cfg, *image_size, alone), image_size


class LlavaOnevisionImageEncoder(LlavaNextImageEncoder):
    @staticmethod
    def projector_class() -> type:
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector

        return LlavaOnevisionMultiModalProjector

    def pack(self, per_tile: list[torch.Tensor], sizes: torch.Tensor) -> list[torch.Tensor]:
        """transformers' packing: an image of one tile (it shared its prompt) is that tile and a newline."""
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

        packed, _ = LlavaOnevisionModel.pack_image_features(self, per_tile, sizes, image_newline=self.image_newline,
                                                            vision_aspect_ratio=self.config.vision_aspect_ratio)
        return list(packed)

    def profile_features(self, max_tokens: int) -> list[ImageFeature]:
        """The image with the most tiles and the one with the most placeholders (if another)."""
        size = self.config.vision_config.image_size
        return [ImageFeature(0, num_image_tokens(self.config, h, w),
                             torch.zeros(num_tiles(self.config, h, w), 3, size, size), "profile", image_size=(h, w))
                for h, w in largest_images(self.config)]
