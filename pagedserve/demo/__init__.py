"""The built-in demo model: a tiny Llama-shaped model trained on CPython's documentation
(pagedserve/demo/train.py), shipped with the package so that pagedserve produces readable
text on a machine that cannot download anything."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("pagedserve")

_DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
# Its draft model for speculative decoding: one layer, hidden 128 (0.7M parameters), the same
# tokenizer and corpus, distilled from the demo model (20 minutes on one core):
# `python -m pagedserve.demo.train --out pagedserve/demo/draft --hidden-size 128
# --intermediate-size 384 --num-layers 1 --steps 800 --teacher pagedserve/demo/model --distill 0.8`.
# Distillation makes more of its drafts stand (greedy, k=2: about 45% against 34% trained on the text alone).
_DRAFT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "draft")


def demo_model_path() -> str:
    """The directory of the demo model that ships with pagedserve."""
    if not os.path.isfile(os.path.join(_DEMO_DIR, "config.json")):
        raise ValueError(f"the demo model is missing from {_DEMO_DIR} (a broken install?); pass a model "
                         "directory, or rebuild it with `python -m pagedserve.demo.train --out "
                         f"{_DEMO_DIR}`.")
    return _DEMO_DIR


def demo_draft_path() -> str:
    """The demo model's draft model (speculative_config={"model": demo_draft_path(), ...})."""
    if not os.path.isfile(os.path.join(_DRAFT_DIR, "config.json")):
        raise ValueError(f"the demo draft model is missing from {_DRAFT_DIR} (a broken install?).")
    return _DRAFT_DIR


def resolve_model(model: str | None) -> str:
    """`model` when given, else the demo model (saying so in the log)."""
    if model is not None:
        return model
    path = demo_model_path()
    logger.info("no model given: using the built-in demo model at %s (a tiny model trained on "
                "Python's documentation; pass a model directory to use another)", path)
    return path
