"""Custom logits processors, with vLLM's (V1) programming model: a processor is a class the
engine instantiates once, `cls(config, device, is_pin_memory)`, that keeps per-row state
through `update_state(BatchUpdate | None)` each step and rewrites the step's [rows, vocab]
logits in `apply`. Per-request arguments come in `SamplingParams.extra_args` (the server's
`vllm_xargs`) and are checked at admission by the class's `validate_params`.

Loaded with `LLM(model, logits_processors=[MyProcessor, "my.module:MyProcessor"])` or
`pagedserve serve MODEL --logits-processors my.module:MyProcessor`, and from installed
packages' entry points in the group `pagedserve.logits_processors`.

Rows: a step's logits hold one row per request that samples in that step (a request in the
middle of its prompt has none yet). Between steps, requests leave (`removed`), come in
(`added`, with a live reference to their output token list) and change rows (`moved`).
Apply `removed`, then `added`, then `moved` in order; an index is never both removed and
added, and an added or moved request replaces whatever state its index held.

What differs from vLLM: the first argument is pagedserve's EngineConfig (`vocab_size`,
`max_num_seqs`, `model`, `device`, `dtype`, ...), not a VllmConfig; and a request is added
when its first token is sampled, not when its prompt starts."""

from __future__ import annotations

import enum
import importlib
import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, Union

import torch

from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.config import EngineConfig

__all__ = ["LogitsProcessor", "AdapterLogitsProcessor", "BatchUpdate", "MoveDirectionality",
           "RequestLogitsProcessor", "process_dict_updates", "load_logits_processors", "ENTRY_POINT_GROUP"]

logger = logging.getLogger("pagedserve")
ENTRY_POINT_GROUP = "pagedserve.logits_processors"


class MoveDirectionality(enum.Enum):
    UNIDIRECTIONAL = enum.auto()  # the state at index a moves to index b (a is left empty)
    SWAP = enum.auto()  # the states at a and b change places


RemovedRequest = int  # a row index
# (row index, sampling params, prompt token ids (None for an embeddings prompt), output token
# ids: the request's own list, so it always holds the tokens so far)
AddedRequest = tuple[int, SamplingParams, Optional[list[int]], list[int]]
MovedRequest = tuple[int, int, MoveDirectionality]  # (index a, index b, directionality)


@dataclass(frozen=True)
class BatchUpdate:
    """How the rows changed since the last step: apply removed, then added, then moved."""

    batch_size: int  # rows this step
    removed: Sequence[RemovedRequest]
    added: Sequence[AddedRequest]
    moved: Sequence[MovedRequest]


class LogitsProcessor(ABC):
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Raise ValueError for a request this processor cannot take (checked at admission:
        the server answers 400)."""
        return None

    @abstractmethod
    def __init__(self, config: "EngineConfig", device: torch.device, is_pin_memory: bool) -> None:
        raise NotImplementedError

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The step's [rows, vocab] float32 logits, rewritten (in place or as a new tensor)."""
        raise NotImplementedError

    @abstractmethod
    def is_argmax_invariant(self) -> bool:
        """True if the processor never changes a row's argmax (then greedy rows skip it and it
        runs after temperature, on the rows that sample); False runs it before everything
        that follows (penalties, temperature, min-p, top-k, top-p) on every row."""
        raise NotImplementedError

    @abstractmethod
    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        """Called before each step's `apply`; batch_update is None when no row changed."""
        raise NotImplementedError


# A per-request processor: (output ids, logits row) -> logits row, or (prompt ids, output ids,
# logits row) -> logits row (vLLM V0's form, which AdapterLogitsProcessor wraps).
RequestLogitsProcessor = Union[Callable[[list[int], torch.Tensor], torch.Tensor],
                               Callable[[list[int], list[int], torch.Tensor], torch.Tensor]]

T = TypeVar("T")


