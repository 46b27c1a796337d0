"""Weights changed in place while the engine runs: an RL trainer's new policy (vLLM's
`model.load_weights` and `collective_rpc`), or the checkpoint read again after sleep level 2
(vLLM's `reload_weights`). Copies go into the existing parameters, so CUDA graphs and
kernels that hold their addresses stay valid."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import nn

from pagedserve.model.loader import check_finite
from pagedserve.model.registry import checkpoint_names
from pagedserve.model.weights import whole_checkpoint


def update_weights(model: nn.Module, hf_config: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy (name, tensor) pairs, named as in the model's Hugging Face checkpoint (a trainer's
    `named_parameters()`), into the model; any subset. Returns how many were given. A
    quantized model is refused: its layers hold the checkpoint's quantized form, which a
    trainer's tensors are not."""
    if getattr(model, "quantized_checkpoint", False):
        raise ValueError("weight updates need a model served unquantized: this one's layers hold a "
                         "quantized checkpoint's (or quantization='fp8') weights.")
    _, vision = checkpoint_names(hf_config)
    given = 0

    def checked() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal given
        for name, tensor in weights:
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise ValueError(f"weights must be (name, tensor) pairs, got ({type(name).__name__}, "
                                 f"{type(tensor).__name__}).")
            if vision and name.startswith(vision):
                raise ValueError(f"{name!r}: only the language model's weights can be updated, not the "
                                 "vision tower's.")
            given += 1
            yield name, tensor

    model.load_weights(model.checkpoint_view(checked()))
    return given


def reload_weights(model: nn.Module) -> None:
    """Every weight again from the checkpoint on disk (as at start-up)."""
    source = getattr(model, "checkpoint_weights", None)
    if source is None:
        raise ValueError("this model's weights cannot be reloaded: they came from load_format='dummy', or its "
                         "classifier head was made from LM-head rows at load.")
    with whole_checkpoint():
        model.load_weights(source())
    check_finite(model)
