"""Engine configuration: the user's knobs (EngineArgs) resolved once into an EngineConfig."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

from pagedserve.engine.scheduler import SCHEDULING_POLICIES
from pagedserve.engine.spec_config import MODEL_FREE

logger = logging.getLogger("pagedserve")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass
class EngineArgs:
    """Everything a user may set, with vLLM's names. Validated by create_engine_config()."""

    model: str = ""
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: Optional[int] = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # vLLM's long_prefill_token_threshold: a request's prompt takes at most this many tokens a
    # step (0: no limit), so long prompts leave room for others' prefills and decodes.
    long_prefill_token_threshold: int = 0
    # vLLM's scheduling_policy: "fcfs" (arrival order) or "priority" (each request's priority,
    # lower first, then arrival; lower-priority running requests are preempted for it).
    scheduling_policy: str = "fcfs"
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: Optional[int] = None
    # vLLM's kv_cache_dtype: "auto" (the model dtype) or "fp8" / "fp8_e4m3": K/V stored in FP8
    # e4m3 (scale 1, saturating at +-448), half the bytes of bf16, so twice the tokens fit.
    kv_cache_dtype: str = "auto"
    # vLLM's mamba_ssm_cache_dtype: the recurrent state of linear-attention and Mamba-2 layers
    # (Qwen3-Next, Qwen3.5, Granite 4.0-H, Nemotron-H). "auto": the model dtype; "float32": full
    # precision, twice the bytes of bf16.
    mamba_ssm_cache_dtype: str = "auto"
    # Those models' prefix caching: how many prompt states are kept (each one request's state
    # in every such layer; engine/state_cache.py). None: min(max_num_seqs, 64).
    state_cache_slots: Optional[int] = None
    # vLLM's quantization: None follows the checkpoint (FP8, GPTQ, AWQ, compressed-tensors);
    # naming the checkpoint's method checks it; "fp8" on an unquantized checkpoint quantizes
    # its decoder linear layers to FP8 e4m3 as they load, a float32 scale per output row
    # (model/fp8_quantize.py online_fp8_weights).
    quantization: Optional[str] = None
    # vLLM's load_format: "auto" / "safetensors" read *.safetensors; "dummy" fills the weights
    # with small random values instead (a config.json and tokenizer suffice: for benchmarks).
    load_format: str = "auto"
    device: Optional[str] = None
    enforce_eager: bool = False
    # vLLM's kv_sharing_fast_prefill (Gemma 4): layers that read an earlier layer's KV run on
    # the rows whose outputs are read only (sampled and logprob rows). On by default here:
    # the rows that are read come out the same (up to float rounding); off with False.
    kv_sharing_fast_prefill: bool = True
    max_logprobs: int = 20
    # vLLM's logprobs_mode: what logprobs report. "raw_logprobs" (the model's distribution),
    # "raw_logits", or "processed_logprobs" / "processed_logits": of the distribution a token is
    # drawn from, after penalties, bias, temperature, min-p, top-k and top-p (RL's sampler ratio).
    logprobs_mode: str = "raw_logprobs"
    attention_backend: Optional[str] = None  # "torch" | "cpu" | "triton"; default picks by device
    # Schedule step N + 1 before step N's tokens are back (None: on CUDA, where the host work
    # then overlaps the GPU; on CPU the forward pass is the host, so there is nothing to gain).
    async_scheduling: Optional[bool] = None
    # "qwen3" | "glm45" | "deepseek_r1" | "openai_gptoss": structured outputs start after the model's </think> (and the
    # server splits reasoning_content off the chat message).
    reasoning_parser: Optional[str] = None
    # vLLM's speculative_config; {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
    # "prompt_lookup_min": 1}: n-gram (prompt lookup) drafts, verified in the next step.
    speculative_config: Optional[dict] = None
    # LoRA adapters (LLM.generate(lora_request=...), the server's --lora-modules): at most
    # max_loras distinct adapters in a batch, ranks up to max_lora_rank, and up to max_cpu_loras
    # adapters no request uses kept loaded (default: max_loras).
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None
    # LLM.sleep() / wake_up() (and the server's /sleep, /wake_up): the weights' and KV cache's
    # device memory given back while idle (worker/sleep.py), as vLLM's enable_sleep_mode.
    enable_sleep_mode: bool = False
    # vLLM's LLM(disable_log_stats=False): the offline engine keeps the server's Prometheus
    # metrics, read with LLM.get_metrics() (metrics_reader.py). (The server's flag of the same
    # name turns off its periodic stats line.)
    disable_log_stats: bool = True
    # Prometheus metric names' prefix: "pagedserve" (pagedserve:num_requests_running, ...) or
    # "vllm" (vllm:num_requests_running: dashboards and alerts written for vLLM work unchanged).
    metrics_prefix: str = "pagedserve"
    # vLLM's worker_extension_cls: "module.Class" whose methods join the worker's, to be called
    # by name through collective_rpc (an RL library's weight-sync methods; worker/worker.py).
    worker_extension_cls: Optional[str] = None
    # vLLM's enable_prompt_embeds: prompts given as input embeddings ({"prompt_embeds": tensor},
    # /v1/completions' base64 prompt_embeds; engine/prompt_embeds.py). Text models only.
    enable_prompt_embeds: bool = False
    # "generate" (text generation) or "pooling" (embeddings: LLM.embed, /v1/embeddings); "auto":
    # pooling for base-model checkpoints (architectures such as "Qwen3Model"), else generate.
    # pooler_config: {"pooling_type": "LAST" | "MEAN" | "CLS", "normalize": bool} over the
    # model's sentence-transformers settings.
    runner: str = "auto"
    pooler_config: Optional[dict] = None
    # vLLM's hf_overrides: config.json values replaced before anything reads them, e.g.
    # {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"]}
    # runs a causal LM as a classifier on those tokens' logits (Qwen3-Reranker).
    hf_overrides: Optional[dict] = None
    # vLLM's limit_mm_per_prompt: {"image": k} admits at most k images a prompt for a
    # vision-language model (LLaVA); {"image": 0} serves it text-only, its vision tower not
    # loaded. Default: no limit but the context length.
    limit_mm_per_prompt: Optional[dict] = None
    # vLLM's mm_processor_kwargs: settings of the model's image processor that replace its
    # preprocessor_config.json's, e.g. {"max_pixels": 1003520} caps Qwen2-VL's image size
    # (and so its placeholders a picture).
    mm_processor_kwargs: Optional[dict] = None
    # vLLM's generation_config: where requests' sampling defaults come from. "auto": the model's
    # generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty,
    # max_new_tokens); "vllm": SamplingParams' own; or a directory holding one.
    # override_generation_config: those keys set over it, e.g. {"temperature": 0.5}.
    generation_config: str = "auto"
    override_generation_config: Optional[dict] = None
    # vLLM's names a switching user passes out of habit. trust_remote_code: accepted, and
    # meaningless here (no checkpoint's own code ever runs: an architecture is served by
    # pagedserve's module for it, or refused). One device: parallel sizes other than 1 refused.
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # More of vLLM's flags, for copied command lines (compat_notes): moot on one device or in
    # this engine, so accepted and logged as ignored, or refused where they ask for what is
    # not here (a data-parallel size or CPU offload, swap preemption, another tokenizer mode).
    data_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None
    disable_custom_all_reduce: bool = False
    enable_expert_parallel: bool = False
    swap_space: Optional[float] = None
    max_seq_len_to_capture: Optional[int] = None
    compilation_config: Any = None
    cpu_offload_gb: float = 0
    preemption_mode: Optional[str] = None
    tokenizer_mode: str = "auto"
    # vLLM's cuda_graph_sizes: the decode batch sizes captured as CUDA graphs. One value N:
    # 1, 2, 4, then every 8 up to N (the default's shape, N = max_num_seqs); several: those.
    cuda_graph_sizes: Optional[list[int]] = None
    # vLLM's logits_processors: custom logits processor classes (or "module:Class" names) run
    # on every step's logits, with installed plugins' (entry points "pagedserve.logits_processors");
    # see pagedserve/logits_processor.py. Requests pass them arguments in SamplingParams.extra_args.
    logits_processors: Optional[list] = None

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def create_engine_config(self) -> "EngineConfig":
        from pagedserve.model.hf_config import load_hf_config

        if not self.model:
            raise ValueError("model must be set to a local Hugging Face model directory.")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) != 1:
                raise ValueError(f"{name} must be 1 (pagedserve runs a model on one device), "
                                 f"got {getattr(self, name)!r}.")
        for note in compat_notes(self):
            logger.info(note)
        if self.trust_remote_code:
            logger.info("trust_remote_code is accepted and changes nothing: pagedserve never runs a checkpoint's "
                        "own code.")
        from pagedserve.reasoning import REASONING_PARSERS

        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                             f"got {self.reasoning_parser!r}.")
        if self.metrics_prefix not in METRICS_PREFIXES:
            raise ValueError(f"metrics_prefix must be one of {', '.join(METRICS_PREFIXES)}, "
                             f"got {self.metrics_prefix!r}.")
        spec = None
        if self.speculative_config is not None:
            from pagedserve.engine.spec_config import SpeculativeConfig

            spec = SpeculativeConfig.from_dict(self.speculative_config)
        for name in ("max_loras", "max_lora_rank") + (("max_cpu_loras",) if self.max_cpu_loras is not None else ()):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if self.runner not in ("auto", "generate", "pooling"):
            raise ValueError(f"runner must be 'auto', 'generate' or 'pooling', got {self.runner!r}.")
        hf_config = load_hf_config(self.model)
        if self.hf_overrides is not None:
            if not isinstance(self.hf_overrides, dict):
                raise ValueError(f"hf_overrides must be a dict, got {type(self.hf_overrides).__name__}.")
            for key, value in self.hf_overrides.items():
                setattr(hf_config, key, value)
        from pagedserve.model.registry import is_encoder_only, pooling_task

        task = pooling_task(hf_config)
        runner = self.runner
        encoder = is_encoder_only(hf_config)
        if runner == "auto":
            runner = "pooling" if task is not None else "generate"
        elif runner == "generate" and task == "classify":
            raise ValueError("a sequence classifier has no LM head to generate with; use runner='pooling'.")
        elif runner == "generate" and encoder:
            raise ValueError("an encoder-only model or a bidirectional one (BERT, RoBERTa, ModernBERT, "
                             "EmbeddingGemma) does not generate text; use runner='pooling'.")
        # Bidirectional attention: a prompt's tokens all see each other, so a prompt is computed
        # in one step (no chunks), and no prefix of one can be reused (its KV would depend on
        # what followed it).
        chunked = self.enable_chunked_prefill and not encoder
        prefix_caching = self.enable_prefix_caching and not encoder
        pooler = None
        if runner == "pooling":
            from pagedserve.model.pooler import resolve_pooler_config

            task = task or "embed"
            from pagedserve.model.bert import encoder_pooling_type

            pooler = resolve_pooler_config(self.model, self.pooler_config, task,
                                           default_type=encoder_pooling_type(hf_config) if encoder else "LAST")
            if self.speculative_config is not None or self.enable_lora:
                raise ValueError("runner='pooling' takes no speculative_config and no LoRA adapters.")
        elif self.pooler_config is not None:
            raise ValueError("pooler_config needs runner='pooling'.")
        logits_procs = _logits_processors(self.logits_processors, runner, spec)
        device = _resolve_device(self.device)
        dtype = _resolve_dtype(self.dtype, hf_config, device)

        if not isinstance(self.block_size, int) or self.block_size < 1 or self.block_size > 256 or (
            self.block_size & (self.block_size - 1)
        ):
            raise ValueError(f"block_size must be a power of two between 1 and 256, got {self.block_size}.")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}.")
        t = self.long_prefill_token_threshold
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ValueError(f"long_prefill_token_threshold must be a non-negative integer, got {t!r}.")
        if t and not self.enable_chunked_prefill:
            raise ValueError("long_prefill_token_threshold needs chunked prefill (enable_chunked_prefill=True).")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                             f"got {self.scheduling_policy!r}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}.")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}.")
        kv_dtype = dtype if self.kv_cache_dtype == "auto" else torch.float8_e4m3fn
        if self.mamba_ssm_cache_dtype not in SSM_CACHE_DTYPES:
            raise ValueError(f"mamba_ssm_cache_dtype must be one of {', '.join(SSM_CACHE_DTYPES)}, "
                             f"got {self.mamba_ssm_cache_dtype!r}.")
        ssm_dtype = dtype if self.mamba_ssm_cache_dtype == "auto" else _DTYPES[self.mamba_ssm_cache_dtype]
        state = has_state_layers_in(hf_config)
        slots = self.state_cache_slots if self.state_cache_slots is not None else min(self.max_num_seqs, 64)
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"state_cache_slots must be a positive integer, got {self.state_cache_slots!r}.")
        online_fp8 = _check_quantization(self.quantization, hf_config)
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r} "
                             "(checkpoints are read from *.safetensors only).")
        if self.load_format == "dummy" and (online_fp8 or _checkpoint_quantized(hf_config)):
            raise ValueError("load_format='dummy' makes unquantized weights: it cannot serve a quantized model.")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, got {self.logprobs_mode!r}.")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be non-negative, got {self.max_logprobs}.")

        derived_len = derive_max_model_len(hf_config)
        max_model_len = self.max_model_len
        if max_model_len is None:
            max_model_len = derived_len
        elif not isinstance(max_model_len, int) or max_model_len < 1:
            raise ValueError(f"max_model_len must be a positive integer, got {max_model_len}.")
        elif max_model_len > derived_len:
            raise ValueError(
                f"max_model_len={max_model_len} is greater than the model's maximum context length "
                f"({derived_len}, from max_position_embeddings in config.json)."
            )

        max_batched = self.max_num_batched_tokens
        if max_batched is None:
            default = 8192 if device.type == "cuda" else 2048
            max_batched = default if chunked else max(default, max_model_len)
        if not isinstance(max_batched, int) or max_batched < 1:
            raise ValueError(f"max_num_batched_tokens must be a positive integer, got {max_batched}.")
        if not chunked and max_batched < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_batched}) is smaller than max_model_len ({max_model_len}) "
                "with chunked prefill disabled: long prompts could never be scheduled. Raise "
                "max_num_batched_tokens, lower max_model_len or enable chunked prefill."
            )

        backend = self.attention_backend or ("triton" if device.type == "cuda" else "cpu")
        if backend not in ("torch", "cpu", "triton"):
            raise ValueError(f"attention_backend must be 'torch', 'cpu' or 'triton', got {backend!r}.")
        if backend == "cpu" and device.type != "cpu":
            raise ValueError("attention_backend='cpu' runs on CPU only.")
        if backend == "triton":
            from pagedserve.ops import triton_available, triton_interpreting

            if not triton_available():
                raise ValueError("attention_backend='triton' needs the triton package (pip install triton).")
            if device.type == "cpu" and not triton_interpreting():
                raise ValueError("attention_backend='triton' needs CUDA; on CPU it runs only in Triton's "
                                 "interpreter (TRITON_INTERPRET=1, slow, for tests).")

        max_images = _max_images(self.limit_mm_per_prompt, hf_config, runner, self.model)
        if self.worker_extension_cls is not None:  # imported now: a bad name fails at start-up
            from pagedserve.worker.worker import worker_class

            worker_class(self.worker_extension_cls)
        if self.enable_prompt_embeds and (max_images or runner != "generate"):
            raise ValueError("enable_prompt_embeds is for text generation with a text model (a vision-language "
                             "model text-only: limit_mm_per_prompt={'image': 0}).")
        if self.load_format == "dummy" and max_images:
            raise ValueError("load_format='dummy' covers the language model only: serve a vision-language model "
                             "text-only with it (limit_mm_per_prompt={'image': 0}).")
        if spec is not None and spec.method not in MODEL_FREE:  # a draft model or an EAGLE head
            clash = [name for name, on in (("enable_sleep_mode", self.enable_sleep_mode),
                                           ("enable_prompt_embeds", self.enable_prompt_embeds)) if on]
            if clash:
                raise ValueError(f"speculative_config: a draft model does not run with {clash[0]}.")
        default_sampling = _sampling_defaults(self.model, self.generation_config, self.override_generation_config)
        return EngineConfig(
            model=self.model,
            tokenizer=self.tokenizer or self.model,
            hf_config=hf_config,
            dtype=dtype,
            device=device,
            seed=self.seed,
            max_model_len=max_model_len,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max_batched,
            enable_prefix_caching=prefix_caching,
            enable_chunked_prefill=chunked,
            scheduling_policy=self.scheduling_policy,
            long_prefill_token_threshold=self.long_prefill_token_threshold if chunked else 0,
            default_sampling=default_sampling,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            kv_dtype=kv_dtype,
            ssm_dtype=ssm_dtype,
            has_state_layers=state,
            state_cache_slots=slots,
            online_fp8=online_fp8,
            dummy_weights=self.load_format == "dummy",
            enforce_eager=self.enforce_eager,
            kv_sharing_fast_prefill=bool(self.kv_sharing_fast_prefill),
            max_logprobs=self.max_logprobs,
            logprobs_mode=self.logprobs_mode,
            attention_backend=backend,
            async_scheduling=(device.type == "cuda") if self.async_scheduling is None
            else bool(self.async_scheduling),
            reasoning_parser=self.reasoning_parser,
            speculative_config=spec,
            enable_lora=bool(self.enable_lora),
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            max_cpu_loras=self.max_cpu_loras or self.max_loras,
            worker_extension_cls=self.worker_extension_cls,
            cuda_graph_sizes=list(self.cuda_graph_sizes) if self.cuda_graph_sizes else None,
            enable_sleep_mode=bool(self.enable_sleep_mode),
            metrics_prefix=self.metrics_prefix,
            enable_prompt_embeds=bool(self.enable_prompt_embeds),
            runner=runner,
            pooler=pooler,
            pooling_task=task if runner == "pooling" else None,
            max_images_per_prompt=max_images,
            mm_processor_kwargs=_mm_processor_kwargs(self.mm_processor_kwargs),
            logits_processors=logits_procs,
        )


