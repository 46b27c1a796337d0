"""Build a model from a Hugging Face directory: class from config.json, weights from
*.safetensors, no random initialisation (parameters are created on the meta device)."""

from __future__ import annotations

import glob
import os
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from pagedserve.model.fp8_quantize import online_fp8_names, online_fp8_weights
from pagedserve.model.kv_scales import attach_kv_scales, split_kv_scales
from pagedserve.model.layers.fp8 import (FP8, Fp8Format, fp8_format, fp8_weights, install_fp8_linears,
                                         quantization_config, quantized_experts, quantized_modules,
                                         scaled_weight_names)
from pagedserve.model.layers.int_quant import (IntFormat, install_int_linears, int_format, int_quantized_stems,
                                               int_weights)
from pagedserve.model.layers.moe import KERNEL_ACTIVATIONS, FusedMoE
from pagedserve.model.layers import mxfp4
from pagedserve.model.layers.mxfp4 import Mxfp4Format
from pagedserve.model.registry import checkpoint_names, resolve_model_class
from pagedserve.model.weights import whole_checkpoint


def iterate_safetensors(model_dir: str, dtype: torch.dtype, device: torch.device, cast: bool = True,
                        keep: Optional[Callable[[str], bool]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint (those whose name `keep` accepts: the others are not
    read); floating ones in `dtype` unless not `cast` (FP8 checkpoints: layers/fp8.py casts
    what it does not keep)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"model directory {model_dir!r} has no *.safetensors weight files "
                         "(pytorch_model.bin checkpoints are not supported; convert them with safetensors).")
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if keep is not None and not keep(name):
                        continue
                    t = f.get_tensor(name)
                    yield name, (t.to(dtype) if cast and t.is_floating_point() else t).to(device)
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


def _checkpoint_keys(model_dir: str) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, framework="pt", device="cpu") as f:
            keys.extend(f.keys())
    return keys


def _int_compressed_tensors(q: dict) -> bool:
    return q.get("quant_method") == "compressed-tensors" and any(
        (g.get("weights") or {}).get("type") == "int" for g in (q.get("config_groups") or {}).values())


def checkpoint_quantization(hf_config: Any) -> Union[None, Fp8Format, IntFormat, Mxfp4Format]:
    """The checkpoint's weight quantization from config.json's quantization_config: None, FP8
    (layers/fp8.py), GPTQ / AWQ (layers/int_quant.py) or MXFP4 experts (layers/mxfp4.py); any
    other is a ValueError naming it."""
    q = quantization_config(hf_config)
    if q is not None and q.get("quant_method") == mxfp4.METHOD:
        return Mxfp4Format()
    if q is not None and (q.get("quant_method") in ("gptq", "awq") or _int_compressed_tensors(q)):
        return int_format(q)
    return fp8_format(hf_config)


