"""Llama-family decoder (Llama, Mistral; Qwen2/Qwen3 subclass it). Plain modules over a flat
batch of tokens: no padding, no per-request dimension; attention reads the paged cache."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from pagedserve.attention.backend import AttentionMetadata
from pagedserve.model.hf_config import layer_windows, rope_parameters
from pagedserve.model.layers.attention import PagedAttention
from pagedserve.model.layers.moe import FusedMoE, moe_graph_safe
from pagedserve.model.layers.norm import RMSNorm, pre_norm
from pagedserve.model.layers.rotary import RotaryEmbedding, make_rotary
from pagedserve.model.weights import check_complete, copy_into, load_shared_perm


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, rotary: Optional[RotaryEmbedding], qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 window: int = 0, scale: Optional[float] = None, softcap: float = 0.0,
                 norm: Callable[[int, float], nn.Module] = RMSNorm, qk_norm_whole: bool = False,
                 sinks: bool = False, qk_norm_after_rope: bool = False, output_gate: bool = False,
                 alibi: Optional[list[float]] = None) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = _head_dim(cfg)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # output_gate (Qwen3-Next, Qwen3.5): q_proj gives each head's query then its gate, and the
        # attention output is multiplied by sigmoid(gate) before o_proj.
        self.output_gate = output_gate
        q_out = self.q_size * (2 if output_gate else 1)
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_out + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=o_bias)
        self.qkv_proj.shard_offsets = {"q": (0, q_out), "k": (q_out, self.kv_size),
                                       "v": (q_out + self.kv_size, self.kv_size)}
        # q/k norms per head (Qwen3, Gemma 3), or over all heads at once (qk_norm_whole: OLMo 2).
        self.qk_norm_whole = qk_norm_whole
        self.qk_norm_after_rope = qk_norm_after_rope  # per-head norms of the rotated q/k (HunYuan)
        self.q_norm = norm(self.q_size if qk_norm_whole else self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = norm(self.kv_size if qk_norm_whole else self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.rotary = rotary  # None: no position encoding in this layer (SmolLM3's NoPE layers)
        # (beta, length, offset): queries scaled by 1 + beta * log(1 + floor((position + offset) /
        # length)) (Llama 4's attention temperature: offset 1; Ministral 3's: 0); None: not scaled.
        self.q_position_scale: Optional[tuple[float, int, int]] = None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, scale or self.head_dim**-0.5,
                                   window, softcap, sinks, alibi_slopes=alibi)  # (alibi: slopes per head)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.attend(positions, self.qkv_proj(x), meta)

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Everything after the qkv projection, given its output."""
        t = qkv.shape[0]
        gate = None
        if self.output_gate:
            q_gate, k, v = qkv.split([2 * self.q_size, self.kv_size, self.kv_size], dim=-1)
            q_gate = q_gate.view(t, self.num_heads, 2 * self.head_dim)
            q, gate = q_gate[..., : self.head_dim].reshape(t, self.q_size), q_gate[..., self.head_dim :]
            gate = torch.sigmoid(gate.reshape(t, self.q_size))
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        out = self._attend(positions, q, k, v, meta, t)
        return self.o_proj(out if gate is None else out * gate)

    def _attend(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, t: int) -> torch.Tensor:
        if self.qk_norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        return self._attend_heads(positions, q, k, v, meta, t)

    def _attend_heads(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      meta: AttentionMetadata, t: int) -> torch.Tensor:
        """Everything after the norms over all heads (if any), on [t, heads * head_dim] q/k/v."""
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_whole and not self.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.q_position_scale is not None:  # (before RoPE: the same, as RoPE is linear)
            beta, length, offset = self.q_position_scale
            scale = 1 + beta * torch.log1p(torch.div(positions + offset, length, rounding_mode="floor").float())
            q = q * scale.to(q.dtype)[:, None, None]
        if self.rotary is not None and self.qk_norm_after_rope:
            q, k = self.rotary(positions, q, k)
            return self.attn(self.q_norm(q), self.k_norm(k), v, meta)
        if self.rotary is None:
            return self.attn(q, k, v, meta)
        if self.attn.fuses_rope and self.rotary.use_triton and not self.rotary.partial:  # RoPE in the KV write
            return self.attn(q, k, v, meta, rope=self.rotary.lookup(positions))
        q, k = self.rotary(positions, q, k)
        return self.attn(q, k, v, meta)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: Any, intermediate_size: Optional[int] = None, act: Optional[str] = None,
                 bias: Optional[bool] = None) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        act = act or cfg.hidden_act
        bias = bool(getattr(cfg, "mlp_bias", False)) if bias is None else bias
        self.intermediate = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate, bias=bias)
        self.gate_up_proj.shard_offsets = {"gate": (0, self.intermediate), "up": (self.intermediate, self.intermediate)}
        self.down_proj = nn.Linear(self.intermediate, cfg.hidden_size, bias=bias)
        self.act = ACT2FN[act]
        self.is_silu = act == "silu"
        self.use_triton = False  # set by the model runner with the Triton backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_down(self.gate_up_proj(x))

    def act_down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """Everything after the gate_up projection, given its output."""
        if self.use_triton and self.is_silu:
            fused = getattr(self.down_proj, "forward_silu_mul", None)  # the small-batch GEMV's
            if fused is not None:
                return fused(gate_up)
            from pagedserve.ops.activation import silu_and_mul

            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)


