"""Rotary position embedding (NeoX / Hugging Face "rotate_half" style) with a cos/sin cache;
on the Triton path one in-place kernel (pagedserve/ops/rotary.py)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from pagedserve.model.hf_config import rope_is_per_layer_type, rope_parameters
from pagedserve.ops.reference import rotary_ref

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "proportional")


def rotary_dim(hf_config: Any, head_dim: int, layer_type: Optional[str] = None) -> int:
    """How many leading dims of each head RoPE rotates: partial_rotary_factor (Phi-4-mini:
    0.75) of the head; the rest pass through unrotated."""
    params = rope_parameters(hf_config, layer_type)
    if params["rope_type"] == "proportional":  # (the whole head turns, some of it at frequency 0)
        return head_dim
    factor = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or 1.0)
    dim = int(head_dim * float(factor))
    if dim <= 0 or dim % 2 or dim > head_dim:
        raise ValueError(f"partial_rotary_factor={factor} gives a rotary dim of {dim} for head dim {head_dim}; "
                         "it must be even and in (0, head_dim].")
    return dim


def _inv_freq(hf_config: Any, head_dim: int, layer_type: Optional[str] = None,
              max_positions: int = 0) -> tuple[torch.Tensor, float]:
    params = rope_parameters(hf_config, layer_type)
    rope_type = params["rope_type"]
    if rope_type == "mrope":  # transformers 4's name for Qwen2-VL's, whose frequencies are the default ones
        rope_type = "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}.")
    if rope_type == "dynamic" and params.get("alpha"):  # HunYuan's fixed NTK alpha: a larger base, static
        dim = rotary_dim(hf_config, head_dim, layer_type)
        base = float(params["rope_theta"]) * float(params["alpha"]) ** (dim / (dim - 2))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type == "proportional":
        # Gemma 4's global layers: RoPE over the whole head, the frequencies of a
        # partial_rotary_factor share of its pairs as the head's full width gives them, the
        # other pairs at frequency 0 (unrotated), all divided by `factor`.
        base, share = float(params["rope_theta"]), float(params.get("partial_rotary_factor", 1.0))
        angles = int(share * head_dim // 2)
        rotated = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.float) / head_dim))
        inv_freq = torch.cat([rotated, torch.zeros(head_dim // 2 - angles)])
        return inv_freq / float(params.get("factor", 1.0)), 1.0
    if rope_type == "default":
        base = float(params["rope_theta"])
        dim = rotary_dim(hf_config, head_dim, layer_type)
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    # The scaled variants come from transformers itself, so they match its models exactly.
    # ("dynamic" only departs from its base frequencies past max_position_embeddings, which
    # max_model_len never exceeds.)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs: dict[str, Any] = {"layer_type": layer_type or "full_attention"} if rope_is_per_layer_type(hf_config) else {}
    if rope_type == "longrope":
        # LongRoPE (Phi-3/3.5/4) has short factors for contexts up to the pretraining length
        # and long ones past it. transformers switches per forward pass on the longest
        # position so far, so a sequence's early keys and later ones can carry different
        # rotations; here the choice is made once, by max_model_len (as llama.cpp decides by
        # its context size), so every key in the cache agrees: long factors only when the
        # engine may run past the pretraining length.
        original = int(params.get("original_max_position_embeddings")
                       or getattr(hf_config, "original_max_position_embeddings", 0) or 0)
        if original and max_positions > original:
            kwargs["seq_len"] = original + 1
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)
    return inv_freq.float(), float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config: Any, head_dim: int, max_positions: int, layer_type: Optional[str] = None) -> None:
        super().__init__()
        self.hf_config, self.head_dim, self.max_positions = hf_config, head_dim, max_positions
        self.layer_type = layer_type  # which of per-layer-type RoPE parameters (Gemma 3)
        self.rotary_dim = rotary_dim(hf_config, head_dim, layer_type)
        self.register_buffer("cos_sin", self._compute(), persistent=False)
        self.use_triton = False  # set by the model runner with the Triton backend

    def _compute(self) -> torch.Tensor:
        with torch.device("cpu"):  # also when the model is being built on the meta device
            return self._compute_cpu()

    def _compute_cpu(self) -> torch.Tensor:
        inv_freq, scaling = _inv_freq(self.hf_config, self.head_dim, self.layer_type, self.max_positions)
        freqs = torch.arange(self.max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
        # [max_positions, rotary_dim]: cos in the first half of the last dim, sin in the second.
        return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], -1)

    @property
    def partial(self) -> bool:
        """Only the leading rotary_dim dims of a head rotate (the fused RoPE + KV-write kernels
        assume whole heads; this takes the separate rotary kernel)."""
        return self.rotary_dim != self.head_dim

    def rebuild_buffers(self, device: torch.device) -> None:
        """Recompute the cache after the module was built on the meta device."""
        self.cos_sin = self._compute().to(device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, cos/sin table) for the kernels, which read row positions[i] of the
        table for token i: the cache itself here (M-RoPE builds a table per step)."""
        return positions, self.cos_sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D]; returns the rotated tensors (copies on PyTorch, the
        same tensors rotated in place on the Triton path)."""
        positions, table = self.lookup(positions)
        if self.use_triton:
            from pagedserve.ops.rotary import rotary_embedding

            return rotary_embedding(positions, q, k, table)
        return rotary_ref(positions, q, k, table)


class MRotaryEmbedding(RotaryEmbedding):
    """Qwen2-VL's multimodal RoPE: a position per token for each of (time, height, width), and
    the rotary frequencies shared among the three (`mrope_section`: how many each turns), in
    consecutive sections (Qwen2-VL, 2.5-VL) or interleaved t, h, w, t, h, w, ... (Qwen3-VL).
    Text tokens have three equal components, which is plain RoPE: so 1-D positions (decode
    steps, CUDA graphs, the fused kernels) take the cache as it is, and only a step with image
    tokens passes positions [3, T] and gets a table of its own."""

    def __init__(self, hf_config: Any, head_dim: int, max_positions: int, section: list[int],
                 interleaved: bool) -> None:
        super().__init__(hf_config, head_dim, max_positions)
        if sum(section) != self.rotary_dim // 2 or len(section) != 3:
            raise ValueError(f"mrope_section {section} must be three numbers summing to half the rotary dim "
                             f"({self.rotary_dim // 2}).")
        self.section, self.interleaved = section, interleaved
        self.register_buffer("component", self._component(), persistent=False)

    def _component(self) -> torch.Tensor:
        """Which position component turns each column of the cos/sin table."""
        with torch.device("cpu"):  # also when the model is being built on the meta device
            if self.interleaved:  # frequency j: h where j % 3 == 1 (j < 3 * s_h), w where j % 3 == 2 (j < 3 * s_w)
                j = torch.arange(sum(self.section))
                comp = torch.zeros_like(j)
                comp[(j % 3 == 1) & (j < 3 * self.section[1])] = 1
                comp[(j % 3 == 2) & (j < 3 * self.section[2])] = 2
            else:
                comp = torch.repeat_interleave(torch.arange(3), torch.tensor(self.section))
            return torch.cat([comp, comp])

    def rebuild_buffers(self, device: torch.device) -> None:
        super().rebuild_buffers(device)
        self.component = self._component().to(device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return positions, self.cos_sin
        rows = self.cos_sin[positions]  # [3, T, R]: each component's angles
        t = positions.shape[1]
        table = rows.gather(0, self.component.view(1, 1, -1).expand(1, t, -1)).squeeze(0)
        return torch.arange(t, device=positions.device), table


# Decoders whose RoPE is always M-RoPE, interleaved, whether or not the config says so (Qwen3-VL,
# Qwen3.5: transformers' defaults).
_INTERLEAVED_MROPE = {"qwen3_vl_text": [24, 20, 20], "qwen3_vl_moe_text": [24, 20, 20], "qwen3_5_text": [11, 11, 10],
                      "qwen3_5_moe_text": [11, 11, 10]}


def make_rotary(hf_config: Any, head_dim: int, max_positions: int,
                layer_type: Optional[str] = None) -> RotaryEmbedding:
    """The model's RoPE module: M-RoPE where the config has an `mrope_section` (Qwen2-VL) or
    is Qwen3-VL's decoder."""
    params = rope_parameters(hf_config, layer_type)
    default = _INTERLEAVED_MROPE.get(getattr(hf_config, "model_type", ""))
    if "mrope_section" in params or default is not None:
        section = [int(v) for v in params.get("mrope_section") or default]
        if "mrope_section" not in params and sum(section) != rotary_dim(hf_config, head_dim, layer_type) // 2:
            # a default that does not fit this head (small test models): text-only, plain RoPE
            return RotaryEmbedding(hf_config, head_dim, max_positions, layer_type)
        interleaved = default is not None or bool(params.get("mrope_interleaved", False))
        return MRotaryEmbedding(hf_config, head_dim, max_positions, section, interleaved)
    return RotaryEmbedding(hf_config, head_dim, max_positions, layer_type)


def interleaved_to_halves(t: torch.Tensor, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """q/k projection rows (weights, biases or per-row scales) [head][d] of a model whose RoPE
    rotates interleaved pairs (2i, 2i + 1) (Cohere, GLM-4), reordered within each head's
    rotated part so that pair i sits at i and i + rotary_dim / 2, where this module's
    split-halves RoPE rotates it with the same frequency. q and k move alike, so their dot
    products, the attention, are unchanged."""
    order = torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2),
                       torch.arange(rotary_dim, head_dim)])
    return t.reshape(t.shape[0] // head_dim, head_dim, *t.shape[1:])[:, order].reshape(t.shape)


def interleaved_rope_weights(weights, head_dim: int, rotary_dim: int):
    """A checkpoint's tensors with q_proj's and k_proj's rows reordered (interleaved_to_halves)."""
    for name, t in weights:
        rows = name.endswith(("weight", "bias", "weight_scale", "weight_zero"))
        if rows and (".q_proj." in name or ".k_proj." in name):
            t = interleaved_to_halves(t, head_dim, rotary_dim)  # (per-row scales and zeros move with their rows)
        yield name, t