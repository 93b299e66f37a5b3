"""Triton's CPU interpreter as an instrument: GPU dot rounding, and memory traffic / FLOP counts.

Both context managers patch ``triton.runtime.interpreter.InterpreterBuilder`` (the numpy
implementation of every Triton op that ``TRITON_INTERPRET=1`` runs) while active and restore it
on exit; they compose, and they only see kernels launched through the interpreter, so the
variable must be set before triton is imported.

``emulate_dot_precision(mode)`` makes ``tl.dot`` see its operands as a GPU's tensor cores do.
What Triton 3.9 emits for an fp32 ``tl.dot`` (checked by compiling one for
``GPUTarget("cuda", 80, 32)`` and ``("cuda", 90, 32)`` and reading the PTX):

  * ``input_precision="tf32"`` (Triton's default): no ``cvt`` at all — the raw fp32 registers go
    to ``mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32`` (sm_80, and sm_90 for small tiles)
    or ``wgmma.mma_async...f32.tf32.tf32`` (sm_90). The tensor core reads only the top 19 bits of
    each register, so the operand is *truncated* to TF32 (the low 13 mantissa bits dropped,
    round toward zero), not rounded; triton-lang/triton#4574 shows the same (Triton's tf32 dot
    matches torch only after an explicit ``cvt.rna.tf32.f32``).
  * ``"tf32x3"``: ``cvt.rna.tf32.f32`` splits each operand into big + small TF32 parts; the
    result is fp32-accurate for our purposes, so it is emulated as exact.
  * ``"ieee"``: ``fma.rn.f32`` on CUDA cores: exact fp32 products, fp32 accumulation.
  * bf16 / fp16 operands: already 8 / 11-bit values; the tensor core multiplies them exactly and
    accumulates in fp32.

Modes: ``"gpu"`` emulates the above (and, as a GPU does, rounds fp32 -> bf16 casts to nearest
even); ``"tf32"`` truncates every fp32 operand whatever its input_precision ("what if these dots
used TF32"); ``"bf16"`` rounds every fp32 / fp16 operand to bf16, nearest even ("what if we fed
bf16 operands"). fp64 operands stay exact in every mode (the GPU's DMMA is exact fp64).

Two defects of the Triton 3.9 interpreter that matter here (found while building this): it
stores bf16 as raw uint16 bits and (1) ``tl.dot`` multiplies those bit patterns as integers, and
(2) fp32 -> bf16 casts truncate. Every mode decodes bf16 dot operands correctly, and ``"gpu"``
also rounds the casts. Elementwise bf16 arithmetic (``a * b`` on two bf16 tensors) is likewise
done on raw bits and is *not* fixed here: a kernel that computes in bf16, rather than loading
bf16 and converting to fp32, gives wrong values under the interpreter whatever the mode.

``count_traffic()`` yields a TrafficCounter; while it is active, per kernel name:

  * bytes read / written: every global load and store (plain, masked, tensor-descriptor, atomic)
    counts its *unmasked* elements times the pointer's element size. These are the bytes a
    program asks of global memory, before caches: a re-read served by L2 still counts, and the
    32-byte sector granularity of strided accesses is not modelled.
  * dot FLOPs: 2·M·N·K per ``tl.dot`` (batched dots times the batch), summed over programs, also
    split by what executes them (``DOT_KINDS``: "bf16", "tf32", "fp32" = IEEE on CUDA cores, ...).
  * launches and programs.
  * sequential steps: iterations of ``for`` loops over ``range`` / ``tl.range`` /
    ``tl.static_range`` executed by one program (nested loops counted in full), maximum over the
    launch's programs. A program is one thread block walking its loops in order, so this is the
    length of the longest chain of loop bodies in the launch; launches on one stream run one
    after another, so the call's critical path is the sum over launches. Its counterpart on a
    GPU assumes every program of a launch runs at once (true when they fit in one wave).
    Also reported per program (maximum): dots and load instructions.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import os

import numpy as np
import triton.language as tl
from triton.runtime import interpreter as _interp

__all__ = ["DOT_MODES", "DOT_KINDS", "emulate_dot_precision", "count_traffic", "KernelTraffic", "TrafficCounter"]

DOT_MODES = ("gpu", "tf32", "bf16")

_Builder = _interp.InterpreterBuilder
_PRECISION = _interp._ir.INPUT_PRECISION


def _require_interpreter(what: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{what} acts on Triton's CPU interpreter: set TRITON_INTERPRET=1 before importing triton")


class _Patches:
    """Replacements of attributes (or of dict entries) undone in reverse order."""

    def __init__(self):
        self._undo = []

    def set(self, obj, name, value):
        # A class attribute is restored to what the class itself held (deleted if inherited).
        old = vars(obj).get(name, _MISSING) if isinstance(obj, type) else getattr(obj, name, _MISSING)
        setattr(obj, name, value)
        self._undo.append(lambda: delattr(obj, name) if old is _MISSING else setattr(obj, name, old))

    def set_item(self, mapping: dict, key, value):
        old = mapping.get(key, _MISSING)
        mapping[key] = value
        self._undo.append(lambda: mapping.pop(key, None) if old is _MISSING else mapping.__setitem__(key, old))

    def restore(self):
        while self._undo:
            self._undo.pop()()


_MISSING = object()


# ---------------------------------------------------------------------------------------------
# Rounding, on numpy fp32 arrays (bit manipulation, so exactly what the hardware does).


def tf32_truncate(x: np.ndarray) -> np.ndarray:
    """fp32 -> the TF32 value a tensor core reads from a raw fp32 register: low 13 mantissa bits
    cleared (round toward zero). Inf and NaN keep their class (NaN payloads may change)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return (bits & np.uint32(0xFFFFE000)).view(np.float32)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """fp32 -> nearest bf16 (ties to even), as fp32 values; what cvt.rn.bf16.f32 gives."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    bias = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    rounded = ((bits + bias) & np.uint32(0xFFFF0000)).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), rounded)


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


# ---------------------------------------------------------------------------------------------
# emulate_dot_precision


def _dot_operand(handle, precision, mode):
    """The operand as the tensor core multiplies it, as a float32/float64 numpy array; None for
    operand types left to the interpreter (integers, fp8)."""
    ty = handle.dtype.scalar if hasattr(handle.dtype, "scalar") else handle.dtype
    data = handle.data
    if ty == tl.bfloat16:
        return _bf16_bits_to_f32(data)
    if ty == tl.float64:
        return data
    if ty == tl.float16:
        return bf16_round(data.astype(np.float32)) if mode == "bf16" else data.astype(np.float32)
    if ty == tl.float32:
        if mode == "bf16":
            return bf16_round(data)
        if mode == "tf32" or precision == _PRECISION.TF32:
            return tf32_truncate(data)
        return data  # tf32x3, bf16x3/x6, ieee: fp32-accurate
    return None


def _operand_dtype(handle):
    """The operand's Triton dtype as the kernel wrote it (before emulate_dot_precision's rewrite)."""
    return handle.attr.get("dot_operand_dtype", handle.dtype.scalar)


def _make_emulated_dot(original, mode):
    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        x = _dot_operand(a, input_precision, mode)
        y = _dot_operand(b, input_precision, mode)
        if x is not None and y is not None:
            # Hand the rounded values on as plain fp32/fp64 operands (the interpreter multiplies
            # those exactly), so whatever else patches create_dot, e.g. count_traffic, still sees it.
            ty = tl.float64 if x.dtype == np.float64 else tl.float32
            a, b = (_interp.TensorHandle(v, ty, {"dot_operand_dtype": _operand_dtype(h)}) for v, h in ((x, a), (y, b)))
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    return create_dot


def _make_rounding_trunc(original):
    def create_fp_trunc(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in (tl.float32, tl.float64):
            rounded = bf16_round(src.data.astype(np.float32))
            return _interp.TensorHandle((rounded.view(np.uint32) >> np.uint32(16)).astype(np.uint16),
                                        tl.bfloat16)
        return original(self, src, dst_type)

    return create_fp_trunc


@contextlib.contextmanager
def emulate_dot_precision(mode: str = "gpu"):
    """Within the block, interpreted ``tl.dot`` rounds its operands as ``mode`` says (see the
    module docstring): "gpu" (what sm_80/sm_90 do: TF32 truncation for input_precision="tf32",
    exact otherwise; fp32 -> bf16 casts rounded to nearest even), "tf32" or "bf16" (forced)."""
    if mode not in DOT_MODES:
        raise ValueError(f"emulate_dot_precision: mode must be one of {DOT_MODES}; got {mode!r}")
    _require_interpreter("emulate_dot_precision")
    patches = _Patches()
    patches.set(_Builder, "create_dot", _make_emulated_dot(_Builder.create_dot, mode))
    if mode == "gpu":
        patches.set(_Builder, "create_fp_trunc", _make_rounding_trunc(_Builder.create_fp_trunc))
    try:
        yield
    finally:
        patches.restore()


# ---------------------------------------------------------------------------------------------
# count_traffic


@dataclasses.dataclass
class KernelTraffic:
    """Counts for one kernel name, summed over its launches (maxima where named so)."""

    launches: int = 0
    programs: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    dot_flops: int = 0
    dot_flops_by_kind: dict = dataclasses.field(default_factory=dict)  # see DOT_KINDS
    loads: int = 0  # load instructions executed, all programs
    stores: int = 0
    steps: int = 0  # sum over launches of the max loop iterations of one program
    # Bytes at distinct addresses, per launch, summed over launches: what reaches HBM if L2 keeps
    # every byte a launch touched (re-reads by other programs of the same launch, e.g. the dv
    # blocks of one head reading its K, are then cache hits). A lower bound on DRAM traffic, as
    # bytes_read / bytes_written (every load and store, before caches) is an upper bound.
    unique_bytes_read: int = 0
    unique_bytes_written: int = 0
    max_steps_per_program: int = 0
    max_dots_per_program: int = 0
    max_loads_per_program: int = 0

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def unique_bytes(self) -> int:
        return self.unique_bytes_read + self.unique_bytes_written

    def add(self, other: "KernelTraffic") -> None:
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, dict):
                for kind, n in b.items():
                    a[kind] = a.get(kind, 0) + n
            else:
                setattr(self, f.name, max(a, b) if f.name.startswith("max_") else a + b)


@dataclasses.dataclass
class _Program:
    """Counts of the program now running."""

    steps: int = 0
    dots: int = 0
    loads: int = 0


def _distinct_bytes(touched) -> int:
    """Bytes at distinct addresses among [(addresses, bytes per element)] (an address accessed
    with two element sizes counts the larger)."""
    if not touched:
        return 0
    addresses = np.concatenate([a.astype(np.uint64, copy=False) for a, _ in touched])
    sizes = np.concatenate([np.full(a.size, e, dtype=np.int64) for a, e in touched])
    order = np.lexsort((-sizes, addresses))
    addresses, sizes = addresses[order], sizes[order]
    first = np.ones(addresses.size, dtype=bool)
    first[1:] = addresses[1:] != addresses[:-1]
    return int(sizes[first].sum())


class TrafficCounter:
    """What count_traffic() measured: ``kernels`` maps kernel name -> KernelTraffic, in order of
    first launch."""

    def __init__(self):
        self.kernels: dict[str, KernelTraffic] = {}
        self._kernel: KernelTraffic | None = None
        self._launch_max_steps = 0
        self._program: _Program | None = None
        self._touched = {True: [], False: []}  # read? -> [(addresses, bytes per element)] this launch

    def total(self) -> KernelTraffic:
        out = KernelTraffic()
        for k in self.kernels.values():
            out.add(k)
        return out

    def as_dict(self) -> dict[str, dict]:
        return {name: dataclasses.asdict(k) | {"bytes": k.bytes} for name, k in self.kernels.items()}

    def table(self) -> str:
        """A markdown table, one row per kernel and a total."""
        head = ("| kernel | launches | programs | bytes read | bytes written | dot FLOPs | steps |\n"
                "|---|---:|---:|---:|---:|---:|---:|")
        rows = [f"| {n} | {k.launches} | {k.programs} | {k.bytes_read:,} | {k.bytes_written:,} | "
                f"{k.dot_flops:,} | {k.steps} |" for n, k in [*self.kernels.items(), ("total", self.total())]]
        return "\n".join([head, *rows])

    # -- events from the patched interpreter ------------------------------------------------

    def _start_launch(self, name: str) -> None:
        self._kernel = self.kernels.setdefault(name, KernelTraffic())
        self._kernel.launches += 1
        self._launch_max_steps = 0
        self._program = None
        self._touched = {True: [], False: []}

    def _start_program(self) -> None:
        self._end_program()
        self._program = _Program()
        self._kernel.programs += 1

    def _end_program(self) -> None:
        p, k = self._program, self._kernel
        if p is None or k is None:
            return
        self._launch_max_steps = max(self._launch_max_steps, p.steps)
        k.max_steps_per_program = max(k.max_steps_per_program, p.steps)
        k.max_dots_per_program = max(k.max_dots_per_program, p.dots)
        k.max_loads_per_program = max(k.max_loads_per_program, p.loads)
        self._program = None

    def _end_launch(self) -> None:
        self._end_program()
        if self._kernel is not None:
            self._kernel.steps += self._launch_max_steps
            self._kernel.unique_bytes_read += _distinct_bytes(self._touched[True])
            self._kernel.unique_bytes_written += _distinct_bytes(self._touched[False])
        self._touched = {True: [], False: []}
        self._kernel = None

    def _memory(self, ptrs, mask, read: bool, write: bool) -> None:
        k = self._kernel
        if k is None:  # a load outside a launch cannot happen; be safe rather than crash
            return
        m = mask.data if mask is not None else None
        addresses = np.asarray(ptrs.data)
        if m is not None:
            addresses = addresses[np.broadcast_to(m, addresses.shape)]
        n = int(addresses.size)
        elem = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        nbytes = n * elem
        if read:
            self._touched[True].append((addresses.ravel().copy(), elem))
        if write:
            self._touched[False].append((addresses.ravel().copy(), elem))
        if read:
            k.bytes_read += nbytes
            k.loads += 1
            if self._program is not None:
                self._program.loads += 1
        if write:
            k.bytes_written += nbytes
            k.stores += 1

    def _dot(self, a, b, input_precision) -> None:
        k = self._kernel
        if k is None:
            return
        *batch, M, K = np.shape(a.data)
        N = np.shape(b.data)[-1]
        flops = 2 * M * N * K * int(np.prod(batch, dtype=np.int64))
        kind = _dot_kind(_operand_dtype(a), input_precision)
        k.dot_flops += flops
        k.dot_flops_by_kind[kind] = k.dot_flops_by_kind.get(kind, 0) + flops
        if self._program is not None:
            self._program.dots += 1

    @property
    def in_launch(self) -> bool:
        """True from a launch's start to its end (argument handling included)."""
        return self._kernel is not None

    @property
    def in_program(self) -> bool:
        """True while an interpreted program (kernel code) is running."""
        return self._program is not None

    def _loop_step(self) -> None:
        if self._program is not None:
            self._program.steps += 1


