"""InternVL's images, in the Hugging Face format (InternVL3 / InternVL3.5 "-hf": the
InternVLForConditionalGeneration architecture). The GotOcr2 image processor cuts an image
into 1..max_patches tiles on the grid closest to its aspect ratio, plus a thumbnail of the
whole when there is more than one; each tile goes through the InternViT tower on its own, its
patches are pixel-shuffled (2x2 into one at downsample_ratio 0.5) and projected, so a tile
gives image_seq_length embeddings (256 for 448-pixel tiles) and an image its tiles' in order.
As InternVLProcessor writes it, an image is `<img>` + `<IMG_CONTEXT>` x (tiles x
image_seq_length) + `</img>`: the encoder's rows fill the <IMG_CONTEXT> run only. The tower,
pixel shuffle and projector are transformers' own (InternVLModel.get_image_features' path)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from pagedserve.multimodal.inputs import ImageFeature
from pagedserve.multimodal.llava import LlavaImageEncoder


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def tokens_per_tile(cfg: Any) -> int:
    """A tile's embeddings: its patches after the pixel shuffle (InternVLProcessor's image_seq_length)."""
    (h, w), (ph, pw) = _pair(cfg.vision_config.image_size), _pair(cfg.vision_config.patch_size)
    return int(round((h // ph) * (w // pw) * cfg.downsample_ratio ** 2))


def crop_to_patches(processor_kwargs: Optional[dict]) -> bool:
    """Whether images are tiled: InternVLProcessor asks for it unless told otherwise (hub
    checkpoints' preprocessor_config.json says false)."""
    return bool((processor_kwargs or {}).get("crop_to_patches", True))


def max_tiles(hf: Any, processor_kwargs: Optional[dict]) -> int:
    """The most tiles the image processor makes of an image: max_patches and the thumbnail."""
    n = int(hf.max_patches)
    return n + 1 if crop_to_patches(processor_kwargs) and n > 1 else 1


def check_tile_size(cfg: Any, hf: Any) -> None:
    """The image processor's tiles must be the tower's size (the pixel shuffle needs its grid)."""
    size = hf.size
    get = size.get if hasattr(size, "get") else lambda k: getattr(size, k, None)
    tile = (get("height"), get("width"))
    if tile != _pair(cfg.vision_config.image_size):
        raise ValueError(f"the image processor's tiles are {tile}, the vision tower takes "
                         f"{_pair(cfg.vision_config.image_size)}: they must be the same.")


def image_marker_ids(tokenizer: Any) -> tuple[int, int]:
    """The ids of <img> and </img> (the tokenizer's start_image_token / end_image_token, as
    InternVL tokenizers name them)."""
    ids = []
    for name, default in (("start_image_token", "<img>"), ("end_image_token", "</img>")):
        token = getattr(tokenizer, name, None) or default
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"the tokenizer has no {token!r} token: InternVL's images need it.")
        ids.append(int(tid))
    return ids[0], ids[1]


class InternVLImageEncoder(LlavaImageEncoder):
    """The InternViT tower and InternVL's projector (loaded as LLaVA's are: the same checkpoint names)."""

    def __init__(self, cfg: Any) -> None:
        nn.Module.__init__(self)
        from transformers import AutoModel
        from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

        self.config = cfg
        self.vision_tower = AutoModel.from_config(cfg.vision_config)
        self.multi_modal_projector = InternVLMultiModalProjector(cfg)
        self.max_tiles = 1  # the image processor's, set at load

    @classmethod
    def load(cls, cfg: Any, model_dir: str, dtype: torch.dtype, device: torch.device,
             processor_kwargs: Optional[dict] = None) -> "InternVLImageEncoder":
        from pagedserve.multimodal.processor import load_image_processor

        enc = super().load(cfg, model_dir, dtype, device)
        enc.max_tiles = max_tiles(load_image_processor(model_dir, processor_kwargs or {}), processor_kwargs)
        return enc

    def encode(self, features: Sequence[ImageFeature]) -> list[torch.Tensor]:
        """The images' tiles through the tower, at most the largest image's tiles a pass (the
        activations the KV profile measured); an image's rows are its tiles' in order."""
        param = next(self.parameters())
        tiles = torch.cat([f.pixel_values for f in features]).to(param.device, param.dtype)
        rows = torch.cat([self(chunk).flatten(0, 1) for chunk in tiles.split(max(self.max_tiles, 1))])
        return list(rows.split([f.length for f in features]))

    def profile_features(self, max_tokens: int) -> list[ImageFeature]:
        """The image with the most tiles (max_patches and the thumbnail)."""
        h, w = _pair(self.config.vision_config.image_size)
        n = self.max_tiles
        return [ImageFeature(0, n * tokens_per_tile(self.config), torch.zeros(n, 3, h, w), "profile")]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, H, W] -> [tiles, tokens a tile, text hidden size], as transformers'
        InternVLModel.get_image_features."""
        from transformers.models.internvl.modeling_internvl import InternVLModel

        cfg = self.config
        layer = cfg.vision_feature_layer
        out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=layer != -1, return_dict=True)
        features = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        if cfg.vision_feature_select_strategy == "default":  # the class token dropped
            features = features[:, 1:]
        n, patches, dim = features.shape
        side = int(patches ** 0.5)
        # Its `self` is not used: the shuffle is transformers' as it is.
        features = InternVLModel.pixel_shuffle(self, features.reshape(n, side, side, dim),
                                               scale_factor=cfg.downsample_ratio)
        return self.multi_modal_projector(features.reshape(n, -1, features.shape[-1]))
