"""A prompt's images -> pixel values and placeholder tokens, as the model's Hugging Face
processor lays them out: each image's one placeholder token (LLaVA's `<image>`, Qwen-VL's
`<|image_pad|>`) becomes as many placeholders as the vision encoder gives it embeddings (a
fixed number for LLaVA, one per 2x2 patches of the resized image for Qwen-VL; Gemma 4's
`<|image|>`, wrapped in `<start_of_image>` ... `<end_of_image>`, one per pooled patch square); Gemma 3's
`<start_of_image>` and Mistral 3's `[IMG]` take their own layouts (multimodal/gemma3.py,
multimodal/mistral3.py); InternVL's `<IMG_CONTEXT>` becomes `<img>`, its tiles' run, `</img>`;
Llama 4's `<|image|>` its tiles' runs between separators (multimodal/llama4.py)."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch

from pagedserve.errors import ParamError
from pagedserve.multimodal.inputs import ImageFeature, load_image

# Vision-language architectures whose images pagedserve runs (multimodal/: llava.py, llava_next.py,
# llava_onevision.py, qwen2_vl.py, gemma3.py, mistral3.py, internvl.py, llama4.py).
LLAVA_ARCHITECTURES = ("LlavaForConditionalGeneration",)
LLAVA_NEXT_ARCHITECTURES = ("LlavaNextForConditionalGeneration",)
LLAVA_ONEVISION_ARCHITECTURES = ("LlavaOnevisionForConditionalGeneration",)
QWEN_VL_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                         "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
                         "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
GEMMA3_ARCHITECTURES = ("Gemma3ForConditionalGeneration",)
GEMMA4_ARCHITECTURES = ("Gemma4ForConditionalGeneration",)
MISTRAL3_ARCHITECTURES = ("Mistral3ForConditionalGeneration",)
INTERNVL_ARCHITECTURES = ("InternVLForConditionalGeneration",)
LLAMA4_ARCHITECTURES = ("Llama4ForConditionalGeneration",)
IMAGE_ARCHITECTURES = (LLAVA_ARCHITECTURES + LLAVA_NEXT_ARCHITECTURES + LLAVA_ONEVISION_ARCHITECTURES
                       + QWEN_VL_ARCHITECTURES + GEMMA3_ARCHITECTURES + GEMMA4_ARCHITECTURES + MISTRAL3_ARCHITECTURES
                       + INTERNVL_ARCHITECTURES + LLAMA4_ARCHITECTURES)
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


def architecture(cfg: Any) -> str:
    archs = list(getattr(cfg, "architectures", None) or [])
    return archs[0] if archs else ""


def load_image_processor(model_dir: str, kwargs: dict) -> Any:
    """transformers' image processor of the checkpoint, `kwargs` (mm_processor_kwargs)
    replacing its settings; a ValueError names a key it does not have (transformers would
    ignore it silently)."""
    from transformers import AutoImageProcessor

    if not os.path.isfile(os.path.join(model_dir, "preprocessor_config.json")):
        raise ValueError(f"{model_dir!r} is a vision-language model without preprocessor_config.json: its "
                         "images cannot be prepared (serve it text-only with limit_mm_per_prompt={'image': 0}).")
    hf = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True, **kwargs)
    known = set(hf.to_dict())
    for cls in getattr(getattr(type(hf), "valid_kwargs", None), "__mro__", ()):  # transformers 5's typed settings
        known |= set(getattr(cls, "__annotations__", {}))
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"mm_processor_kwargs {unknown} are not settings of {type(hf).__name__}.")
    return hf


def max_image_pixels(hf: Any) -> int:
    """The largest image (in pixels) a Qwen2-VL image processor resizes to, 0 if it has no cap."""
    size = getattr(hf, "size", None) or {}
    get = size.get if hasattr(size, "get") else lambda k: getattr(size, k, None)
    return int(getattr(hf, "max_pixels", None) or get("max_pixels") or get("longest_edge") or 0)


def check_image_model(cfg: Any) -> None:
    arch = architecture(cfg)
    if arch not in IMAGE_ARCHITECTURES:
        raise ValueError(f"images are supported for {', '.join(IMAGE_ARCHITECTURES)}, not {arch!r}.")
    if arch in LLAVA_ARCHITECTURES + LLAVA_NEXT_ARCHITECTURES + LLAVA_ONEVISION_ARCHITECTURES + INTERNVL_ARCHITECTURES \
            and cfg.vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} is not supported.")
    if arch in LLAVA_ONEVISION_ARCHITECTURES:
        from pagedserve.multimodal.llava_onevision import check_config

        check_config(cfg)
    if arch in INTERNVL_ARCHITECTURES and not isinstance(cfg.vision_feature_layer, int):
        # transformers' InternVLModel.get_image_features takes one layer only
        raise ValueError(f"vision_feature_layer {cfg.vision_feature_layer!r} is not supported: one layer only.")


class ImageInputProcessor:
    """Turns (prompt ids, images) into expanded prompt ids and one ImageFeature per image."""

    def __init__(self, model_dir: str, max_images: int, processor_kwargs: Optional[dict] = None,
                 tokenizer: Any = None) -> None:
        self.config = load_full_config(model_dir)
        check_image_model(self.config)
        # Llama 4: tiles laid out with separators (multimodal/llama4.py); transformers' image
        # processor needs torchvision, so its twin on torch prepares them.
        self.llama4 = architecture(self.config) in LLAMA4_ARCHITECTURES
        if self.llama4:
            from pagedserve.multimodal.llama4 import check_tile_size
            from pagedserve.multimodal.llama4_images import Llama4ImageProcessor

            self.hf = Llama4ImageProcessor.from_pretrained(model_dir, processor_kwargs or {})
            check_tile_size(self.config, self.hf)
        else:
            self.hf = load_image_processor(model_dir, processor_kwargs or {})
        self.token_id = image_token_id(self.config)
        self.max_images = max_images
        self.qwen_vl = architecture(self.config) in QWEN_VL_ARCHITECTURES
        # Gemma 3: images written <start_of_image>, expanded with the tokenizer's help; an
        # image's tokens attend to each other both ways (the scheduler keeps each whole in a chunk).
        self.gemma3 = architecture(self.config) in GEMMA3_ARCHITECTURES
        # Gemma 4: each image's one <|image|> becomes <start_of_image> run <end_of_image>, the run as
        # long as the image's resized size gives (multimodal/gemma4.py); the larger models' image
        # tokens attend to each other both ways (use_bidirectional_attention "vision").
        self.gemma4 = architecture(self.config) in GEMMA4_ARCHITECTURES
        self.bidirectional = self.gemma3 or (
            self.gemma4 and getattr(self.config.text_config, "use_bidirectional_attention", None) == "vision")
        # The most tokens one image takes (a chunk must hold an image whole where it attends both ways).
        self.max_image_tokens = int(self.config.mm_tokens_per_image) if self.gemma3 else 0
        if self.gemma4:
            self.max_image_tokens = int(self.hf.max_soft_tokens)
        # Mistral 3: rows of [IMG] closed by [IMG_BREAK] / [IMG_END] (multimodal/mistral3.py).
        self.pixtral = architecture(self.config) in MISTRAL3_ARCHITECTURES
        # LLaVA-NeXT, LLaVA-OneVision: tiles of the image at its best-fit resolution, placeholders
        # by its size (OneVision: a prompt's several images one tile each, multimodal/llava_onevision.py).
        self.onevision = architecture(self.config) in LLAVA_ONEVISION_ARCHITECTURES
        self.anyres = self.onevision or architecture(self.config) in LLAVA_NEXT_ARCHITECTURES
        if self.anyres and [list(p) for p in self.hf.image_grid_pinpoints] != [
                list(p) for p in self.config.image_grid_pinpoints]:
            raise ValueError("the image processor's image_grid_pinpoints differ from the model's config.json.")
        # InternVL: each image's tiles (a thumbnail after them), wrapped in <img> ... </img>.
        self.internvl = architecture(self.config) in INTERNVL_ARCHITECTURES
        self.processor_kwargs = dict(processor_kwargs or {})
        if self.internvl:
            from pagedserve.multimodal.internvl import check_tile_size

            check_tile_size(self.config, self.hf)
        self.tokenizer = tokenizer
        if (self.gemma3 or self.pixtral or self.internvl or self.llama4) and tokenizer is None:
            raise ValueError(f"{architecture(self.config)}'s images need the tokenizer to expand their placeholders.")
        # Gemma 3's pan-and-scan settings (multimodal/gemma3.py): none unless do_pan_and_scan.
        self.pan_and_scan: dict = {}
        if self.gemma3:
            from pagedserve.multimodal.gemma3 import pan_and_scan_kwargs

            self.pan_and_scan = pan_and_scan_kwargs(self.hf)
        self.image_start = self.image_end = -1  # InternVL's <img> and </img>, Gemma 4's <start/end_of_image>
        if self.internvl:
            from pagedserve.multimodal.internvl import image_marker_ids

            self.image_start, self.image_end = image_marker_ids(tokenizer)
        if self.gemma4:
            self.image_start, self.image_end = int(self.config.boi_token_id), int(self.config.eoi_token_id)
        self.llama4_marks: dict[str, int] = {}  # Llama 4's <|image|>, <|image_start|>, separators ...
        if self.llama4:
            from pagedserve.multimodal.llama4 import marker_ids

            self.llama4_marks = marker_ids(tokenizer)

    def _pixels(self, images: list, field: str) -> list[tuple[torch.Tensor, Any, Optional[tuple[int, int, int]]]]:
        """(pixel values, placeholder tokens (Mistral 3: the resized (height, width)), patch
        grid) of each image."""
        kwargs = {}
        if self.pixtral:  # images resized to whole merged patches, as PixtralProcessor asks
            kwargs["patch_size"] = self.config.vision_config.patch_size * self.config.spatial_merge_size
        if self.internvl:  # InternVLProcessor tiles images whatever preprocessor_config.json says
            from pagedserve.multimodal.internvl import crop_to_patches

            kwargs["crop_to_patches"] = crop_to_patches(self.processor_kwargs)
        pil = [load_image(im, field).convert("RGB") for im in images]
        if self.gemma4:
            from pagedserve.multimodal.gemma4 import prepare_images

            return prepare_images(self.hf, pil)
        alone = len(pil) == 1
        if self.onevision and not alone:  # grouped as one prompt's: each image padded square, not tiled
            pil = [pil]
        out = self.hf(images=pil, return_tensors="pt", **kwargs)
        if self.pixtral:  # each image at its own size (padded to the largest in the batch: cropped back)
            return [(p[:, :h, :w], (int(h), int(w)), None) for p, (h, w) in zip(out["pixel_values"], out["image_sizes"])]
        if self.anyres:  # each image's tiles (padded to the most in the batch: cut back), by its size
            from pagedserve.multimodal.llava_next import num_image_tokens, num_tiles

            sizes = [(int(h), int(w)) for h, w in out["image_sizes"]]
            if self.onevision:
                from pagedserve.multimodal.llava_onevision import prepared_image

                return [prepared_image(self.config, p, hw, alone) for p, hw in zip(out["pixel_values"], sizes)]
            return [(p[:num_tiles(self.config, *hw)], num_image_tokens(self.config, *hw), hw)
                    for p, hw in zip(out["pixel_values"], sizes)]
        if self.internvl:  # every image's tiles in one tensor; num_patches says how many are each one's
            from pagedserve.multimodal.internvl import tokens_per_tile

            tiles = [int(n) for n in out["num_patches"]]
            per_tile = tokens_per_tile(self.config)
            return [(p, per_tile * n, None) for p, n in zip(out["pixel_values"].split(tiles), tiles)]
        if not self.qwen_vl:
            pixels = out["pixel_values"]
            n = tokens_per_image(self.config, *pixels.shape[-2:])
            return [(p, n, None) for p in pixels]
        # Every image's patches in one [sum of t*h*w, dim] tensor; its grid says how many are its own.
        merge = self.config.vision_config.spatial_merge_size
        grids = [tuple(int(v) for v in g) for g in out["image_grid_thw"]]
        sizes = [t * h * w for t, h, w in grids]
        return [(p, size // merge**2, g) for p, size, g in zip(out["pixel_values"].split(sizes), sizes, grids)]

    def process(self, ids: list[int], images: Any,
                field: str = "multi_modal_data") -> tuple[list[int], list[ImageFeature]]:
        images = images if isinstance(images, (list, tuple)) else [images]
        if len(images) > self.max_images:
            raise ParamError(field, f"at most {self.max_images} images a prompt are accepted (limit_mm_per_prompt), "
                             f"got {len(images)}.")
        prepared = None
        if self.gemma3:  # each image's crops (pan-and-scan) decide the text it becomes
            from pagedserve.multimodal.gemma3 import expand_image_markers, prepare_images

            pil = [load_image(im, field).convert("RGB") for im in images]
            prepared, crops = prepare_images(self.hf, self.config, pil, self.pan_and_scan)
            ids = expand_image_markers(ids, self.tokenizer, self.config, crops)
        if self.pixtral:
            return self._process_pixtral(ids, list(images), field)
        if self.llama4:
            from pagedserve.multimodal.llama4 import expand_prompt

            pil = [load_image(im, field) for im in images]
            return expand_prompt(ids, self.hf(pil), self.config, self.llama4_marks, field)
        video = getattr(self.config, "video_token_index", None) if self.onevision else None
        if video is not None and video in ids:
            raise ParamError("prompt", f"the prompt has a video placeholder (token {video}): videos are not "
                             "supported, only images.")
        runs = placeholder_runs(ids, self.token_id)
        if not images:
            if runs:
                raise ParamError(field, f"the prompt has image placeholders (token {self.token_id}) but no images.")
            return ids, []
        prepared = prepared if prepared is not None else self._pixels(list(images), field)
        counts = _images_per_run([length for _, length in runs], [n for _, n, _ in prepared])
        if counts is None:
            sizes = sorted({n for _, n, _ in prepared})
            raise ParamError(field, f"the prompt has {len(runs)} runs of image placeholder tokens for {len(images)} "
                             f"images: write one placeholder per image (each becomes as many tokens as the "
                             f"encoder gives it: {', '.join(map(str, sizes))} here).")
        out: list[int] = []
        features: list[ImageFeature] = []
        at = 0
        k = 0
        for (start, length), count in zip(runs, counts):
            out += ids[at:start]
            # InternVL: an image's one placeholder becomes <img> run </img> (the two are text tokens)
            wrap = (self.internvl or self.gemma4) and self._lone_marker(ids, start, length, prepared[k][1])
            for pixels, n, grid in prepared[k:k + count]:
                size = grid if self.anyres else None  # LLaVA-NeXT's third item: the image's size
                grid = None if self.anyres else grid
                out += [self.image_start] if wrap else []
                features.append(ImageFeature(len(out), n, pixels, ImageFeature.pixel_hash(pixels, grid or size), grid,
                                             image_size=size))
                out += [self.token_id] * n
                out += [self.image_end] if wrap else []
            k += count
            at = start + length
        out += ids[at:]
        return out, features

    def _lone_marker(self, ids: list[int], start: int, length: int, n: int) -> bool:
        """Whether a run of placeholders (InternVL's <IMG_CONTEXT>, Gemma 4's <|image|>) is an
        image's one placeholder (to wrap in <img> ... </img>, <start_of_image> ... <end_of_image>)
        rather than the image written out already: one token, unless the image is one token and
        the run already stands between <img> and </img>."""
        if length != 1:
            return False
        written = 0 < start and start + 1 < len(ids) and (ids[start - 1], ids[start + 1]) == (
            self.image_start, self.image_end)
        return n != 1 or not written

    def _process_pixtral(self, ids: list[int], images: list, field: str) -> tuple[list[int], list[ImageFeature]]:
        from pagedserve.multimodal.mistral3 import expand_images, image_layout

        brk, end = self.tokenizer.convert_tokens_to_ids(["[IMG_BREAK]", "[IMG_END]"])
        prepared = self._pixels(images, field) if images else []
        step = self.config.vision_config.patch_size * self.config.spatial_merge_size
        layouts = [image_layout(h // step, w // step, self.token_id, brk, end) for _, (h, w), _ in prepared]
        out, starts = expand_images(ids, layouts, self.token_id, brk, end, field)
        features = []
        for (pixels, _, _), start, layout in zip(prepared, starts, layouts):
            rows = tuple(i for i, t in enumerate(layout) if t == self.token_id)
            features.append(ImageFeature(start, len(layout), pixels, ImageFeature.pixel_hash(pixels), embed_rows=rows))
        return out, features


def _images_per_run(runs: list[int], sizes: list[int]) -> Optional[list[int]]:
    """How many images each run of placeholders stands for: one placeholder is one image; a
    longer run is images already expanded, whose sizes must add up to it exactly. None if
    the runs and the images do not fit."""
    counts: list[int] = []
    k = 0
    for length in runs:
        if length == 1 and k < len(sizes) and sizes[k] != 1:
            counts.append(1)
            k += 1
            continue
        total, start = 0, k
        while total < length and k < len(sizes):
            total += sizes[k]
            k += 1
        if total != length or k == start:
            return None
        counts.append(k - start)
    return counts if k == len(sizes) else None


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
