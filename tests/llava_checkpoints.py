"""A vision-language checkpoint from the random builders (the hub's names) rewritten with
transformers 5's module names, for the tests that both layouts load the same model."""

from __future__ import annotations

import glob
import os
import shutil


def write_transformers5_names(src_dir: str, dst_dir: str,
                              tower: str = "model.vision_tower.vision_model.") -> tuple[set[str], set[str]]:
    """Copy `src_dir` to `dst_dir` with its weights renamed: the language model under
    'model.language_model.', 'lm_head' at the top, the vision tower under `tower` (LLaVA's
    nests it under 'vision_model.'), anything else (projector, image_newline) under 'model.'.
    The weight names before and after."""
    from safetensors.torch import load_file, save_file

    (src,) = glob.glob(os.path.join(src_dir, "*.safetensors"))
    state = load_file(src)
    moved = {}
    for k, v in state.items():
        if k.startswith("vision_tower."):
            k = tower + k[len("vision_tower."):]
        elif k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model."):]
        elif k.startswith("language_model.lm_head."):
            k = k[len("language_model."):]
        else:
            k = "model." + k
        moved[k] = v
    os.makedirs(dst_dir, exist_ok=True)
    for f in os.listdir(src_dir):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(src_dir, f), os.path.join(dst_dir, f))
    save_file(moved, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
    return set(state), set(moved)
