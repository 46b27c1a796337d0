"""Per-request state shared by the scheduler, the KV cache manager and the model runner."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Optional, Sequence, Union

from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.engine.grammar import GrammarState
    from pagedserve.lora.request import LoRARequest
    from pagedserve.multimodal.inputs import ImageFeature
    from pagedserve.pooling_params import PoolingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Everything from here on is finished.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> Optional[str]:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """One sequence being generated. `num_computed_tokens` counts the tokens whose KV is in
    the cache (or is being written by the step in flight); the scheduler advances it."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_time: Optional[float] = None,
        cache_salt: Optional[str] = None,
        lora_request: Optional["LoRARequest"] = None,
        mm_features: Sequence["ImageFeature"] = (),
        priority: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.cache_salt = cache_salt
        # Under the priority policy: lower values are served first, ties by arrival.
        self.priority = priority
        self.lora_request = lora_request
        self.pooling_params: Optional["PoolingParams"] = None  # set for an embedding request
        # A BERT cross-encoder pair's token types (0: first text, 1: second), one per prompt token.
        self.token_type_ids: Optional[list[int]] = None
        # The first block's extra hash key: a request's KV depends on its adapter too.
        self.hash_extra = cache_salt if lora_request is None else f"{cache_salt or ''}\x00lora:{lora_request.lora_int_id}"
        # The prompt's images (multimodal/inputs.py), in prompt order: their placeholders'
        # embeddings come from the vision encoder, and their hashes key the blocks they cover.
        self.mm_features = tuple(mm_features)
        # A prompt given as embeddings (engine/prompt_embeds.py): its ids are placeholders.
        self.prompt_is_embeds = any(f.precomputed for f in self.mm_features)

        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        # Tokens a launched step is sampling whose values are not back yet (async scheduling
        # schedules the next step before then; at most 2: the step in flight and this one).
        self.num_inflight = 0
        self.num_cached_tokens = -1  # prompt tokens served by the prefix cache, set when first scheduled
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: Union[int, str, None] = None
        self.block_hashes: list[bytes] = []  # hashes of full blocks, filled by the KV cache manager
        # Models with per-request states: the prefix hash whose saved state this request resumes
        # from when admitted with prefix-cache hits (engine/state_cache.py).
        self.state_resume: Optional[bytes] = None
        self.num_published_blocks = 0  # how many of its blocks the KV cache manager put in the prefix cache
        # Sampling reads its output history on the host (async scheduling waits for it).
        self.needs_output_history = sampling_params.needs_output_history
        # Per-step logit rules (min_tokens bans, bad words, logit bias) to apply when sampling.
        p = sampling_params
        self.has_logit_rules = p.min_tokens > 0 or bool(p._bad_words_token_ids) or bool(p.logit_bias)
        self.max_tokens = 0  # resolved by the engine from sampling_params and max_model_len
        # Prompt logprobs need every prompt position computed: no prefix-cache hits.
        self.skip_prefix_cache = sampling_params.prompt_logprobs is not None
        # n > 1: the first child computes the prompt; its siblings wait here and are forked
        # from its prompt blocks (shared, ref-counted) once the prompt's KV is written.
        self.pending_siblings: list["Request"] = []
        self.leader: Optional["Request"] = None
        self.first_scheduled_time: Optional[float] = None
        # Structured outputs: where the output stands in its grammar (set by the engine).
        self.grammar: Optional["GrammarState"] = None
        # Speculative decoding verifies drafts against each position's distribution. Penalties,
        # min_tokens, bad words and a grammar take the drafts before each row
        # (SamplingStates.build's `extra`); logit bias and allowed tokens are the same at every
        # row; logprobs come from each emitted token's row. Every request may speculate, once
        # its grammar (if any) masks every token (GrammarState.speculates).

    def block_hash_extra(self, i: int, block_size: int) -> Optional[str]:
        """The extra hash key of full block i: the first block's salt / adapter, and the hash of
        every image with a placeholder in the block (same tokens, other pixels: other KV)."""
        extra = self.hash_extra if i == 0 else None
        lo, hi = i * block_size, (i + 1) * block_size
        images = [f.hash for f in self.mm_features if f.offset < hi and f.offset + f.length > lo]
        if images:
            extra = f"{extra or ''}\x00image:" + ",".join(images)
        return extra

    @property
    def sort_key(self) -> tuple[int, float]:
        """The priority policy's order: the smaller key is served first and preempted last."""
        return (self.priority, self.arrival_time)

    @property
    def speculates(self) -> bool:
        return self.grammar is None or self.grammar.speculates

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def capped_by_inflight(self, max_model_len: int) -> bool:
        """Whether the tokens in flight already reach max_tokens or max_model_len, so the
        request ends when they land and must not be scheduled again."""
        return self.num_inflight > 0 and (len(self.output_token_ids) + self.num_inflight >= self.max_tokens
                                          or len(self.all_token_ids) + self.num_inflight >= max_model_len)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def is_finished(self) -> bool:
        return self.status.is_finished

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
