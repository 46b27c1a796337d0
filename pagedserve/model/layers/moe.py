"""Mixture-of-experts feed-forward: top-k routing and the experts' weights stacked in two
3-D parameters (gate and up fused, as the dense MLP's gate_up_proj), so one module holds a
layer's experts whatever the checkpoint's naming.

Two ways to run the experts:
- PyTorch (CPU, the PyTorch attention backend, other activations): tokens are grouped by expert
  and each hit expert does one pair of matmuls on its tokens. The group sizes are read on the
  host, so a model on this path runs without CUDA graphs.
- Triton (with the Triton backend, SiLU, GeGLU or GPT-OSS's clamped SwiGLU experts, with or
  without biases): ops/fused_moe.py sorts the routed tokens by
  expert on the device and runs every expert in one grouped-GEMM launch per projection. No
  host sync, so decode steps are captured in CUDA graphs (`moe_graph_safe`)."""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import torch
from torch import nn


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in float32 over the experts, the top k, optionally renormalised to sum to 1,
    as Mixtral and Qwen-MoE route. Returns (weights [T, k] float32, expert ids [T, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def select_topk_softmax(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k logits, then a softmax over just those (GPT-OSS), in float32."""
    logits, ids = torch.topk(router_logits.float(), top_k, dim=-1)
    return torch.softmax(logits, dim=-1), ids


def select_grouped_experts(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
                           num_groups: int = 1, topk_groups: int = 1, correction_bias: Optional[torch.Tensor] = None,
                           renormalize: bool = False, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's routers, in float32: scores by softmax (V2) or sigmoid (V3); with groups,
    only the topk_groups best groups of experts compete (a group's worth: its best score, or
    with a correction bias its two best biased scores, as V3). The bias moves the choice, not
    the weights. Weights optionally renormalised, then scaled (routed_scaling_factor).
    Returns (weights [T, k] float32, expert ids [T, k])."""
    logits = router_logits.float()
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"MoE scoring function {scoring!r} is not supported; supported: softmax, sigmoid.")
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if num_groups > 1 and topk_groups < num_groups:
        t, e = choice.shape
        grouped = choice.view(t, num_groups, e // num_groups)
        worth = grouped.topk(2, dim=-1).values.sum(-1) if correction_bias is not None else grouped.amax(-1)
        keep = torch.zeros_like(worth, dtype=torch.bool).scatter_(1, worth.topk(topk_groups, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // num_groups, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, ids


def run_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The PyTorch expert path: each expert's tokens gathered, `expert(e, rows)` on them, the
    results weighted and summed per token in float32 (one rounding to the model dtype at the
    end). One host sync (the tokens per expert)."""
    t, k = topk_ids.shape
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # the one host sync
    token_of = order // k
    weight_of = topk_weights.reshape(-1)[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = token_of[start : start + n]
        out.index_add_(0, rows, expert(e, x[rows]).float() * weight_of[start : start + n, None])
        start += n
    return out.to(x.dtype)


KERNEL_ACTIVATIONS = ("silu", "swigluoai", "gelu_pytorch_tanh", "gelu_new")  # the fused kernel's (ops/activation.py)


class FusedMoE(nn.Module):
    """E experts: w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I]; with bias,
    w13_bias [E, 2I] and w2_bias [E, H]. act: a transformers activation name applied to the
    gate (times up), or "swigluoai" (GPT-OSS's clamped SwiGLU, act_params = (alpha, limit))."""

    # Checkpoint names of one expert's tensors -> (our parameter, shard). Mixtral says w1/w3/w2,
    # Qwen-MoE gate_proj/up_proj/down_proj.
    shard_names = {"w1": ("w13", "gate"), "w3": ("w13", "up"), "w2": ("w2", None),
                   "gate_proj": ("w13", "gate"), "up_proj": ("w13", "up"), "down_proj": ("w2", None)}
    _expert_re = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<w>\w+)\."
                            r"(?P<kind>weight|weight_scale|weight_zero|bias)$")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str, bias: bool = False,
                 act_params: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w13_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size)) if bias else None
        self.w2_bias = nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None
        self.activation, self.act_params = act, act_params
        if act != "swigluoai":
            from transformers.activations import ACT2FN

            self.act = ACT2FN[act]
        self.use_triton = False  # set by the model runner with the Triton backend
        self.scale_bk: Optional[tuple[int, int]] = None  # FP8 / integer experts: (w13's, w2's) K blocks
        self.int_bits = 0  # integer experts (to_int): their bits
        self.fp4 = False  # MXFP4 experts (to_mxfp4): 4-bit e2m1 codes, no zeros

    def to_fp8(self, block_k: int) -> None:
        """Hold the experts in FP8 e4m3 with float32 scales per row and K block (layers/fp8.py),
        for the kernel path; called on the meta device, before loading. block_k 0: a scale per
        row (the K block is the whole row)."""
        from pagedserve.model.layers.fp8 import FP8

        e, two_i, h = self.w13.shape
        i = self.intermediate
        self.scale_bk = (block_k or h, block_k or i)
        self.w13 = nn.Parameter(torch.empty(e, two_i, h, dtype=FP8), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, i, dtype=FP8), requires_grad=False)
        self.w13_scale = nn.Parameter(torch.empty(e, two_i, -(-h // self.scale_bk[0]), dtype=torch.float32),
                                      requires_grad=False)
        self.w2_scale = nn.Parameter(torch.empty(e, h, -(-i // self.scale_bk[1]), dtype=torch.float32),
                                     requires_grad=False)

    def to_int(self, bits: int, group: int) -> None:
        """Hold the experts as packed integers (layers/int_quant.py's layout, stacked per
        expert) with float32 scales and int16 zeros per row and group, for the kernel path;
        called on the meta device, before loading. group -1: one group a row."""
        e, two_i, h = self.w13.shape
        i = self.intermediate
        pack = 32 // bits
        if h % pack or i % pack:
            raise ValueError(f"experts of sizes {h} / {i} cannot hold {bits}-bit weights packed {pack} a word.")
        self.int_bits = bits
        self.scale_bk = (group if group > 0 else h, group if group > 0 else i)
        hg, ig = -(-h // self.scale_bk[0]), -(-i // self.scale_bk[1])

        def param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        self.w13, self.w2 = param(e, two_i, h // pack, dtype=torch.int32), param(e, h, i // pack, dtype=torch.int32)
        self.w13_scale, self.w2_scale = param(e, two_i, hg, dtype=torch.float32), param(e, h, ig, dtype=torch.float32)
        self.w13_zero, self.w2_zero = param(e, two_i, hg, dtype=torch.int16), param(e, h, ig, dtype=torch.int16)

    def to_mxfp4(self) -> None:
        """Hold the experts in MXFP4 (GPT-OSS's checkpoints): e2m1 codes packed 8 to an int32
        along K, as to_int's 4-bit layout, and a uint8 exponent (scale 2^(s - 127)) per row
        and 32 columns; called on the meta device, before loading."""
        self.to_int(4, 32)
        del self.w13_zero, self.w2_zero
        for name in ("w13_scale", "w2_scale"):
            setattr(self, name, nn.Parameter(torch.empty_like(getattr(self, name), dtype=torch.uint8),
                                             requires_grad=False))
        self.fp4 = True

    @property
    def uses_kernel(self) -> bool:
        return self.use_triton and self.activation in KERNEL_ACTIVATIONS

    def gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The activation of a [T, 2I] gate_up (gate half, then up) -> [T, I] (PyTorch path)."""
        if self.activation == "swigluoai":
            from pagedserve.ops.reference import swigluoai_and_mul_ref

            return swigluoai_and_mul_ref(gate_up, *self.act_params)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; each token's output is the routing-weighted sum of its k experts' outputs."""
        if self.uses_kernel:
            from pagedserve.ops.fused_moe import fused_moe

            opts: dict[str, Any] = {"activation": self.activation, "act_params": self.act_params}
            if self.w13_bias is not None:
                opts["biases"] = (self.w13_bias, self.w2_bias)
            if self.scale_bk is not None:
                opts["scales"] = (self.w13_scale, self.w2_scale, *self.scale_bk)
            if self.int_bits:
                opts.update(int_bits=self.int_bits, fp4=self.fp4)
                if not self.fp4:
                    opts["zeros"] = (self.w13_zero, self.w2_zero)
            return fused_moe(x, self.w13, self.w2, topk_weights, topk_ids, **opts)
        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            b13 = self.w13_bias[e] if self.w13_bias is not None else None
            b2 = self.w2_bias[e] if self.w2_bias is not None else None
            return torch.nn.functional.linear(self.gated(torch.nn.functional.linear(rows, self.w13[e], b13)),
                                              self.w2[e], b2)

        return run_experts(x, topk_weights, topk_ids, self.num_experts, expert)

    # ---- checkpoint loading -------------------------------------------------------------
    @classmethod
    def match(cls, name: str) -> Optional[tuple[str, int, str, Optional[str]]]:
        """'...experts.<e>.<w>.weight' -> (our parameter name, expert, our parameter, shard)."""
        m = cls._expert_re.match(name)
        if m is None or m["w"] not in cls.shard_names:
            return None
        param, shard = cls.shard_names[m["w"]]
        if m["kind"] != "weight":  # a bias, or a quantized expert's scales (or zeros), sharded as its rows
            param += {"weight_scale": "_scale", "weight_zero": "_zero", "bias": "_bias"}[m["kind"]]
        return f"{m['prefix']}.{param}", int(m["e"]), param, shard

    def load_expert(self, param: str, expert: int, shard: Optional[str], tensor: torch.Tensor, name: str) -> str:
        if expert >= self.num_experts:
            raise ValueError(f"{name}: expert {expert} does not exist (the config has {self.num_experts})")
        target = getattr(self, param)[expert]
        if shard is not None:
            i = self.intermediate
            target = target[:i] if shard == "gate" else target[i:]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expert shape {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
        return f"{expert}:{param}:{shard}"

    def expected_loads(self) -> set[str]:
        params = (("w13", "gate"), ("w13", "up"), ("w2", None))
        if self.scale_bk is not None:
            params += (("w13_scale", "gate"), ("w13_scale", "up"), ("w2_scale", None))
        if self.int_bits and not self.fp4:
            params += (("w13_zero", "gate"), ("w13_zero", "up"), ("w2_zero", None))
        if self.w13_bias is not None:
            params += (("w13_bias", "gate"), ("w13_bias", "up"), ("w2_bias", None))
        return {f"{e}:{p}:{s}" for e in range(self.num_experts) for p, s in params}


class SparseMoeBlock(nn.Module):
    """Router + experts, plus Qwen2-MoE's shared expert (always on, scaled by a sigmoid gate)."""

    def __init__(self, cfg: Any, num_experts: int, intermediate_size: int, renormalize: bool,
                 shared_expert: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = renormalize
        self.gate = nn.Linear(cfg.hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, cfg.hidden_size, intermediate_size, cfg.hidden_act)
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if shared_expert is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def moe_graph_safe(model: nn.Module) -> bool:
    """Whether every expert layer of `model` runs without a host sync (the Triton path)."""
    return all(m.uses_kernel for m in model.modules() if isinstance(m, FusedMoE))
