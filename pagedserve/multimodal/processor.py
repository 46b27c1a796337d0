"""A prompt's images -> pixel values and placeholder tokens, as the model's Hugging Face
processor lays them out: each image's one placeholder token (LLaVA's `<image>`) becomes as
many placeholders as the vision encoder gives it embeddings."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from pagedserve.errors import ParamError
from pagedserve.multimodal.inputs import ImageFeature, load_image

# Vision-language architectures whose images pagedserve runs (multimodal/llava.py).
IMAGE_ARCHITECTURES = ("LlavaForConditionalGeneration",)
# Vision towers that put a class token before the patches (LLaVA's "default" strategy drops it).
_CLS_TOWERS = ("clip_vision_model",)


def takes_images(text_config: Any) -> bool:
    """Whether the engine's (text) config comes from a vision-language model whose images run here."""
    return getattr(text_config, "multimodal_architecture", None) in IMAGE_ARCHITECTURES


def load_full_config(model_dir: str) -> Any:
    """The vision-language config.json whole (the engine's hf_config is its text part)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def image_token_id(cfg: Any) -> int:
    tid = getattr(cfg, "image_token_index", None)
    return int(tid if tid is not None else cfg.image_token_id)


def tokens_per_image(cfg: Any, height: int, width: int) -> int:
    """The vision encoder's output rows for an image of this size (after the processor)."""
    vc = cfg.vision_config
    n = (height // vc.patch_size) * (width // vc.patch_size)
    if vc.model_type in _CLS_TOWERS:
        n += 1
    if cfg.vision_feature_select_strategy == "default":
        n -= 1
    return n


def check_image_model(cfg: Any) -> None:
    archs = list(getattr(cfg, "architectures", None) or [])
    if not archs or archs[0] not in IMAGE_ARCHITECTURES:
        raise ValueError(f"images are supported for {', '.join(IMAGE_ARCHITECTURES)}, not {archs}.")
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} is not supported.")


class ImageInputProcessor:
    """Turns (prompt ids, images) into expanded prompt ids and one ImageFeature per image."""

    def __init__(self, model_dir: str, max_images: int) -> None:
        from transformers import AutoImageProcessor

        self.config = load_full_config(model_dir)
        check_image_model(self.config)
        if not os.path.isfile(os.path.join(model_dir, "preprocessor_config.json")):
            raise ValueError(f"{model_dir!r} is a vision-language model without preprocessor_config.json: its "
                             "images cannot be prepared (serve it text-only with limit_mm_per_prompt={'image': 0}).")
        self.hf = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        self.token_id = image_token_id(self.config)
        self.max_images = max_images

    def process(self, ids: list[int], images: Any,
                field: str = "multi_modal_data") -> tuple[list[int], list[ImageFeature]]:
        images = images if isinstance(images, (list, tuple)) else [images]
        if len(images) > self.max_images:
            raise ParamError(field, f"at most {self.max_images} images a prompt are accepted (limit_mm_per_prompt), "
                             f"got {len(images)}.")
        runs = placeholder_runs(ids, self.token_id)
        if not images:
            if runs:
                raise ParamError(field, f"the prompt has image placeholders (token {self.token_id}) but no images.")
            return ids, []
        pixels = self.hf(images=[load_image(im, field).convert("RGB") for im in images],
                         return_tensors="pt")["pixel_values"]
        n = tokens_per_image(self.config, *pixels.shape[-2:])
        # A run of placeholders is one image's single token, or images already expanded.
        counts = [1 if length == 1 else length // n if length % n == 0 else -1 for _, length in runs]
        if -1 in counts or sum(counts) != len(images):
            raise ParamError(field, f"the prompt has {len(runs)} runs of image placeholder tokens for {len(images)} "
                             f"images: write one placeholder per image (each becomes {n} tokens).")
        out: list[int] = []
        features: list[ImageFeature] = []
        at = 0
        k = 0
        for (start, length), count in zip(runs, counts):
            out += ids[at:start]
            for _ in range(count):
                features.append(ImageFeature(len(out), n, pixels[k], ImageFeature.pixel_hash(pixels[k])))
                out += [self.token_id] * n
                k += 1
            at = start + length
        out += ids[at:]
        return out, features


def placeholder_runs(ids: Sequence[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `token` in ids."""
    runs: list[tuple[int, int]] = []
    start: Optional[int] = None
    for i, t in enumerate(ids):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            runs.append((start, i - start))
            start = None
    if start is not None:
        runs.append((start, len(ids) - start))
    return runs
