"""LLaVA's image path: the vision tower (transformers' own CLIP / SigLIP vision model), the
chosen hidden layer(s), and the two-layer projector into the language model's embeddings.
It runs once per image, outside the paged decoder, so the reference modules are used as they
are rather than rewritten."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from pagedserve.model.loader import iterate_safetensors
from pagedserve.model.registry import non_text_prefixes
from pagedserve.multimodal.inputs import ImageFeature
from pagedserve.multimodal.processor import tokens_per_image


class LlavaImageEncoder(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.config = cfg
        self.vision_tower = AutoModel.from_config(cfg.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(cfg)

    @classmethod
    def load(cls, cfg: Any, model_dir: str, dtype: torch.dtype, device: torch.device) -> "LlavaImageEncoder":
        from pagedserve.multimodal.encoder import build_in

        enc = build_in(cls, cfg, dtype, device)
        # The vision model's own names: "vision_model.embeddings..." (hub checkpoints, and the
        # module in transformers 4) or "embeddings..." (the module in transformers 5).
        nested = any(k.startswith("vision_tower.vision_model.") for k in enc.state_dict())
        state = {}
        # Only the weights the text model skips are read (transformers 5 puts them under
        # "model.", older checkpoints bare).
        pieces = non_text_prefixes(cfg.architectures[0])
        for name, tensor in iterate_safetensors(model_dir, dtype, device, keep=lambda n: n.startswith(pieces)):
            name = name.removeprefix("model.")
            if name.startswith("vision_tower."):
                rest = name[len("vision_tower."):].removeprefix("vision_model.")
                name = "vision_tower." + ("vision_model." if nested else "") + rest
            state[name] = tensor
        missing, unexpected = enc.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("position_ids")]  # a buffer some versions do not save
        if missing or unexpected:
            raise ValueError(f"the checkpoint's vision weights do not fit {cfg.vision_config.model_type}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}.")
        return enc.eval().requires_grad_(False)

    def encode(self, features: Sequence[ImageFeature]) -> list[torch.Tensor]:
        """Each image's embeddings [its placeholders, text hidden size]; one pass per image size."""
        param = next(self.parameters())
        out: dict[int, torch.Tensor] = {}
        by_shape: dict[tuple, list[int]] = {}
        for i, f in enumerate(features):
            by_shape.setdefault(tuple(f.pixel_values.shape), []).append(i)
        for group in by_shape.values():
            pixels = torch.stack([features[i].pixel_values for i in group]).to(param.device, param.dtype)
            out.update(zip(group, self(pixels)))
        return [out[i] for i in range(len(features))]

    def profile_features(self, max_tokens: int) -> list[ImageFeature]:
        """One image at the tower's size (every image is resized to it)."""
        size = self.config.vision_config.image_size
        n = tokens_per_image(self.config, size, size)
        return [ImageFeature(0, n, torch.zeros(3, size, size), "profile")]

    def rope_positions(self, num_prompt: int, features: Sequence[ImageFeature]) -> None:
        return None  # plain positions

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, tokens per image, text hidden size], as transformers'
        LlavaModel.get_image_features."""
        cfg = self.config
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = cfg.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        chosen = [out.hidden_states[i] for i in layers]
        if cfg.vision_feature_select_strategy == "default":
            chosen = [h[:, 1:] for h in chosen]
        return self.multi_modal_projector(torch.cat(chosen, dim=-1))
