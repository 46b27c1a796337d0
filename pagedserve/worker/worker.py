"""The worker that collective_rpc calls reach (vLLM's `LLM.collective_rpc`, and
`llm_engine.model_executor.driver_worker` as RL libraries such as TRL reach the model): one
process, one device, so one worker, around the engine's model runner."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from pagedserve.engine.engine import LLMEngine
    from pagedserve.worker.model_runner import ModelRunner


class Worker:
    def __init__(self, engine: "LLMEngine") -> None:
        self._engine = engine

    @property
    def worker(self) -> "Worker":
        """vLLM's driver_worker is a wrapper whose `.worker` is the worker: both paths lead here."""
        return self

    @property
    def model_runner(self) -> "ModelRunner":
        return self._engine.runner

    @property
    def device(self) -> torch.device:
        return self._engine.runner.device

    def get_model(self) -> nn.Module:
        return self._engine.runner.model

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """(name, tensor) pairs named as in the Hugging Face checkpoint (a trainer's
        named_parameters()), any subset, into the model; the prefix cache, whose blocks the old
        weights computed, is emptied. Needs an idle engine, or a paused one (pause_generation:
        its frozen requests go on under the new weights). Returns how many were given."""
        self._engine.require_idle("a weight update", unless_paused=True)
        n = self._engine.runner.update_weights(weights)
        self._engine.kv.reset_prefix_cache()
        return n

    def reload_weights(self) -> None:
        """Every weight again from the checkpoint on disk (after sleep level 2, say)."""
        self._engine.require_idle("reload_weights", unless_paused=True)
        self._engine.runner.reload_weights()
        self._engine.kv.reset_prefix_cache()

    def check_health(self) -> None:
        return None

    def call(self, method: Union[str, Callable[..., Any]], args: tuple, kwargs: Optional[dict]) -> Any:
        """`method` by name (one of this worker's public methods), or a callable given the worker."""
        if callable(method):
            return method(self, *args, **(kwargs or {}))
        if not isinstance(method, str) or method.startswith("_") or not callable(getattr(self, method, None)):
            raise ValueError(f"collective_rpc: unknown worker method {method!r}; the worker has "
                             f"{', '.join(worker_methods(type(self)))}.")
        return getattr(self, method)(*args, **(kwargs or {}))


def worker_methods(cls: type = Worker) -> list[str]:
    return sorted(n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n, None)) and n != "call")


def worker_class(extension: Optional[str]) -> type:
    """Worker, with vLLM's worker_extension_cls ("module.Class") mixed in: its methods come
    first, and collective_rpc reaches them by name."""
    if not extension:
        return Worker
    import importlib

    module, _, name = extension.rpartition(".")
    try:
        ext = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as e:
        raise ValueError(f"worker_extension_cls {extension!r} could not be imported: {e}") from None
    if not isinstance(ext, type):
        raise ValueError(f"worker_extension_cls must name a class as 'module.Class', got {extension!r}.")
    clash = sorted(n for n in vars(ext) if not n.startswith("__") and n in vars(Worker))
    if clash:
        raise ValueError(f"worker_extension_cls {extension!r} redefines the worker's {clash}.")
    return type("Worker", (ext, Worker), {})


class Executor:
    """vLLM's `llm_engine.model_executor`: here only the way to its driver worker."""

    def __init__(self, worker: Worker) -> None:
        self.driver_worker = worker
