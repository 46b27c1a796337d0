"""The only component that touches tensors: builds a step's flat inputs, runs the model,
samples. Owns the model, the KV cache tensors and the per-request sampling state."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Optional

import numpy as np
import torch

from pagedserve.attention.backend import AttentionMetadata, NeededRows, StateRows, get_attention_backend
from pagedserve.config import EngineConfig
from pagedserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from pagedserve.engine.state_cache import StateCache, save_positions
from pagedserve.lora.layers import LoRASlots
from pagedserve.lora.manager import LoRAManager
from pagedserve.model.bert import TOKEN_TYPE_SHIFT
from pagedserve.model.eagle import EAGLE_METHODS
from pagedserve.model.gemma4_assistant import is_gemma4_assistant
from pagedserve.model.mtp import MTP_METHODS
from pagedserve.model.kv_scales import use_kv_scales
from pagedserve.model.loader import load_model
from pagedserve.ops.state_reference import verify_slot
from pagedserve.worker import kv_sizing
from pagedserve.worker.block_table import BlockTable
from pagedserve.worker.cuda_graphs import (DecodeBuffers, DecodeGraphRunner, TokenPatch, apply_patch, graph_sizes,
                                           pad_uniform)
from pagedserve.worker.runner_output import ModelRunnerOutput, PositionLogprobs
from pagedserve.worker.device_io import DeviceToHost, to_device
from pagedserve.worker.assistant_proposer import AssistantProposer
from pagedserve.worker.draft_model import DraftModelProposer
from pagedserve.worker.eagle_proposer import EagleProposer
from pagedserve.worker.encoder_cache import EncoderCache, profile_images
from pagedserve.worker.image_rows import image_kv_limits, rope_positions
from pagedserve.worker.pooling import PoolingStates
from pagedserve.worker.custom_logits import CustomLogits
from pagedserve.worker.sampler import Sampler
from pagedserve.worker.sampling_state import SamplingStates
from pagedserve.worker.sleep import SLEEP_TAGS, SleepingStorages, release_cached_memory, unique_storages
from pagedserve.worker.spec_verify import SampledDrafts, settle, verify_sampled
from pagedserve.worker.weight_updates import reload_weights, update_weights

logger = logging.getLogger("pagedserve")


@dataclass
class HostInputs:
    """A step's flat inputs on the host, before they become device tensors (eager) or are
    copied into a CUDA graph's static buffers."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64
    seq_lens: list[int]
    qsl: list[int]
    block_rows: np.ndarray  # [num_reqs, max_blocks] int32, this step's block table rows
    num_decodes: int
    sample_rows: list[int]
    # Decode rows whose input token the previous step is still sampling (async scheduling):
    # (row, request id); the token is taken from that step's samples on the device.
    pending_rows: list[tuple[int, str]] = field(default_factory=list)
    # [3, T] (time, height, width) positions when a row is an image token of an M-RoPE model
    # (Qwen2-VL); `positions` then holds their first component.
    mrope: Optional[np.ndarray] = None
    # [T] keys each row sees when some rows are image tokens that attend to their whole image
    # (Gemma 3; AttentionMetadata.kv_limit), else None (causal).
    kv_limit: Optional[np.ndarray] = None
    # Models with per-request states: each request's block-table row (its state row too)
    # and whether it continues a state (it has computed tokens before this step).
    state_rows: Optional[list[int]] = None
    state_init: Optional[list[bool]] = None
    # The rows whose hidden states are read, where fewer than all (kv_sharing_fast_prefill).
    needed_rows: Optional[list[int]] = None
    # Prefix caching of states (engine/state_cache.py): (row, slot) loaded before the forward
    # pass (requests resuming from a saved state), (row, prefix hash) saved after it (chunks
    # that end at a save position).
    state_loads: list[tuple[int, int]] = field(default_factory=list)
    state_saves: list[tuple[int, bytes]] = field(default_factory=list)
    # ... and states saved inside prefill chunks by the layers' scans: request index ->
    # [(position, prefix hash)], then [(position, slot)] once slots are given (_forward).
    state_keeps: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    state_keep_slots: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    # ... and (row, request, position) saved after it whose prefix hash needs a token still
    # being sampled (async scheduling): registered once it lands.
    state_pending: list[tuple[int, Any, int]] = field(default_factory=list)
    # Speculative decoding (verify_k): the requests after the decode rows that verify drafts
    # (StateRows.verify), and their positions to save, which wait for the drafts' checks:
    # request index -> positions (_settle_verifications).
    state_verify: int = 0
    verify_saves: dict[int, list[int]] = field(default_factory=dict)

    @property
    def decode_only(self) -> bool:
        return self.num_decodes == len(self.seq_lens)


class PendingStep:
    """A launched step: `result()` waits for the device and returns the step's output."""

    def __init__(self, collect: "ModelRunnerOutput | Callable[[], ModelRunnerOutput]") -> None:
        self._collect = collect

    def result(self) -> ModelRunnerOutput:
        if isinstance(self._collect, ModelRunnerOutput):
            return self._collect
        out = self._collect()
        self._collect = out
        return out


def _draft_extras(reqs: list, spec: list) -> Optional[list[list[int]]]:
    """Per sampled row, the drafts before its position (its penalties, min_tokens, bad words
    and grammar take them as output): a speculative request's plain row follows all its
    drafts, its draft row j the first j; None without drafts."""
    if not spec:
        return None
    drafts = {sr.request.request_id: sr.drafts for sr, _ in spec}
    n_plain = len(reqs) - sum(len(d) for d in drafts.values())
    extra = [drafts.get(r.request_id, []) for r in reqs[:n_plain]]
    for sr, _ in spec:
        extra += [sr.drafts[:j] for j in range(len(sr.drafts))]
    return extra


