"""The offline API: LLM(model=...).generate(prompts, sampling_params), as in vLLM."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from pagedserve.config import EngineArgs
from pagedserve.demo import resolve_model
from pagedserve.engine.engine import LLMEngine, PromptType
from pagedserve.lora.request import LoRARequest
from pagedserve.multimodal.chat_parts import split_images
from pagedserve.outputs import (ClassificationRequestOutput, EmbeddingRequestOutput, PoolingOutput,
                                PoolingRequestOutput, RequestOutput, ScoringOutput, ScoringRequestOutput)
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from pagedserve.beam_search import BeamSearchOutput
    from pagedserve.sampling_params import BeamSearchParams


class LLM:
    """An engine for offline batched generation.

    Accepts vLLM's constructor names for the knobs pagedserve has (model, tokenizer, dtype,
    seed, max_model_len, block_size, max_num_seqs, max_num_batched_tokens,
    enable_prefix_caching, enable_chunked_prefill, gpu_memory_utilization,
    kv_cache_memory_bytes, device, enforce_eager, max_logprobs, async_scheduling); an unknown
    name is a TypeError rather than being silently ignored."""

    def __init__(self, model: Optional[str] = None, **kwargs: Any) -> None:
        """`model` is a local Hugging Face directory; None means the built-in demo model."""
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise TypeError(f"LLM() got unexpected keyword argument(s): {', '.join(sorted(unknown))}; "
                            f"supported: {', '.join(sorted(EngineArgs.field_names() - {'model'}))}.")
        self.engine_args = EngineArgs(model=resolve_model(model), **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._profiler: Optional[Any] = None
        self._stats: Optional[Any] = None  # PrometheusStatLogger, with disable_log_stats=False
        if not self.engine_args.disable_log_stats:
            from pagedserve.metrics import PrometheusStatLogger

            self._stats = PrometheusStatLogger(self.llm_engine, self.engine_args.model)
        self._feeds: dict[str, Any] = {}  # request id -> its stats feed

    def get_metrics(self) -> list:
        """vLLM's: the engine's metrics now, as metrics_reader.Counter / Gauge / Histogram (the
        server's /metrics, pagedserve:* names, or vllm:* with metrics_prefix="vllm"). Needs
        LLM(..., disable_log_stats=False)."""
        if self._stats is None:
            raise RuntimeError("metrics are off: create the LLM with disable_log_stats=False.")
        from pagedserve.metrics_reader import snapshot

        return snapshot(self._stats.registry, self._stats.prefix)

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every cached prefix block (after changing weights, say). False, with
        nothing changed, while requests hold blocks."""
        return self.llm_engine.kv.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """vLLM's: give the device memory of the KV cache and the weights back (an RL trainer's
        turn on the GPU). Level 1 keeps the weights in host memory, level 2 drops them (load
        new ones, or collective_rpc("reload_weights"), after wake_up). The prefix cache is
        emptied. Needs LLM(..., enable_sleep_mode=True)."""
        self.llm_engine.sleep(level)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Take the memory of `tags` ("weights", "kv_cache"; default both) again: waking the
        weights alone first leaves room to update them before the KV cache comes back."""
        self.llm_engine.wake_up(tags)

    def collective_rpc(self, method: Union[str, Callable[..., Any]], timeout: Optional[float] = None,
                       args: tuple = (), kwargs: Optional[dict] = None) -> list[Any]:
        """vLLM's: run `method` on each worker (one here, worker/worker.py) and return their
        results: a worker method's name ("load_weights", "reload_weights", "get_model", ...)
        or a callable given the worker, e.g. `lambda w: w.model_runner.model.load_weights(ws)`."""
        return self.llm_engine.collective_rpc(method, timeout, args, kwargs)

    def apply_model(self, func: Callable[[torch.nn.Module], Any]) -> list[Any]:
        """vLLM's: func(model) on each worker's model (one here); their results."""
        return self.collective_rpc(lambda worker: func(worker.get_model()))

    def start_profile(self) -> None:
        """vLLM's: torch's profiler on, until stop_profile() writes its trace into
        $PAGEDSERVE_TORCH_PROFILER_DIR (a RuntimeError when that is unset)."""
        from pagedserve.profiler import TorchProfiler

        self._profiler = self._profiler or TorchProfiler()
        self._profiler.start()

    def stop_profile(self) -> str:
        """Stop the profiler; the path of the trace it wrote (Chrome / Perfetto JSON)."""
        if self._profiler is None:
            raise RuntimeError("the profiler is not running: start_profile() first.")
        return self._profiler.stop()

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: what generate() and chat() use when given no sampling_params: SamplingParams'
        defaults, with those the model's generation_config.json recommends over them (unless
        generation_config='vllm')."""
        return SamplingParams(**self.llm_engine.config.default_sampling)

    def chat(
        self,
        messages: Union[list[dict], Sequence[list[dict]]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Optional[list[dict]] = None,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
        lora_request: Optional[LoRARequest] = None,
    ) -> list[RequestOutput]:
        """vLLM's LLM.chat: one conversation (a list of {"role", "content"} messages) or a list
        of them, rendered with the tokenizer's chat template (or `chat_template`); `tools`
        (OpenAI's tool dicts) and `chat_template_kwargs` (e.g. enable_thinking) go to the
        template."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true.")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        prompts = []
        for conv in convs:
            conv, images = split_images(conv)
            try:
                text = tok.apply_chat_template(conv, chat_template=chat_template, tokenize=False,
                                               add_generation_prompt=add_generation_prompt,
                                               continue_final_message=continue_final_message, tools=tools,
                                               **(chat_template_kwargs or {}))
            except Exception as e:  # jinja and transformers raise many types for a bad conversation
                raise ValueError(f"messages could not be rendered with the chat template: {e}") from e
            # The template already holds the special tokens it wants.
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False),
                            **({"multi_modal_data": {"image": images}} if images else {})})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def embed(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        pooling_params: Optional[Union[PoolingParams, Sequence[PoolingParams]]] = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """vLLM's LLM.embed (a pooling model: runner="pooling", or a base-model checkpoint):
        one vector per prompt, `.outputs.embedding`, in the order of `prompts`."""
        return self._pool(prompts, pooling_params, "embed", use_tqdm)

    def encode(self, prompts: Union[PromptType, Sequence[PromptType]],
               pooling_params: Optional[Union[PoolingParams, Sequence[PoolingParams]]] = None, use_tqdm: bool = True,
               pooling_task: Optional[str] = None) -> list[PoolingRequestOutput]:
        """vLLM's LLM.encode: a pooling model's outputs as tensors, `.outputs.data` (the
        embedding, or the class probabilities); pooling_task "embed" or "classify" (default:
        the model's own)."""
        task = pooling_task or self.llm_engine.config.pooling_task
        if task not in ("embed", "classify"):
            raise ValueError(f"pooling_task must be 'embed' or 'classify', got {pooling_task!r}.")
        outs = self._pool(prompts, pooling_params if task == "embed" else None, task, use_tqdm)
        return [PoolingRequestOutput(o.request_id, PoolingOutput(torch.tensor(
            o.outputs.embedding if task == "embed" else o.outputs.probs)), o.prompt_token_ids, o.finished, o.prompt,
            o.num_cached_tokens) for o in outs]

    def classify(self, prompts: Union[PromptType, Sequence[PromptType]],
                 use_tqdm: bool = True) -> list[ClassificationRequestOutput]:
        """vLLM's LLM.classify (a *ForSequenceClassification checkpoint): each prompt's class
        probabilities, `.outputs.probs`, in the order of `prompts`."""
        return self._pool(prompts, None, "classify", use_tqdm)

    def score(self, data_1: Union[str, Sequence[str]], data_2: Union[str, Sequence[str]],
              use_tqdm: bool = True) -> list[ScoringRequestOutput]:
        """vLLM's LLM.score: one text against many, or pairwise. A cross-encoder (a sequence
        classifier with one label) scores each pair as one input; an embedding model scores the
        cosine similarity of the two embeddings."""
        from pagedserve import scoring

        kind = scoring.check_scorer(self.llm_engine.config)
        texts = scoring.pairs(data_1, data_2)
        if kind == "cross":
            tok, types = self.get_tokenizer(), scoring.uses_token_types(self.llm_engine.config)
            outs = self.classify([scoring.pair_prompt(tok, a, b, types) for a, b in texts], use_tqdm=use_tqdm)
            return [ScoringRequestOutput(o.request_id, ScoringOutput(o.outputs.probs[0]), o.prompt_token_ids)
                    for o in outs]
        unique = list(dict.fromkeys(t for pair in texts for t in pair))
        vecs = dict(zip(unique, (o.outputs.embedding for o in self.embed(unique, use_tqdm=use_tqdm))))
        return [ScoringRequestOutput(str(i), ScoringOutput(scoring.cosine(vecs[a], vecs[b])), [])
                for i, (a, b) in enumerate(texts)]

    def _pool(self, prompts, pooling_params, task: str, use_tqdm: bool) -> list:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = PoolingParams() if pooling_params is None else pooling_params
        params_list = [p.clone() for p in _per_prompt("pooling_params", params, PoolingParams, len(prompts))]
        for p in params_list:
            p.task = task
        engine = self.llm_engine
        staged = []
        for prompt, p in zip(prompts, params_list):  # all checked before any is queued
            text, ids = engine.process_prompt(prompt)
            engine.validate_pooling(ids, p)
            types = engine.token_types(prompt, len(ids))
            staged.append(({"prompt_token_ids": ids, "prompt": text, "token_type_ids": types}, p))
        order = {}
        try:
            for i, (prompt, p) in enumerate(staged):
                rid = engine.add_request(None, prompt, p)
                order[rid] = i
                self._track(rid, 1)
            return self._run(order, use_tqdm)
        except BaseException:
            engine.abort_request(list(order))
            raise

    def beam_search(self, prompts: Sequence[PromptType], params: "BeamSearchParams",
                    use_tqdm: bool = False) -> list["BeamSearchOutput"]:
        """vLLM's LLM.beam_search: the beam_width best sequences per prompt
        (pagedserve/beam_search.py)."""
        from pagedserve.beam_search import beam_search

        return beam_search(self, [prompts] if isinstance(prompts, (str, dict)) else list(prompts), params)

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
        lora_request: Optional[Union[LoRARequest, Sequence[Optional[LoRARequest]]]] = None,
        priority: Optional[list[int]] = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results come back in the order of `prompts`. lora_request:
        one adapter for all prompts, or one (or None) per prompt (needs enable_lora=True).
        priority: one per prompt, lower first (needs scheduling_policy='priority')."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self.get_default_sampling_params() if sampling_params is None else sampling_params
        params_list = _per_prompt("sampling_params", params, SamplingParams, len(prompts))
        loras = _per_prompt("lora_request", lora_request, (LoRARequest, type(None)), len(prompts))
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"priority must have one value per prompt: {len(priorities)} for {len(prompts)} prompts.")
        engine = self.llm_engine
        # Validate every prompt before queueing any, so a bad one leaves nothing behind.
        staged = []
        for prompt, params, lora, prio in zip(prompts, params_list, loras, priorities):
            prepared = engine.prepare(prompt, params)
            engine.check_lora(lora)
            engine.check_priority(prio)
            params = params.clone()
            # (with metrics, every step's output: the trackers time first and later tokens)
            params.output_kind = RequestOutputKind.FINAL_ONLY if self._stats is None else RequestOutputKind.CUMULATIVE
            staged.append((prepared, params, lora, prio))
        order = {}
        try:
            for i, (prompt, params, lora, prio) in enumerate(staged):
                rid = engine.add_request(None, prompt, params, lora_request=lora, priority=prio)
                order[rid] = i
                self._track(rid, params.n)
            return self._run(order, use_tqdm)
        except BaseException:
            engine.abort_request(list(order))
            raise

    def _track(self, request_id: str, n: int) -> None:
        if self._stats is not None:
            from pagedserve.metrics_reader import DeltaFeed

            self._feeds[request_id] = DeltaFeed(self._stats.new_request(time.monotonic(), n))

    def _run(self, order: dict[str, int], use_tqdm: bool) -> list[RequestOutput]:
        results: list[Optional[RequestOutput]] = [None] * len(order)
        bar = tqdm(total=len(order), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        engine = self.llm_engine
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    feed = self._feeds.get(out.request_id)
                    if feed is not None:  # (metrics on)
                        if isinstance(out, RequestOutput):
                            feed.feed(out, time.monotonic())
                        else:
                            feed.tracker.on_pooled(out, time.monotonic())
                        if out.finished:
                            del self._feeds[out.request_id]
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.update(1)
        finally:
            bar.close()
            for rid in [r for r in self._feeds if r in order]:  # aborted (an exception above)
                self._feeds.pop(rid).tracker.on_abort(time.monotonic())
        return [r for r in results if r is not None]


def _per_prompt(field: str, value: Any, one: Union[type, tuple[type, ...]], n: int) -> list:
    """One value for every prompt, or a sequence of one per prompt."""
    if isinstance(value, one):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{field} has {len(values)} entries for {n} prompts; pass one value or one per prompt.")
    return values
