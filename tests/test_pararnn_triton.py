"""kernels/pararnn_triton.py (fused Newton forward and backward) under TRITON_INTERPRET=1, against
the torch reference solver of kernels/pararnn.py run on the same inputs.

BLOCK_T=16 with T in {1, 7, 37}, D=12 with BLOCK_D=8 (a partial channel block). fp32; every
output and gradient is compared with max error <= 1e-5 relative to the reference's largest
magnitude (both sides are fp32 solvers, so their difference is rounding only).
"""

import pytest
import torch

import kernels.pararnn_triton
from kernels.pararnn import ParaGRUCell, paragru, paragru_sequential, paralstm, paralstm_sequential
from kernels.scan import linear_scan_sequential

B, D = 2, 12
RTOL = 1e-5


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(kernels.pararnn_triton, "DEFAULT_BLOCK_T", 16)
    monkeypatch.setattr(kernels.pararnn_triton, "DEFAULT_BLOCK_D", 8)


def make_problem(T, dtype=torch.float32, seed=0, a_max=1.0):
    """u ~ N(0,1), a, p ~ U(-a_max, a_max); resets at t=0 of row 1 and t=5 of row 0 (if T > 5)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, 3, D, dtype=torch.float64, generator=g)
    a = torch.empty(3, D, dtype=torch.float64).uniform_(-a_max, a_max, generator=g)
    p = torch.empty(2, D, dtype=torch.float64).uniform_(-a_max, a_max, generator=g)
    h0 = torch.randn(B, D, dtype=torch.float64, generator=g)
    state0 = torch.randn(B, D, 2, dtype=torch.float64, generator=g)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[1, 0] = True
    if T > 5:
        reset[0, 5] = True
    return [x.to(dtype) for x in (u, a, p, h0, state0)] + [reset]


def solve(cell, backend, u, a, p, init, reset, **kw):
    """Forward and backward of a fixed random loss; returns [h, final, residual, grads...]."""
    g = torch.Generator().manual_seed(99)
    # bf16-representable weights: a bf16 h passes dL/dh back through its cast unchanged.
    w_h = torch.randn(u.shape[0], u.shape[1], u.shape[3], generator=g).bfloat16().float()
    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in (u, a, p, init)]
    if cell == "gru":
        h, final, residual = paragru(leaves[0], leaves[1], leaves[3], reset, backend=backend, **kw)
    else:
        h, final, residual = paralstm(*leaves, reset, backend=backend, **kw)
    w_f = torch.randn(final.shape, generator=g)
    ((h.float() * w_h).sum() + (final * w_f).sum()).backward()
    grads = [x.grad if x is not None else None for x in leaves]
    if cell == "gru":
        grads[2] = None  # p is not an input of the GRU
    return [h, final, residual] + grads


def assert_same(out, ref, rtol=RTOL):
    names = ("h", "final state", "residual", "grad u", "grad a", "grad p", "grad init")
    for name, x, y in zip(names, out, ref):
        if y is None:
            assert x is None, name
            continue
        assert x.shape == y.shape and x.dtype == y.dtype, name
        # A converged residual is rounding noise on h: measure it on h's scale.
        scale = (ref[0] if name == "residual" else y).abs().max().clamp_min(1e-3)
        err = (x.double() - y.double()).abs().max() / scale
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("T", [1, 7, 37])
def test_fused_matches_reference_with_init_and_resets(cell, T):
    u, a, p, h0, state0, reset = make_problem(T, seed=T)
    init = h0 if cell == "gru" else state0
    args = (u, a, p, init, reset)
    assert_same(solve(cell, "triton", *args, num_iters=4), solve(cell, "torch", *args, num_iters=4))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_fused_matches_reference_without_init_or_resets(cell):
    u, a, p, _, _, _ = make_problem(37, seed=1)
    args = (u, a, p, None, None)
    assert_same(solve(cell, "triton", *args), solve(cell, "torch", *args))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_unconverged_residual_and_damping_match_reference(cell):
    # One damped iteration from a rough start: far from the solution, so the residual is large
    # (checked) and the clamp is active; the fused kernel must report the same residual.
    u, a, p, h0, state0, reset = make_problem(37, seed=2, a_max=1.5)
    args = (u, a, p, h0 if cell == "gru" else state0, reset)
    ref = solve(cell, "torch", *args, num_iters=1, damping=0.05)
    assert ref[2] > 1e-2
    assert_same(solve(cell, "triton", *args, num_iters=1, damping=0.05), ref)


def test_tol_stops_early_and_warns_when_unreachable():
    u, a, _, h0, _, reset = make_problem(37, seed=3)
    h, _, residual = paragru(u, a, h0, reset, tol=1e-6, max_iters=30, backend="triton")
    assert residual <= 1e-6
    h_ref, _ = paragru_sequential(u.double(), a.double(), h0.double(), reset)
    assert (h.double() - h_ref).abs().max() <= 1e-5
    with pytest.warns(RuntimeWarning, match="residual"):
        _, _, residual = paragru(u, a, h0, reset, num_iters=1, tol=1e-6, max_iters=1, backend="triton")
    assert residual > 1e-6


def test_reported_residual_is_the_true_residual():
    u, a, _, h0, _, reset = make_problem(37, seed=4, a_max=1.5)
    h, _, residual = paragru(u, a, h0, reset, num_iters=1, backend="triton")
    h_prev = torch.cat((h0[:, None], h[:, :-1]), dim=1) * (~reset)[..., None]
    expected = (h - ParaGRUCell.step(h_prev, u, (a,))).abs().max()
    assert expected > 1e-3
    torch.testing.assert_close(residual, expected, rtol=1e-5, atol=1e-7)


def test_nan_residual_is_reported_as_inf():
    u, a, p, _, state0, reset = make_problem(7, seed=5)
    u[0, 3, 1, 2] = float("nan")
    _, _, residual = paralstm(u, a, p, state0, reset, backend="triton")
    assert residual == float("inf")


def test_fp64_solves_to_the_sequential_loop():
    u, a, p, _, state0, reset = make_problem(37, dtype=torch.float64, seed=6)
    h, final, residual = paralstm(u, a, p, state0, reset, tol=1e-13, max_iters=40, backend="triton")
    assert h.dtype == final.dtype == torch.float64 and residual <= 1e-13
    h_ref, final_ref = paralstm_sequential(u, a, p, state0, reset)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=1e-10)


def test_bf16_input_is_fp32_math_on_the_bf16_values():
    u, a, p, _, state0, reset = make_problem(37, seed=7)
    u16 = u.bfloat16()
    out16 = solve("lstm", "triton", u16, a, p, state0, reset)
    out32 = solve("lstm", "triton", u16.float(), a, p, state0, reset)
    assert out16[0].dtype == torch.bfloat16 and out16[1].dtype == torch.float32
    torch.testing.assert_close(out16[0], out32[0].bfloat16(), rtol=0, atol=0)
    for i in (1, 2, 4, 5, 6):  # final state, residual, grads of a, p, state0: fp32, identical
        torch.testing.assert_close(out16[i], out32[i], rtol=0, atol=0)
    # grad u is stored in u's dtype by the kernel. The interpreter's fp32 -> bf16 store truncates
    # (the GPU rounds to nearest), so allow one bf16 ulp: |error| < 2^-7 |value|.
    assert out16[3].dtype == torch.bfloat16
    err = (out16[3].float() - out32[3]).abs()
    assert (err <= out32[3].abs() * 2.0 ** -7).all(), f"grad u off by {err.max():.2e}"


def test_dispatch(monkeypatch):
    u, a, _, h0, _, reset = make_problem(7, seed=8)
    with pytest.raises(ValueError, match="custom linear_solve"):
        paragru(u, a, h0, reset, linear_solve=linear_scan_sequential, backend="triton")
    # CPU tensors and no backend: the torch reference, never the fused kernels.
    monkeypatch.setattr(kernels.pararnn_triton, "FusedNewtonSolve", None)
    h, _, _ = paragru(u, a, h0, reset, num_iters=7)
    h_ref, _ = paragru_sequential(u.double(), a.double(), h0.double(), reset)
    assert (h.double() - h_ref).abs().max() <= 1e-5
