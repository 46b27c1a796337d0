"""LLMEngine: the synchronous core. add_request / step / abort_request around one loop:
schedule -> run the model -> update the scheduler -> process outputs."""

from __future__ import annotations

import functools
import itertools
import logging
import time
from typing import Any, Iterable, Optional, Union

from pagedserve.config import EngineArgs, EngineConfig
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.fault_injection import maybe_inject_step_failure
from pagedserve.engine.grammar import GrammarCompiler, HarmonyGate, ThinkGate
from pagedserve.engine.kv_cache import KVCacheManager
from pagedserve.engine.suffix import make_proposer
from pagedserve.engine.prompt_embeds import (FIELD as PROMPT_EMBEDS, PLACEHOLDER_ID as EMBEDS_PLACEHOLDER_ID,
                                             embeds_features, model_takes_prompt_embeds)
from pagedserve.engine.output_processor import OutputProcessor, RequestState, SequenceState
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.errors import EngineSleepingError, ParamError
from pagedserve.lora.request import LoRARequest
from pagedserve.model.hf_config import generation_eos_ids
from pagedserve.multimodal.inputs import ImageFeature
from pagedserve.multimodal.processor import ImageInputProcessor, takes_images
from pagedserve.outputs import (ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput,
                                EmbeddingRequestOutput, RequestOutput)
from pagedserve.pooling_params import PoolingParams
from pagedserve.harmony import CHANNEL, ENDS, MESSAGE, START as HARMONY_START
from pagedserve.reasoning import END as THINK_END, OPENS_WITH_THINK, START as THINK_START
from pagedserve.sampling_params import SamplingParams
from pagedserve.tokenizer import load_tokenizer
from pagedserve.worker.model_runner import ModelRunner, PendingStep
from pagedserve.worker.worker import Executor, worker_class

logger = logging.getLogger("pagedserve")