def _logits_processors(specs: Optional[list], runner: str, spec: Any) -> tuple[type, ...]:
    """The custom logits processor classes, loaded now so that a bad name fails at start-up."""
    from pagedserve.logits_processor import load_logits_processors

    if runner == "pooling":  # (installed plugins are for generation: not loaded here)
        if specs:
            raise ValueError("logits_processors: a pooling model samples nothing; it takes no logits processors.")
        return ()
    classes = load_logits_processors(specs)
    if classes and spec is not None:
        raise ValueError("logits_processors: custom logits processors do not run with speculative_config (as in "
                         "vLLM: drafts are verified against distributions they would change).")
    return classes


def _max_images(limit: Optional[dict], hf_config: Any, runner: str, model_dir: str) -> int:
    """Images a prompt may carry: 0 for a model without an image path (or limited to 0), or
    whose directory lacks the image processor's settings and was given no limit (a text-only
    copy: served as its language model; an explicit limit makes the missing file an error)."""
    from pagedserve.multimodal.processor import takes_images

    if limit is not None:
        if not isinstance(limit, dict) or set(limit) - {"image"}:
            raise ValueError(f"limit_mm_per_prompt must be a dict like {{'image': 2}} (images are the only "
                             f"modality here), got {limit!r}.")
        v = limit.get("image", 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"limit_mm_per_prompt['image'] must be a non-negative integer, got {v!r}.")
    if not takes_images(hf_config) or runner != "generate":
        return 0
    if (limit is None or "image" not in limit) and not os.path.isfile(os.path.join(model_dir,
                                                                                 "preprocessor_config.json")):
        logger.warning("%s has no preprocessor_config.json: serving it text-only (no images).", model_dir)
        return 0
    return (1 << 30) if limit is None or "image" not in limit else limit["image"]


