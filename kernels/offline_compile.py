"""Compile the Triton kernels for an NVIDIA GPU on a machine that has none, and report what each
launch would need: shared memory, registers, spills, programs.

Inside ``compile_only(arch)`` every ``kernel[grid](...)`` launch compiles the kernel for that
target with Triton's own compiler and its bundled ptxas (exactly what a GPU run would JIT) and
records the launch instead of running it; nothing is executed, so the dispatch code around the
kernels (kernels/deltaproduct.py, kernels/pararnn.py, ...) runs unchanged on CPU tensors whose
values do not matter. That is how the offline GPU check (tests/test_gpu_compile.py,
``python -m bench.gpu_compile``) sees every kernel at the shapes the shipped configs launch.

Resource usage comes from the cubin (``cuobjdump --dump-resource-usage``): REG registers per
thread, LOCAL bytes of local memory per thread (register spills; none of our kernels use local
arrays). Shared memory is the dynamic amount Triton asks for at launch plus the static amount in
the cubin, against the per-block opt-in limit of the target (what CUDA allows a launch to ask).

The process must not run under TRITON_INTERPRET=1 (kernels would be interpreted instead of
compiled); run this in its own process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
import threading

import torch

__all__ = ["TARGETS", "KernelLaunch", "compile_only", "compile_only_active"]


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    arch: int  # compute capability x 10
    max_shared: int  # per-block opt-in shared memory limit, bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    registers_per_sm: int
    sms: int  # the smallest common part with this architecture (A100: 108, H100/H200 SXM: 132)


TARGETS = {
    "sm_80": Target("sm_80", 80, 166_912, 65_536, 108),
    "sm_90": Target("sm_90", 90, 232_448, 65_536, 132),
}


@dataclasses.dataclass
class KernelLaunch:
    """One launch as it would happen on the target."""

    kernel: str
    target: str
    programs: int
    num_warps: int
    num_stages: int
    shared: int  # bytes per block, dynamic + static
    registers: int  # per thread
    spill_bytes: int  # local memory per thread
    constexprs: dict

    def problems(self, target: Target, spill_budget: int = 0) -> list[str]:
        """Why this launch would fail, or run with spills above the budget, on the target."""
        out = []
        if self.shared > target.max_shared:
            out.append(f"shared memory {self.shared:,} B > {target.max_shared:,} B per block on {target.name}")
        threads = 32 * self.num_warps
        if self.registers * threads > target.registers_per_sm:
            out.append(f"{self.registers} registers x {threads} threads > {target.registers_per_sm} per SM")
        if self.spill_bytes > spill_budget:
            out.append(f"{self.spill_bytes} B/thread of register spills > budget {spill_budget}")
        return out


_state = threading.local()


def compile_only_active() -> bool:
    """True inside compile_only(): Triton launches compile for a GPU target and run nothing, so
    the kernels' dispatch may send CPU tensors to them (kernels/scan.py's backend rule asks)."""
    return getattr(_state, "target", None) is not None


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers per thread, static shared bytes, local (spill) bytes per thread) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = _RESOURCE.search(out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return reg, shared, max(stack, local)


def _make_driver(target: Target):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnlyDriver(DriverBase):
        """A driver with no device: names the target so the JIT compiles for it."""

        @classmethod
        def is_active(cls):
            return False

        def get_current_target(self):
            return GPUTarget("cuda", target.arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return target.arch  # one JIT cache per target

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            raise RuntimeError("compile_only: nothing runs, nothing to benchmark")

        def map_python_to_cpp_type(self, ty):
            raise RuntimeError("compile_only: no launcher is built")

    return CompileOnlyDriver()


def _constexprs(kernel) -> dict:
    names = kernel.src.fn.arg_names if hasattr(kernel.src, "fn") else []
    out = {}
    for key, value in getattr(kernel.src, "constants", {}).items():
        idx = key[0] if isinstance(key, tuple) else key
        name = names[idx] if isinstance(idx, int) and idx < len(names) else str(idx)
        out[name] = value
    return out


@contextlib.contextmanager
def compile_only(target: str | Target):
    """Within the block, Triton launches compile for ``target`` ("sm_80" / "sm_90") and are
    recorded, not run. Yields the list of KernelLaunch records, appended in launch order."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_only needs a process without TRITON_INTERPRET=1")
    from triton.runtime import driver as rt_driver
    from triton.runtime.jit import JITFunction

    target = TARGETS[target] if isinstance(target, str) else target
    launches: list[KernelLaunch] = []
    resources: dict[int, tuple[int, int, int]] = {}
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        if warmup:
            return kernel
        if callable(grid):
            grid = grid(dict(zip(self.arg_names, args)))
        programs = 1
        for g in grid:
            programs *= int(g)
        key = id(kernel)
        if key not in resources:
            resources[key] = _resource_usage(kernel.asm["cubin"])
        reg, static_shared, spill = resources[key]
        md = kernel.metadata
        launches.append(KernelLaunch(
            kernel=self.fn.__name__, target=target.name, programs=programs, num_warps=md.num_warps,
            num_stages=md.num_stages, shared=int(md.shared) + static_shared, registers=reg,
            spill_bytes=spill, constexprs=_constexprs(kernel)))
        return kernel

    rt_driver.set_active(_make_driver(target))
    JITFunction.run = run
    _state.target = target
    try:
        yield launches
    finally:
        _state.target = None
        JITFunction.run = original_run
        rt_driver.reset_active() if _has_default_driver() else setattr(rt_driver, "_active", None)


def _has_default_driver() -> bool:
    try:
        from triton.runtime import driver as rt_driver

        rt_driver.default  # noqa: B018  (raises on a machine with no GPU backend active)
        return True
    except RuntimeError:
        return False
