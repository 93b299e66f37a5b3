"""kernels/triton_interpreter.py under TRITON_INTERPRET=1 (set in conftest), on small hand-written
kernels whose byte counts, FLOPs, loop counts and rounded results are known exactly."""

import builtins

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter as interp

from kernels.triton_interpreter import bf16_round, count_traffic, emulate_dot_precision, tf32_truncate


@triton.jit
def copy_kernel(x_ptr, y_ptr, n_ptr, BLOCK: tl.constexpr):
    n = tl.load(n_ptr)  # an unmasked scalar load: one int32
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=m, other=0.0), mask=m)


@triton.jit
def chunked_dot_kernel(a_ptr, b_ptr, c_ptr, NC, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                       PREC: tl.constexpr):
    """c[pid] = sum over NC chunks of a[pid, c] @ b[pid, c], then three tl.range and two
    tl.static_range iterations that only add: NC + 5 loop iterations per program."""
    pid = tl.program_id(0)
    rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    acc = tl.zeros([M, N], dtype=tl.float32)
    for c in range(NC):
        a = tl.load(a_ptr + ((pid * NC + c) * M + rm[:, None]) * K + rk[None, :])
        b = tl.load(b_ptr + ((pid * NC + c) * K + rk[:, None]) * N + rn[None, :])
        acc += tl.dot(a, b, input_precision=PREC)
    for _ in tl.range(0, 3):
        acc += 0.0
    for _ in tl.static_range(2):
        acc += 0.0
    tl.store(c_ptr + (pid * M + rm[:, None]) * N + rn[None, :], acc)


@triton.jit
def cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, tl.load(x_ptr + i).to(tl.bfloat16))


def chunked_dot(a, b, prec="tf32"):
    P, NC, M, K = a.shape
    N = b.shape[-1]
    c = torch.empty(P, M, N)
    chunked_dot_kernel[(P,)](a, b, c, NC, M=M, K=K, N=N, PREC=prec)
    return c


def test_masked_copy_counts_unmasked_bytes_per_element_size():
    n, block = 100, 32  # 4 programs, the last one 4 elements long
    with count_traffic() as counter:
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(n).to(dtype)
            y = torch.zeros(n, dtype=dtype)
            copy_kernel[(triton.cdiv(n, block),)](x, y, torch.tensor([n], dtype=torch.int32), BLOCK=block)
            assert torch.equal(x, y)
    k = counter.kernels["copy_kernel"]
    assert (k.launches, k.programs) == (2, 8)
    # reads: x (4 + 2 bytes per element) and the int32 n once per program; writes: y
    assert k.bytes_read == n * 4 + n * 2 + 8 * 4
    assert k.bytes_written == n * 4 + n * 2
    assert (k.loads, k.stores, k.max_loads_per_program) == (16, 8, 2)
    assert (k.dot_flops, k.steps) == (0, 0)
    # at distinct addresses, per launch: n is read by 4 programs but counts once per launch
    assert k.unique_bytes_read == n * 4 + n * 2 + 2 * 4
    assert k.unique_bytes_written == k.bytes_written


@triton.jit
def broadcast_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """Every program reads the same block of x (twice) and writes its own block of y."""
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i) + tl.load(x_ptr + i)
    tl.store(y_ptr + tl.program_id(0) * BLOCK + i, x)


def test_distinct_bytes_count_rereads_of_a_launch_once_and_each_launch_anew():
    P, block = 5, 16
    x, y = torch.randn(block), torch.zeros(P * block)
    with count_traffic() as counter:
        for _ in range(2):
            broadcast_kernel[(P,)](x, y, BLOCK=block)
    k = counter.kernels["broadcast_kernel"]
    assert k.bytes_read == 2 * P * 2 * block * 4 and k.unique_bytes_read == 2 * block * 4
    assert k.bytes_written == k.unique_bytes_written == 2 * P * block * 4
    assert k.unique_bytes == k.unique_bytes_read + k.unique_bytes_written


def test_dot_flops_loop_steps_and_per_kernel_names():
    P, NC, M, K, N = 3, 4, 16, 32, 64
    a, b = torch.randn(P, NC, M, K), torch.randn(P, NC, K, N)
    with count_traffic() as counter:
        chunked_dot(a, b, "ieee")
        copy_kernel[(1,)](torch.ones(8), torch.zeros(8), torch.tensor([8], dtype=torch.int32), BLOCK=8)
    assert list(counter.kernels) == ["chunked_dot_kernel", "copy_kernel"]
    k = counter.kernels["chunked_dot_kernel"]
    assert k.dot_flops == 2 * M * N * K * NC * P and k.dot_flops_by_kind == {"fp32": k.dot_flops}
    assert (k.max_dots_per_program, k.max_loads_per_program) == (NC, 2 * NC)
    assert k.max_steps_per_program == NC + 3 + 2 and k.steps == NC + 5  # one launch
    assert k.bytes_read == 4 * P * NC * (M * K + K * N) and k.bytes_written == 4 * P * M * N
    total = counter.total()
    assert total.bytes == k.bytes + counter.kernels["copy_kernel"].bytes
    assert total.launches == 2 and total.programs == P + 1
    assert "| total | 2 | 4 |" in counter.table()


