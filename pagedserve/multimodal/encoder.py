"""The vision encoder of a vision-language checkpoint, by architecture."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from pagedserve.multimodal.processor import (GEMMA3_ARCHITECTURES, GEMMA4_ARCHITECTURES, INTERNVL_ARCHITECTURES,
                                             LLAMA4_ARCHITECTURES, LLAVA_ARCHITECTURES, LLAVA_NEXT_ARCHITECTURES,
                                             LLAVA_ONEVISION_ARCHITECTURES, MISTRAL3_ARCHITECTURES, architecture,
                                             load_full_config, load_image_processor)


def build_in(cls: type, cfg: Any, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """cls(cfg) with its parameters made in `dtype` on `device` (transformers' modules take
    the default dtype), before the checkpoint's weights are copied in."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(cfg)
    finally:
        torch.set_default_dtype(old)


def load_vision_weights(enc: nn.Module, model_dir: str, dtype: torch.dtype, device: torch.device,
                        prefixes: tuple[str, ...], what: str) -> None:
    """Copy the checkpoint's tensors under `prefixes` into `enc`, named without a leading
    "model." (hub checkpoints name them bare, transformers 5 under "model."); every one must
    fit and every parameter be covered, else a ValueError naming `what`."""
    from pagedserve.model.loader import iterate_safetensors

    state = {name.removeprefix("model."): t for name, t in
             iterate_safetensors(model_dir, dtype, device, keep=lambda n: n.startswith(prefixes))}
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the checkpoint's vision weights do not fit {what}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")


def load_image_encoder(model_dir: str, dtype: torch.dtype, device: torch.device,
                       processor_kwargs: Optional[dict] = None) -> nn.Module:
    """The encoder module: `encode(features)` -> each image's embeddings, `profile_features(n)`
    -> the largest image's (for KV sizing), `rope_positions(num_prompt, features)` -> M-RoPE
    positions or None; `bidirectional` where an image's tokens attend to each other both ways."""
    cfg = load_full_config(model_dir)
    if architecture(cfg) in GEMMA3_ARCHITECTURES:
        from pagedserve.multimodal.gemma3 import Gemma3ImageEncoder

        from pagedserve.multimodal.gemma3 import images_per_image

        enc = Gemma3ImageEncoder.load(cfg, model_dir, dtype, device)
        enc.images_per_image = images_per_image(model_dir, processor_kwargs)  # pan-and-scan's crops
        return enc
    if architecture(cfg) in GEMMA4_ARCHITECTURES:
        from pagedserve.multimodal.gemma4 import Gemma4ImageEncoder

        return Gemma4ImageEncoder.load(cfg, model_dir, dtype, device,
                                       load_image_processor(model_dir, processor_kwargs or {}))
    if architecture(cfg) in LLAMA4_ARCHITECTURES:
        from pagedserve.multimodal.llama4 import Llama4ImageEncoder

        return Llama4ImageEncoder.load(cfg, model_dir, dtype, device, processor_kwargs)
    if architecture(cfg) in MISTRAL3_ARCHITECTURES:
        from pagedserve.multimodal.mistral3 import Mistral3ImageEncoder

        return Mistral3ImageEncoder.load(cfg, model_dir, dtype, device)
    if architecture(cfg) in INTERNVL_ARCHITECTURES:
        from pagedserve.multimodal.internvl import InternVLImageEncoder

        return InternVLImageEncoder.load(cfg, model_dir, dtype, device, processor_kwargs)
    if architecture(cfg) in LLAVA_NEXT_ARCHITECTURES:
        from pagedserve.multimodal.llava_next import LlavaNextImageEncoder

        return LlavaNextImageEncoder.load(cfg, model_dir, dtype, device)
    if architecture(cfg) in LLAVA_ONEVISION_ARCHITECTURES:
        from pagedserve.multimodal.llava_onevision import LlavaOnevisionImageEncoder

        return LlavaOnevisionImageEncoder.load(cfg, model_dir, dtype, device)
    if architecture(cfg) in LLAVA_ARCHITECTURES:
        from pagedserve.multimodal.llava import LlavaImageEncoder

        return LlavaImageEncoder.load(cfg, model_dir, dtype, device)
    from pagedserve.multimodal.qwen2_vl import Qwen2VLImageEncoder

    return Qwen2VLImageEncoder.load(cfg, model_dir, dtype, device, processor_kwargs)
