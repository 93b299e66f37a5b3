"""flash-linear-attention's chunk_gated_delta_product under Triton's CPU interpreter, set up as on
an H200: for bench/kernel_traffic.py only (the package never imports fla; it is not a dependency).

fla chooses block sizes and kernel variants from the device when its modules are imported
(``check_shared_mem()``, ``IS_NVIDIA_HOPPER``, ``IS_TF32_SUPPORTED``, ...), and its kernels are
wrapped in ``triton.autotune``. With no GPU, three things are patched here, none of which
changes what a kernel computes:

  * ``pretend_h200()``: while fla is imported and run, Triton's active driver is a stub that
    names target ``cuda`` sm_90 and reports an H200's properties (232,448 B shared memory per
    block opt-in, 132 SMs), and ``torch.cuda.get_device_name / get_device_capability /
    device_count / get_device_properties`` answer as for one H200. fla then takes its Hopper
    branches (e.g. 64/128 tiles in chunk_fwd_kernel_o, CONST_TILING=128 in chunk_bwd_dqkwg).
    FLA_USE_TMA stays unset, as fla's default (so no tensor descriptors).
  * ``pinned_autotune()``: instead of timing every config (which under the interpreter would run
    each kernel several times per config), ``Autotuner.prune_configs`` keeps one: the config with
    the largest product of its integer block sizes (BK·BV·BS·...; num_warps / num_stages do not
    change what a program loads). Larger tiles mean fewer re-reads of shared operands, so this
    is the least traffic fla's config space allows: the comparison is conservative for us.
  * ``tensor_loop_variables()``: on a GPU the induction variable of ``for i in range(n)`` in a
    kernel is an int32 tensor, and fla relies on it (``i_t.to(tl.int64)`` in
    chunk_gated_delta_product_fwd_kernel_h_blockdim64); Triton 3.9's interpreter hands out
    Python ints, which have no ``.to``. While a launch runs, ``range`` in fla's modules yields
    int32 interpreter tensors instead (host code, which never runs during a launch, keeps the
    builtin).
  * nothing else: fla's host code and kernels run unchanged.

The interpreter stores bf16 as raw bits and does bf16 arithmetic on those bits (see
kernels/triton_interpreter.py), so fla — whose kernels compute in the input dtype — is run
with fp16 inputs: the same 2 bytes per element as bf16, and values the interpreter computes
correctly, so its output can be checked against our reference.
"""

from __future__ import annotations

import builtins
import contextlib
import sys
import types

import numpy as np
import torch

H200 = dict(name="NVIDIA H200", capability=(9, 0), max_shared_mem=232_448, multiprocessor_count=132)


def _stub_driver():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    props = dict(max_shared_mem=H200["max_shared_mem"], multiprocessor_count=H200["multiprocessor_count"],
                 max_num_regs=65_536, warpSize=32, sm_clock_rate=1_980_000, mem_clock_rate=2_619_000,
                 mem_bus_width=6_144)

    class H200Properties(DriverBase):
        """A driver with no device: names sm_90 and answers property queries like an H200."""

        utils = types.SimpleNamespace(get_device_properties=lambda device=0: dict(props))

        @classmethod
        def is_active(cls):
            return False

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            return triton.testing.do_bench

        def map_python_to_cpp_type(self, ty):
            raise RuntimeError("pretend_h200: nothing is compiled")

    return H200Properties()


@contextlib.contextmanager
def pretend_h200():
    """Within the block, Triton's driver and torch.cuda's property queries describe one H200."""
    from triton.runtime import driver

    cuda = torch.cuda
    props = types.SimpleNamespace(name=H200["name"], major=9, minor=0, total_memory=141 * 2**30,
                                  multi_processor_count=H200["multiprocessor_count"],
                                  shared_memory_per_block=49_152,
                                  shared_memory_per_block_optin=H200["max_shared_mem"])
    replaced = dict(get_device_name=lambda device=None: H200["name"],
                    get_device_capability=lambda device=None: H200["capability"],
                    device_count=lambda: 1, current_device=lambda: 0,
                    get_device_properties=lambda device=None: props)
    saved = {name: getattr(cuda, name) for name in replaced}
    saved_driver = driver._active
    driver.set_active(_stub_driver())
    for name, fn in replaced.items():
        setattr(cuda, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(cuda, name, fn)
        driver._active = saved_driver


def _block_volume(config) -> int:
    volume = 1
    for value in config.kwargs.values():
        if isinstance(value, int) and not isinstance(value, bool):
            volume *= value
    return volume


@contextlib.contextmanager
def pinned_autotune():
    """Within the block, every triton.autotune picks its largest-block config without timing."""
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.prune_configs

    def prune_configs(self, kwargs):
        configs = original(self, kwargs)
        return [max(configs, key=_block_volume)]  # max keeps the first of equals

    Autotuner.prune_configs = prune_configs
    try:
        yield
    finally:
        Autotuner.prune_configs = original


@contextlib.contextmanager
def tensor_loop_variables(prefix: str = "fla."):
    """Within the block, kernel loops over `range` in modules named prefix* count in int32
    tensors, as compiled Triton code does."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    launches = [0]
    grid_call = interp.GridExecutor.__call__

    def call(self, *args, **kwargs):
        launches[0] += 1
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launches[0] -= 1

    def as_tensor(i):
        return tl.core.tensor(interp.TensorHandle(np.array([i], dtype=np.int32), tl.int32), tl.int32)

    def kernel_range(*args):
        r = builtins.range(*args)
        return (as_tensor(i) for i in r) if launches[0] else r

    modules = [m for name, m in list(sys.modules.items()) if name.startswith(prefix) and m is not None
               and "range" not in vars(m)]
    interp.GridExecutor.__call__ = call
    for m in modules:
        m.range = kernel_range
    try:
        yield
    finally:
        for m in modules:
            vars(m).pop("range", None)
        interp.GridExecutor.__call__ = grid_call


def load_chunk_gated_delta_product():
    """fla's chunk_gated_delta_product imported as on an H200, or None with the reason."""
    try:
        with pretend_h200():
            from fla.ops.gated_delta_product import chunk_gated_delta_product
    except ImportError as e:
        return None, f"flash-linear-attention is not installed ({e.name}): pip install --no-deps flash-linear-attention fla-core"
    import fla.utils

    if not fla.utils.IS_NVIDIA_HOPPER:
        return None, "fla was imported before pretend_h200(): its Hopper settings are off"
    return chunk_gated_delta_product, None


@contextlib.contextmanager
def fla_environment():
    """All three patches at once: what a run of fla's kernels (forward or backward) needs."""
    with pretend_h200(), pinned_autotune(), tensor_loop_variables():
        yield


def call_fla(fn, q, k, v, beta, g):
    """fla's op on our shapes: k, v [B,T,n_h,H,d] and beta [B,T,n_h,H] become its interleaved
    [B,T·n_h,H,...]; no final state, as in training. Call inside fla_environment()."""
    B, T, n_h, H, dk = k.shape
    o, _ = fn(q=q, k=k.reshape(B, T * n_h, H, dk), v=v.reshape(B, T * n_h, H, -1), g=g,
              beta=beta.reshape(B, T * n_h, H), num_householder=n_h, output_final_state=False)
    return o