def test_host_code_keeps_the_real_range():
    with count_traffic():
        chunked_dot(torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16))
        r = range(3)  # this module's globals hold the counting range now; host code is exempt
    assert isinstance(r, builtins.range) and "range" not in globals()


def _bits(shape, seed):
    """fp32 operands whose low 13 mantissa bits are random and include bit 12, so truncating and
    rounding to TF32 differ."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    bits = x.view(np.uint32) | np.uint32(1 << 12)
    return bits.view(np.float32)


def test_tf32_emulation_truncates_exactly():
    a, b = _bits((1, 1, 16, 32), 0), _bits((1, 1, 32, 16), 1)
    exact = a[0, 0] @ b[0, 0]
    truncated = tf32_truncate(a[0, 0]) @ tf32_truncate(b[0, 0])
    bits = lambda x: x.view(np.uint32).astype(np.uint64)  # noqa: E731
    rounded = ((bits(a[0, 0]) + 0x1000) & 0xFFFFE000).astype(np.uint32).view(np.float32) @ \
        ((bits(b[0, 0]) + 0x1000) & 0xFFFFE000).astype(np.uint32).view(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    with emulate_dot_precision("gpu"):
        tf32 = chunked_dot(ta, tb, "tf32")[0].numpy()
        ieee = chunked_dot(ta, tb, "ieee")[0].numpy()
        tf32x3 = chunked_dot(ta, tb, "tf32x3")[0].numpy()
    assert np.array_equal(tf32, truncated)
    assert np.abs(tf32 - exact).max() > 1e-4 and np.abs(tf32 - rounded).max() > 1e-6
    assert np.array_equal(ieee, exact) and np.array_equal(tf32x3, exact)
    with emulate_dot_precision("tf32"):  # forced: the ieee dot truncates too
        assert np.array_equal(chunked_dot(ta, tb, "ieee")[0].numpy(), truncated)


def test_bf16_mode_rounds_operands_to_nearest_even():
    a, b = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    a[0, 0, 0, 0] = 1.0 + 2.0**-8  # a tie: rounds to even (1.0)
    a[0, 0, 0, 1] = 1.0 + 3 * 2.0**-8  # a tie: rounds up to 1 + 2^-6
    ref = (a[0, 0].bfloat16().double() @ b[0, 0].bfloat16().double()).float()
    with emulate_dot_precision("bf16"):
        got = chunked_dot(a, b, "ieee")[0]
    assert torch.allclose(got, ref, rtol=0, atol=1e-5)
    assert (got - a[0, 0] @ b[0, 0]).abs().max() > 1e-3
    assert np.array_equal(bf16_round(a[0, 0, 0, :2].numpy()), np.array([1.0, 1.0 + 2.0**-6], np.float32))


def test_gpu_mode_bf16_operands_and_casts():
    a, b = torch.randn(1, 1, 16, 16).bfloat16(), torch.randn(1, 1, 16, 16).bfloat16()
    with count_traffic() as counter, emulate_dot_precision("gpu"):
        got = chunked_dot(a, b, "tf32")[0]
    assert torch.allclose(got, a[0, 0].float() @ b[0, 0].float(), rtol=0, atol=1e-5)
    assert counter.total().dot_flops_by_kind == {"bf16": 2 * 16**3}  # seen through the emulation
    x = torch.randn(64)
    x[:3] = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-8 + 2.0**-12])
    y = torch.empty(64, dtype=torch.bfloat16)
    with emulate_dot_precision("gpu"):
        cast_kernel[(1,)](x, y, N=64)
    assert torch.equal(y, x.bfloat16())  # torch rounds to nearest even, as cvt.rn.bf16.f32


def test_everything_is_restored_on_exit():
    before = {name: vars(interp.InterpreterBuilder).get(name) for name in
              ("create_dot", "create_masked_load", "create_masked_store", "create_fp_trunc", "set_grid_idx")}
    grid_call, patch_core = interp.GridExecutor.__call__, interp._patch_lang_core
    a, b = torch.from_numpy(_bits((1, 1, 16, 16), 2)), torch.from_numpy(_bits((1, 1, 16, 16), 3))
    with pytest.raises(ZeroDivisionError):
        with count_traffic() as counter, emulate_dot_precision("gpu"):
            chunked_dot(a, b)
            raise ZeroDivisionError  # an error inside the block restores too
    seen = counter.total().dot_flops
    after = {name: vars(interp.InterpreterBuilder).get(name) for name in before}
    assert after == before and interp.GridExecutor.__call__ is grid_call and interp._patch_lang_core is patch_core
    assert "range" not in globals()
    # The interpreter is its plain self again: exact dot, and nothing counted.
    assert np.array_equal(chunked_dot(a, b)[0].numpy(), a[0, 0].numpy() @ b[0, 0].numpy())
    assert counter.total().dot_flops == seen == 2 * 16**3


def test_bad_use_is_one_clear_error():
    with pytest.raises(ValueError, match="mode must be one of"):
        with emulate_dot_precision("fp8"):
            pass
    with count_traffic():
        with pytest.raises(RuntimeError, match="already active"):
            with count_traffic():
                pass
