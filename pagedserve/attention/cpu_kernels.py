"""Native CPU kernels, compiled from pagedserve/attention/csrc at first use with the system C
compiler and loaded with ctypes (no torch headers, so the build takes about a second; cached
under ~/.cache/pagedserve). When no compiler is there, callers fall back to pure PyTorch."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

import torch

logger = logging.getLogger("pagedserve")

_SRC = os.path.join(os.path.dirname(__file__), "csrc", "paged_decode.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
MAX_GQA_GROUP = 64  # the kernel keeps per-head softmax state for up to this many q heads per kv head


def _cache_dir() -> str:
    base = os.environ.get("PAGEDSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pagedserve")
    return os.path.join(base, "kernels")


def _build() -> Optional[ctypes.CDLL]:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None or not os.path.isfile(_SRC):
        return None
    with open(_SRC, "rb") as f:
        key = hashlib.sha256(f.read() + " ".join([cc] + _FLAGS).encode()).hexdigest()[:16]
    out = os.path.join(_cache_dir(), f"paged_decode_{key}.so")
    if not os.path.isfile(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
        os.close(fd)
        res = subprocess.run([cc, *_FLAGS, _SRC, "-o", tmp, "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            os.unlink(tmp)
            logger.warning("could not build the CPU attention kernel (%s); using pure PyTorch", res.stderr[-500:])
            return None
        os.replace(tmp, out)  # atomic: concurrent builders never load a half-written file
    lib = ctypes.CDLL(out)
    for fn in (lib.paged_decode_f32, lib.paged_decode_bf16kv):
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int, ctypes.c_float,
                                                                    ctypes.c_int]
    return lib


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None where they cannot be built (PAGEDSERVE_NO_CPU_KERNELS=1
    also says no)."""
    global _lib, _tried
    if os.environ.get("PAGEDSERVE_NO_CPU_KERNELS") == "1":
        return None
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = _build()
            except OSError as e:
                logger.warning("could not load the CPU attention kernel (%s); using pure PyTorch", e)
                _lib = None
        return _lib


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, window: int = 0, softcap: float = 0.0,
                 sinks: Optional[torch.Tensor] = None, alibi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q: [R, H, D] -> out [R, H, D] in q's dtype; the caches float32 or bfloat16 (as q),
    computed in float32. See csrc/paged_decode.c for the layout, the sliding window, the
    softcap, the sinks ([H]) and ALiBi's slopes ([H])."""
    lib = load()
    assert lib is not None
    fn = lib.paged_decode_bf16kv if k_cache.dtype == torch.bfloat16 else lib.paged_decode_f32
    q32 = q.float().contiguous()
    bt = block_tables.to(torch.int32).contiguous()
    sl = seq_lens.to(torch.int32).contiguous()
    sk = sinks.float().contiguous() if sinks is not None else None
    ab = alibi.float().contiguous() if alibi is not None else None
    out = torch.empty_like(q32)
    r, h, d = q.shape
    fn(out.data_ptr(), q32.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), bt.data_ptr(), sl.data_ptr(),
       sk.data_ptr() if sk is not None else None, ab.data_ptr() if ab is not None else None, r, h,
       k_cache.shape[2], d, k_cache.shape[1], bt.shape[1], scale, int(window), float(softcap), torch.get_num_threads())
    return out.to(q.dtype)


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype == k_cache.dtype and k_cache.dtype in (torch.float32, torch.bfloat16)
            and k_cache.is_contiguous() and q.shape[1] // k_cache.shape[2] <= MAX_GQA_GROUP and load() is not None)
