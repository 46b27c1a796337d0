"""Build a model from a Hugging Face directory: class from config.json, weights from
*.safetensors, no random initialisation (parameters are created on the meta device)."""

from __future__ import annotations

import glob
import os
from typing import Any, Iterator, Optional

import torch
from torch import nn

from pagedserve.model.registry import checkpoint_names, resolve_model_class


def iterate_safetensors(model_dir: str, dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"model directory {model_dir!r} has no *.safetensors weight files "
                         "(pytorch_model.bin checkpoints are not supported; convert them with safetensors).")
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    yield name, (t.to(dtype) if t.is_floating_point() else t).to(device)
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"could not read weight file {path}: {e}") from e


def _base_model_weights(weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A pooling model's weights: no LM head, and names of a base-model checkpoint (saved
    from e.g. Qwen3Model: "layers.0...") put under "model." as the causal-LM class has them
    (a classifier's "score" head stays where it is)."""
    for name, tensor in weights:
        if name.startswith("lm_head."):
            continue
        yield (name if name.startswith(("model.", "score.")) else "model." + name), tensor


def _text_model_weights(weights: Iterator[tuple[str, torch.Tensor]], renamed: list[tuple[str, str]],
                        skipped: tuple[str, ...]) -> Iterator[tuple[str, torch.Tensor]]:
    """A vision-language checkpoint's language-model weights, under the text model's names."""
    for name, tensor in weights:
        if name.startswith(skipped):
            continue
        for piece, ours in renamed:
            if name.startswith(piece):
                name = ours + name[len(piece):]
                break
        yield name, tensor


def _head_from_tokens(model: nn.Module, token_ids: list[int]) -> None:
    """A classifier head from LM-head rows (vLLM's classifier_from_token): two tokens
    [negative, positive] give one label whose logit is their logit difference, so its sigmoid
    is the 2-way softmax's positive side (Qwen3-Reranker's score); more give one label each."""
    rows = model.lm_head.weight.detach()[token_ids]
    weight = (rows[1] - rows[0])[None] if len(token_ids) == 2 else rows
    model.score = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        model.score.weight.copy_(weight)
    model.lm_head = None  # (with tied embeddings, the embedding table stays)
    model.tie_word_embeddings = False


def load_model(model_dir: str, hf_config: Any, dtype: torch.dtype, device: torch.device, max_positions: int,
               pooling: bool = False, classify: bool = False,
               classifier_token_ids: Optional[list[int]] = None) -> nn.Module:
    """pooling: an embedding model, built without its LM head; classify: a sequence
    classifier, with its `score` head (hidden -> num_labels) instead. classifier_token_ids:
    a causal-LM checkpoint classified on those tokens' logits (see _head_from_tokens)."""
    from_tokens = classifier_token_ids is not None
    if from_tokens:  # loaded whole, LM head included; the head is made from it afterwards
        pooling = classify = False
    cls = resolve_model_class(hf_config)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(hf_config, max_positions)
    finally:
        torch.set_default_dtype(old_dtype)
    encoder = getattr(cls, "encoder_only", False)  # builds its own head, loads its own names
    if pooling:
        model.lm_head = None
        model.tie_word_embeddings = False
    if classify and not encoder:
        with torch.device("meta"):
            model.score = nn.Linear(hf_config.hidden_size, hf_config.num_labels, bias=False, dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()
    for m in model.modules():
        if hasattr(m, "rebuild_buffers"):
            m.rebuild_buffers(device)
    weights = iterate_safetensors(model_dir, dtype, device)
    renamed, skipped = checkpoint_names(hf_config)
    if renamed:
        weights = _text_model_weights(weights, renamed, skipped)
    model.load_weights(_base_model_weights(weights) if pooling and not encoder else weights)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"weight {name} holds NaN or infinite values")
    if from_tokens:
        _head_from_tokens(model, classifier_token_ids)
    return model.eval().requires_grad_(False)
