"""Triton kernels (GPU; on CPU only through Triton's interpreter, TRITON_INTERPRET=1), each
with a pure-PyTorch twin in `reference.py` that the tests hold it to. Importing this package
never imports triton: the kernel modules do, and only the Triton backend imports them."""

from __future__ import annotations

import importlib.util
import os


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Kernels run on CPU tensors in Triton's interpreter (tests on machines without CUDA)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
