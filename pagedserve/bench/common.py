"""Helpers shared by the benchmark commands: model resolution, result printing, JSON."""

from __future__ import annotations

import json
import platform
from typing import Any, Optional

import torch


def resolve_model(model: Optional[str]) -> str:
    from pagedserve.bench.models import bench_model_dir

    return model if model else bench_model_dir()


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "cpu": _cpu_model()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(path: Optional[str], record: dict) -> None:
    line = json.dumps(record, sort_keys=True)
    print(line)
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")


def percentiles(values: list[float], ps=(10, 25, 50, 75, 90, 99)) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {f"p{p}": float(torch.quantile(t, p / 100.0)) for p in ps}


def dtype_of(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def args_record(ns: Any) -> dict:
    """The command's arguments, for the JSON record (the subcommand function left out)."""
    return {k: v for k, v in vars(ns).items() if not callable(v)}


def engine_kwargs(ns: Any) -> dict:
    from pagedserve.config import EngineArgs

    return {f: getattr(ns, f) for f in EngineArgs.field_names() if f != "model" and hasattr(ns, f)}
