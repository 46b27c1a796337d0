"""Integer weight-only checkpoints: GPTQ (`quant_method: "gptq"`, 4 or 8 bits: TheBloke's and
Qwen's *-GPTQ-Int4 / -Int8), AWQ (`quant_method: "awq"`, 4 bits, the "gemm" layout: *-AWQ)
and compressed-tensors' pack-quantized integers (llm-compressor's W4A16 / W8A16: RedHatAI
*-quantized.w4a16) and int-quantized int8 weights (W8A8: RedHatAI *-quantized.w8a8). Weights
are unsigned integers q with, per output column and group of `group_size` input rows, a
scale s and a zero point z: w = (q - z) * s.

W8A8 checkpoints also give the activations' int8 quantization (dynamic per token, or static
input scales). It is not applied: activations stay in the model dtype, as transformers runs
these checkpoints (decompressed: the same logits as the dequantized weights), so outputs
agree with it; the weights stay int8 all the same (half of bf16's bytes).

The formats pack differently:
- GPTQ: qweight [K * bits / 32, N] int32 packed along K (value j of a word at bits j * bits);
  qzeros [K / G, N * bits / 32] packed along N, holding z - 1 (AutoGPTQ's convention, kept by
  `checkpoint_format: "gptq"`; "gptq_v2" holds z itself); scales [K / G, N]; g_idx [K], the
  group of each input row, which with `desc_act` (act order) is not k // G;
- AWQ: qweight [K, N / 8] and qzeros [K / G, N / 8] packed along N in the order
  0, 2, 4, 6, 1, 3, 5, 7 (AWQ_ORDER); scales [K / G, N]; z as stored;
- compressed-tensors int-quantized (W8A8): weight [N, K] int8, signed, symmetric (read as
  q + 128 with z = 128), weight_scale [N, 1] (by channel) or [N, K / G]; input_scale and
  input_zero_point (static activations) are dropped;
- compressed-tensors: weight_packed [N, K * bits / 32] packed along K, values signed and
  stored plus 2^(bits-1) (so unsigned as here, z = 2^(bits-1) when symmetric);
  weight_zero_point [N * bits / 32, K / G] packed along N, likewise offset; weight_scale
  [N, K / G]; weight_shape [2]; weight_g_idx [K] (older checkpoints' actorder "group").

Both become one layout, rows = output features as our other weights (so fused q/k/v and
gate/up shards load the way plain ones do): qweight [N, K * bits / 32] int32 packed along K,
scales [N, KG] float32, zeros [N, KG] int16, and, for act order, the input rows sorted by
group (`weight_perm` [K]: the kernel reads x's columns in that order, so groups are
contiguous). q/k/v (and gate/up) share their input, so GPTQ gives them one act order; a
checkpoint whose shards disagree is refused.

Two ways to run them, as FP8 checkpoints (layers/fp8.py):
- IntQuantLinear (the Triton backend): the packed weights stay packed, a quarter (4 bits) of
  bf16's bytes, and ops/int_linear.py unpacks and dequantizes each tile inside the GEMM;
  MoE experts stay packed too, unpacked per tile by the fused MoE kernel (ops/fused_moe.py),
  except with act order (each expert has its own input order);
- elsewhere (CPU, the PyTorch backend): dequantized to the model dtype as they load (w
  computed in float32, rounded once)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # packed slot i holds column 8c + AWQ_ORDER[i]
# each format's tensor names for (packed weight, zeros, scales, groups of input rows)
NAMES = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales", "g_idx"),
         "compressed-tensors": ("weight_packed", "weight_zero_point", "weight_scale", "weight_g_idx")}


@dataclass(frozen=True)
class IntFormat:
    method: str  # "gptq", "awq" or "compressed-tensors"
    bits: int
    group_size: int  # -1: one group (a scale per output column)
    desc_act: bool = False  # GPTQ act order: input rows grouped by g_idx, not k // G
    zero_offset: int = 0  # added to the stored zeros (1 for AutoGPTQ's "gptq" format)
    zero_points: bool = True  # stored; else symmetric, z = 2^(bits-1) (compressed-tensors)
    packed: bool = True  # False: compressed-tensors' int-quantized int8 `weight` [N, K] (W8A8)

    @property
    def names(self) -> tuple[str, str, str, str]:
        return ("weight",) + NAMES[self.method][1:] if not self.packed else NAMES[self.method]

    def needs(self) -> set[str]:
        qweight, qzeros, scales, g_idx = self.names
        return ({qweight, scales} | ({qzeros} if self.zero_points else set()) | ({g_idx} if self.desc_act else set())
                | ({"weight_shape"} if self.method == "compressed-tensors" and self.packed else set()))

    @property
    def pack(self) -> int:
        return 32 // self.bits


def _int8_activations(groups: list[dict]) -> bool:
    """Whether every group's activations are int8 (W8A8) or not quantized."""
    acts = [g.get("input_activations") for g in groups]
    return all(a is None or (a.get("type") == "int" and a.get("num_bits") == 8) for a in acts)