_active: TrafficCounter | None = None

# What executes a dot, by operand dtype and input_precision: the keys of dot_flops_by_kind.
DOT_KINDS = ("bf16", "fp16", "tf32", "tf32x3", "bf16x3", "bf16x6", "fp32", "fp64", "fp8", "int8")
_FP32_KINDS = {_PRECISION.TF32: "tf32", _PRECISION.TF32x3: "tf32x3", _PRECISION.BF16x3: "bf16x3",
               _PRECISION.BF16x6: "bf16x6", _PRECISION.IEEE: "fp32"}


def _dot_kind(dtype, input_precision) -> str:
    if dtype == tl.float32:
        return _FP32_KINDS.get(input_precision, "fp32")
    if dtype.is_fp8():
        return "fp8"
    return {tl.bfloat16: "bf16", tl.float16: "fp16", tl.float64: "fp64"}.get(dtype, "int8")


def _counted(counter: TrafficCounter, r):
    for i in r:
        counter._loop_step()
        yield i


def _make_counting_range(counter: TrafficCounter, base):
    """`range` for a kernel module: while a program runs, only kernel code calls it (host code
    does not run during a launch), so its loops are counted; otherwise it is `base`."""

    def range(*args):  # noqa: A001 (shadows the builtin on purpose, in kernel modules only)
        r = base(*args)
        return _counted(counter, r) if counter.in_program else r

    range.counts_loops_of = counter
    return range