def _mm_processor_kwargs(kwargs: Optional[dict]) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"mm_processor_kwargs must be a dict of image processor settings, got {kwargs!r}.")
    return dict(kwargs)


def compat_notes(args: EngineArgs) -> list[str]:
    """vLLM flags with nothing to do here: a note for each one set, a ValueError for a value
    that asks for what pagedserve does not do."""
    if args.data_parallel_size != 1:
        raise ValueError(f"data_parallel_size must be 1 (one engine, one device), got {args.data_parallel_size!r}.")
    if args.cpu_offload_gb:
        raise ValueError("cpu_offload_gb: weights are not offloaded to CPU memory here; it must be 0.")
    if args.preemption_mode not in (None, "recompute"):
        raise ValueError(f"preemption_mode must be 'recompute' (preempted requests recompute; nothing is "
                         f"swapped), got {args.preemption_mode!r}.")
    if args.tokenizer_mode not in ("auto", "hf", "slow"):
        raise ValueError(f"tokenizer_mode must be 'auto', 'hf' or 'slow' (a Hugging Face tokenizer), got "
                         f"{args.tokenizer_mode!r}.")
    if args.cuda_graph_sizes is not None and (not args.cuda_graph_sizes or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in args.cuda_graph_sizes)):
        raise ValueError(f"cuda_graph_sizes must be positive integers, got {args.cuda_graph_sizes!r}.")
    moot = {"distributed_executor_backend": "one process", "disable_custom_all_reduce": "no all-reduce on one device",
            "enable_expert_parallel": "one device holds every expert",
            "swap_space": "preempted requests recompute (no swap space)",
            "max_seq_len_to_capture": "decode graphs serve any sequence length",
            "compilation_config": "no torch.compile here", "tokenizer_mode": "a Hugging Face tokenizer either way"}
    defaults = EngineArgs()
    return [f"{name}={getattr(args, name)!r} accepted and ignored: {why}." for name, why in moot.items()
            if getattr(args, name) not in (getattr(defaults, name), None, False)]


