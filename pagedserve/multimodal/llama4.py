"""Llama 4's image path (Scout, Maverick): each image is cut into tiles of the tower's size
(multimodal/llama4_images.py), each tile goes through transformers' Llama4VisionModel (its
patches pixel-shuffled 2x2 into one and put through its MLP) and Llama 4's projector. In the
prompt an image's `<|image|>` becomes, as Llama4Processor writes it: `<|image_start|>`, for a
tiled image each tile's run of `<|patch|>` with `<|tile_x_separator|>` between the tiles of a
row and `<|tile_y_separator|>` after each row, then `<|image|>` and the whole-image tile's run,
then `<|image_end|>`. The encoder's rows fill the `<|patch|>` positions only
(`ImageFeature.embed_rows`); the other tokens stay text. The decoder attends causally, so an
image may span prefill chunks."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from pagedserve.errors import ParamError
from pagedserve.multimodal.inputs import ImageFeature

VISION_PREFIXES = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")
# Llama4Processor's tokens, besides <|patch|> (the config's image_token_index).
MARKERS = ("<|image|>", "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>", "<|tile_y_separator|>")


def tokens_per_tile(cfg: Any) -> int:
    """A tile's rows: its patches after the pixel shuffle (Llama4Processor's num_patches_per_chunk)."""
    vc = cfg.vision_config
    return int((vc.image_size // vc.patch_size) ** 2 * vc.pixel_shuffle_ratio ** 2)


def marker_ids(tokenizer: Any) -> dict[str, int]:
    """The ids of MARKERS in the tokenizer; a ValueError names one it lacks."""
    ids = {}
    for token in MARKERS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"the tokenizer has no {token!r} token: Llama 4's images need it.")
        ids[token] = int(tid)
    return ids


def image_layout(rows: int, cols: int, per_tile: int, patch: int, marks: dict[str, int]) -> list[int]:
    """An image of rows x cols tiles as tokens (Llama4Processor._prompt_split_image)."""
    ids = [marks["<|image_start|>"]]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                ids += [patch] * per_tile
                if x < cols - 1:
                    ids.append(marks["<|tile_x_separator|>"])
            ids.append(marks["<|tile_y_separator|>"])
    return ids + [marks["<|image|>"]] + [patch] * per_tile + [marks["<|image_end|>"]]


def expand_images(ids: list[int], layouts: list[list[int]], marks: dict[str, int], patch: int,
                  field: str) -> tuple[list[int], list[int]]:
    """(ids with each image's layout in place, each layout's first position). An image is one
    <|image|>, or its layout already written out; an image's other tokens outside a whole
    layout are an error."""
    image, start = marks["<|image|>"], marks["<|image_start|>"]
    stray = {patch} | set(marks.values())
    out: list[int] = []
    starts: list[int] = []
    i = k = 0
    while i < len(ids):
        t = ids[i]
        layout = layouts[k] if k < len(layouts) else None
        if t == start and layout is not None and ids[i:i + len(layout)] == layout:
            step = len(layout)  # already expanded
        elif t == image:
            if layout is None:
                raise ParamError(field, f"the prompt has more images (<|image|> placeholders) than the "
                                 f"{len(layouts)} given.")
            step = 1
        elif t in stray:
            raise ParamError(field, f"image {k}'s tokens in the prompt do not match its size: write one <|image|> "
                             "per image.")
        else:
            out.append(t)
            i += 1
            continue
        starts.append(len(out))
        out += layout
        i += step
        k += 1
    if k != len(layouts):
        raise ParamError(field, f"the prompt has {k} image placeholders (<|image|>) for {len(layouts)} images.")
    return out, starts


def expand_prompt(ids: list[int], prepared: list[tuple[torch.Tensor, tuple[int, int]]], cfg: Any,
                  marks: dict[str, int], field: str) -> tuple[list[int], list[ImageFeature]]:
    """The prompt's ids with each image laid out, and an ImageFeature per image (its span the
    whole layout, its rows the <|patch|> positions)."""
    patch, per_tile = int(cfg.image_token_index), tokens_per_tile(cfg)
    layouts = [image_layout(rows, cols, per_tile, patch, marks) for _, (rows, cols) in prepared]
    out, starts = expand_images(ids, layouts, marks, patch, field)
    features = []
    for (tiles, ratio), start, layout in zip(prepared, starts, layouts):
        rows = tuple(i for i, t in enumerate(layout) if t == patch)
        features.append(ImageFeature(start, len(layout), tiles, ImageFeature.pixel_hash(tiles, ratio),
                                     embed_rows=rows))
    return out, features


def check_tile_size(cfg: Any, hf: Any) -> None:
    """The image processor's tiles must be the tower's size (its position table and shuffle need it)."""
    if hf.tile != cfg.vision_config.image_size:
        raise ValueError(f"the image processor's tiles are {hf.tile} pixels, the vision tower takes "
                         f"{cfg.vision_config.image_size}: they must be the same.")


class Llama4ImageEncoder(nn.Module):
    """transformers' Llama4VisionModel and Llama4MultiModalProjector."""

    def __init__(self, cfg: Any) -> None:
        from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

        super().__init__()
        self.config = cfg
        self.vision_model = Llama4VisionModel(cfg.vision_config)
        self.multi_modal_projector = Llama4MultiModalProjector(cfg)
        self.max_tiles = 1  # the image processor's (max_patches and the global tile), set by load()

    @classmethod
    def load(cls, cfg: Any, model_dir: str, dtype: torch.dtype, device: torch.device,
             processor_kwargs: Optional[dict] = None) -> "Llama4ImageEncoder":
        from pagedserve.multimodal.encoder import build_in, load_vision_weights
        from pagedserve.multimodal.llama4_images import Llama4ImageProcessor

        enc = build_in(cls, cfg, dtype, device)
        hf = Llama4ImageProcessor.from_pretrained(model_dir, processor_kwargs or {})
        check_tile_size(cfg, hf)
        enc.max_tiles = hf.max_patches + 1 if hf.max_patches > 1 else 1
        load_vision_weights(enc, model_dir, dtype, device, VISION_PREFIXES, "Llama 4's tower")
        return enc.eval().requires_grad_(False)

    def encode(self, features: Sequence[ImageFeature]) -> list[torch.Tensor]:
        """The images' tiles through the tower, at most the largest image's tiles a pass (the
        activations the KV profile measured); an image's rows are its tiles' in order, the
        whole-image tile last."""
        param = next(self.parameters())
        tiles = torch.cat([f.pixel_values for f in features]).to(param.device, param.dtype)
        rows = torch.cat([self(chunk) for chunk in tiles.split(max(self.max_tiles, 1))])
        return list(rows.split([f.num_embeds for f in features]))

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, S, S] -> [tiles x rows a tile, text hidden size], as transformers'
        Llama4ForConditionalGeneration does before it scatters them."""
        out = self.vision_model(tiles, return_dict=True).last_hidden_state
        return self.multi_modal_projector(out.reshape(-1, out.shape[-1]))

    def profile_features(self, max_tokens: int) -> list[ImageFeature]:
        """The image with the most tiles (max_patches and the whole-image tile)."""
        size, n = self.config.vision_config.image_size, self.max_tiles
        rows = n * tokens_per_tile(self.config)
        return [ImageFeature(0, rows, torch.zeros(n, 3, size, size), "profile", embed_rows=tuple(range(rows)))]

    def rope_positions(self, num_prompt: int, features: Sequence[ImageFeature]) -> None:
        return None  # plain positions
