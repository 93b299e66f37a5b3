"""The backend rule for every op in kernels/ (linear_scan, paragru / paralstm, deltaproduct).

    backend="auto"    the op's Triton kernels when the tensor is on CUDA (or the self-check is
                      forced on CPU: kernels/selfcheck.py), triton imports, the op's own shape
                      conditions hold and its start-up self-check passed; else the torch reference
    backend="torch"   the torch reference
    backend="triton"  the Triton kernels; on CPU tensors only under TRITON_INTERPRET=1 (the tests'
                      way of running them) or inside kernels.offline_compile.compile_only(); on CUDA
                      a failed self-check is an error instead of a fallback

train.kernel_backend sets it for every recurrent mixer.
"""
from __future__ import annotations

import os
import sys

import torch

from kernels import selfcheck

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install on a machine without a GPU driver
        return False
    return True


def use_triton(backend: str, tensor: torch.Tensor, name: str) -> bool:
    """Whether the backend and the tensor allow the Triton kernels of op `name` (the op then adds
    its own shape conditions for "auto" and runs its self-check). Raises ValueError for an
    unknown backend, or "triton" where the kernels cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend must be 'auto', 'triton' or 'torch'; got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return (tensor.is_cuda or selfcheck.forced_on_cpu()) and triton_available()
    if not triton_available():
        raise ValueError(f"{name}: backend='triton' but triton is not installed")
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" and not _compile_only():
        raise ValueError(f"{name}: backend='triton' on {tensor.device} tensors needs TRITON_INTERPRET=1")
    return True


def _compile_only() -> bool:
    """Inside kernels.offline_compile.compile_only(): launches compile for a GPU and run nothing."""
    module = sys.modules.get("kernels.offline_compile")
    return module is not None and module.compile_only_active()