def _compressed_tensors_format(q: dict[str, Any]) -> IntFormat:
    groups = list((q.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    if q.get("format") == "int-quantized" and _int8_activations(groups):  # W8A8 (see the module docstring)
        if any((w.get("num_bits"), w.get("type"), w.get("symmetric", True)) != (8, "int", True) for w in weights):
            raise ValueError("quantization_config: compressed-tensors 'int-quantized' weights must be int8, "
                             "symmetric.")
        strategies = {(w.get("strategy"), w.get("group_size")) for w in weights}
        if len(strategies) != 1 or next(iter(strategies))[0] not in ("channel", "group"):
            raise ValueError(f"quantization_config: int8 weights by {sorted(map(str, strategies))}: one scheme, by "
                             "'channel' or 'group', is supported.")
        strategy, group = strategies.pop()
        return IntFormat("compressed-tensors", 8, int(group) if strategy == "group" else -1, zero_points=False,
                         packed=False)
    if q.get("format") != "pack-quantized" or any(g.get("input_activations") for g in groups):
        raise ValueError("quantization_config: of compressed-tensors' integer formats, only weight-only "
                         f"'pack-quantized' (W4A16 / W8A16) is supported, not {q.get('format')!r} with these "
                         "activations.")
    keys = {(w.get("num_bits"), w.get("symmetric", True), w.get("strategy"), w.get("group_size"),
             w.get("actorder")) for w in weights}
    if len(keys) != 1:
        raise ValueError("quantization_config: compressed-tensors groups with different weight schemes are not "
                         "supported.")
    bits, sym, strategy, group, order = keys.pop()
    if bits not in (4, 8) or strategy not in ("group", "channel"):
        raise ValueError(f"quantization_config: compressed-tensors {bits}-bit integer weights by {strategy!r}: "
                         "4 or 8 bits, by 'group' or 'channel', are supported.")
    return IntFormat("compressed-tensors", bits, int(group) if strategy == "group" else -1,
                     desc_act=order == "group", zero_points=not sym)


def int_format(q: dict[str, Any]) -> IntFormat:
    """The format from config.json's quantization_config (quant_method gptq, awq, or
    compressed-tensors with integer weights)."""
    method = q.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors_format(q)
    bits = int(q.get("bits", q.get("w_bit", 4)))
    group = int(q.get("group_size", q.get("q_group_size", 128)))
    if group == 0 or group < -1:
        raise ValueError(f"quantization_config.group_size {group} is not a group size (a positive size or -1).")
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config.version {version!r}: only AWQ's 'gemm' layout is supported.")
        if bits != 4:
            raise ValueError(f"quantization_config.bits {bits}: AWQ checkpoints are 4-bit.")
        if q.get("zero_point", True) is False:
            raise ValueError("quantization_config.zero_point false (AWQ without zero points) is not supported.")
        return IntFormat("awq", 4, group)
    if bits not in (4, 8):
        raise ValueError(f"quantization_config.bits {bits}: GPTQ checkpoints of 4 or 8 bits are supported.")
    fmt = str(q.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"quantization_config.checkpoint_format {fmt!r} is not supported ('gptq' or 'gptq_v2').")
    return IntFormat("gptq", bits, group, bool(q.get("desc_act", False)), 1 if fmt == "gptq" else 0)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their 32 / bits unsigned values, unpacked along `dim` (value j of a word
    from bits j * bits up), as int16."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    x = packed.to(torch.int32).unsqueeze(dim + 1) >> shifts.view([-1] + [1] * (packed.dim() - 1 - dim))
    x = (x & ((1 << bits) - 1)).to(torch.int16)
    shape = list(packed.shape)
    shape[dim] *= 32 // bits
    return x.reshape(shape)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [N, K] -> int32 words [N, K * bits / 32] packed along K (value j of a
    word at bits j * bits): our layout, and GPTQ's qweight transposed."""
    n, k = q.shape
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (q.to(torch.int64).reshape(n, k // per, per) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _awq_columns(values: torch.Tensor) -> torch.Tensor:
    """AWQ's unpacked [rows, N] (slot i of a word's 8 is column 8c + AWQ_ORDER[i]) -> columns
    in order."""
    reverse = [AWQ_ORDER.index(j) for j in range(8)]
    rows, n = values.shape
    return values.reshape(rows, n // 8, 8)[:, :, reverse].reshape(rows, n)


@dataclass
class IntWeight:
    """One layer in our layout, before packing: q [N, K] and zeros [N, KG] int16, scales [N, KG]
    float32, g_idx [K] (the group of each input row) or None for k // G."""

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: Optional[torch.Tensor]
    group: int

    def groups(self) -> torch.Tensor:
        k = self.q.shape[1]
        return self.g_idx if self.g_idx is not None else torch.arange(k, device=self.q.device) // self.group

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        g = self.groups().long()
        return ((self.q.float() - self.zeros[:, g].float()) * self.scales[:, g]).to(dtype)


def read_layer(parts: dict[str, torch.Tensor], fmt: IntFormat, name: str) -> IntWeight:
    """A checkpoint layer's packed weight, zeros, scales (and groups) -> IntWeight, shapes checked."""
    n_qweight, n_qzeros, n_scales, n_g_idx = fmt.names
    qweight, scales = parts[n_qweight], parts[n_scales]
    qzeros = parts.get(n_qzeros)
    want = torch.int32 if fmt.packed else torch.int8
    if qweight.dtype != want or (qzeros is not None and qzeros.dtype != torch.int32):
        raise ValueError(f"{name}: {'packed ' if fmt.packed else ''}weights must be {want}, got {qweight.dtype}.")
    if fmt.method == "gptq":
        q = unpack(qweight, fmt.bits, 0).t()
        zeros = unpack(qzeros, fmt.bits, 1).t() + fmt.zero_offset
        scales = scales.t()
    elif fmt.method == "awq":
        q = _awq_columns(unpack(qweight, 4, 1)).t()
        zeros = _awq_columns(unpack(qzeros, 4, 1)).t()
        scales = scales.t()
    elif not fmt.packed:  # int8, signed: offset to unsigned as the packed formats store them
        q = qweight.to(torch.int16) + 128
        n = q.shape[0]
        zeros = torch.full((n, scales.shape[-1]), 128, dtype=torch.int16)
    else:
        n, k = (int(d) for d in parts["weight_shape"].tolist())
        q = unpack(qweight, fmt.bits, 1)[:, :k]
        zeros = (unpack(qzeros, fmt.bits, 0)[:n] if qzeros is not None
                 else torch.full((n, scales.shape[-1]), 1 << (fmt.bits - 1), dtype=torch.int16))
    n, k = q.shape
    group = fmt.group_size if fmt.group_size > 0 else k
    kg = -(-k // group)
    if tuple(scales.shape) != (n, kg) or tuple(zeros.shape) != (n, kg):
        raise ValueError(f"{name}: scales / zeros of shape {tuple(scales.shape)} / {tuple(zeros.shape)} (as "
                         f"[N, groups]) do not fit a [{k}, {n}] weight in groups of {group}.")
    g_idx = parts.get(n_g_idx)
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        if tuple(g_idx.shape) != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= kg:
            raise ValueError(f"{name}: g_idx must hold {k} group indices in [0, {kg}).")
        if not fmt.desc_act:
            if not torch.equal(g_idx, torch.arange(k) // group):
                raise ValueError(f"{name}: g_idx is not k // group_size, but desc_act is false.")
            g_idx = None
    elif fmt.desc_act:
        raise ValueError(f"{name}: desc_act is true but the checkpoint has no g_idx.")
    return IntWeight(q.contiguous(), zeros.contiguous(), scales.float().contiguous(), g_idx, group)


def act_order(g_idx: torch.Tensor, group: int, name: str) -> torch.Tensor:
    """The input rows sorted by group (stable), each group `group` rows as GPTQ makes them."""
    counts = torch.bincount(g_idx)
    k = g_idx.numel()
    want = torch.full_like(counts, group)
    want[-1] = k - group * (counts.numel() - 1)
    if not torch.equal(counts, want):
        raise ValueError(f"{name}: g_idx does not give every group {group} input rows.")
    return torch.sort(g_idx, stable=True).indices.to(torch.int32)


def int_weights(weights: Iterable[tuple[str, torch.Tensor]], fmt: IntFormat, dtype: torch.dtype,
                keep: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with each quantized layer's parts met: for a module `keep`
    accepts, our layout (`<module>.weight` packed, `.weight_scale`, `.weight_zero`, and
    `.weight_perm` with act order); otherwise the weight dequantized to `dtype`. Other
    tensors pass through, floating ones cast to `dtype`."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    need = fmt.needs()
    g_idx_name = fmt.names[3]
    ours = set(fmt.names) | need
    for name, t in weights:
        stem, _, part = name.rpartition(".")
        if not fmt.packed and part in ("input_scale", "input_zero_point"):
            continue  # W8A8's activation quantization: not applied (see the module docstring)
        if part not in ours or (not fmt.packed and part == "weight" and t.dtype != torch.int8):
            yield name, (t.to(dtype) if t.is_floating_point() else t)
            continue
        parts = pending.setdefault(stem, {})
        parts[part] = t
        if not need <= parts.keys():
            continue
        del pending[stem]
        layer = read_layer(parts, fmt, stem)
        if not keep(stem):
            yield stem + ".weight", layer.dequantize(dtype)
            continue
        q = layer.q
        if layer.g_idx is not None:
            perm = act_order(layer.g_idx, layer.group, stem)
            q = q[:, perm.long()]
            yield stem + ".weight_perm", perm
        yield stem + ".weight", pack_rows(q, fmt.bits)
        yield stem + ".weight_scale", layer.scales
        yield stem + ".weight_zero", layer.zeros
    for stem, parts in pending.items():
        if parts.keys() == {g_idx_name}:  # (desc_act false) after its layer: must be k // G
            g = parts[g_idx_name].to(torch.int64)
            group = fmt.group_size if fmt.group_size > 0 else g.numel()
            if not torch.equal(g, torch.arange(g.numel()) // group):
                raise ValueError(f"{stem}: g_idx is not k // group_size, but desc_act is false.")
            continue
        missing = sorted(need - parts.keys())
        raise ValueError(f"checkpoint: {stem} has no {', '.join(missing)} to go with its {', '.join(sorted(parts))}.")


class IntQuantLinear(nn.Module):
    """y = x[:, perm] @ dequantize(W)^T (+ b), W packed (see the module docstring)."""

    def __init__(self, linear: nn.Linear, fmt: IntFormat) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        k, n = self.in_features, self.out_features
        if k % fmt.pack:
            raise ValueError(f"a {k}-wide layer cannot hold {fmt.bits}-bit weights packed {fmt.pack} a word.")
        self.bits = fmt.bits
        self.group = fmt.group_size if fmt.group_size > 0 else k
        kg = -(-k // self.group)
        dev = linear.weight.device

        def param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=dev), requires_grad=False)

        self.weight = param(n, k // fmt.pack, dtype=torch.int32)
        self.weight_scale = param(n, kg, dtype=torch.float32)
        self.weight_zero = param(n, kg, dtype=torch.int16)
        self.weight_perm = param(k, dtype=torch.int32) if fmt.desc_act else None
        self.bias = linear.bias
        if hasattr(linear, "shard_offsets"):
            self.shard_offsets = linear.shard_offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pagedserve.ops.int_linear import int_linear

        return int_linear(x, self.weight, self.weight_scale, self.weight_zero, self.bits, self.group,
                          self.weight_perm, self.bias)


def int_quantized_stems(names: Iterable[str], fmt: IntFormat) -> list[str]:
    """The module names with packed weights in the checkpoint (int8 ones: with their scales)."""
    suffix = "." + (fmt.names[0] if fmt.packed else fmt.names[2])
    return [n[: -len(suffix)] for n in names if n.endswith(suffix)]


def install_int_linears(model: nn.Module, targets: Iterable[str], fmt: IntFormat) -> None:
    """Replace each named nn.Linear (on the meta device, before loading) with an
    IntQuantLinear, and put each named FusedMoE's experts in the packed layout."""
    from pagedserve.model.layers.moe import FusedMoE

    for name in sorted(set(targets)):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        module = getattr(owner, leaf)
        if isinstance(module, FusedMoE):
            module.to_int(fmt.bits, fmt.group_size)
        else:
            setattr(owner, leaf, IntQuantLinear(module, fmt))