class XIELU(nn.Module):
    """xIELU (Apertus): x > 0: alpha_p * x^2 + beta * x; else (expm1(min(x, eps)) - x) *
    alpha_n + beta * x, with alpha_p = softplus(a_p), alpha_n = beta + softplus(a_n) learned
    per layer (all four numbers read from the checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("alpha_p", "alpha_n", "beta", "eps"):  # (the checkpoint's shapes: [1] and [])
            self.register_parameter(name, nn.Parameter(torch.zeros(1 if name.startswith("alpha") else ()),
                                                       requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p = nn.functional.softplus(self.alpha_p)
        alpha_n = self.beta + nn.functional.softplus(self.alpha_n)
        return torch.where(x > 0, alpha_p * x * x + self.beta * x,
                           (torch.expm1(torch.minimum(x, self.eps)) - x) * alpha_n + self.beta * x)


class UpDownMLP(nn.Module):
    """An MLP without a gate: down(act(up(x))) (Arcee's ReLU², Apertus' xIELU; GELU with biases in
    GPT-NeoX, Phi, StarCoder 2, GPT-2)."""

    def __init__(self, cfg: Any, act: Optional[str] = None, intermediate_size: Optional[int] = None,
                 bias: Optional[bool] = None) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        bias = bool(getattr(cfg, "mlp_bias", False)) if bias is None else bias
        act = act or cfg.hidden_act
        inter = intermediate_size or cfg.intermediate_size
        self.up_proj = nn.Linear(cfg.hidden_size, inter, bias=bias)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=bias)
        self.act_fn = XIELU() if act == "xielu" else ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, rotary: RotaryEmbedding, attn_options: dict, mlp: nn.Module, window: int = 0,
                 self_attn: Optional[nn.Module] = None) -> None:
        super().__init__()
        # self_attn: another attention module taking (positions, x, meta) (DeepSeek's MLA)
        self.self_attn = self_attn if self_attn is not None else LlamaAttention(cfg, rotary, window=window,
                                                                                **attn_options)
        self.mlp = mlp  # LlamaMLP, or a mixture of experts (layers/moe.py)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.residual_multiplier: Optional[float] = None  # Granite: attention and MLP outputs scaled

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        # A projection on the small-batch GEMV kernel takes the norm before it in the same
        # kernel (forward_rmsnorm, ops/gemv.py); otherwise norm, then projection.
        qkv_norm = getattr(getattr(self.self_attn, "qkv_proj", None), "forward_rmsnorm", None)
        if qkv_norm is not None:
            qkv, residual = qkv_norm(x, residual, self.input_layernorm)
            x = self.self_attn.attend(positions, qkv, meta)
        else:
            x, residual = pre_norm(self.input_layernorm, x, residual)
            x = self.self_attn(positions, x, meta)
        m = self.residual_multiplier
        if m is not None:
            x = x * m
        mlp_norm = getattr(getattr(self.mlp, "gate_up_proj", None), "forward_rmsnorm", None)
        if mlp_norm is not None:
            gate_up, residual = mlp_norm(x, residual, self.post_attention_layernorm)
            out = self.mlp.act_down(gate_up)
        else:
            x, residual = self.post_attention_layernorm(x, residual)
            out = self.mlp(x)
        return (out if m is None else out * m), residual


class LlamaModel(nn.Module):
    """Embeddings, the decoder layers (each made by `make_layer(rotary, index, window)`), the
    final norm (RMSNorm unless given)."""

    def __init__(self, cfg: Any, max_positions: int, make_layer: Callable[[RotaryEmbedding, int, int], nn.Module],
                 norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        rotary = make_rotary(cfg, _head_dim(cfg), max_positions)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(make_layer(rotary, i, w) for i, w in enumerate(layer_windows(cfg)))
        self.norm = norm if norm is not None else RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.embed_scale: Optional[float] = None  # Granite's embedding_multiplier
        # EAGLE-3 speculation (model/eagle.py): the hidden states entering these layers are
        # returned too, after the final ones on each row ([tokens, (1 + len) * hidden]).
        self.aux_layers: tuple[int, ...] = ()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: Optional[torch.Tensor] = None,
                deepstack: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """inputs_embeds: the tokens' embeddings given (image placeholders replaced by the
        vision encoder's outputs), instead of looked up from input_ids. deepstack: (rows,
        [levels, rows, hidden]) added to those rows' hidden states after each of the first
        `levels` layers (Qwen3-VL's DeepStack)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.embed_scale is not None:
            x = x * self.embed_scale
        residual = None
        aux = {}
        for i, layer in enumerate(self.layers):
            if i in self.aux_layers:
                aux[i] = x if residual is None else x + residual
            x, residual = layer(positions, x, residual, meta)
            if deepstack is not None and i < deepstack[1].shape[0]:  # (the hidden state is x + residual)
                x = x.index_add(0, deepstack[0], deepstack[1][i].to(x.dtype))
        x, _ = self.norm(x, residual)
        return torch.cat([x, *(aux[i] for i in self.aux_layers)], dim=-1) if aux else x


class LlamaForCausalLM(nn.Module):
    # HF checkpoint name piece -> (our fused parameter piece, shard)
    stacked_params = [
        (".q_proj.", ".qkv_proj.", "q"),
        (".k_proj.", ".qkv_proj.", "k"),
        (".v_proj.", ".qkv_proj.", "v"),
        (".gate_proj.", ".gate_up_proj.", "gate"),
        (".up_proj.", ".gate_up_proj.", "up"),
    ]
    # HF checkpoint name piece -> ours, where a module sits under another name.
    renamed: list[tuple[str, str]] = []

    @property
    def cuda_graph_safe(self) -> bool:
        """Decode steps may be captured in CUDA graphs (no host syncs, static shapes): expert
        layers, if any, must be on their Triton path (layers/moe.py)."""
        return moe_graph_safe(self)

    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        bias = bool(getattr(cfg, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": False}

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        return LlamaMLP(cfg)

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        """One decoder layer (architectures with another layer shape override this)."""
        return LlamaDecoderLayer(cfg, rotary, cls.attn_options(cfg), cls.build_mlp(cfg, layer_idx), window)

    @classmethod
    def final_norm(cls, cfg: Any) -> Optional[nn.Module]:
        return None  # LlamaModel's RMSNorm

    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, max_positions, lambda rotary, i, w: self.make_layer(cfg, rotary, i, w),
                                self.final_norm(cfg))
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: Optional[torch.Tensor] = None,
                deepstack: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if inputs_embeds is None:  # (decoders other than LlamaModel take no embeddings)
            return self.model(input_ids, positions, meta)
        if deepstack is None:
            return self.model(input_ids, positions, meta, inputs_embeds=inputs_embeds)
        return self.model(input_ids, positions, meta, inputs_embeds=inputs_embeds, deepstack=deepstack)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors into our (partly fused) parameters; every
        parameter must be covered."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            for hf_piece, piece in self.renamed:  # (first: a head renamed to lm_head is tied too)
                name = name.replace(hf_piece, piece)
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            expert = FusedMoE.match(name)
            if expert is not None:
                target, e, param, shard = expert
                module = self.get_submodule(target.rsplit(".", 1)[0]) if target in params else None
                if not isinstance(module, FusedMoE):
                    raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                loaded.add(f"{target.rsplit('.', 1)[0]}#{module.load_expert(param, e, shard, tensor, name)}")
                continue
            for hf_piece, piece, shard in self.stacked_params:
                if hf_piece in name:
                    target = name.replace(hf_piece, piece)
                    module = self.get_submodule(target.rsplit(".", 1)[0])
                    offset, size = module.shard_offsets[shard]
                    param = params[target]
                    if name.endswith(".weight_perm"):  # an input-side order (GPTQ act order): one for all shards
                        load_shared_perm(param, tensor, target, f"{target}#perm" in loaded)
                        loaded.update((f"{target}#perm", f"{target}#{shard}"))
                        break
                    if tensor.shape[0] != size or tensor.shape[1:] != param.shape[1:]:
                        raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit shard {shard} of {target}")
                    with torch.no_grad():
                        param[offset : offset + size].copy_(tensor)
                    loaded.add(f"{target}#{shard}")
                    break
            else:
                copy_into(params, name, tensor, name, type(self).__name__)
                loaded.add(name)
                # A checkpoint that already fuses it (Phi-3's qkv_proj, gate_up_proj): every shard.
                owner, kind = name.rsplit(".", 1)
                for shard in getattr(self.get_submodule(owner), "shard_offsets", {}):
                    loaded.add(f"{owner}.{kind}#{shard}")
        missing = []
        for name, module in self.named_modules():
            if isinstance(module, FusedMoE):
                missing += [f"{name} expert {k}" for k in sorted(module.expected_loads())
                            if f"{name}#{k}" not in loaded]
                continue
            for shard in getattr(module, "shard_offsets", {}):
                if f"{name}.weight#{shard}" not in loaded:
                    missing.append(f"{name}.weight ({shard})")
                if module.bias is not None and f"{name}.bias#{shard}" not in loaded:
                    missing.append(f"{name}.bias ({shard})")
                for part in ("weight_scale", "weight_zero", "weight_perm"):  # a quantized shard's parts
                    if getattr(module, part, None) is not None and f"{name}.{part}#{shard}" not in loaded:
                        missing.append(f"{name}.{part} ({shard})")
        stacked = {n for n, m in self.named_modules() if hasattr(m, "shard_offsets") or isinstance(m, FusedMoE)}
        for name in params:
            if name.rsplit(".", 1)[0] in stacked or name in loaded:
                continue
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            missing.append(name)
        check_complete(missing)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Ministral3ForCausalLM(LlamaForCausalLM):
    """Ministral 3 (Mistral's 3B / 8B / 14B of December 2025, the language model of their
    Mistral3ForConditionalGeneration checkpoints): the Mistral decoder with YaRN, its queries
    scaled by 1 + beta * log(1 + floor(position / original_max_position_embeddings))
    (`llama_4_scaling_beta`), which is 1 within the original context."""

    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        params = rope_parameters(cfg)
        beta = params.get("llama_4_scaling_beta")
        if beta:
            length = int(params.get("original_max_position_embeddings") or cfg.max_position_embeddings)
            for layer in self.model.layers:
                layer.self_attn.q_position_scale = (float(beta), length, 0)


class HunYuanDenseV1ForCausalLM(LlamaForCausalLM):
    """Hunyuan dense models (tencent/Hunyuan-0.5B..7B-Instruct): the Llama decoder with per-head
    RMSNorm of q and k after RoPE (`query_layernorm`, `key_layernorm`) and NTK-alpha RoPE (a
    fixed alpha stretches the base: theta * alpha ** (d / (d - 2)))."""

    renamed = [(".query_layernorm.", ".q_norm."), (".key_layernorm.", ".k_norm.")]

    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        bias = bool(getattr(cfg, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": True, "qk_norm_after_rope": True}

    @classmethod
    def make_layer(cls, cfg: Any, rotary: RotaryEmbedding, layer_idx: int, window: int) -> nn.Module:
        # (full attention whatever sliding_window a config.json carries: transformers ignores it)
        return super().make_layer(cfg, rotary, layer_idx, 0)


class ArceeForCausalLM(LlamaForCausalLM):
    """Arcee AFM: the Llama decoder with an MLP without a gate, ReLU² (down(relu(up(x))²))."""

    stacked_params = [p for p in LlamaForCausalLM.stacked_params if p[2] not in ("gate", "up")]

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        return UpDownMLP(cfg)


class ApertusForCausalLM(ArceeForCausalLM):
    """Apertus (swiss-ai): Arcee's gateless MLP with the xIELU activation (its numbers learned per
    layer), q/k norms per head, Llama-3 RoPE."""

    renamed = [(".attention_layernorm.", ".input_layernorm."),
               (".feedforward_layernorm.", ".post_attention_layernorm.")]

    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        bias = bool(getattr(cfg, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": True}


class SeedOssForCausalLM(LlamaForCausalLM):
    """Seed-OSS (ByteDance): the Llama decoder, its q/k/v biases (attention_bias) set apart
    from the output projection's (attention_out_bias); the MLP's follow mlp_bias."""

    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        return {"qkv_bias": bool(getattr(cfg, "attention_bias", True)),
                "o_bias": bool(getattr(cfg, "attention_out_bias", False)), "qk_norm": False}


class SmolLM3ForCausalLM(LlamaForCausalLM):
    """SmolLM3: the Llama decoder with RoPE left out of some layers (no_rope_layers: 1 keeps
    it, 0 drops it; every fourth layer in the released models)."""

    def __init__(self, cfg: Any, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        flags = list(getattr(cfg, "no_rope_layers", None) or [1] * cfg.num_hidden_layers)
        if len(flags) != cfg.num_hidden_layers:
            raise ValueError(f"config.json has {len(flags)} no_rope_layers for {cfg.num_hidden_layers} layers.")
        for layer, use_rope in zip(self.model.layers, flags):
            if not use_rope:
                layer.self_attn.rotary = None


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3, Phi-3.5, Phi-4 and Phi-4-mini: the Llama decoder; their checkpoints hold qkv_proj
    and gate_up_proj already fused, in our layout. LongRoPE and partial rotary (Phi-4-mini)
    are in layers/rotary.py, Phi-3-mini's sliding window in the attention backends."""


class MinistralForCausalLM(MistralForCausalLM):
    """Ministral (Ministral-8B-Instruct-2410 under its own model type): the Mistral decoder with
    the sliding window on the layers its `layer_types` marks (hf_config.layer_windows) and no
    bias anywhere, whatever attention_bias or mlp_bias a config.json carries (transformers'
    layers have none)."""

    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        return {"qkv_bias": False, "o_bias": False, "qk_norm": False}

    @classmethod
    def build_mlp(cls, cfg: Any, layer_idx: int) -> nn.Module:
        return LlamaMLP(cfg, bias=False)


class CwmForCausalLM(LlamaForCausalLM):
    """Code World Model (facebook/cwm): the Llama decoder (Llama-3 RoPE, MLP biases as mlp_bias
    says) with sliding windows on the layers `layer_types` marks (three of four by default) and
    no attention biases (its config's attention_bias is a placeholder that must not be read)."""

    @classmethod
    def attn_options(cls, cfg: Any) -> dict:
        return {"qkv_bias": False, "o_bias": False, "qk_norm": False}