LOAD_FORMATS = ("auto", "safetensors", "dummy")
METRICS_PREFIXES = ("pagedserve", "vllm")  # metrics.py
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")  # worker/sampler.py
# vLLM's names for the methods a checkpoint may carry (its Marlin kernels' names included)
QUANTIZATION_METHODS = {"fp8": "fp8", "gptq": "gptq", "gptq_marlin": "gptq", "awq": "awq", "awq_marlin": "awq",
                        "compressed-tensors": "compressed-tensors", "mxfp4": "mxfp4"}


def _checkpoint_quantized(hf_config: Any) -> bool:
    from pagedserve.model.loader import checkpoint_quantization

    return checkpoint_quantization(hf_config) is not None


def _check_quantization(quantization: Optional[str], hf_config: Any) -> bool:
    """`quantization` against the checkpoint's own (model/loader.py checkpoint_quantization);
    True where it asks for online FP8 (an unquantized checkpoint, quantization="fp8")."""
    from pagedserve.model.layers.fp8 import quantization_config
    from pagedserve.model.loader import checkpoint_quantization

    found = checkpoint_quantization(hf_config)  # (a ValueError for unsupported methods)
    if quantization is None:
        return False
    if quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, got {quantization!r}.")
    if found is None:
        if quantization != "fp8":
            raise ValueError(f"quantization={quantization!r}: the checkpoint is not quantized; only 'fp8' "
                             "quantizes an unquantized checkpoint as it loads.")
        return True
    method = quantization_config(hf_config).get("quant_method")
    if QUANTIZATION_METHODS[quantization] != method:
        raise ValueError(f"quantization={quantization!r}, but the checkpoint is quantized with {method!r}.")
    return False


