"""A LLaVA-NeXT-style checkpoint (the builder's, with the hub's names) rewritten with
transformers 5's module names, for the tests that both layouts load the same model."""

from __future__ import annotations

import glob
import os
import shutil


def write_transformers5_names(src_dir: str, dst_dir: str) -> None:
    """Copy `src_dir` to `dst_dir` with its weights renamed: 'image_newline' and the projector
    under 'model.', the language model under 'model.language_model.', 'lm_head' at the top and
    the tower under 'model.vision_tower.vision_model.'."""
    from safetensors.torch import load_file, save_file

    (src,) = glob.glob(os.path.join(src_dir, "*.safetensors"))
    state = load_file(src)
    assert "image_newline" in state and "language_model.lm_head.weight" in state
    moved = {}
    for k, v in state.items():
        if k.startswith("vision_tower."):
            k = "model.vision_tower.vision_model." + k[len("vision_tower."):]
        elif k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model."):]
        elif k.startswith("language_model.lm_head."):
            k = k[len("language_model."):]
        else:
            k = "model." + k
        moved[k] = v
    assert "model.image_newline" in moved
    os.makedirs(dst_dir, exist_ok=True)
    for f in os.listdir(src_dir):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(src_dir, f), os.path.join(dst_dir, f))
    save_file(moved, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
