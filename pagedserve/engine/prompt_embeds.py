"""vLLM's EmbedsPrompt: a prompt given as its input embeddings, {"prompt_embeds": tensor
[n, hidden]} offline or a base64 `torch.save` of one in /v1/completions' `prompt_embeds`
(--enable-prompt-embeds). The embeddings replace the embedding layer's lookup, as
transformers' `model(inputs_embeds=...)` takes them. They ride the image path: each block's
worth is a precomputed feature (no encoder runs) whose hash keys the prefix cache, so equal
embedding prefixes share KV blocks as equal token prefixes do."""

from __future__ import annotations

import base64
import binascii
import inspect
import io
from typing import Any

import torch
from torch import nn

from pagedserve.errors import ParamError
from pagedserve.multimodal.inputs import ImageFeature

FIELD = "prompt_embeds"
PLACEHOLDER_ID = 0  # the token id that stands in the prompt for each embedding (never looked up)
MAX_EMBEDS_BYTES = 256 << 20  # a base64 tensor larger than this is refused before it is decoded


def model_takes_prompt_embeds(model: nn.Module) -> bool:
    """Decoders that take `inputs_embeds` as transformers' do: as given, in place of what
    their embedding layer would give (LlamaModel and the families built on it; the Gemma
    families, whose embedding layer scales by sqrt(hidden) in transformers too, so a prompt
    made with `get_input_embeddings()` is already scaled and goes in as it is)."""
    from pagedserve.model.gemma import GemmaModel
    from pagedserve.model.llama import LlamaModel

    return (type(getattr(model, "model", None)) in (LlamaModel, GemmaModel)
            and "inputs_embeds" in inspect.signature(model.forward).parameters)


def embeds_features(value: Any, hidden_size: int, block_size: int) -> list[ImageFeature]:
    """The prompt's embeddings checked ([n, hidden] or [1, n, hidden], floating, finite) and
    cut into one feature per KV block."""
    if not isinstance(value, torch.Tensor):
        raise ParamError(FIELD, f"prompt_embeds must be a torch.Tensor, got {type(value).__name__}.")
    t = value.detach()
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] != hidden_size:
        raise ParamError(FIELD, f"prompt_embeds must have shape [tokens, {hidden_size}] (the model's hidden size), "
                         f"got {list(value.shape)}.")
    if not t.is_floating_point() or t.dtype == torch.float8_e4m3fn:
        raise ParamError(FIELD, f"prompt_embeds must be float32, float16 or bfloat16, got {t.dtype}.")
    t = t.to("cpu", torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise ParamError(FIELD, "prompt_embeds holds NaN or infinite values.")
    return [ImageFeature(start, len(chunk), chunk, ImageFeature.pixel_hash(chunk, (start,)), precomputed=True)
            for start, chunk in zip(range(0, len(t), block_size), t.split(block_size))]


def decode_base64_embeds(data: str) -> torch.Tensor:
    """A base64 string of `torch.save(tensor)`, loaded without unpickling code (weights_only)."""
    if not isinstance(data, str) or len(data) > MAX_EMBEDS_BYTES * 4 // 3 + 4:
        raise ParamError(FIELD, f"prompt_embeds must be base64 strings of at most {MAX_EMBEDS_BYTES >> 20} MB.")
    try:
        raw = base64.b64decode(data, validate=True)
        t = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (binascii.Error, ValueError):
        raise ParamError(FIELD, "prompt_embeds is not valid base64.") from None
    except Exception as e:  # torch.load raises many types for data that is not a saved tensor
        raise ParamError(FIELD, f"prompt_embeds is not a torch.save()d tensor: {type(e).__name__}.") from None
    if not isinstance(t, torch.Tensor):
        raise ParamError(FIELD, f"prompt_embeds must hold a tensor, got {type(t).__name__}.")
    return t
