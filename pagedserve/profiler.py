"""LLM.start_profile / stop_profile (vLLM's): torch's profiler around whatever the engine runs
in between, its trace written as a Chrome / Perfetto JSON file into the directory named by
PAGEDSERVE_TORCH_PROFILER_DIR (vLLM: VLLM_TORCH_PROFILER_DIR). Without it, profiling is off."""

from __future__ import annotations

import os
import time
from typing import Optional

import torch

PROFILER_DIR_ENV = "PAGEDSERVE_TORCH_PROFILER_DIR"


class TorchProfiler:
    def __init__(self, directory: Optional[str] = None) -> None:
        self.directory = directory if directory is not None else os.environ.get(PROFILER_DIR_ENV)
        self._prof: Optional[torch.profiler.profile] = None

    def start(self) -> None:
        if not self.directory:
            raise RuntimeError(f"profiling is off: set {PROFILER_DIR_ENV} to the directory for the traces.")
        if self._prof is not None:
            raise RuntimeError("the profiler is already running: stop_profile() first.")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self._prof.__enter__()

    def stop(self) -> str:
        """Stop, write the trace; its path."""
        if self._prof is None:
            raise RuntimeError("the profiler is not running: start_profile() first.")
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"pagedserve-{os.getpid()}-{time.time_ns()}.trace.json")
        prof.export_chrome_trace(path)
        return path