@dataclass
class EngineConfig:
    """The resolved configuration every engine component reads."""

    model: str
    tokenizer: str
    hf_config: Any
    dtype: torch.dtype
    device: torch.device
    seed: int
    max_model_len: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    gpu_memory_utilization: float
    kv_cache_memory_bytes: Optional[int]
    kv_dtype: torch.dtype
    online_fp8: bool  # quantization="fp8" on an unquantized checkpoint
    dummy_weights: bool  # load_format="dummy": random weights, no checkpoint read
    enforce_eager: bool
    max_logprobs: int
    logprobs_mode: str
    attention_backend: str
    async_scheduling: bool = False
    kv_sharing_fast_prefill: bool = True
    reasoning_parser: Optional[str] = None
    speculative_config: Any = None  # engine/spec_config.py SpeculativeConfig
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int = 1
    worker_extension_cls: Optional[str] = None
    cuda_graph_sizes: Optional[list[int]] = None
    enable_sleep_mode: bool = False
    metrics_prefix: str = "pagedserve"
    enable_prompt_embeds: bool = False
    runner: str = "generate"
    pooler: Any = None  # model/pooler.py PoolerConfig, with runner "pooling"
    pooling_task: Optional[str] = None  # "embed" | "classify", with runner "pooling"
    classifier_token_ids: Optional[list[int]] = None  # classifier_from_token, resolved by the engine
    num_gpu_blocks: int = 0  # set once the KV cache is sized
    max_images_per_prompt: int = 0  # 0: no image inputs (a text model, or limit_mm_per_prompt 0)
    mm_processor_kwargs: dict = field(default_factory=dict)  # the image processor's settings overridden
    scheduling_policy: str = "fcfs"
    long_prefill_token_threshold: int = 0
    # Sampling defaults of requests that leave them unset (model/generation_defaults.py).
    default_sampling: dict = field(default_factory=dict)
    logits_processors: tuple = ()  # custom logits processor classes (pagedserve/logits_processor.py)
    # Layers with a per-request state (model/layers/state_mixer.py): a state row per running
    # request, its recurrent part in ssm_dtype; prefix caching through saved states
    # (engine/state_cache.py, state_cache_slots of them); samples do not share prompt blocks.
    has_state_layers: bool = False
    ssm_dtype: torch.dtype = torch.float32
    state_cache_slots: int = 64  # their prefix caching: prompt states kept

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
SSM_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")


