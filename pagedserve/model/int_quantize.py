"""Write a GPTQ, AWQ or compressed-tensors (W4A16 / W8A16, W8A8) copy of a checkpoint, for tests
and benchmarks (a real one comes from its publisher or a tool such as GPTQModel, AutoAWQ or
llm-compressor; this rounds to nearest, no calibration).

The packing follows the published packers' loops, written here independently of the loader's
unpacking (layers/int_quant.py) so that a test holds one to the other:
- GPTQ (AutoGPTQ's QuantLinear.pack): qweight [K * bits / 32, N], value j of word r is input
  row r * 32 / bits + j; qzeros [KG, N * bits / 32] likewise along N, storing z - 1 in the
  "gptq" format (z in "gptq_v2"); scales [KG, N] float16; g_idx [K] int32;
- AWQ (AutoAWQ's WQLinear_GEMM.pack): qweight [K, N / 8] and qzeros [KG, N / 8], slot i of a
  word holding column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; scales [KG, N] float16.

The decoder blocks' linear layers are quantized; embeddings, norms, the LM head and routers
stay as they are. `reference_dir` gets the same model with the quantized weights dequantized
(float32), what transformers runs as the reference."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from typing import Optional

import torch

from pagedserve.model.layers.int_quant import pack_rows

_QUANTIZED = re.compile(r"\.layers\.\d+\..*(proj|\.w[123])\.weight$")
_SHARED_INPUT = re.compile(r"(\b[qkv]_proj|gate_proj|up_proj|\bw[13])$")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def quantize_groups(w: torch.Tensor, bits: int, group: int, sym: bool, g_idx: torch.Tensor,
                    min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest per output row and group ([N, K], g_idx [K] the group of each input
    row) -> q [N, K], zeros [N, KG], scales [N, KG] float16; w ~ (q - z) * s."""
    n, k = w.shape
    kg = int(g_idx.max()) + 1
    maxq = (1 << bits) - 1
    w = w.float()
    lo = torch.zeros(n, kg).scatter_reduce(1, g_idx.expand(n, k), w, "amin", include_self=True)
    hi = torch.zeros(n, kg).scatter_reduce(1, g_idx.expand(n, k), w, "amax", include_self=True)
    if sym:
        amax = torch.maximum(lo.abs(), hi)
        scales = (2 * amax / maxq).clamp(min=1e-6).half()
        zeros = torch.full((n, kg), (maxq + 1) // 2, dtype=torch.int64)
    else:
        scales = ((hi - lo) / maxq).clamp(min=1e-6).half()
        zeros = torch.round(-lo / scales.float()).clamp(min_zero, maxq).long()
    s, z = scales.float()[:, g_idx], zeros[:, g_idx]
    q = torch.clamp(torch.round(w / s) + z, 0, maxq).long()
    return q, zeros, scales


def _pack_gptq(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] unsigned -> [R * bits / 32, C] int32: word r holds rows r * per ... r * per + per - 1."""
    per = 32 // bits
    rows, cols = values.shape
    out = torch.zeros(rows // per, cols, dtype=torch.int64)
    for r in range(rows // per):
        for j in range(per):
            out[r] |= values[r * per + j].long() << (bits * j)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def _pack_awq(values: torch.Tensor) -> torch.Tensor:
    """[R, C] 4-bit unsigned -> [R, C / 8] int32 in AWQ's column order."""
    rows, cols = values.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i in range(8):
            out[:, c] |= values[:, c * 8 + AWQ_ORDER[i]].long() << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def quantize_checkpoint(src: str, dst: str, method: str = "gptq", bits: int = 4, group_size: int = 32,
                        sym: bool = True, desc_act: bool = False, checkpoint_format: str = "gptq",
                        reference_dir: Optional[str] = None, seed: int = 0) -> str:
    """Copy the model directory `src` to `dst` with its decoder linear layers quantized."""
    from safetensors.torch import load_file, save_file

    if method not in ("gptq", "awq", "compressed-tensors", "w8a8"):
        raise ValueError(f"method must be 'gptq', 'awq', 'compressed-tensors' or 'w8a8', got {method!r}")
    if method == "w8a8":  # compressed-tensors' int-quantized: int8 weights, symmetric, int8 activations
        bits, sym, desc_act = 8, True, False
    gen = torch.Generator().manual_seed(seed)
    orders: dict[str, torch.Tensor] = {}
    for d in filter(None, (dst, reference_dir)):
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    v1 = method == "gptq" and checkpoint_format == "gptq"
    for path in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        out, ref = {}, {}
        for name, t in load_file(path).items():
            ref[name] = t
            if not _QUANTIZED.search(name) or t.dim() != 2:
                out[name] = t
                continue
            stem = name[: -len(".weight")]
            n, k = t.shape
            group = group_size if group_size > 0 else k
            g_idx = torch.arange(k) // group
            if desc_act:  # act order: groups of input rows in a shuffled order, one per input
                key = _SHARED_INPUT.sub("<in>", stem)  # (q/k/v, gate/up share theirs, as GPTQ's Hessian)
                g_idx = g_idx[orders.setdefault(key, torch.randperm(k, generator=gen))]
            # (AutoGPTQ's "gptq" format stores z - 1 in unsigned slots, so z = 0 cannot be stored)
            q, zeros, scales = quantize_groups(t, bits, group, sym, g_idx, min_zero=1 if v1 else 0)
            ref[name] = ((q - zeros[:, g_idx]).float() * scales.float()[:, g_idx])
            if method == "gptq":
                out[stem + ".qweight"] = _pack_gptq(q.t(), bits)
                out[stem + ".qzeros"] = _pack_gptq(zeros - (1 if v1 else 0), bits).t().contiguous()
                out[stem + ".g_idx"] = g_idx.to(torch.int32)
            elif method == "awq":
                out[stem + ".qweight"] = _pack_awq(q.t())
                out[stem + ".qzeros"] = _pack_awq(zeros.t())
            if method == "w8a8":  # signed int8 as they are, a static input scale (unused) beside
                out[stem + ".weight"] = (q - 128).to(torch.int8)
                out[stem + ".weight_scale"] = scales.to(t.dtype)
                out[stem + ".input_scale"] = torch.ones(1, dtype=t.dtype)
                continue
            if method != "compressed-tensors":
                out[stem + ".scales"] = scales.t().contiguous()
                continue
            # compressed-tensors: signed values offset by 2^(bits-1), packed along K ([N, K*bits/32]);
            # zero points packed along N; scales [N, KG] in the model's dtype
            out[stem + ".weight_packed"] = pack_rows(q, bits)
            out[stem + ".weight_scale"] = scales.to(t.dtype)
            out[stem + ".weight_shape"] = torch.tensor([n, k])
            if not sym:
                out[stem + ".weight_zero_point"] = pack_rows(zeros.t().contiguous(), bits).t().contiguous()
            if desc_act:
                out[stem + ".weight_g_idx"] = g_idx.to(torch.int32)
        save_file(out, os.path.join(dst, os.path.basename(path)), metadata={"format": "pt"})
        if reference_dir:
            save_file({n: (t.float() if t.is_floating_point() else t) for n, t in ref.items()},
                      os.path.join(reference_dir, os.path.basename(path)), metadata={"format": "pt"})
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if method == "gptq":
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                      "desc_act": desc_act, "sym": sym, "checkpoint_format": checkpoint_format}
    elif method == "compressed-tensors":
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": None, "output_activations": None,
                "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
                            "strategy": "group" if group_size > 0 else "channel",
                            "group_size": group_size if group_size > 0 else None,
                            "actorder": "group" if desc_act else None}}}}
    elif method == "w8a8":
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], "config_groups": {"group_0": {
                "targets": ["Linear"], "output_activations": None,
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                                      "strategy": "token"},
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False,
                            "strategy": "group" if group_size > 0 else "channel",
                            "group_size": group_size if group_size > 0 else None}}}}
    else:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                      "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    if reference_dir:
        ref_cfg = os.path.join(reference_dir, "config.json")
        with open(ref_cfg) as f:
            cfg = json.load(f)
        cfg["torch_dtype"] = "float32"
        with open(ref_cfg, "w") as f:
            json.dump(cfg, f, indent=2)
    return dst
