"""Startup self-check of the Triton kernels against their torch references, with fallback.

The Triton kernels are validated offline (interpreter tests, the offline compile check), but a
user's GPU, driver or Triton build can still break one. So the first time a kernel is dispatched
at a new *shape class* (the things its compiled code depends on: head size, chunk, dtype, which
optional inputs are present, block sizes chosen at launch), the dispatcher runs it once on a small
random slice of that class (forward and backward) beside the torch reference and compares. On an
exception or a mismatch it prints one loud line naming the kernel, the class and the error, and
that class runs on the torch reference for the rest of the process; with ``strict=True``
(``train.kernel_backend=triton``) the failure is raised instead. Verdicts are cached per process; ``report()`` lists them.

The slice uses its own generator, never the global RNG (exact resume depends on it), and runs
under ``torch.enable_grad()`` on fresh tensors, so it does not touch the caller's graph.

Tests force the check on CPU (under TRITON_INTERPRET=1) with ``force_on_cpu()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Callable

import torch

__all__ = ["Verdict", "kernel_allowed", "force_on_cpu", "forced_on_cpu", "report", "reset",
           "relative_error", "slice_generator"]


@dataclasses.dataclass(frozen=True)
class Verdict:
    op: str
    shape_class: tuple
    ok: bool
    detail: str  # "max relative error 3.1e-06 <= 2.0e-02", or the error


_verdicts: dict[tuple[str, tuple], Verdict] = {}
_force_cpu = False


@contextlib.contextmanager
def force_on_cpu():
    """Run the self-check (and let backend='auto' pick the kernels) for CPU tensors too: the
    tests' way to exercise it through the Triton interpreter."""
    global _force_cpu
    previous, _force_cpu = _force_cpu, True
    try:
        yield
    finally:
        _force_cpu = previous


def forced_on_cpu() -> bool:
    return _force_cpu


def reset():
    """Forget every verdict (tests)."""
    _verdicts.clear()


def report() -> list[Verdict]:
    return list(_verdicts.values())


def slice_generator(device) -> torch.Generator:
    """A generator of the device's kind with a fixed seed: the slice is the same on every rank
    and run, and the global RNG stream is untouched."""
    gen = torch.Generator(device=device)
    gen.manual_seed(20251021)
    return gen


def relative_error(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    """max |got - want| / max(max |want|, 1e-6), in fp64; inf for NaN or a missing gradient."""
    if got is None and want is None:
        return 0.0
    if got is None or want is None:
        return float("inf")
    diff = (got.double() - want.double()).abs().max().item()
    if diff != diff:
        return float("inf")
    return diff / max(want.double().abs().max().item(), 1e-6)


def kernel_allowed(op: str, shape_class: tuple, check: Callable[[], float], tol: float,
                   strict: bool = False) -> bool:
    """Whether the Triton kernel of ``op`` may serve ``shape_class`` in this process.

    ``check()`` runs the kernel and the reference on a small slice of the class and returns the
    largest relative error over outputs and gradients; it is called once per class. A failure
    (an exception, or an error above ``tol``) prints one line and returns False, or raises a
    RuntimeError naming the kernel when ``strict``.
    """
    key = (op, shape_class)
    verdict = _verdicts.get(key)
    if verdict is None:
        try:
            with torch.enable_grad():
                err = check()
            ok = err <= tol
            detail = f"max relative error {err:.1e} {'<=' if ok else '>'} {tol:.1e}"
        except Exception as exc:  # a compile error, an illegal address, a launch failure ...
            ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        verdict = _verdicts[key] = Verdict(op, shape_class, ok, detail)
        if not ok and not strict:
            print(f"KERNEL SELF-CHECK FAILED: Triton {op} {_describe(shape_class)}: {verdict.detail}; "
                  f"using the torch reference for it for the rest of this run "
                  f"(train.kernel_backend=triton makes this fatal)", file=sys.stderr, flush=True)
    if not verdict.ok and strict:
        raise RuntimeError(f"Triton {op} {_describe(shape_class)} failed its self-check against the "
                           f"torch reference: {verdict.detail} (train.kernel_backend=auto falls back "
                           f"to the reference instead)")
    return verdict.ok


def _describe(shape_class: tuple) -> str:
    return "(" + ", ".join(str(x) for x in shape_class) + ")"
