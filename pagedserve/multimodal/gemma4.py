"""Gemma 4's image path: each image keeps its aspect ratio, resized to at most max_soft_tokens x
pooling_kernel_size^2 patches (transformers' Gemma4ImageProcessor), the patches padded to
that count with their (x, y) positions; the vision tower (transformers' Gemma4VisionModel:
2-D position embeddings, axial RoPE) pools each kernel x kernel square of patches to one
row, and `embed_vision` projects the rows into the decoder. In the prompt an image's one
`<|image|>` token becomes `<start_of_image>` + a row's token each + `<end_of_image>`
(Gemma4Processor), and with `use_bidirectional_attention: "vision"` an image's tokens attend
to each other both ways in the decoder (AttentionMetadata.kv_limit)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from pagedserve.multimodal.inputs import ImageFeature

VISION_PREFIXES = ("model.vision_tower.", "model.embed_vision.")


def prepare_images(hf: Any, images: list) -> list[tuple[torch.Tensor, int, None]]:
    """(patches with their positions, soft tokens, None) of each image: the patches [max patches,
    3 * patch^2] and the (x, y) positions (-1: padding) as two more float32 columns, exact, so
    that one tensor carries the image (and its prefix-cache hash covers both)."""
    if not images:
        return []
    out = hf(images=images, return_tensors="pt")
    return [(torch.cat([p.float(), pos.float()], dim=-1), int(n), None)
            for p, pos, n in zip(out["pixel_values"], out["image_position_ids"], out["num_soft_tokens_per_image"])]


def split_patches(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., patches, 3 * patch^2 + 2] -> (pixel values, (x, y) positions as int64)."""
    return pixels[..., :-2], pixels[..., -2:].round().long()


class Gemma4ImageEncoder(nn.Module):
    def __init__(self, cfg: Any) -> None:
        from transformers import AutoModel
        from transformers.models.gemma4.modeling_gemma4 import Gemma4MultimodalEmbedder

        super().__init__()
        self.config = cfg
        self.vision_tower = AutoModel.from_config(cfg.vision_config)
        self.embed_vision = Gemma4MultimodalEmbedder(cfg.vision_config, cfg.text_config)
        # An image's tokens attend to each other both ways (the larger models).
        self.bidirectional = getattr(cfg.text_config, "use_bidirectional_attention", None) == "vision"
        self.max_soft_tokens = 280  # the image processor's, set by load()

    @classmethod
    def load(cls, cfg: Any, model_dir: str, dtype: torch.dtype, device: torch.device,
             hf_processor: Any) -> "Gemma4ImageEncoder":
        from pagedserve.multimodal.encoder import build_in, load_vision_weights

        enc = build_in(cls, cfg, dtype, device)
        enc.max_soft_tokens = int(hf_processor.max_soft_tokens)
        load_vision_weights(enc, model_dir, dtype, device, VISION_PREFIXES, "Gemma 4's tower")
        return enc.eval().requires_grad_(False)

    def encode(self, features: Sequence[ImageFeature]) -> list[torch.Tensor]:
        """Each image's embeddings [its soft tokens, text hidden size]; every image's patches are
        padded to the same count, so one pass takes them all."""
        if not features:
            return []
        param = next(self.parameters())
        pixels, positions = split_patches(torch.stack([f.pixel_values for f in features]).to(param.device))
        rows = self.vision_tower(pixel_values=pixels.to(param.dtype), pixel_position_ids=positions).last_hidden_state
        rows = self.embed_vision(inputs_embeds=rows)  # (the images' valid rows, one after another)
        return list(rows.split([f.length for f in features]))

    def profile_features(self, max_tokens: int) -> list[ImageFeature]:
        """The largest square image the processor makes: side^2 rows, side^2 <= max_soft_tokens."""
        vc = self.config.vision_config
        k, patch = vc.pooling_kernel_size, vc.patch_size
        side = math.isqrt(self.max_soft_tokens)
        grid = torch.stack(torch.meshgrid(torch.arange(side * k), torch.arange(side * k), indexing="xy"), -1)
        positions = torch.full((self.max_soft_tokens * k * k, 2), -1.0)
        positions[: grid.numel() // 2] = grid.reshape(-1, 2).float()
        pixels = torch.cat([torch.zeros(positions.shape[0], 3 * patch * patch), positions], dim=-1)
        return [ImageFeature(0, side * side, pixels, "profile")]

    def rope_positions(self, num_prompt: int, features: Sequence[ImageFeature]) -> None:
        return None  # plain positions