def _report_emitted(s_out: Any, drafts: SampledDrafts) -> None:
    """Sampled speculative rows: the logprob and rank of the token each row emits (its draft
    where it stood, else the token drawn in its place), not of the sampler's own draw there."""
    if s_out.sampled_logprobs is None:
        return
    rows = to_device(drafts.rows, torch.long, s_out.reported.device)
    rep = s_out.reported[rows]
    chosen = rep.gather(1, drafts.emitted.unsqueeze(1)).squeeze(1)
    s_out.sampled_logprobs[rows] = chosen
    s_out.sampled_ranks[rows] = (rep > chosen.unsqueeze(1)).sum(dim=-1, dtype=torch.int32) + 1


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.device
        self.block_size = config.block_size
        torch.manual_seed(config.seed)
        self.model = load_model(config.model, config.hf_config, config.dtype, config.device, config.max_model_len,
                                pooling=config.runner == "pooling", classify=config.pooling_task == "classify",
                                classifier_token_ids=config.classifier_token_ids,
                                quant_kernels=config.attention_backend == "triton", online_fp8=config.online_fp8,
                                dummy=config.dummy_weights, seed=config.seed)
        self.backend = get_attention_backend(config.attention_backend)
        self.attn_layers = self.model.attention_layers()
        for layer in self.attn_layers:
            layer.backend = self.backend
        if use_kv_scales(self.attn_layers, config.kv_dtype):
            logger.info("FP8 KV cache with the checkpoint's per-layer scales")
        self.lora: Optional[LoRAManager] = None
        self.lora_slots: Optional[LoRASlots] = None  # the adapters' factors as the forward pass reads them
        if config.enable_lora:
            spec = config.speculative_config
            max_rows = max(config.max_num_batched_tokens,
                           config.max_num_seqs * (1 + (spec.num_speculative_tokens if spec is not None else 0)))
            self.lora_slots = LoRASlots(self.model, config.max_loras, config.max_lora_rank, max_rows, config.dtype,
                                        config.device)
            logger.info("LoRA: %d adapter slots of rank %d, %.1f MiB", config.max_loras, config.max_lora_rank,
                        self.lora_slots.num_bytes() / 2**20)
            self.lora = LoRAManager(self.model, config.max_lora_rank, config.max_cpu_loras, config.dtype,
                                    config.device)
        if self.backend.name == "triton":  # the fused norm, RoPE and SiLU-and-mul kernels too
            for m in self.model.modules():
                if hasattr(m, "use_triton"):
                    m.use_triton = True
            from pagedserve.ops.gemv import install_all

            # Small-batch layers measured faster than cuBLAS here; not with LoRA, whose hooks
            # the GEMV's fused norm calls would go around.
            installed = {} if config.enable_lora else install_all(self.model)
            if installed:
                logger.info("small-batch GEMV kernel on layer shapes %s", installed)
        self.pooling = None
        if config.runner == "pooling":
            from pagedserve.model.st_dense import load_dense_layers

            self.pooling = PoolingStates(config.pooler, load_dense_layers(config.pooler.dense, self.device))
        self.encoder_cache: Optional[EncoderCache] = None  # a vision-language model's image embeddings
        if config.max_images_per_prompt > 0:
            from pagedserve.multimodal.encoder import load_image_encoder

            encoder = load_image_encoder(config.model, config.dtype, config.device, config.mm_processor_kwargs)
            self.encoder_cache = EncoderCache(encoder, config.device, config.dtype)
        elif config.enable_prompt_embeds:  # prompt embeddings ride the image rows' path, with no encoder
            self.encoder_cache = EncoderCache(None, config.device, config.dtype)
        self.draft: Optional[DraftModelProposer] = None  # speculative decoding's draft model
        spec = config.speculative_config
        self.sampler = Sampler(config.logprobs_mode)
        self.sampling_states = SamplingStates(config.vocab_size, config.device)
        # The user's logits processors (LLM(logits_processors=...)), instantiated once.
        self.custom_logits = (CustomLogits(config.logits_processors, config, config.device)
                              if config.logits_processors else None)
        if spec is not None and spec.method == "draft_model" and is_gemma4_assistant(spec.model):
            # (a Gemma 4 assistant: a draft model by its name, but drafting from the target's state)
            self.draft = AssistantProposer(config, self.backend, self.sampler, self.sampling_states, self.model)
        elif spec is not None and spec.method == "draft_model":  # it samples as the requests ask
            self.draft = DraftModelProposer(config, self.backend, self.sampler, self.sampling_states)
        elif spec is not None and spec.method in EAGLE_METHODS + MTP_METHODS:  # it reads the target's hidden states
            self.draft = EagleProposer(config, self.backend, self.sampler, self.sampling_states, self.model)
        # Gemma 4's KV-sharing layers run on the rows whose outputs are read alone (their KV is an
        # earlier layer's): not beside a proposer reading every row's features (EAGLE, MTP; an
        # assistant reads only the feature of the row that sampled a request's last token, a
        # sampled row), LoRA's per-row adapters, or pooling (every row pooled).
        self.fast_prefill = (config.kv_sharing_fast_prefill and getattr(self.model, "skips_unread_rows", False)
                             and (self.draft is None or isinstance(self.draft, AssistantProposer))
                             and not config.enable_lora and config.runner == "generate")
        self.prompt_logprobs_next: dict[str, int] = {}  # next prompt position whose logprob is owed
        self.block_table = BlockTable(config.max_num_seqs, -(-config.max_model_len // config.block_size))
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        # Layers with a per-request state keep it (fixed-size) in the row of the
        # request's block-table row, plus a scratch row the decode graphs' padding rows use
        # (allocated now: the KV cache is sized from what is left).
        self.state_layers = list(getattr(self.model, "state_layers", list)())
        for layer in self.state_layers:
            layer.allocate_state(config.max_num_seqs + 1, self.device, config.dtype, config.ssm_dtype)
        self.state_cache: Optional[StateCache] = None  # prefix caching of those states
        # (request, tokens) -> the request's block hashes over its first `tokens`, extended as
        # needed (the KV cache manager's, set by the engine): the keys of saved states.
        self.block_hashes: Callable[[Any, int], list[bytes]] = lambda req, upto: req.block_hashes
        self._pending_saves: list[tuple[Any, int, int]] = []  # (request, position, reserved slot)
        if self.state_layers and config.enable_prefix_caching:
            self.state_cache = StateCache(config.state_cache_slots)
        # Speculative decoding keeps k states a row: those after each token of a verification
        # but the last, to step back to after the last accepted one (StateMixer._verify_rows).
        self.verify_k = spec.num_speculative_tokens if spec is not None and self.state_layers else 0
        cache_slots = config.state_cache_slots if self.state_cache is not None else 0
        self._verify_base = cache_slots  # (the verification slots follow the prefix cache's)
        if cache_slots or self.verify_k:
            for layer in self.state_layers:
                layer.allocate_snapshots(cache_slots, config.max_num_seqs + 1, self.verify_k)
        if self.state_layers:
            logger.info("per-request states: %d layers, %.1f MiB for %d requests, %d saved prefixes and %d states "
                        "of verifications a request", len(self.state_layers),
                        sum(t.nbytes for t in self._state_tensors()) / 2**20, config.max_num_seqs, cache_slots,
                        self.verify_k)
        self.graphs: Optional[DecodeGraphRunner] = None  # decode CUDA graphs, captured after the KV cache
        # Graphs of 1 + k query rows a request: speculative verification steps (and any step
        # whose every request has at most 1 + k tokens).
        self.verify_graphs: Optional[DecodeGraphRunner] = None
        self._asleep: dict[str, list[SleepingStorages]] = {}  # sleep mode: tag -> memory given back
        # The last launched step's sampled tokens (device) and the requests of its rows.
        self._last_samples: Optional[tuple[torch.Tensor, list]] = None

    # ---- KV cache ---------------------------------------------------------------------
    def _kv_groups(self) -> list[tuple[tuple[int, int], list[int]]]:
        """The attention layers grouped by cache shape, (num_kv_heads, head_dim) -> their
        indices, in first-seen order: one cache tensor a group (Gemma 4's global layers have
        heads of their own width and number)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, a in enumerate(self.attn_layers):
            groups.setdefault((a.num_kv_heads, a.head_dim), []).append(i)
        return list(groups.items())

    def _new_kv_caches(self, num_blocks: int, empty: bool = False) -> list[torch.Tensor]:
        """[layers of the group, parts, blocks, block size, kv heads, head dim] a group. Zeroed
        unless `empty`: padded positions of a gathered block must never hold NaN."""
        make = torch.empty if empty else torch.zeros
        if not self.attn_layers:  # an encoder (model/bert.py): no KV cache, an empty tensor
            return [make((0, 2, num_blocks, self.block_size, 1, 1), dtype=self.config.kv_dtype, device=self.device)]
        parts = self._kv_parts()
        return [make((len(idx), parts, num_blocks, self.block_size, kvh, hd), dtype=self.config.kv_dtype,
                     device=self.device) for (kvh, hd), idx in self._kv_groups()]

    def _kv_parts(self) -> int:
        """2 caches a layer (keys, values), or 1 where values are read from the key cache (MLA)."""
        shared = {bool(getattr(a, "kv_shared", False)) for a in self.attn_layers}
        if len(shared) > 1:
            raise ValueError("attention layers that share their key and value caches cannot mix with ones that do not.")
        return 1 if shared == {True} else 2

    def kv_block_bytes(self) -> int:
        """Bytes of one KV block over every layer (the draft model's too)."""
        own = sum(kv_sizing.block_bytes(len(idx), self.block_size, kvh, hd, self.config.kv_dtype, self._kv_parts())
                  for (kvh, hd), idx in self._kv_groups())
        return own + (self.draft.kv_block_bytes() if self.draft is not None else 0)

    def determine_num_blocks(self) -> int:
        per_seq = -(-self.config.max_model_len // self.block_size)
        if not self.attn_layers:  # blocks cost nothing: as many as max_num_seqs full sequences use
            return self.config.max_num_seqs * per_seq
        per_block = self.kv_block_bytes()
        if self.config.kv_cache_memory_bytes is not None:
            n = self.config.kv_cache_memory_bytes // per_block
            if n < 1:
                raise ValueError(f"kv_cache_memory_bytes={self.config.kv_cache_memory_bytes} is smaller than one "
                                 f"KV block ({per_block} bytes).")
            return int(n)
        if self.device.type == "cpu":
            return kv_sizing.cpu_num_blocks(per_block, self.config.max_num_seqs * per_seq)
        return kv_sizing.cuda_num_blocks(per_block, self.config.gpu_memory_utilization, self.device, self._profile_run)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._bind(self._new_kv_caches(num_blocks))
        if self.draft is not None:
            self.draft.allocate_kv_cache(num_blocks)
        self._capture_graphs()

    def _capture_graphs(self) -> None:
        """Every CUDA graph, in one memory pool (they never run at the same time), largest
        first: the target's verification graphs, its decode graphs, then the draft model's (or
        EAGLE head's) catch-up and one-token graphs. Their activations (at most max_num_batched_tokens
        tokens) fit the headroom the profiling pass left."""
        if not self.use_cuda_graphs():
            return
        if self.lora_slots is not None:  # the adapters' products in every graph (rows without one add 0)
            self.lora_slots.active = True
        pool = torch.cuda.graph_pool_handle()
        spec = self.config.speculative_config
        if spec is not None:
            self.verify_graphs = self.make_graph_runner(capture=True, query_len=1 + spec.num_speculative_tokens)
            if self.verify_graphs is not None:
                self.verify_graphs.capture(pool)
        self.graphs = self.make_graph_runner(capture=True)
        self.graphs.capture(pool)
        draft = self.draft
        if draft is not None and not draft.cfg.enforce_eager and getattr(draft.model, "cuda_graph_safe", True):
            draft.pair_graphs = self.make_graph_runner(capture=True, model=draft.model, query_len=2)
            if draft.pair_graphs is not None:
                draft.pair_graphs.capture(pool)
            draft.graphs = self.make_graph_runner(capture=True, model=draft.model)
            draft.graphs.capture(pool)
        elif isinstance(draft, EagleProposer) and not draft.cfg.enforce_eager:
            for graphs in draft.make_graphs(lambda fn, q: self.make_graph_runner(capture=True, model=fn, query_len=q)):
                graphs.capture(pool)
        if self.lora_slots is not None:
            self.lora_slots.active = False

    def use_cuda_graphs(self) -> bool:
        return (self.device.type == "cuda" and not self.config.enforce_eager
                and getattr(self.backend, "supports_cuda_graphs", False)
                and getattr(self.model, "cuda_graph_safe", True)
                and self.config.runner == "generate")  # a pooling model only prefills

    def make_graph_runner(self, capture: bool, model: Optional[Callable] = None,
                          query_len: int = 1) -> Optional[DecodeGraphRunner]:
        """Graphs of `model` (default: the target; the draft model's passes have theirs) over
        batch-size buckets up to max_num_seqs, of query_len rows a request; capture=False runs
        the same static-buffer path eagerly (tests without CUDA). Where query_len > 1, only
        buckets within max_num_batched_tokens (and speculation's disable_by_batch_size): None
        if no bucket is left."""
        cfg = self.config
        sizes = graph_sizes(cfg.max_num_seqs, cfg.cuda_graph_sizes)
        if query_len > 1:
            spec = cfg.speculative_config
            cap = spec.disable_by_batch_size if spec is not None and spec.disable_by_batch_size else cfg.max_num_seqs
            sizes = [s for s in sizes if s * query_len <= cfg.max_num_batched_tokens and s <= cap]
            if not sizes:
                return None
        scratch = cfg.max_num_seqs if self.state_layers and model is None else None  # (the target's states)
        buffers = DecodeBuffers(sizes[-1], self.block_table.table.shape[1], self.block_size, cfg.max_model_len,
                                self.device, query_len=query_len, scratch_state_row=scratch)
        return DecodeGraphRunner(model or self.model, buffers, sizes, capture=capture)

    def _state_tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.state_layers for t in layer.state_tensors()]

    def _bind(self, caches: list[torch.Tensor]) -> None:
        pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for cache, (_, idx) in zip(caches, self._kv_groups()):
            pairs.update({i: (cache[j, 0], cache[j, -1]) for j, i in enumerate(idx)})  # (one part: v is k)
        self.kv_caches = [pairs[i] for i in range(len(pairs))]
        for layer, (k, v) in zip(self.attn_layers, self.kv_caches):
            layer.k_cache, layer.v_cache = k, v

    # ---- sleep mode and weight updates (worker/sleep.py, worker/weight_updates.py) ----------
    def sleep(self, level: int) -> dict[str, int]:
        """Give back the KV cache's memory (its contents are dropped) and the decoder weights'
        (level 1: kept in host memory; level 2: dropped, to be reloaded or replaced after
        wake-up). The vision encoder and buffers are small and always kept in host memory.
        Returns the bytes given back by tag."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 (weights kept in host memory) or 2 (weights dropped), "
                             f"got {level!r}.")
        if self._asleep:
            raise RuntimeError("the engine is already asleep.")
        params = unique_storages(self.model.parameters())
        taken = {s.data_ptr() for s in params}
        kept = [t for t in self.model.buffers()]
        enc = self.encoder_cache.encoder if self.encoder_cache is not None else None
        if enc is not None:
            kept += list(enc.parameters()) + list(enc.buffers())
        kept_storages = [s for s in unique_storages(kept) if s.data_ptr() not in taken]
        kv = unique_storages([t for pair in self.kv_caches for t in pair] + self._state_tensors())
        self.graphs = self.verify_graphs = None  # they hold the addresses about to go; captured again on wake-up
        self._asleep = {
            "weights": [SleepingStorages(params, offload=level == 1), SleepingStorages(kept_storages, offload=True)],
            "kv_cache": [SleepingStorages(kv, offload=False)],
        }
        release_cached_memory(self.device)
        return {tag: sum(s.nbytes for s in parts) for tag, parts in self._asleep.items()}

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Take the memory of `tags` (default: all of SLEEP_TAGS) again. The KV cache comes
        back zeroed; once all is awake the decode CUDA graphs are captured again."""
        for tag in tags if tags is not None else SLEEP_TAGS:
            if tag not in SLEEP_TAGS:
                raise ValueError(f"wake_up tags must be among {list(SLEEP_TAGS)}, got {tag!r}.")
            for part in self._asleep.pop(tag, ()):
                part.restore(zero=tag == "kv_cache")
        if not self._asleep and self.graphs is None:
            self._capture_graphs()

    @property
    def sleeping_tags(self) -> list[str]:
        return sorted(self._asleep)

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        if "weights" in self._asleep:
            raise RuntimeError("the weights are asleep: wake_up(tags=['weights']) first.")
        with torch.no_grad():
            return update_weights(self.model, self.config.hf_config, weights)

    def reload_weights(self) -> None:
        if "weights" in self._asleep:
            raise RuntimeError("the weights are asleep: wake_up(tags=['weights']) first.")
        with torch.no_grad():
            reload_weights(self.model)

    def _profile_run(self) -> None:
        """A worst-case step: max_num_batched_tokens prompt tokens (split into requests of at
        most max_model_len), and max_num_seqs rows of logits."""
        cfg = self.config
        n = cfg.max_num_batched_tokens
        lens = [min(cfg.max_model_len, n - s) for s in range(0, n, cfg.max_model_len)]
        per_req = -(-max(lens) // self.block_size)
        nblocks = per_req * len(lens)
        self._bind(self._new_kv_caches(nblocks))
        qsl = np.cumsum([0] + lens).tolist()
        dev = self.device
        positions = torch.cat([torch.arange(m, device=dev) for m in lens])
        slots = torch.cat([torch.arange(m, device=dev) + i * per_req * self.block_size for i, m in enumerate(lens)])
        meta = AttentionMetadata(
            num_tokens=n, num_actual_tokens=n, num_reqs=len(lens), num_decodes=0, slot_mapping=slots,
            block_tables=torch.arange(nblocks, dtype=torch.int32, device=dev).view(len(lens), per_req),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            max_query_len=max(lens), max_seq_len=max(lens), seq_lens_cpu=lens, query_start_loc_cpu=qsl,
            block_size=self.block_size,
        )
        with torch.inference_mode():
            if self.encoder_cache is not None and self.encoder_cache.encoder is not None:  # its worst step too
                self.encoder_cache.encoder.encode(profile_images(self.encoder_cache.encoder, cfg))
            if self.lora_slots is not None:  # with the adapters' products (no adapter: 0 added)
                self.lora_slots.active = True
            hidden = self.model(torch.zeros(n, dtype=torch.long, device=dev), positions, meta)
            if isinstance(self.draft, EagleProposer):  # (the target's own columns)
                hidden = self.draft.keep_features([], [0], hidden)
            if self.lora_slots is not None:
                self.lora_slots.active = False
            if self.model.lm_head is not None:  # none in a pooling model
                rows = torch.arange(cfg.max_num_seqs, device=dev) % n
                self.model.compute_logits(hidden[rows])
        self._bind(self._new_kv_caches(0, empty=True))

    def release(self, request_ids) -> None:
        """Forget the per-request state of finished or aborted requests."""
        request_ids = set(request_ids)
        if self._pending_saves:
            self._register_pending_saves(dropped=request_ids)
        for rid in request_ids:
            self.sampling_states.drop(rid)
            self.prompt_logprobs_next.pop(rid, None)
            self.block_table.release(rid)
            if self.lora is not None:
                self.lora.release(rid)
            if self.pooling is not None:
                self.pooling.drop(rid)
            if self.encoder_cache is not None:
                self.encoder_cache.release(rid)

    # ---- one step -----------------------------------------------------------------------
    def launch(self, out: SchedulerOutput) -> "PendingStep":
        """Queue the scheduled step on the device and return without waiting for the GPU:
        host-to-device copies go through pinned memory, the sampler reads nothing back, and
        results come back behind an event (worker/device_io.py), so the caller can do host
        work, or prepare the next step, while it runs. `result()` waits for this step only
        and gives the sampled tokens of the requests whose chunk reaches their end, with
        logprobs where asked, and prompt logprobs for the positions computed."""
        for req in out.preempted:  # their blocks were freed; they get fresh ones later
            self.block_table.release(req.request_id)
        if out.is_empty():
            return PendingStep(ModelRunnerOutput())
        order = [s for s in out.scheduled if s.num_tokens == 1]
        rest = [s for s in out.scheduled if s.num_tokens != 1]
        if self.verify_k:  # verifications next, longest first (StateMixer._verify_rows)
            rest = sorted((s for s in rest if s.drafts), key=lambda s: -s.num_tokens) + [s for s in rest if not s.drafts]
        order += rest
        host = self._host_inputs(order)
        if self.pooling is not None:
            return self._launch_pooling(order, host)
        sampled_reqs = [order[i].request for i in host.sample_rows]
        hidden_rows = [host.qsl[i + 1] - 1 for i in host.sample_rows]
        if self.custom_logits is not None:  # (no speculative rows: config refuses the two together)
            self.custom_logits.update(sampled_reqs)
        # Speculative rows: every position of the request's chunk is sampled (its last token's
        # and each draft's), after the plain rows.
        spec = [(order[i], host.qsl[i]) for i in host.sample_rows if order[i].drafts]
        for sr, first in spec:
            sampled_reqs += [sr.request] * len(sr.drafts)
            hidden_rows += range(first, first + len(sr.drafts))
        prompt_lp = self._prompt_logprob_rows(order, host.qsl)
        rows = hidden_rows + [r for _, _, rs, _ in prompt_lp for r in rs]
        uniform = self._uniform_step(host)
        if uniform is not None and rows:  # the hidden states come in the graphs' padded layout
            rows = uniform[1][4][rows].tolist()
        # A decode-only step samples every row in order: its logits rows are a slice of the
        # hidden states (no gather, no index copy to the device).
        rows_t = None if not rows or rows == list(range(len(rows))) else to_device(rows, torch.long, self.device)
        if self.lora_slots is not None:
            self._set_lora_rows(order, host, uniform)
        if self.fast_prefill and uniform is None and host.mrope is None and host.kv_limit is None and rows:
            needed = sorted(set(rows))
            if len(needed) < len(host.input_ids):
                host.needed_rows = needed
        with torch.inference_mode():
            patch = self._pending_token_patch(host.pending_rows)
            images = self.encoder_cache.step_rows(order, host.qsl) if self.encoder_cache is not None else None
            hidden = self._forward(host, patch, images, uniform)
            if isinstance(self.draft, EagleProposer):
                hidden = self.draft.keep_features(order, host.qsl, hidden, None if uniform is None else uniform[1][4])
            if not rows:
                return PendingStep(ModelRunnerOutput())
            # Sampling's host work (per-row tensors, grammar masks) runs while the GPU does
            # the forward pass queued above.
            batch = (self.sampling_states.build(sampled_reqs, _draft_extras(sampled_reqs, spec))
                     if sampled_reqs else None)
            if batch is not None:
                batch.custom = self.custom_logits
            targets = [req.prompt_token_ids[first : first + len(rs)] for req, first, rs, _ in prompt_lp]
            targets_t = (to_device([t for ts in targets for t in ts], torch.long, self.device)
                         if prompt_lp else None)
            logits = self.model.compute_logits(hidden[: len(rows)] if rows_t is None else hidden[rows_t])
            s_out = (self.sampler(logits[: len(hidden_rows)], batch, keep_reported=bool(spec), keep_input=bool(spec))
                     if batch is not None else None)
            plp = (self._prompt_logprob_tensors(logits[len(hidden_rows):], prompt_lp, targets, targets_t,
                                                raw_logits=self.config.logprobs_mode.endswith("logits"))
                   if prompt_lp else None)
            # Copies to the host queued right behind this step, so that result() waits for this
            # step alone, not for one launched after it (async scheduling).
            d2h = DeviceToHost(self.device)
            sampled_drafts = self._verify_sampled_drafts(logits, spec, len(hidden_rows), d2h)
            if s_out is not None and s_out.reported is not None:
                if sampled_drafts is not None:
                    _report_emitted(s_out, sampled_drafts)
                s_out.reported = None
            s_host = d2h.dataclass(s_out)
            plp_host = None if plp is None else [
                (req, tgt, d2h(chosen), d2h(ranks), None if top is None else (d2h(top[0]), d2h(top[1])))
                for req, tgt, chosen, ranks, top in plp]
            d2h.record()
        if s_out is not None:  # the next step, if scheduled before these are back, reads them here
            self._last_samples = (s_out.tokens, sampled_reqs)

        def collect() -> ModelRunnerOutput:
            d2h.wait()
            result = ModelRunnerOutput()
            if s_host is not None:
                self._collect_samples(sampled_reqs, s_host, result, spec, sampled_drafts)
                if host.state_verify or (self.verify_k and uniform is not None):
                    self._settle_verifications(order, host, result.accepted, uniform is not None)
            if plp_host is not None:
                self._collect_prompt_logprobs(plp_host, result)
            return result

        return PendingStep(collect)

    def _settle_verifications(self, order: list[ScheduledRequest], host: HostInputs,
                              accepted: dict[str, list[int]], uniform: bool) -> None:
        """Models with states, after a step with drafts: each verifying request's state goes
        back to after its last accepted token (from its verification slot: its row holds the
        state after the last token run), and the saves due up to there are made. In a
        verification graph (`uniform`) every request ran its padded 1 + k tokens."""
        nd, base, k = host.num_decodes, self._verify_base, self.verify_k
        loads, from_rows, from_slots = [], [], []
        for i in range(0, len(order)) if uniform else range(nd, nd + host.state_verify):
            s, row = order[i], host.state_rows[i]
            ran = 1 + k if uniform else s.num_tokens
            a = len(accepted.get(s.request.request_id, ()))
            if a < ran - 1:
                loads.append((row, verify_slot(base, k, row, a)))
            for p in host.verify_saves.get(i, ()):
                j = p - s.start - 1  # the state before p: after the chunk's token j
                if j > a:
                    break
                slot = self.state_cache.reserve()
                self._pending_saves.append((s.request, p, slot))
                if j == ran - 1:
                    from_rows.append((row, slot))
                else:
                    from_slots.append((verify_slot(base, k, row, j), slot))
        with torch.inference_mode():
            if from_slots:
                src, dst = to_device([[p for p, _ in from_slots], [q for _, q in from_slots]], torch.long, self.device)
                for layer in self.state_layers:
                    layer.copy_snapshots(src, dst)
            if from_rows:
                self._copy_states(from_rows, load=False)
            if loads:
                self._copy_states(loads, load=True)

    def _launch_pooling(self, order: list[ScheduledRequest], host: HostInputs) -> "PendingStep":
        """A pooling model's step: every chunk feeds its request's pooled state; requests whose
        prompt this step completes get their vectors."""
        done: list[tuple[str, torch.Tensor]] = []
        with torch.inference_mode():
            hidden = self._forward(host)
            for i, s in enumerate(order):
                rid, rows = s.request.request_id, hidden[host.qsl[i] : host.qsl[i + 1]]
                self.pooling.add_chunk(rid, rows, s.start)
                if s.samples:
                    p = s.request.pooling_params
                    vec = self.pooling.finish(rid, rows, s.request.num_prompt_tokens, p.dimensions, p.normalize)
                    if self.config.pooling_task == "classify":
                        vec = self._class_probs(vec)
                    done.append((rid, vec))
            d2h = DeviceToHost(self.device)
            vectors = [(rid, d2h(v)) for rid, v in done]
            d2h.record()

        def collect() -> ModelRunnerOutput:
            d2h.wait()
            return ModelRunnerOutput(pooled={rid: v.tolist() for rid, v in vectors})

        return PendingStep(collect)

    def _class_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """A classifier's head on the pooled hidden state: softmax over the labels, or a sigmoid
        per label for one label or multi-label problems (as vLLM)."""
        logits = self.model.score(hidden.to(self.config.dtype)).float()
        cfg = self.config.hf_config
        if logits.shape[-1] == 1 or getattr(cfg, "problem_type", None) == "multi_label_classification":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def _verify_sampled_drafts(self, logits: torch.Tensor, spec: list, num_rows: int,
                               d2h: DeviceToHost) -> Optional[SampledDrafts]:
        """Queue the rejection-sampling checks of the drafts of sampled (not greedy) requests;
        their draft rows follow the plain rows in `logits`, k per request in `spec` order."""
        rows, scheduled = [], []
        at = num_rows - sum(len(sr.drafts) for sr, _ in spec)
        for sr, _ in spec:
            if not sr.request.sampling_params.is_greedy:
                rows += range(at, at + len(sr.drafts))
                scheduled.append(sr)
            at += len(sr.drafts)
        if not rows:
            return None
        batch = self.sampling_states.build([sr.request for sr in scheduled for _ in sr.drafts],
                                           [sr.drafts[:j] for sr in scheduled for j in range(len(sr.drafts))])
        draft_probs = self.draft.take_probs(scheduled, logits.shape[1]) if self.draft is not None else None
        return verify_sampled(self.sampler, logits, rows, batch, scheduled, d2h, draft_probs)

    @staticmethod
    def _collect_samples(reqs, s_out, result: ModelRunnerOutput, spec: list,
                         sampled_drafts: Optional[SampledDrafts] = None) -> None:
        tokens = s_out.tokens.tolist()
        n_plain = len(reqs) - sum(len(sr.drafts) for sr, _ in spec)
        result.sampled = {r.request_id: t for r, t in zip(reqs[:n_plain], tokens)}
        checks = {}
        if sampled_drafts is not None:
            acc, res = sampled_drafts.accepted.tolist(), sampled_drafts.resampled.tolist()
            at = 0
            for sr in sampled_drafts.requests:
                k = len(sr.drafts)
                checks[sr.request.request_id] = (acc[at:at + k], res[at:at + k])
                at += k
        at = n_plain
        for sr, _ in spec:
            rid, k = sr.request.request_id, len(sr.drafts)
            if rid in checks:  # sampled: drafts stand as rejection sampling decided
                accepted, picks = checks[rid]
            else:  # greedy: the model's choices at the draft positions
                accepted, picks = None, tokens[at:at + k]
            at += k
            result.accepted[rid], result.sampled[rid] = settle(sr.drafts, picks + [result.sampled[rid]], accepted)
        if s_out.sampled_logprobs is None:
            return
        lps, ranks = s_out.sampled_logprobs.tolist(), s_out.sampled_ranks.tolist()
        top_ids = s_out.topk_ids.tolist() if s_out.topk_ids is not None else None
        top_lps = s_out.topk_logprobs.tolist() if s_out.topk_logprobs is not None else None

        def position(row: int, token: int, k: int) -> PositionLogprobs:
            return PositionLogprobs(token, lps[row], ranks[row], top_ids[row][:k] if k else [],
                                    top_lps[row][:k] if k else [])

        for i, r in enumerate(reqs[:n_plain]):
            k = r.sampling_params.logprobs
            if k is not None:
                result.logprobs[r.request_id] = position(i, tokens[i], k)
        # Speculative requests: a position per token emitted, each read from the row that
        # predicted it (a draft row, or the plain row after every draft); sampled rows' values
        # are of the emitted token (_report_emitted).
        plain_row = {r.request_id: i for i, r in enumerate(reqs[:n_plain])}
        at = n_plain
        for sr, _ in spec:
            rid, k = sr.request.request_id, sr.request.sampling_params.logprobs
            n = len(sr.drafts)
            if k is not None:
                emitted = result.accepted[rid] + [result.sampled[rid]]
                rows = list(range(at, at + n)) + [plain_row[rid]]
                result.logprobs[rid] = [position(row, t, k) for row, t in zip(rows, emitted)]
            at += n

    def _prompt_logprob_rows(self, order: list[ScheduledRequest], qsl: list[int]):
        """For requests wanting prompt logprobs: (request, first target position, hidden rows,
        k) for the prompt positions this chunk predicts that were not reported yet (a
        preempted request recomputes its prompt without reporting it twice)."""
        items = []
        for i, s in enumerate(order):
            req = s.request
            k = req.sampling_params.prompt_logprobs
            if k is None:
                continue
            nxt = self.prompt_logprobs_next.get(req.request_id, 1)
            # hidden row at position p predicts the token at p + 1
            first = max(nxt, s.start + 1)
            last = min(s.end, req.num_prompt_tokens - 1)  # last target position
            if first > last:
                continue
            base = qsl[i] - s.start
            items.append((req, first, [base + t - 1 for t in range(first, last + 1)], k))
            self.prompt_logprobs_next[req.request_id] = last + 1
        return items

    @staticmethod
    def _prompt_logprob_tensors(logits: torch.Tensor, items, targets: list[list[int]], targets_t: torch.Tensor,
                                raw_logits: bool = False):
        """Queue the prompt-logprob computations of a step: per item (request, target ids,
        chosen logprobs, ranks, top-k values and ids or None). targets_t: all items' target
        ids, already on the device. raw_logits: the logits themselves (logprobs_mode
        "*_logits"; a prompt position has no sampling to process)."""
        logprobs = logits.float() if raw_logits else logits.float().log_softmax(dim=-1)
        offset = 0
        out = []
        for (req, _, rows, k), tgt in zip(items, targets):
            lp = logprobs[offset : offset + len(rows)]
            chosen = lp.gather(1, targets_t[offset : offset + len(rows)].unsqueeze(1)).squeeze(1)
            offset += len(rows)
            ranks = (lp > chosen.unsqueeze(1)).sum(-1, dtype=torch.int32) + 1
            top = lp.topk(k, dim=-1) if k else None
            out.append((req, tgt, chosen, ranks, top))
        return out

    @staticmethod
    def _collect_prompt_logprobs(items, result: ModelRunnerOutput) -> None:
        for req, targets, chosen, ranks, top in items:
            n = len(targets)
            top_v = top[0].tolist() if top is not None else [[]] * n
            top_i = top[1].tolist() if top is not None else [[]] * n
            result.prompt_logprobs[req.request_id] = [
                PositionLogprobs(t, c, rk, ti, tv)
                for t, c, rk, ti, tv in zip(targets, chosen.tolist(), ranks.tolist(), top_i, top_v)]

    def _pending_token_patch(self, pending_rows: list[tuple[int, str]]) -> Optional[TokenPatch]:
        """(rows, tokens) on the device for decode rows whose input the previous step is still
        sampling: its sampled-token tensor, gathered without waiting for it."""
        if not pending_rows:
            return None
        assert self._last_samples is not None, "a pending input token but no step sampled it"
        tokens, reqs = self._last_samples
        row_of = {r.request_id: i for i, r in enumerate(reqs)}
        src = [row_of[rid] for _, rid in pending_rows]
        rows = [t for t, _ in pending_rows]
        if rows == src == list(range(len(rows))):  # the same requests in the same order (batch 1
            return None, tokens[: len(rows)]  # always): a plain copy, no index to send up
        idx = to_device([rows, src], torch.long, self.device)
        return idx[0], tokens.index_select(0, idx[1])

    def _set_lora_rows(self, order: list[ScheduledRequest], host: HostInputs, uniform) -> None:
        """Each row's adapter slot (lora/layers.py), in the layout the forward pass takes:
        the flat rows, or the verification graphs' padded ones (their padding: no adapter)."""
        slots = self.lora_slots.slot_of([self.lora.adapter_of(s.request.request_id) for s in order])
        rows = np.repeat(np.asarray(slots, dtype=np.int64), np.diff(host.qsl))
        if uniform is not None:
            padded = np.full(len(uniform[1][0]), -1, dtype=np.int64)
            padded[uniform[1][4]] = rows
            rows = padded
        self.lora_slots.set_rows(rows)

    def _uniform_step(self, host: HostInputs) -> Optional[tuple[DecodeGraphRunner, tuple[np.ndarray, ...]]]:
        """The verification graphs and the step laid out for them (pad_uniform), where the step
        has a request of several tokens, each of at most 1 + k (a speculative verification
        step, or short last prompt chunks beside decodes), and fits a bucket; else None."""
        g = self.verify_graphs
        if (g is None or host.decode_only or host.mrope is not None or host.kv_limit is not None
                or host.pending_rows or self.encoder_cache is not None or len(host.seq_lens) > g.max_size
                or max(b - a for a, b in zip(host.qsl, host.qsl[1:])) > g.query_len):
            return None
        # Models with states: there every request runs as a verification of 1 + k tokens, so
        # only decodes and verifications, with no state to save at the step's end.
        if self.state_layers and (host.num_decodes + host.state_verify < len(host.seq_lens) or host.state_saves
                                  or host.state_keeps or host.state_pending):
            return None
        return g, pad_uniform(g.query_len, host.qsl, host.input_ids, host.positions, host.slots, host.seq_lens)

    def _forward(self, host: HostInputs, patch: Optional[TokenPatch] = None,
                 images: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 uniform: Optional[tuple[DecodeGraphRunner, tuple[np.ndarray, ...]]] = None) -> torch.Tensor:
        """_run_model, with saved states loaded into resuming requests' rows before it and
        states at prompt boundaries saved after it (prefix caching, engine/state_cache.py)."""
        if host.state_loads:
            self._copy_states(host.state_loads, load=True)
        for i, keeps in host.state_keeps.items():
            host.state_keep_slots[i] = [(p, slot) for p, h in keeps if (slot := self.state_cache.insert(h)) is not None]
        hidden = self._run_model(host, patch, images, uniform)
        saves = [(row, slot) for row, h in host.state_saves if (slot := self.state_cache.insert(h)) is not None]
        for row, req, p in host.state_pending:
            slot = self.state_cache.reserve()
            saves.append((row, slot))
            self._pending_saves.append((req, p, slot))
        if saves:
            self._copy_states(saves, load=False)
        return hidden

    def _register_pending_saves(self, dropped: Collection[str] = ()) -> None:
        """Saved states whose last token has landed since get their prefix hash; those of
        requests in `dropped` (finished or aborted) that still cannot give their slot back."""
        keep = []
        bs = self.block_size
        for req, p, slot in self._pending_saves:
            hashes = self.block_hashes(req, p)
            if len(hashes) >= p // bs:
                self.state_cache.register(hashes[p // bs - 1], slot)
            elif req.request_id in dropped:
                self.state_cache.give_back(slot)
            else:
                keep.append((req, p, slot))
        self._pending_saves = keep

    def _copy_states(self, pairs: list[tuple[int, int]], load: bool) -> None:
        rows, slots = to_device([[r for r, _ in pairs], [s for _, s in pairs]], torch.long, self.device)
        for layer in self.state_layers:
            (layer.load_states if load else layer.save_states)(rows, slots)

    def _run_model(self, host: HostInputs, patch: Optional[TokenPatch] = None,
                   images: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                   uniform: Optional[tuple[DecodeGraphRunner, tuple[np.ndarray, ...]]] = None) -> torch.Tensor:
        """Hidden states of the step's tokens: a graph replay when the step is decode-only and
        fits a captured bucket, or when `uniform` (_uniform_step) gives graphs and the padded
        layout (the hidden states are then in that layout), else an eager pass. `patch`
        overwrites pending input tokens; `images` (rows, embeddings) replaces image
        placeholders' embeddings (a one-token prompt chunk looks like a decode row, hence no
        graph then)."""
        states = (host.state_rows, host.state_init) if host.state_rows is not None else None
        if uniform is not None:
            graphs, (ids, pos, slots, lens, _) = uniform
            return graphs.run(ids, pos, slots, lens, host.block_rows, None, states)
        if (images is None and host.mrope is None and host.kv_limit is None and self.graphs is not None
                and host.decode_only
                and len(host.seq_lens) <= self.graphs.max_size):
            return self.graphs.run(host.input_ids, host.positions, host.slots,
                                   np.asarray(host.seq_lens, dtype=np.int32), host.block_rows, patch, states)
        ids, positions, meta = self._device_inputs(host)
        if patch is not None:
            apply_patch(ids, patch)
        if images is None:
            return self.model(ids, positions, meta)
        embeds = self.model.embed_input_ids(ids)
        rows, values = images
        hidden = embeds.shape[-1]
        embeds[rows] = values[:, :hidden].to(embeds.dtype)
        if values.shape[1] == hidden:
            return self.model(ids, positions, meta, inputs_embeds=embeds)
        # Qwen3-VL: DeepStack levels follow the embeddings on each row (multimodal/qwen2_vl.py).
        deep = values[:, hidden:].view(len(values), -1, hidden).transpose(0, 1)
        return self.model(ids, positions, meta, inputs_embeds=embeds, deepstack=(rows, deep))

    def _host_inputs(self, order: list[ScheduledRequest]) -> HostInputs:
        """The step's flat inputs; `order` has its decode rows first. Decode rows (one token
        each) are gathered into lists and written in bulk: this runs at every step."""
        bs = self.block_size
        sync = self.block_table.sync
        if self._pending_saves:  # (their tokens landed with the last step's results)
            self._register_pending_saves()
        state_init = None
        resumed: list[tuple[int, int]] = []  # (index in order, snapshot slot)
        if self.state_layers:  # a state continues where this runner kept it, or from a saved one
            state_init = [s.start > 0 for s in order]
            for i, (s, init) in enumerate(zip(order, state_init)):
                if init and s.request.request_id not in self.block_table.row_of:
                    resume = s.request.state_resume
                    slot = self.state_cache.lookup(resume) if self.state_cache and resume else None
                    if slot is None:
                        raise RuntimeError(f"request {s.request.request_id} resumes at position {s.start} but has no "
                                           "state there")
                    resumed.append((i, slot))
        rows = [sync(s.request.request_id, s.block_ids) for s in order]
        table = self.block_table.table
        ids: list[int] = []
        pos: list[int] = []
        slot: list[int] = []
        seq_lens: list[int] = []
        pending_rows: list[tuple[int, str]] = []
        for s in order:
            if s.num_tokens != 1:
                break
            req, start = s.request, s.start
            toks = req.all_token_ids
            if start < len(toks):
                ids.append(toks[start])
            else:
                pending_rows.append((len(ids), req.request_id))
                ids.append(0)
            pos.append(start)
            slot.append(s.block_ids[start // bs] * bs + start % bs)
            seq_lens.append(start + 1)
        num_decodes = len(ids)
        total = num_decodes + sum(s.num_tokens for s in order[num_decodes:])
        input_ids = np.empty(total, dtype=np.int64)
        positions = np.empty(total, dtype=np.int64)
        slots = np.empty(total, dtype=np.int64)
        input_ids[:num_decodes] = ids
        positions[:num_decodes] = pos
        slots[:num_decodes] = slot
        qsl = list(range(num_decodes + 1))
        t = num_decodes
        for i in range(num_decodes, len(order)):
            s = order[i]
            start, end = s.start, s.end
            if s.drafts:  # the request's last token, then its drafts
                input_ids[t : t + s.num_tokens] = s.request.all_token_ids[start:] + s.drafts
            else:
                input_ids[t : t + s.num_tokens] = s.request.all_token_ids[start:end]
            if s.request.token_type_ids is not None:  # into the ids' high bits (model/bert.py)
                input_ids[t : t + s.num_tokens] |= np.asarray(s.request.token_type_ids[start:end]) << TOKEN_TYPE_SHIFT
            p = np.arange(start, end)
            positions[t : t + s.num_tokens] = p
            slots[t : t + s.num_tokens] = table[rows[i], p // bs].astype(np.int64) * bs + p % bs
            t += s.num_tokens
            qsl.append(t)
            seq_lens.append(end)
        sample_rows = [i for i, s in enumerate(order) if s.samples]
        max_blocks = -(-max(seq_lens) // bs)
        block_rows = table[rows, :max_blocks]  # one C-level copy of the step's rows
        mrope = kv_limit = None
        if self.encoder_cache is not None:  # images: M-RoPE positions, two-way image spans
            mrope = rope_positions(order, qsl, positions, self.encoder_cache)
            if num_decodes < len(order) and getattr(self.encoder_cache.encoder, "bidirectional", False):
                kv_limit = image_kv_limits(order, qsl)  # (one-token rows see what causal rows see)
        host = HostInputs(input_ids, positions, slots, seq_lens, qsl, block_rows, num_decodes, sample_rows,
                          pending_rows, mrope, kv_limit, rows if state_init is not None else None, state_init)
        if self.verify_k:
            host.state_verify = sum(1 for s in order if s.drafts)
        if self.state_cache is not None:
            host.state_loads = [(rows[i], slot) for i, slot in resumed]
            for i, (s, row) in enumerate(zip(order, rows)):
                positions = save_positions(s.start, s.end, s.request.num_prompt_tokens, bs)
                if s.drafts:  # the states there are known once the drafts are checked
                    if positions:
                        host.verify_saves[i] = positions
                    continue
                hashes = self.block_hashes(s.request, positions[-1]) if positions else []
                for p in positions:
                    if len(hashes) < p // bs:  # its last input token is still being sampled
                        if p == s.end:
                            host.state_pending.append((row, s.request, p))
                        break
                    if p == s.end:  # the state left in its row after the step
                        host.state_saves.append((row, hashes[p // bs - 1]))
                    else:  # inside the chunk: the scan keeps it
                        host.state_keeps.setdefault(i, []).append((p, hashes[p // bs - 1]))
        return host

    def _needed_rows(self, host: HostInputs) -> NeededRows:
        """The metadata of the rows read alone: each a one-token query at its position over
        its request's keys up to itself (causal: steps whose images attend both ways do not
        come here)."""
        rows = np.asarray(host.needed_rows, dtype=np.int64)
        req = np.searchsorted(np.asarray(host.qsl), rows, side="right") - 1
        lens = (host.positions[rows] + 1).tolist()
        dev = self.device
        n = len(rows)
        meta = AttentionMetadata(
            num_tokens=n, num_actual_tokens=n, num_reqs=n, num_decodes=n,
            slot_mapping=to_device(host.slots[rows], torch.int64, dev),
            block_tables=to_device(host.block_rows[req], torch.int32, dev),
            seq_lens=to_device(lens, torch.int32, dev), query_start_loc=to_device(np.arange(n + 1), torch.int32, dev),
            max_query_len=1, max_seq_len=max(lens), seq_lens_cpu=lens, query_start_loc_cpu=list(range(n + 1)),
            block_size=self.block_size)
        return NeededRows(to_device(rows, torch.int64, dev), meta)

    def _device_inputs(self, host: HostInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device
        total = len(host.input_ids)
        meta = AttentionMetadata(
            num_tokens=total, num_actual_tokens=total, num_reqs=len(host.seq_lens), num_decodes=host.num_decodes,
            slot_mapping=to_device(host.slots, torch.int64, dev),
            block_tables=to_device(host.block_rows, torch.int32, dev),
            seq_lens=to_device(host.seq_lens, torch.int32, dev),
            query_start_loc=to_device(host.qsl, torch.int32, dev),
            max_query_len=max(b - a for a, b in zip(host.qsl, host.qsl[1:])), max_seq_len=max(host.seq_lens),
            seq_lens_cpu=host.seq_lens, query_start_loc_cpu=host.qsl, block_size=self.block_size,
            kv_limit=None if host.kv_limit is None else to_device(host.kv_limit, torch.int32, dev),
        )
        if host.needed_rows is not None:
            meta.needed = self._needed_rows(host)
        if host.state_rows is not None:
            meta.states = StateRows(to_device(host.state_rows, torch.int64, dev),
                                    to_device(host.state_init, torch.float32, dev), host.state_rows, host.state_init,
                                    host.state_keep_slots, host.state_verify)
        positions = host.positions if host.mrope is None else host.mrope
        return to_device(host.input_ids, torch.int64, dev), to_device(positions, torch.int64, dev), meta