def process_dict_updates(entries: dict[int, T], batch_update: Optional[BatchUpdate],
                         new_state: Callable[[SamplingParams, Optional[list[int]], list[int]], Optional[T]]) -> bool:
    """Keep a dict of row index -> state in step with the batch: `new_state(params, prompt ids,
    output ids)` makes an added request's state (None: the processor leaves that row alone).
    Returns whether anything changed."""
    if batch_update is None:
        return False
    changed = False
    for index in batch_update.removed:
        changed |= entries.pop(index, None) is not None
    for index, params, prompt_ids, output_ids in batch_update.added:
        state = new_state(params, prompt_ids, output_ids)
        if state is not None:
            entries[index] = state
            changed = True
        else:
            changed |= entries.pop(index, None) is not None
    for a, b, direction in batch_update.moved:
        a_state, b_state = entries.pop(a, None), entries.pop(b, None)
        if a_state is not None:
            entries[b] = a_state
        if b_state is not None and direction == MoveDirectionality.SWAP:
            entries[a] = b_state
        changed |= a_state is not None or b_state is not None
    return changed


class AdapterLogitsProcessor(LogitsProcessor):
    """Runs a per-request processor (RequestLogitsProcessor) on each row that has one:
    subclasses give `new_req_logits_processor(params)` (None: not for this request) and
    `is_argmax_invariant()`, and call `super().__init__` if they override it."""

    def __init__(self, config: "EngineConfig", device: torch.device, is_pin_memory: bool) -> None:
        self.req_info: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}

    @abstractmethod
    def new_req_logits_processor(self, params: SamplingParams) -> Optional[RequestLogitsProcessor]:
        raise NotImplementedError

    def _new_state(self, params: SamplingParams, prompt_ids: Optional[list[int]],
                   output_ids: list[int]) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        fn = self.new_req_logits_processor(params)
        if fn is None:
            return None
        # (the partial holds the request's own output list: it sees each new token)
        takes_prompt = len(inspect.signature(fn).parameters) == 3
        return partial(fn, prompt_ids, output_ids) if takes_prompt else partial(fn, output_ids)

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        process_dict_updates(self.req_info, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, fn in self.req_info.items():
            before = logits[row]
            after = fn(before)
            if after is not before:
                logits[row] = after
        return logits


_REQUIRED = ("apply", "update_state", "is_argmax_invariant")


def _resolve(spec: Union[str, type], where: str) -> type:
    """A class, or its name as "module:Class" (vLLM's form) or "module.Class"."""
    if isinstance(spec, str):
        module_name, sep, qualname = spec.partition(":")
        if not sep:
            module_name, _, qualname = spec.rpartition(".")
        if not module_name or not qualname:
            raise ValueError(f"{where}: {spec!r} is not a class name of the form 'module:Class'.")
        try:
            obj: Any = importlib.import_module(module_name)
            for attr in qualname.split("."):
                obj = getattr(obj, attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{where}: cannot load {spec!r}: {e}") from None
    else:
        obj = spec
    if not isinstance(obj, type):
        raise ValueError(f"{where}: {spec!r} is not a class (a logits processor is a class the engine "
                         "instantiates).")
    missing = [m for m in _REQUIRED if not callable(getattr(obj, m, None))]
    if missing or inspect.isabstract(obj):
        what = f"lacks {', '.join(missing)}" if missing else "is abstract"
        raise ValueError(f"{where}: {obj.__name__} {what}; subclass pagedserve.logits_processor.LogitsProcessor.")
    return obj


def _entry_point_classes() -> list[type]:
    from importlib.metadata import entry_points

    classes = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as e:  # a broken plugin stops start-up, naming itself
            raise ValueError(f"logits processor plugin {ep.name!r} ({ep.value}) failed to load: {e}") from e
        classes.append(_resolve(loaded, f"logits processor plugin {ep.name!r}"))
        logger.info("logits processor plugin %s: %s", ep.name, ep.value)
    return classes


def load_logits_processors(specs: Optional[Sequence[Union[str, type]]]) -> tuple[type, ...]:
    """The installed plugins' classes, then `specs` resolved (classes or names); a ValueError
    naming the entry at fault."""
    if specs is not None and (isinstance(specs, (str, type)) or not isinstance(specs, Sequence)):
        raise ValueError(f"logits_processors must be a list of classes or 'module:Class' names, got {specs!r}.")
    classes = _entry_point_classes()
    for i, spec in enumerate(specs or ()):
        classes.append(_resolve(spec, f"logits_processors[{i}]"))
    return tuple(classes)