def _make_counting_patch_lang_core(counter: TrafficCounter, original):
    """interpreter._patch_lang_core, then tl.range / tl.static_range counted too."""

    def patch_lang_core(lang, scope):
        original(lang, scope)
        new_range = lang.range  # the interpreter's: a Python range

        def counted_range(*args, **kwargs):
            r = new_range(*args, **kwargs)
            return _counted(counter, r) if counter.in_program else r

        scope.set_attr(lang, "range", counted_range)
        scope.set_attr(lang, "static_range", counted_range)

    return patch_lang_core


@contextlib.contextmanager
def count_traffic():
    """Count global-memory bytes, dot FLOPs, programs and sequential steps per kernel of every
    interpreted launch in the block (see the module docstring). Yields a TrafficCounter."""
    global _active
    _require_interpreter("count_traffic")
    if _active is not None:
        raise RuntimeError("count_traffic is already active; nest one counter, not two")
    counter = TrafficCounter()
    patches = _Patches()

    def shadow_range(fn_globals):
        # Kernel code looks `range` up in its module's globals before the builtins: shadow it
        # there (never in builtins), wrapping whatever range the module already sees.
        current = fn_globals.get("range", builtins.range)
        if getattr(current, "counts_loops_of", None) is not counter:
            patches.set_item(fn_globals, "range", _make_counting_range(counter, current))

    grid_call = _interp.GridExecutor.__call__

    def grid_executor_call(self, *args, **kwargs):
        shadow_range(self.fn.__globals__)
        counter._start_launch(self.fn.__name__)
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            counter._end_launch()

    device_call = _interp.InterpretedFunction.__call__

    def device_function_call(self, *args, **kwargs):
        shadow_range(self.fn.__globals__)
        return device_call(self, *args, **kwargs)

    set_grid_idx = _Builder.set_grid_idx

    def start_program(self, x, y, z):
        set_grid_idx(self, x, y, z)
        counter._start_program()

    masked_load, masked_store = _Builder.create_masked_load, _Builder.create_masked_store
    atomic_rmw, atomic_cas = _Builder.create_atomic_rmw, _Builder.create_atomic_cas
    dot, dot_scaled = _Builder.create_dot, _Builder.create_dot_scaled

    # create_load / create_store, the descriptor loads/stores (and gathers/scatters) and the
    # atomic load/store all end in create_masked_load / create_masked_store: counted there once.
    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        counter._memory(ptrs, mask, read=True, write=False)
        return masked_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_policy):
        counter._memory(ptrs, mask, read=False, write=True)
        return masked_store(self, ptrs, value, mask, cache_policy)

    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        counter._memory(ptr, mask, read=True, write=True)
        return atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope)

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        counter._memory(ptr, None, read=True, write=True)
        return atomic_cas(self, ptr, cmp, val, sem, scope)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        counter._dot(a, b, input_precision)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def create_dot_scaled(self, lhs, lhs_scale, lhs_format, rhs, rhs_scale, rhs_format, *rest):
        counter._dot(lhs, rhs, None)
        return dot_scaled(self, lhs, lhs_scale, lhs_format, rhs, rhs_scale, rhs_format, *rest)

    patches.set(_interp.GridExecutor, "__call__", grid_executor_call)
    patches.set(_interp, "_patch_lang_core", _make_counting_patch_lang_core(counter, _interp._patch_lang_core))
    patches.set(_interp.InterpretedFunction, "__call__", device_function_call)
    patches.set(_Builder, "set_grid_idx", start_program)
    patches.set(_Builder, "create_masked_load", create_masked_load)
    patches.set(_Builder, "create_masked_store", create_masked_store)
    patches.set(_Builder, "create_atomic_rmw", create_atomic_rmw)
    patches.set(_Builder, "create_atomic_cas", create_atomic_cas)
    patches.set(_Builder, "create_dot", create_dot)
    patches.set(_Builder, "create_dot_scaled", create_dot_scaled)
    _active = counter
    try:
        yield counter
    finally:
        _active = None
        patches.restore()
