"""LLMEngine: the synchronous core. add_request / step / abort_request around one loop:
schedule -> run the model -> update the scheduler -> build outputs."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from pagedserve.config import EngineArgs, EngineConfig
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.kv_cache import KVCacheManager
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.scheduler import Scheduler
from pagedserve.model.hf_config import generation_eos_ids
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.tokenizer import load_tokenizer
from pagedserve.worker.model_runner import ModelRunner

logger = logging.getLogger("pagedserve")

PromptType = Union[str, dict, list]


@dataclass
class _OutputState:
    """What the output side keeps per request: its prompt text and its detokenizer."""

    request: Request
    prompt: Optional[str]
    detok: Optional[IncrementalDetokenizer]
    sent_tokens: int = 0  # for DELTA outputs
    sent_text: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.runner = ModelRunner(config)
        num_blocks = self.runner.determine_num_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        config.num_gpu_blocks = num_blocks
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len,
                                   config.enable_chunked_prefill)
        self.eos_token_ids = frozenset(generation_eos_ids(config.model, config.hf_config, self.tokenizer))
        self.states: dict[str, _OutputState] = {}
        self._ids = itertools.count()
        logger.info("pagedserve engine: %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d",
                    config.model, config.device, str(config.dtype).replace("torch.", ""), num_blocks,
                    config.block_size, config.max_model_len)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    # ---- input side -------------------------------------------------------------------
    def process_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        """A text prompt, or vLLM's TokensPrompt {"prompt_token_ids": [...]} -> (text, ids)."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise ValueError("prompt_token_ids must be a list of integers.")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt and isinstance(prompt["prompt"], str):
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(f"a prompt must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}.")

    def validate(self, token_ids: list[int], params: SamplingParams) -> int:
        """Check a request can ever run; returns its resolved max_tokens."""
        n = len(token_ids)
        if n == 0:
            raise ValueError("The prompt cannot be empty.")
        vocab = self.config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token id {bad} is out of vocabulary (vocab size {vocab}).")
        bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids: token id {bad} is out of vocabulary (vocab size {vocab}).")
        max_len = self.config.max_model_len
        if n >= max_len:
            raise ValueError(f"The prompt (length {n}) is longer than the maximum model length of {max_len} "
                             "(it must leave room for at least one generated token).")
        max_tokens = params.max_tokens if params.max_tokens is not None else max_len - n
        if n + max_tokens > max_len:
            raise ValueError(f"This model's maximum context length is {max_len} tokens. However, you requested "
                             f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion). "
                             "Please reduce the length of the prompt or max_tokens.")
        capacity = self.kv.num_blocks * self.config.block_size
        if n + max_tokens > capacity:
            raise ValueError(f"the request needs {n + max_tokens} tokens of KV cache but the whole cache holds "
                             f"{capacity} ({self.kv.num_blocks} blocks of {self.config.block_size}); lower "
                             "max_tokens or give the KV cache more memory.")
        return max_tokens

    def add_request(self, request_id: Optional[str], prompt: PromptType, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None) -> str:
        params = (params or SamplingParams()).clone()
        text, ids = self.process_prompt(prompt)
        max_tokens = self.validate(ids, params)
        if request_id is None:
            request_id = str(next(self._ids))
        if not params.ignore_eos:
            params._eos_token_ids = self.eos_token_ids
        req = Request(request_id, ids, params, arrival_time)
        req.max_tokens = max_tokens
        self.scheduler.add_request(req)
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens) if params.detokenize else None
        self.states[request_id] = _OutputState(req, text, detok)
        return request_id

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for req in self.scheduler.finish_requests(list(request_ids), RequestStatus.FINISHED_ABORTED):
            self.states.pop(req.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.num_waiting + self.scheduler.num_running

    # ---- the loop -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched_out = self.scheduler.schedule()
        sampled = self.runner.execute(sched_out)
        results = self.scheduler.update_from_output(sched_out, sampled)
        outputs = []
        for r in results:
            st = self.states.get(r.request.request_id)
            if st is None:
                continue
            if st.detok is not None:
                st.detok.add_tokens(r.new_token_ids)
                if r.request.is_finished():
                    st.detok.finish()
            out = self._make_output(st)
            if out is not None:
                outputs.append(out)
            if st.request.is_finished():
                del self.states[r.request.request_id]
        return outputs

    def _make_output(self, st: _OutputState) -> Optional[RequestOutput]:
        req = st.request
        finished = req.is_finished()
        kind = req.sampling_params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        text = st.detok.text if st.detok is not None else ""
        token_ids = req.output_token_ids
        if kind == RequestOutputKind.DELTA:
            text, token_ids = text[st.sent_text:], token_ids[st.sent_tokens:]
            st.sent_text, st.sent_tokens = st.sent_text + len(text), st.sent_tokens + len(token_ids)
        else:
            token_ids = list(token_ids)
        completion = CompletionOutput(index=0, text=text, token_ids=token_ids,
                                      finish_reason=req.status.finish_reason if finished else None,
                                      stop_reason=req.stop_reason)
        return RequestOutput(request_id=req.request_id, prompt=st.prompt, prompt_token_ids=req.prompt_token_ids,
                             outputs=[completion], finished=finished, num_cached_tokens=max(req.num_cached_tokens, 0))
