"""Helpers shared by the benchmark commands: model resolution, result printing, JSON."""

from __future__ import annotations

import argparse
import json
import platform
import random
from typing import Any, Optional

import torch


def resolve_model(model: Optional[str]) -> str:
    from pagedserve.bench.models import bench_model_dir

    return model if model else bench_model_dir()


def add_batch_args(ap: argparse.ArgumentParser, output_len: Optional[int] = 64) -> None:
    """The offline batch benchmarks' shared flags: model, batch shape, repeats, JSON path."""
    ap.add_argument("--model", default=None, help="model dir (default: build the ~30M benchmark model)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    if output_len is not None:
        ap.add_argument("--output-len", type=int, default=output_len)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--output-json", default=None)


def random_token_prompts(vocab: int, num_prompts: int, input_len: int, seed: int = 0) -> list[dict]:
    """Token-id prompts drawn uniformly from the vocabulary (no tokenizer in the measurement)."""
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(input_len)]} for _ in range(num_prompts)]


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
