"""How many KV blocks fit: an exact byte budget, a share of RAM on CPU, or what the GPU has
left at gpu_memory_utilization after a worst-case forward pass."""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

logger = logging.getLogger("pagedserve")

CPU_DEFAULT_KV_BYTES = 4 << 30  # like vLLM's VLLM_CPU_KVCACHE_SPACE default


def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                parts: int = 2) -> int:
    """parts: caches a layer, 2 (keys, values) or 1 (MLA's latent, read as both)."""
    return num_layers * parts * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def cpu_num_blocks(per_block: int, max_useful_blocks: int) -> int:
    budget = min(CPU_DEFAULT_KV_BYTES, _available_ram() // 4)
    return max(1, min(budget // per_block, max_useful_blocks))


def cuda_num_blocks(per_block: int, utilization: float, device: torch.device, profile: Callable[[], None]) -> int:
    """Run `profile` (a worst-case forward pass) and give the KV cache what is left of
    utilization * total memory after weights, peak activations and other users."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    profile()
    torch.cuda.synchronize(device)
    peak_extra = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    used = total - free  # weights, other processes, CUDA context
    budget = int(total * utilization) - used - peak_extra
    n = budget // per_block
    logger.info("GPU memory: total %.1f GiB, used %.1f GiB, activation peak %.2f GiB -> %d KV blocks (%.1f GiB)",
                total / 2**30, used / 2**30, peak_extra / 2**30, n, n * per_block / 2**30)
    if n < 1:
        raise ValueError(
            f"no GPU memory is left for the KV cache at gpu_memory_utilization={utilization}: raise it, "
            "or lower max_num_batched_tokens / max_model_len."
        )
    return n