# layer_types of layers that keep a per-request state (transformers' names: Gated DeltaNet and
# Mamba-2 layers are "linear_attention", LFM2's short convolutions "conv").
STATE_LAYER_TYPES = ("linear_attention", "conv")


def has_state_layers_in(hf_config: Any) -> bool:
    """Whether the (text) model has layers with a per-request state instead of KV blocks."""
    return any(t in STATE_LAYER_TYPES for t in (getattr(hf_config, "layer_types", None) or ()))


def _sampling_defaults(model: str, source: str, override: Optional[dict]) -> dict:
    """The model's recommended sampling defaults, checked now rather than on every request."""
    from pagedserve.model.generation_defaults import sampling_defaults
    from pagedserve.sampling_params import SamplingParams

    if override is not None and not isinstance(override, dict):
        raise ValueError(f"override_generation_config must be a dict, got {type(override).__name__}.")
    defaults = sampling_defaults(model, source, override)
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ValueError(f"generation_config: the model's sampling defaults are invalid: {e}") from None
    if defaults:
        logger.info("Sampling defaults from the model's generation config (--generation-config vllm ignores "
                    "them): %s", defaults)
    return defaults


def _resolve_device(device: Optional[str]) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available.")
    return torch.device(device)


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _resolve_dtype(dtype: Any, hf_config: Any, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got {dtype!r}.")
        return _DTYPES[dtype]
    cfg = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(cfg, str):
        cfg = _DTYPES.get(cfg, torch.float32)
    if device.type == "cpu":
        # float32 by default: exact against transformers' float32, and half-precision matmuls
        # are slow on CPUs without native support. Where bf16 is native, say how to use it.
        if cfg == torch.bfloat16 and _cpu_has_native_bf16():
            logger.info("computing in float32 on CPU; this CPU has native bfloat16 matmuls: dtype='bfloat16' "
                        "(--dtype bfloat16) runs about 1.5-2x faster (benchmarks/bench_cpu_dtype.py)")
        return torch.float32
    if cfg in (torch.float16, torch.bfloat16):
        return cfg
    return torch.bfloat16


# Where configs without max_position_embeddings keep their context length (MPT: max_seq_len),
# in the order vLLM reads them; none of them (BLOOM, whose ALiBi has no table): 2048.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                 "max_seq_length", "seq_len")


def derive_max_model_len(hf_config: Any) -> int:
    n = next((int(v) for k in _CONTEXT_KEYS if (v := getattr(hf_config, k, None))), 2048)
    from pagedserve.model.registry import is_encoder_only

    if is_encoder_only(hf_config):  # RoBERTa's position table starts past its padding index
        from pagedserve.model.bert import position_offset

        n -= position_offset(hf_config)
    return n


def set_offline_env() -> None:
    """pagedserve never reaches a model hub: everything is read from local directories."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
