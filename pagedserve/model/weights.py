"""Checkpoint tensors into parameters, with the errors every model's load_weights gives: a
tensor with no place, a shape that does not fit, weights the checkpoint lacks (only while
the loader loads a whole checkpoint: called directly, as an RL trainer updating some weights
does, a model's load_weights takes any subset, as vLLM's does)."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn


def copy_into(params: dict[str, nn.Parameter], ours: str, tensor: torch.Tensor, name: str, model: str) -> None:
    """The checkpoint tensor `name` into our parameter `ours`."""
    if ours not in params:
        raise ValueError(f"checkpoint tensor {name!r} has no place in {model}")
    param = params[ours]
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)


_WHOLE_CHECKPOINT = contextvars.ContextVar("pagedserve_whole_checkpoint", default=False)


@contextlib.contextmanager
def whole_checkpoint() -> Iterator[None]:
    """Within it, load_weights must be given every weight of the model (check_complete)."""
    token = _WHOLE_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _WHOLE_CHECKPOINT.reset(token)


def base_prefixed(name: str, prefix: str = "transformer.") -> str:
    """A checkpoint tensor's name with the base model's prefix that transformers' *ForCausalLM
    gives it: hub checkpoints of GPT-2 and BLOOM name the base model's tensors without it."""
    return name if name.startswith((prefix, "lm_head.")) else prefix + name


def load_by_name(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 our_name: Callable[[str], Optional[str]]) -> None:
    """Copy each checkpoint tensor into the parameter `our_name` gives it (None: a tensor the
    model does not use); every parameter must be covered (the encoders' loading)."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        ours = our_name(name)
        if ours is None:
            continue
        copy_into(params, ours, tensor, name, type(model).__name__)
        loaded.add(ours)
    check_complete(list(set(params) - loaded))


def check_complete(missing: Sequence[str]) -> None:
    if missing and _WHOLE_CHECKPOINT.get():
        missing = sorted(missing)
        raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:10])}"
                         + (" ..." if len(missing) > 10 else ""))


def load_shared_perm(param: nn.Parameter, tensor: torch.Tensor, name: str, seen: bool) -> None:
    """A fused layer's input-row order (GPTQ act order, layers/int_quant.py), which its shards
    share since they share their input: the first shard sets it, the others must agree."""
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
    if seen:
        if not torch.equal(param.to(tensor.device), tensor):
            raise ValueError(f"{name}: the fused shards' act orders (g_idx) differ; they must share one.")
        return
    with torch.no_grad():
        param.copy_(tensor)