def load_model(model_dir: str, hf_config: Any, dtype: torch.dtype, device: torch.device, max_positions: int,
               pooling: bool = False, classify: bool = False,
               classifier_token_ids: Optional[list[int]] = None, quant_kernels: bool = False,
               online_fp8: bool = False, dummy: bool = False, seed: int = 0) -> nn.Module:
    """pooling: an embedding model, built without its LM head; classify: a sequence
    classifier, with its `score` head (hidden -> num_labels) instead. classifier_token_ids:
    a causal-LM checkpoint classified on those tokens' logits (see _head_from_tokens).
    quant_kernels: a quantized checkpoint's linear layers stay quantized (FP8: Fp8Linear,
    GPTQ / AWQ: IntQuantLinear; the Triton backend); otherwise they are dequantized to `dtype`
    as they load (layers/fp8.py, layers/int_quant.py). online_fp8: an unquantized checkpoint's
    decoder linear layers quantized to FP8 per output row as they load (vLLM's
    quantization="fp8"), then run as an FP8 checkpoint's. dummy: no checkpoint is read, the
    weights are drawn uniformly from [-1e-3, 1e-3] (vLLM's load_format="dummy"), from `seed`."""
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
    fmt = checkpoint_quantization(hf_config)
    online_fp8 = online_fp8 and fmt is None and not getattr(cls, "encoder_only", False)
    if online_fp8:
        fmt = Fp8Format(None)
    renamed, skipped = checkpoint_names(hf_config)

    def checkpoint_view(weights: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """The checkpoint's names as this model's load_weights takes them."""
        if renamed:
            weights = _text_model_weights(weights, renamed, skipped)
        return _base_model_weights(weights) if pooling and not encoder else weights

    if pooling:
        model.lm_head = None
        model.tie_word_embeddings = False
    if classify and not encoder:
        with torch.device("meta"):
            model.score = nn.Linear(hf_config.hidden_size, hf_config.num_labels, bias=False, dtype=dtype)
    targets: dict[str, str] = {}  # checkpoint module -> ours, kept quantized
    if isinstance(fmt, Mxfp4Format):
        if not getattr(cls, "mxfp4_experts", False):
            raise ValueError(f"quantization_config.quant_method 'mxfp4' is supported for GPT-OSS's experts only, "
                             f"not {cls.__name__}.")
        if quant_kernels:  # (the loader's stream and the model's load_weights do the rest)
            for m in model.modules():
                if isinstance(m, FusedMoE) and m.activation in KERNEL_ACTIVATIONS:
                    m.to_mxfp4()
    elif fmt is not None and quant_kernels and not encoder:
        keys = _checkpoint_keys(model_dir)
        names = [n for n, _ in checkpoint_view((k, None) for k in (online_fp8_names(keys) if online_fp8 else keys))]
        if isinstance(fmt, IntFormat):
            stems = int_quantized_stems(names, fmt)
            # (experts with act order, each its own input order, are dequantized)
            targets = {**quantized_modules(stems, model), **({} if fmt.desc_act else quantized_experts(stems, model))}
            install_int_linears(model, targets.values(), fmt)
        else:
            stems = scaled_weight_names(names)
            targets = {**quantized_modules(stems, model), **quantized_experts(stems, model)}
            install_fp8_linears(model, targets.values(), fmt)
    model.to_empty(device=device)
    model.tie_weights()
    for m in model.modules():
        if hasattr(m, "rebuild_buffers"):
            m.rebuild_buffers(device)

    def checkpoint_weights() -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors, named and (de)quantized as load_weights takes them."""
        stream = iterate_safetensors(model_dir, dtype, device, cast=fmt is None or isinstance(fmt, Mxfp4Format))
        weights = split_kv_scales(checkpoint_view(online_fp8_weights(stream) if online_fp8 else stream), kv_scales)
        if isinstance(fmt, IntFormat):
            weights = int_weights(weights, fmt, dtype, keep=lambda stem: stem in targets)
        elif isinstance(fmt, Fp8Format):
            weights = fp8_weights(weights, fmt, dtype, keep=lambda stem: stem in targets)
        return weights

    kv_scales: dict[str, dict[str, float]] = {}  # FP8 KV-cache scales the checkpoint carries (kv_scales.py)
    if dummy:
        dummy_weights(model, seed)
    else:
        with whole_checkpoint():
            model.load_weights(checkpoint_weights())
        check_finite(model)
        attach_kv_scales(model, kv_scales)
    if from_tokens:
        _head_from_tokens(model, classifier_token_ids)
    # What weight updates (worker/weight_updates.py) need: the checkpoint again, its names.
    model.checkpoint_weights = None if from_tokens or dummy else checkpoint_weights
    model.checkpoint_view = checkpoint_view
    model.quantized_checkpoint = fmt is not None
    return model.eval().requires_grad_(False)


def build_empty(make: Callable[[], nn.Module], dtype: torch.dtype, device: torch.device) -> nn.Module:
    """make() built on the meta device in `dtype`, then given uninitialised storage on `device`
    (and its computed buffers rebuilt there): for the loader to fill."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            module = make()
    finally:
        torch.set_default_dtype(old)
    module.to_empty(device=device)
    for m in module.modules():
        if hasattr(m, "rebuild_buffers"):
            m.rebuild_buffers(device)
    return module


@torch.no_grad()
def dummy_weights(model: nn.Module, seed: int) -> None:
    """vLLM's dummy weights: every floating parameter uniform in [-1e-3, 1e-3]; tied ones once."""
    gens: dict[torch.device, torch.Generator] = {}
    for p in model.parameters():
        if p.is_floating_point():
            gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            p.uniform_(-1e-3, 1e-3, generator=gen)


def check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p if p.dtype != FP8 else p.float()).all():
            raise ValueError(f"weight {name} holds NaN or infinite values")
