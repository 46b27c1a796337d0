"""Llama 4's image processor without torchvision: transformers' Llama4ImageProcessor runs on
torchvision only, which pagedserve does not depend on, so its steps are written again here on
torch alone, in its order and dtypes (the resize is torch's own uint8 interpolation, the one
torchvision calls): the image resized (never distorted, upscaled only to the tile size) and padded
onto the best-fitting canvas of up to `max_patches` tiles, rescaled and normalised in
bfloat16, cut into tiles row by row, and, where there are several, followed by the whole image
squashed to one tile (the "global" tile). Checked against transformers' own where torchvision
is installed (tests/test_multimodal_llama4.py)."""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# The settings read from preprocessor_config.json (and mm_processor_kwargs), with transformers' defaults.
DEFAULTS: dict[str, Any] = {"size": {"height": 336, "width": 336}, "max_patches": 16, "resize_to_max_canvas": False,
                            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
                            "do_rescale": True, "do_normalize": True, "do_resize": True, "do_convert_rgb": True,
                            "resample": 2}

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as transformers maps them to torchvision's modes


def supported_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """(height, width) of every canvas of up to max_tiles tiles, in transformers' order
    (find_supported_resolutions: grouped by aspect ratio, larger tile counts first)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for h in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(h / (n // h), []).append((h, n // h))
    return [(h * tile, w * tile) for group in by_ratio.values() for h, w in group]


def best_canvas(height: int, width: int, canvases: list[tuple[int, int]], to_max: bool) -> tuple[int, int]:
    """The canvas that needs the least upscaling (or, with none big enough, the least
    downscaling), the smallest in area among equals (transformers' get_best_fit, in float32)."""
    c = torch.tensor(canvases)
    scale_w, scale_h = c[:, 1] / width, c[:, 0] / height
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    chosen = (up.max() if to_max else up.min()) if len(up) else scales[scales < 1].max()
    fits = c[scales == chosen]
    best = fits[torch.argmin(fits[:, 0] * fits[:, 1])] if len(fits) > 1 else fits[0]
    return int(best[0]), int(best[1])


def undistorted_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The largest size within the target at the image's aspect ratio (get_max_res_without_distortion)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return max(min(math.floor(height * scale_w), target_h), 1), max(target_w, 1)
    return max(target_h, 1), max(min(math.floor(width * scale_h), target_w), 1)


class Llama4ImageProcessor:
    """images -> each image's tiles [n, 3, tile, tile] (float32 holding bfloat16 values, as
    transformers makes them) and its (rows, columns) of tiles."""

    def __init__(self, settings: dict) -> None:
        self.settings = settings
        size = settings["size"]
        if size["height"] != size["width"]:
            raise ValueError(f"Llama 4's image processor takes square tiles, got size {size}.")
        if not settings["do_resize"]:  # (transformers refuses it too: tiles of other sizes)
            raise ValueError("Llama 4's image processor always resizes: do_resize=False is not supported.")
        self.tile = int(size["height"])
        self.max_patches = int(settings["max_patches"])
        self.canvases = supported_canvases(self.max_patches, self.tile)

    @classmethod
    def from_pretrained(cls, model_dir: str, kwargs: dict) -> "Llama4ImageProcessor":
        """preprocessor_config.json's settings, `kwargs` (mm_processor_kwargs) replacing them; a
        ValueError names a key it does not have."""
        path = os.path.join(model_dir, "preprocessor_config.json")
        if not os.path.isfile(path):
            raise ValueError(f"{model_dir!r} is a vision-language model without preprocessor_config.json: its "
                             "images cannot be prepared (serve it text-only with limit_mm_per_prompt={'image': 0}).")
        with open(path) as f:
            saved = json.load(f)
        unknown = sorted(set(kwargs) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"mm_processor_kwargs {unknown} are not settings of Llama4ImageProcessor.")
        settings = dict(DEFAULTS)
        settings.update({k: v for k, v in saved.items() if k in DEFAULTS and v is not None})
        settings.update(kwargs)
        return cls(settings)

    def __call__(self, images: list) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        return [self.one(im) for im in images]

    def one(self, image: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        from transformers.image_transforms import convert_to_rgb

        s = self.settings
        # (transparency composited onto white, as transformers does)
        pixels = self._pixels(convert_to_rgb(image, return_numpy=True) if s["do_convert_rgb"] else image.convert("RGB"))
        height, width = pixels.shape[-2:]
        canvas_h, canvas_w = best_canvas(height, width, self.canvases, bool(s["resize_to_max_canvas"]))
        target_h, target_w = canvas_h, canvas_w
        if not s["resize_to_max_canvas"]:  # upscaled no further than one tile's size
            target_h = min(max(height, self.tile), canvas_h)
            target_w = min(max(width, self.tile), canvas_w)
        h, w = undistorted_size(height, width, target_h, target_w)
        resized = self._resize(pixels, h, w)
        padded = torch.zeros(3, canvas_h, canvas_w, dtype=torch.uint8)  # padded right and below, black
        padded[:, :h, :w] = resized
        rows, cols = canvas_h // self.tile, canvas_w // self.tile
        tiles = self._normalize(padded).reshape(3, rows, self.tile, cols, self.tile).permute(1, 3, 0, 2, 4)
        tiles = tiles.reshape(rows * cols, 3, self.tile, self.tile)
        if rows * cols > 1:  # the whole image squashed to one tile, after the others
            whole = self._normalize(self._resize(pixels, self.tile, self.tile))
            tiles = torch.cat([tiles, whole[None]])
        return tiles.float(), (rows, cols)

    @staticmethod
    def _pixels(image: Any) -> torch.Tensor:
        """[3, H, W] uint8 of a PIL image or an [H, W, 3] array."""
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()

    def _resize(self, pixels: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[3, H, W] uint8 -> [3, h, w] uint8 as torchvision's resize_image: antialiased, on the
        uint8 values where torch has a kernel for them (bilinear: AVX2 / AVX512 / ARM CPUs), else
        in float32, rounded."""
        if tuple(pixels.shape[-2:]) == (h, w):
            return pixels
        mode = _RESAMPLE.get(int(self.settings["resample"]))
        if mode is None:
            raise ValueError(f"Llama 4's image processor here resamples bilinear (2) or bicubic (3), not "
                             f"{self.settings['resample']!r}.")
        native = mode == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") \
            or platform.machine() in ("aarch64", "arm64")
        x = pixels[None] if native else pixels[None].float()
        x = F.interpolate(x, size=[h, w], mode=mode, align_corners=False, antialias=True)[0]
        return x if native else x.clamp_(0, 255).round_().to(torch.uint8)

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Rescale and normalise as transformers' Llama4ImageProcessor does: in bfloat16 when both."""
        s = self.settings
        x = pixels
        if s["do_rescale"] and s["do_normalize"]:
            x = x.to(torch.bfloat16) * s["rescale_factor"]
        elif s["do_rescale"]:
            x = x * s["rescale_factor"]
        if s["do_normalize"]:
            x = x if x.is_floating_point() else x.float()
            mean = torch.as_tensor(s["image_mean"], dtype=x.dtype).view(-1, 1, 1)
            std = torch.as_tensor(s["image_std"], dtype=x.dtype).view(-1, 1, 1)
            x = (x - mean) / std
        return x