PromptType = Union[str, dict, list]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer)
        config.classifier_token_ids = self._classifier_token_ids()
        self.runner = ModelRunner(config)
        self.mm_processor: Optional[ImageInputProcessor] = None  # a vision-language model's images
        if config.max_images_per_prompt > 0:
            self.mm_processor = ImageInputProcessor(config.model, config.max_images_per_prompt,
                                                    config.mm_processor_kwargs, self.tokenizer)
        if config.enable_prompt_embeds and not model_takes_prompt_embeds(self.runner.model):
            raise ValueError(f"enable_prompt_embeds: {type(self.runner.model).__name__} does not take prompt "
                             "embeddings (decoders built on LlamaModel do: Llama, Mistral, Qwen2/3, ...).")
        maybe_inject_step_failure(self.runner)
        num_blocks = self.runner.determine_num_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        config.num_gpu_blocks = num_blocks
        # (the model's own layers' windows: a model may ignore a config's sliding_window, as
        # transformers' OLMo and Solar Open do)
        windows = [a.window for a in self.runner.attn_layers] or [0]
        # Out-of-window blocks are given back only when every layer has a window (Mistral 7B
        # v0.1, Phi-3-mini): a layer seeing the whole context needs every block.
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                 window=max(windows) if min(windows) > 0 else 0)
        self.kv.state_cache = self.runner.state_cache  # (models with per-request states)
        self.runner.block_hashes = self.kv.update_hashes
        proposer = self.runner.draft
        if proposer is not None and self.kv.window:  # the draft's catch-up would write released blocks
            raise ValueError("speculative_config: a draft model cannot run beside a model whose every layer has a "
                             "sliding window (its blocks out of the window are given back).")
        if config.speculative_config is not None and proposer is None:
            proposer = make_proposer(config.speculative_config)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len,
                                   config.enable_chunked_prefill, proposer,
                                   config.max_loras if config.enable_lora else 0, config.scheduling_policy,
                                   config.long_prefill_token_threshold, fork_prompts=not config.has_state_layers)
        if self.mm_processor is not None and self.mm_processor.bidirectional:
            # Gemma 3 / 4: a chunk holds the rest of an image whole, so one must fit the step's budget.
            need = self.mm_processor.max_image_tokens
            if config.max_num_batched_tokens < need:
                raise ValueError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be at least an "
                                 f"image's {need} tokens for this model's images.")
            if 0 < config.long_prefill_token_threshold < need:
                raise ValueError(f"long_prefill_token_threshold ({config.long_prefill_token_threshold}) must be at "
                                 f"least an image's {need} tokens for this model's images (0: no limit).")
            self.scheduler.whole_images = True
        self.eos_token_ids = frozenset(generation_eos_ids(config.model, config.hf_config, self.tokenizer))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.grammar_compiler = GrammarCompiler(self.tokenizer, config.vocab_size, self.eos_token_ids)
        self._ids = itertools.count()
        self.async_scheduling = config.async_scheduling
        self._inflight: Optional[_InFlight] = None  # the launched step whose tokens are not back
        self._landed: Optional[tuple[dict, dict, Any]] = None  # its results, for the output side
        self._pooling: dict[str, tuple[Optional[str], Request]] = {}  # pooling requests: prompt text, request
        # AsyncLLM.pause_generation: no step runs; weights may change under frozen requests.
        self.paused = False
        logger.info("pagedserve engine: %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d%s",
                    config.model, config.device, str(config.dtype).replace("torch.", ""), num_blocks,
                    config.block_size, config.max_model_len, ", async scheduling" if self.async_scheduling else "")

    def _classifier_token_ids(self) -> Optional[list[int]]:
        """hf_overrides' classifier_from_token: the tokens whose LM-head rows make a causal LM's
        classifier head (each must be one token of this tokenizer)."""
        tokens = getattr(self.config.hf_config, "classifier_from_token", None)
        if tokens is None or self.config.pooling_task != "classify":
            return None
        ids = []
        for t in tokens:
            tid = self.tokenizer.convert_tokens_to_ids(t)
            if not isinstance(tid, int) or tid == self.tokenizer.unk_token_id:
                raise ValueError(f"classifier_from_token: {t!r} is not a token of this tokenizer.")
            ids.append(tid)
        if len(ids) < 2:
            raise ValueError("classifier_from_token needs at least two tokens.")
        self.config.hf_config.num_labels = 1 if len(ids) == 2 else len(ids)  # see loader._head_from_tokens
        return ids

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    # ---- input side -------------------------------------------------------------------
    def process_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        """A text prompt, or vLLM's TokensPrompt {"prompt_token_ids": [...]} -> (text, ids).
        Images (multi_modal_data) are for process_inputs: here they are refused, not dropped."""
        if isinstance(prompt, str):
            return prompt, self.encode(prompt, "prompt")
        if isinstance(prompt, dict):
            if prompt.get("multi_modal_data") is not None:
                raise ParamError("multi_modal_data", "images are accepted by text generation only "
                                 "(LLM.generate / LLM.chat, chat completions).")
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise ParamError("prompt", "prompt_token_ids must be a list of integers.")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt and isinstance(prompt["prompt"], str):
                return prompt["prompt"], self.encode(prompt["prompt"], "prompt")
        raise ParamError("prompt", "a prompt must be a string or a dict with 'prompt_token_ids', "
                         f"got {type(prompt).__name__}.")

    def process_inputs(self, prompt: PromptType) -> tuple[Optional[str], list[int], list[ImageFeature]]:
        """process_prompt, plus a vision-language prompt's images (vLLM's
        {"prompt": ..., "multi_modal_data": {"image": image or [images]}}): each image's
        placeholder token expanded to its embedding rows (multimodal/processor.py). A prompt
        processed already (AsyncLLM.preprocess, LLM.generate) carries its "mm_features"."""
        if isinstance(prompt, dict) and PROMPT_EMBEDS in prompt:
            ids, features = self._embeds_prompt(prompt)
            return None, ids, features
        if isinstance(prompt, dict) and "mm_features" in prompt:
            text, ids = self.process_prompt({k: v for k, v in prompt.items() if k != "mm_features"})
            return text, ids, list(prompt["mm_features"])
        data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        if data is not None:
            prompt = {k: v for k, v in prompt.items() if k != "multi_modal_data"}
        text, ids = self.process_prompt(prompt)
        if data is not None and (not isinstance(data, dict) or set(data) - {"image"}):
            raise ParamError("multi_modal_data", "multi_modal_data must be {'image': an image or a list of images}.")
        images = (data or {}).get("image", [])
        if self.mm_processor is None:
            if data is not None and images not in ([], ()):
                raise ParamError("multi_modal_data", "this model takes no images" + (
                    " (limit_mm_per_prompt is 0)." if takes_images(self.config.hf_config) else "."))
            return text, ids, []
        ids, features = self.mm_processor.process(ids, images)
        return text, ids, features

    def _embeds_prompt(self, prompt: dict) -> tuple[list[int], list[ImageFeature]]:
        """vLLM's EmbedsPrompt -> (a placeholder id per embedding, the embeddings' features)."""
        if not self.config.enable_prompt_embeds:
            raise ParamError(PROMPT_EMBEDS, "prompt embeddings are off: start the engine with "
                             "enable_prompt_embeds=True (--enable-prompt-embeds).")
        other = sorted(set(prompt) - {PROMPT_EMBEDS})
        if other:
            raise ParamError(PROMPT_EMBEDS, f"a prompt_embeds prompt takes nothing else, got {other}.")
        features = embeds_features(prompt[PROMPT_EMBEDS], self.config.hf_config.hidden_size, self.config.block_size)
        return [EMBEDS_PLACEHOLDER_ID] * sum(f.length for f in features), features

    def prepare(self, prompt: PromptType, params: SamplingParams) -> dict:
        """A generation prompt processed (text, ids, images) and validated; the dict
        add_request takes back without doing it again."""
        text, ids, features = self.process_inputs(prompt)
        self.validate(ids, params)
        refuse_truncated_images(features, params)
        return {"prompt_token_ids": ids, "prompt": text, "mm_features": features}

    def encode(self, text: str, param: str, **kwargs: Any) -> list[int]:
        """Tokenize; text that is not valid Unicode (lone surrogates, which JSON can carry)
        is the caller's error, not a tokenizer crash."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ParamError(param, f"{param} must be valid Unicode text (found an unpaired surrogate at "
                             f"position {e.start}).") from None
        return self.tokenizer.encode(text, **kwargs)

    def _check_token_ids(self, field: str, ids: Iterable[int]) -> None:
        vocab = self.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ParamError(field, f"{field}: token id {bad} is out of vocabulary (vocab size {vocab}).")

    def truncation(self, params: Union[SamplingParams, PoolingParams]) -> Optional[int]:
        """How many prompt tokens truncate_prompt_tokens keeps (vLLM's -1: max_model_len)."""
        k = params.truncate_prompt_tokens
        return self.config.max_model_len if k == -1 else k

    def validate(self, token_ids: list[int], params: SamplingParams) -> int:
        """Check a request can ever run; returns its resolved max_tokens. Errors name the
        parameter at fault (ParamError). Length checks come first: they are O(1), so a
        huge prompt is refused before anything scans it."""
        if self.truncation(params) is not None:
            token_ids = token_ids[-self.truncation(params):]
        n = len(token_ids)
        if n == 0:
            raise ParamError("prompt", "The prompt cannot be empty.")
        max_len = self.config.max_model_len
        if n >= max_len:
            raise ParamError("prompt", f"The prompt (length {n}) is longer than the maximum model length of {max_len} "
                             "(it must leave room for at least one generated token).")
        max_tokens = params.max_tokens
        if max_tokens is None:  # the room left, capped by the model's max_new_tokens (generation_config)
            max_tokens = min(max_len - n, self.config.default_sampling.get("max_tokens", max_len))
        if n + max_tokens > max_len:
            raise ParamError("max_tokens", f"This model's maximum context length is {max_len} tokens. However, you "
                             f"requested {n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion). "
                             "Please reduce the length of the prompt or max_tokens.")
        chunk = self.config.max_num_batched_tokens if self.config.enable_chunked_prefill else n
        if self.kv.max_blocks_held(n + max_tokens, chunk) > self.kv.num_blocks:
            capacity = self.kv.num_blocks * self.config.block_size
            raise ParamError("max_tokens", f"the request needs {n + max_tokens} tokens of KV cache but the whole cache "
                             f"holds {capacity} ({self.kv.num_blocks} blocks of {self.config.block_size}); lower "
                             "max_tokens or give the KV cache more memory.")
        for field in ("logprobs", "prompt_logprobs"):
            k = getattr(params, field)
            if k is not None and k > self.config.max_logprobs:
                raise ParamError(field, f"{field}: requested {k} logprobs, more than the maximum allowed "
                                 f"({self.config.max_logprobs}, set by max_logprobs).")
        self._check_token_ids("prompt", token_ids)
        self._check_token_ids("stop_token_ids", params.stop_token_ids)
        self._check_token_ids("logit_bias", params.logit_bias or ())
        self._check_token_ids("allowed_token_ids", params.allowed_token_ids or ())
        for cls in self.config.logits_processors:  # the user's processors check their extra_args
            if hasattr(cls, "validate_params"):
                cls.validate_params(params)
        return max_tokens

    def compile_grammar(self, params: SamplingParams) -> Any:
        """Compile a request's structured-output constraint, if any (a ParamError when it is
        invalid); None without one. Compiled grammars are cached, so adding the request later
        reuses this one: the server calls it in a thread of its own first."""
        if params.structured_outputs is None:
            return None
        return self.grammar_compiler.compile(params.structured_outputs)

    def _think_gate(self, prompt_ids: list[int]) -> Union[ThinkGate, HarmonyGate, None]:
        """With a reasoning parser, how a grammar waits for the reasoning to end (vLLM's rule):
        not at all when the prompt has already closed the think block (Qwen3's template with
        enable_thinking off), or when `</think>` (and for qwen3 `<think>`) is not one token of
        this tokenizer; qwen3 waits only if the output opens with `<think>`."""
        parser = self.config.reasoning_parser
        if parser is None:
            return None
        if parser == "openai_gptoss":
            return self._harmony_gate(prompt_ids)
        start, end = (self.tokenizer.encode(t, add_special_tokens=False) for t in (THINK_START, THINK_END))
        opens = parser in OPENS_WITH_THINK
        if len(end) != 1 or (opens and len(start) != 1):
            return None
        last_start, last_end = _rfind(prompt_ids, start), _rfind(prompt_ids, end)
        if last_end >= 0 and last_end > last_start:
            return None
        return ThinkGate(end[0], start[0] if opens else None)

    @functools.cached_property
    def _harmony(self) -> Optional[tuple[int, HarmonyGate]]:
        """(<|start|>'s id, the gate) where harmony's markers are single tokens, else None."""
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in (*HARMONY_MARKERS, "final")]
        if any(len(i) != 1 for i in ids[:-1]) or not ids[-1]:
            return None
        start, channel, message, *ends = (i[0] for i in ids[:-1])
        return start, HarmonyGate(channel, message, frozenset(ends), tuple(ids[-1]))

    def _harmony_gate(self, prompt_ids: list[int]) -> Optional[HarmonyGate]:
        """GPT-OSS: the grammar waits for the final message's body (vLLM's rule), unless the
        prompt already opened it, or harmony's markers are not single tokens here."""
        if self._harmony is None:
            return None
        start, gate = self._harmony
        tail = prompt_ids[max(_rfind(prompt_ids, [start]), 0):]  # the prompt's last message
        return None if gate.walk(tail).open else gate

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """Token sequences for each bad word, alone and after a space (mid-text), as vLLM."""
        seqs: list[list[int]] = []
        for word in words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            seqs.append(plain)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if spaced and spaced != plain:
                seqs.append(spaced)
        return [s for s in seqs if s]

    def check_lora(self, lora_request: Optional[LoRARequest]) -> None:
        """Load (or find) a request's adapter: a ParamError when LoRA is off or the adapter is
        bad, before anything is queued."""
        if lora_request is None:
            return
        if not isinstance(lora_request, LoRARequest):
            raise ParamError("lora_request", f"lora_request must be a LoRARequest, got {type(lora_request).__name__}.")
        if self.runner.lora is None:
            raise ParamError("lora_request", "LoRA adapters need an engine started with enable_lora=True.")
        try:
            self.runner.lora.load(lora_request)
        except ValueError as e:
            raise ParamError("lora_request", str(e)) from None

    def check_priority(self, priority: int) -> None:
        """A request's scheduling priority: an integer, and other than 0 only under the priority
        policy (as vLLM: it would otherwise be silently ignored)."""
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ParamError("priority", f"priority must be an integer, got {priority!r}.")
        if priority and self.config.scheduling_policy != "priority":
            raise ParamError("priority", f"priority={priority} needs priority scheduling: start the engine with "
                             "scheduling_policy='priority' (--scheduling-policy priority).")

    def validate_pooling(self, token_ids: list[int], params: PoolingParams) -> None:
        """Check an embedding request can run (ParamError naming the field)."""
        task = self.config.pooling_task
        if task is None:
            raise ParamError("pooling_params", "embeddings need a pooling model (runner='pooling'); this engine "
                             "generates text.")
        if params.task is not None and params.task != task:
            what = {"embed": "an embedding model", "classify": "a sequence classifier"}[task]
            raise ParamError("task", f"this is {what}: it does not {params.task}.")
        if task == "classify" and (params.dimensions is not None or params.normalize is not None):
            raise ParamError("dimensions" if params.dimensions is not None else "normalize",
                             "a classifier's probabilities take no dimensions or normalize.")
        if self.truncation(params) is not None:
            token_ids = token_ids[-self.truncation(params):]
        n, max_len = len(token_ids), self.config.max_model_len
        if n == 0:
            raise ParamError("prompt", "The prompt cannot be empty.")
        if n > max_len:
            raise ParamError("prompt", f"The prompt (length {n}) is longer than the maximum model length of {max_len}.")
        capacity = self.kv.num_blocks * self.config.block_size
        if n > capacity:
            raise ParamError("prompt", f"the prompt needs {n} tokens of KV cache but the whole cache holds {capacity}.")
        hidden = int(self.config.hf_config.hidden_size)
        if params.dimensions is not None and params.dimensions > hidden:
            raise ParamError("dimensions", f"dimensions={params.dimensions} is more than the model's embedding size "
                             f"({hidden}).")
        self._check_token_ids("prompt", token_ids)

    def _add_pooling(self, request_id: Optional[str], prompt: PromptType, params: PoolingParams,
                     arrival_time: Optional[float], cache_salt: Optional[str], priority: int) -> str:
        text, ids = self.process_prompt(prompt)
        self.validate_pooling(ids, params)
        types = self.token_types(prompt, len(ids))
        k = self.truncation(params)
        if k is not None:
            ids = ids[-k:]
            types = types[-k:] if types is not None else None
        if request_id is None:
            request_id = str(next(self._ids))
        # A Request as the scheduler knows it: its prompt, then one step's worth of "output".
        req = Request(request_id, ids, SamplingParams(max_tokens=1, detokenize=False), arrival_time, cache_salt,
                      priority=priority)
        req.pooling_params = params.clone()
        req.token_type_ids = types
        req.max_tokens = 1  # so once its last chunk is in flight the scheduler leaves it (capped_by_inflight)
        # MEAN and CLS pool every prompt token, so none may come from the prefix cache.
        req.skip_prefix_cache = self.config.pooler.pooling_type != "LAST"
        self.scheduler.add_request(req)
        self._pooling[request_id] = (text, req)
        return request_id

    def token_types(self, prompt: PromptType, n: int) -> Optional[list[int]]:
        """A prompt's token_type_ids (a BERT cross-encoder's pair encoding), checked; None if
        it has none, or only type 0."""
        types = prompt.get("token_type_ids") if isinstance(prompt, dict) else None
        if types is None:
            return None
        num_types = int(getattr(self.config.hf_config, "type_vocab_size", 0) or 0)
        if not num_types:
            raise ParamError("token_type_ids", "token_type_ids are for BERT-family models; this model has none.")
        if (not isinstance(types, (list, tuple)) or len(types) != n
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < num_types for t in types)):
            raise ParamError("token_type_ids", f"token_type_ids must be {n} integers (one per prompt token) in "
                             f"[0, {num_types}).")
        return list(types) if any(types) else None

    def add_request(self, request_id: Optional[str], prompt: PromptType,
                    params: Union[SamplingParams, PoolingParams, None] = None,
                    arrival_time: Optional[float] = None, cache_salt: Optional[str] = None,
                    lora_request: Optional[LoRARequest] = None, priority: int = 0) -> str:
        """Queue a request: text generation with SamplingParams, or an embedding with
        PoolingParams (a pooling model). `priority`: lower is served first, under
        scheduling_policy='priority'."""
        self.check_priority(priority)
        if self.runner.sleeping_tags:
            raise EngineSleepingError(f"the engine is asleep ({', '.join(self.runner.sleeping_tags)} given back): "
                                      "wake_up() first.")
        if isinstance(params, PoolingParams):
            if lora_request is not None:
                raise ParamError("lora_request", "embedding requests take no LoRA adapter.")
            return self._add_pooling(request_id, prompt, params, arrival_time, cache_salt, priority)
        if self.config.runner == "pooling":
            what = {"embed": "an embedding model (LLM.embed, /v1/embeddings)",
                    "classify": "a sequence classifier (LLM.classify, /classify)"}[self.config.pooling_task]
            raise ParamError("model", f"this is {what}: it does not generate text.")
        params = (params or SamplingParams()).clone()
        text, ids, features = self.process_inputs(prompt)
        max_tokens = self.validate(ids, params)
        refuse_truncated_images(features, params)
        self.check_lora(lora_request)
        grammar = self.compile_grammar(params)
        if self.truncation(params) is not None:
            ids = ids[-self.truncation(params):]
        think = self._think_gate(ids) if grammar is not None else None
        if request_id is None:
            request_id = str(next(self._ids))
        if not params.ignore_eos:
            params._eos_token_ids = self.eos_token_ids
        if params.bad_words:
            params._bad_words_token_ids = self._bad_words_ids(params.bad_words)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                child_params = params.clone()
                if params.seed is not None:
                    child_params.seed = params.seed + i
                if i > 0:
                    child_params.prompt_logprobs = None  # reported once, by the first sample
            child = Request(request_id if params.n == 1 else f"{i}_{request_id}", ids, child_params, arrival_time,
                            cache_salt, lora_request, features, priority)
            child.max_tokens = max_tokens
            # Custom logits processors may read the output so far: async scheduling waits for it.
            child.needs_output_history |= bool(self.config.logits_processors)
            if grammar is not None:  # each sample walks the grammar on its own
                child.grammar = self.grammar_compiler.matcher(grammar, think)
            children.append(child)
        leader = children[0]
        leader.pending_siblings = children[1:]
        self.scheduler.add_request(leader)
        if lora_request is not None:  # loaded by check_lora: this cannot fail
            for c in children:
                self.runner.lora.acquire(c.request_id, lora_request)
        embeds = leader.prompt_is_embeds  # no prompt tokens: none to detokenize after or to report
        seqs = [SequenceState(i, c, IncrementalDetokenizer(self.tokenizer, [] if embeds else ids,
                                                           params.skip_special_tokens)
                              if params.detokenize else None) for i, c in enumerate(children)]
        self.output_processor.add(RequestState(request_id, text, None if embeds else ids, params, seqs,
                                               lora_request=lora_request))
        return request_id

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in list(request_ids):
            if self._pooling.pop(rid, None) is not None:
                self.scheduler.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
                continue
            children = self.output_processor.child_ids(rid)
            self.scheduler.finish_requests(children, RequestStatus.FINISHED_ABORTED)
            self.output_processor.remove(rid)
        if self._inflight is not None and all(s.request.is_finished() for s in self._inflight.sched_out.scheduled):
            self._inflight = None  # nothing it computes is wanted any more
        self.runner.release(self.scheduler.pop_finished_ids())

    # ---- sleep mode, weight updates, RPC (vLLM's LLM.sleep / wake_up / collective_rpc) ----
    def require_idle(self, what: str, unless_paused: bool = False) -> None:
        """No request unfinished (or, with unless_paused, the engine paused: none can step)."""
        if unless_paused and self.paused:
            return
        if self.has_unfinished_requests():
            raise RuntimeError(f"{what} needs an idle engine: {self.get_num_unfinished_requests()} requests are "
                               "unfinished (let them finish or abort them first).")

    def sleep(self, level: int = 1) -> dict[str, int]:
        """Give the device memory of the KV cache and the weights back (worker/sleep.py) until
        wake_up(); the prefix cache is emptied. Needs enable_sleep_mode and an idle engine."""
        if not self.config.enable_sleep_mode:
            raise ValueError("sleep mode is off: start the engine with enable_sleep_mode=True (--enable-sleep-mode).")
        self.require_idle("sleep")
        self.kv.reset_prefix_cache()
        freed = self.runner.sleep(level)
        logger.info("sleep level %d: gave back %.2f GiB of weights (%s) and %.2f GiB of KV cache", level,
                    freed["weights"] / 2**30, "kept in host memory" if level == 1 else "dropped",
                    freed["kv_cache"] / 2**30)
        return freed

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Take the memory of `tags` ("weights", "kv_cache"; default both) again."""
        self.runner.wake_up(tags)

    def flush(self) -> list[RequestOutput]:
        """Land the launched step, if one is in flight, and return its outputs: afterwards
        nothing runs on the device (AsyncLLM.pause_generation)."""
        if self._inflight is None:
            return []
        self._land(self._inflight)
        self._inflight = None
        outputs = self._process_landed()
        self.runner.release(self.scheduler.pop_finished_ids())
        return outputs

    def recompute_all(self) -> None:
        """Running requests give their blocks back and will recompute their tokens, and the
        prefix cache is emptied: every KV entry after this comes from the weights then loaded
        (pause_generation's clear_cache). Call after flush()."""
        if self._inflight is not None:
            raise RuntimeError("recompute_all() with a step in flight: flush() first.")
        for req in self.scheduler.preempt_all():
            self.runner.block_table.release(req.request_id)
        self.kv.reset_prefix_cache()

    def reset_prefix_cache(self) -> bool:
        """vLLM's LLMEngine.reset_prefix_cache (False while requests hold blocks)."""
        return self.kv.reset_prefix_cache()

    def is_sleeping(self) -> bool:
        return bool(self.runner.sleeping_tags)

    def collective_rpc(self, method: Union[str, Any], timeout: Optional[float] = None, args: tuple = (),
                       kwargs: Optional[dict] = None) -> list[Any]:
        """vLLM's: call `method` (a worker method's name, or a callable given the worker) on
        every worker (one here); the list of their results. `timeout` is accepted for vLLM's
        signature: the one worker runs in this thread."""
        return [self.model_executor.driver_worker.call(method, tuple(args), kwargs)]

    @functools.cached_property
    def model_executor(self) -> Executor:
        return Executor(worker_class(self.config.worker_extension_cls)(self))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._inflight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.states) + len(self._pooling)

    # ---- the loop -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One model step; returns the outputs of the step before it.

        Synchronous scheduling: wait for step N - 1, update the scheduler, schedule and launch
        step N, then work out step N - 1's outputs (detokenization, stop strings, logprob
        dicts, RequestOutputs) while the device runs step N.

        Async scheduling (async_scheduling=True, the default on CUDA): schedule and launch step
        N before step N - 1's tokens are back, its decode inputs taken on the device from
        N - 1's samples, so the device never waits for the host between steps. A request that
        step N - 1 ends (EOS, stop token) has run in step N too; that token is dropped, as is
        the one after a stop string. Batches that sample from the output history on the host
        (penalties, multi-token bad words) wait for step N - 1 first, as do steps after one
        with drafts (how many stood decides where each request goes on) and steps that may
        draft (speculative decoding, within disable_by_batch_size: drafts follow the last
        token)."""
        if self._inflight is not None and (not self.async_scheduling or self._inflight.needs_history
                                           or self.scheduler.may_draft()):
            self._land(self._inflight)
            self._inflight = None
        sched_out = self.scheduler.schedule()
        pending = self.runner.launch(sched_out)
        if self._inflight is not None:  # the device moves on to step N meanwhile
            self._land(self._inflight)
        self._inflight = None if sched_out.is_empty() else _InFlight(sched_out, pending)
        outputs = self._process_landed()
        self.runner.release(self.scheduler.pop_finished_ids())
        return outputs

    def _land(self, step: "_InFlight") -> None:
        """Wait for a launched step and record its tokens in the scheduler; its outputs are
        worked out by _process_landed."""
        runner_out = step.pending.result()
        # A request a stop string ended since may have run in this step: the scheduler skips
        # it (it is finished), so its extra token is dropped.
        upd = self.scheduler.update_from_output(step.sched_out, runner_out.sampled, runner_out.accepted,
                                                runner_out.pooled)
        # (A request can finish without a token: one its grammar refused.)
        if upd.new_tokens or upd.finished or runner_out.prompt_logprobs or runner_out.pooled:
            self._landed = (upd.new_tokens, upd.finished, runner_out)
        self.runner.release(self.scheduler.pop_finished_ids())  # before a schedule reuses their rows

    def _process_landed(self) -> list[RequestOutput]:
        if self._landed is None:
            return []
        new_tokens, finished, runner_out = self._landed
        self._landed = None
        outputs, stopped = self.output_processor.process(new_tokens, finished, runner_out)
        for rid, vector in runner_out.pooled.items():
            entry = self._pooling.pop(rid, None)
            if entry is not None:  # (gone if aborted meanwhile)
                text, req = entry
                cls, result = ((ClassificationRequestOutput, ClassificationOutput)
                               if self.config.pooling_task == "classify" else (EmbeddingRequestOutput, EmbeddingOutput))
                outputs.append(cls(rid, result(vector), req.prompt_token_ids, True, text,
                                   max(req.num_cached_tokens, 0)))
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return outputs


class _InFlight:
    """A launched step whose tokens are not recorded yet."""

    def __init__(self, sched_out: SchedulerOutput, pending: PendingStep) -> None:
        self.sched_out, self.pending = sched_out, pending
        # Requests it samples for that read their output history on the host, or drafts whose
        # outcome the next step's positions depend on.
        self.needs_history = any([s.drafts or (s.samples and s.request.needs_output_history)
                                  for s in sched_out.scheduled])


HARMONY_MARKERS = (HARMONY_START, CHANNEL, MESSAGE, *ENDS)


def refuse_truncated_images(features: list[ImageFeature], params: Union[SamplingParams, PoolingParams]) -> None:
    """Truncating from the left could cut an image's placeholders apart from its embeddings;
    a prompt given as embeddings has no tokens to score (prompt_logprobs)."""
    embeds = any(f.precomputed for f in features)
    if features and params.truncate_prompt_tokens is not None:
        raise ParamError("truncate_prompt_tokens", f"a prompt with {'embeddings' if embeds else 'images'} cannot be "
                         "truncated.")
    if embeds and getattr(params, "prompt_logprobs", None) is not None:
        raise ParamError("prompt_logprobs", "prompt_logprobs needs prompt tokens: a prompt given as embeddings "
                         "has none.")


def _rfind(seq: list[int], sub: list[int]) -> int:
    """Where the last occurrence of `sub` starts in `seq`, or -1."""
    n = len(sub)
    for i in range(len(seq) - n, -1, -1):
        if seq[i:i + n] == sub:
            return i
    return -1
