"""LLaVA-NeXT's images (LLaVA-1.6: "anyres"): the image processor resizes an image to the best
of `image_grid_pinpoints` and cuts it into tower-sized tiles, plus the whole image at tower
size; the tiles' features are stitched back into one grid, the padding the resize added is
cut off ("unpad"), and a learned `image_newline` vector closes each row. So an image's
placeholder count follows its size (`num_image_tokens`, as LlavaNextProcessor counts them).
The tower, projector and packing are transformers' own (LlavaNextModel.pack_image_features)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from pagedserve.multimodal.inputs import ImageFeature
from pagedserve.multimodal.llava import LlavaImageEncoder
from pagedserve.multimodal.processor import tokens_per_image


def num_tiles(cfg: Any, height: int, width: int) -> int:
    """Tiles the processor makes of an image of this size: its best-fit grid's, plus the whole."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return int(image_size_to_num_patches((height, width), cfg.image_grid_pinpoints, cfg.vision_config.image_size))


def unpadded_grid(cfg: Any, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of patch features of an image's tile grid once the resize's padding is
    cut off (LlavaNextProcessor._get_unpadded_features)."""
    from transformers.image_processing_utils import select_best_resolution

    size = cfg.vision_config.image_size
    side = size // cfg.vision_config.patch_size
    best_h, best_w = select_best_resolution([height, width], cfg.image_grid_pinpoints)
    rows, cols = side * (best_h // size), side * (best_w // size)
    if width / height > cols / rows:  # wider than the grid: padded above and below
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        rows -= 2 * pad
    else:
        pad = (cols - int(round(width * (rows / height), 7))) // 2
        cols -= 2 * pad
    return rows, cols


def num_image_tokens(cfg: Any, height: int, width: int) -> int:
    """An image's placeholders: the whole image's rows, then its unpadded tile grid with one
    newline a row (LlavaNextProcessor._get_number_of_features)."""
    size = cfg.vision_config.image_size
    rows, cols = unpadded_grid(cfg, height, width)
    return tokens_per_image(cfg, size, size) + rows * cols + rows


class LlavaNextImageEncoder(LlavaImageEncoder):
    def __init__(self, cfg: Any) -> None:
        nn.Module.__init__(self)
        from transformers import AutoModel

        self.config = cfg
        self.vision_tower = AutoModel.from_config(cfg.vision_config)
        self.multi_modal_projector = self.projector_class()(cfg)
        self.image_newline = nn.Parameter(torch.empty(cfg.text_config.hidden_size))

    @staticmethod
    def projector_class() -> type:
        from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

        return LlavaNextMultiModalProjector

    def pack(self, per_tile: list[torch.Tensor], sizes: torch.Tensor) -> list[torch.Tensor]:
        """Each image's tile features -> its placeholders' rows (transformers' packing as it is:
        its `self` needs only `config`)."""
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

        packed, _ = LlavaNextModel.pack_image_features(self, per_tile, sizes,
                                                       self.config.vision_feature_select_strategy,
                                                       image_newline=self.image_newline)
        return list(packed)

    def encode(self, features: Sequence[ImageFeature]) -> list[torch.Tensor]:
        """All images' tiles through the tower in one pass, then each image packed."""
        param = next(self.parameters())
        tiles = torch.cat([f.pixel_values for f in features]).to(param.device, param.dtype)
        per_tile = self(tiles).split([f.pixel_values.shape[0] for f in features])
        return self.pack(list(per_tile), torch.tensor([f.image_size for f in features]))

    def profile_features(self, max_tokens: int) -> list[ImageFeature]:
        """The image with the most placeholders: one the size of the largest pinpoint grid."""
        size = self.config.vision_config.image_size
        h, w = max(self.config.image_grid_pinpoints, key=lambda hw: num_image_tokens(self.config, *hw))
        return [ImageFeature(0, num_image_tokens(self.config, h, w), torch.zeros(num_tiles(self.config, h, w), 3,
                                                                                  size, size),
                             "profile", image_size=(int(h), int(w)))]
