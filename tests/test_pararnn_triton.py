"""kernels/pararnn_triton.py (per-chunk fused Newton forward, one-pass backward) under
TRITON_INTERPRET=1.

The kernels solve chunk after chunk, each chunk by Newton from the previous chunk's converged last
state, so their iterates differ from the reference's global Newton (kernels/pararnn.py); both
converge to the sequential recurrence. So:
  - converged runs are compared with the per-token loop (paragru_sequential / paralstm_sequential)
    and with the reference solver at its own convergence: values, final state and every gradient
    (u, a, p, initial state) against backprop through the loop;
  - unconverged runs (one damped iteration, tol early stop) are compared with `chunked_newton`
    below, the kernels' schedule written out in torch, and their residual with the true residual
    of the returned h recomputed by the cell's step function.
BLOCK_T=8, BLOCK_D=4 with D=10 (a partial channel block); T in {1, 8, 37}; resets at t=0, in the
middle of a chunk, on the last step of a chunk and on the first step of one (chunk boundaries).

Tolerances. fp64 with tol=1e-12: h and final state within 1e-10 of the loop, gradients within
1e-9 of the loop's relative to their largest magnitude (observed at T=37: h ~1e-13 GRU, ~6e-13
LSTM; gradients ~1e-14). fp32 with tol=1e-6: 1e-5 relative to the largest magnitude (observed
~4e-7 for h and final state, ~2e-7 for gradients). Same-schedule comparisons (chunked_newton):
1e-12 fp64, 1e-5 fp32 relative.
"""

import math

import pytest
import torch

import kernels.pararnn_triton
from kernels.pararnn import (
    ParaGRUCell,
    ParaLSTMCell,
    _shift,
    paragru,
    paragru_sequential,
    paralstm,
    paralstm_sequential,
)
from kernels.scan import linear_scan_sequential

B, D = 2, 10
BLOCK_T, BLOCK_D = 8, 4
LAUNCH_CONFIG = kernels.pararnn_triton.launch_config


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(kernels.pararnn_triton, "launch_config",
                        lambda lstm, B, T, D, block_t=None, block_d=None: (BLOCK_T, BLOCK_D, 1))


def make_problem(T, dtype=torch.float32, seed=0, a_max=1.0):
    """u ~ N(0,1), a, p ~ U(-a_max, a_max); resets at t=0 of row 1 and, in row 0, at t=5 (inside
    a chunk), t=7 (a chunk's last step) and t=16 (a chunk's first step) where T allows."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, 3, D, dtype=torch.float64, generator=g)
    a = torch.empty(3, D, dtype=torch.float64).uniform_(-a_max, a_max, generator=g)
    p = torch.empty(2, D, dtype=torch.float64).uniform_(-a_max, a_max, generator=g)
    h0 = torch.randn(B, D, dtype=torch.float64, generator=g)
    state0 = torch.randn(B, D, 2, dtype=torch.float64, generator=g)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[1, 0] = True
    for t in (5, 7, 16):
        if t < T:
            reset[0, t] = True
    return [x.to(dtype) for x in (u, a, p, h0, state0)] + [reset]


def cell_of(name):
    return ParaGRUCell if name == "gru" else ParaLSTMCell


def params_of(name, a, p):
    return (a,) if name == "gru" else (a, p)


def run(cell, backend, u, a, p, init, reset, **kw):
    if cell == "gru":
        return paragru(u, a, init, reset, backend=backend, **kw)
    return paralstm(u, a, p, init, reset, backend=backend, **kw)


def run_sequential(cell, u, a, p, init, reset):
    if cell == "gru":
        return paragru_sequential(u, a, init, reset)
    return paralstm_sequential(u, a, p, init, reset)


def with_grads(fn, u, a, p, init, cell, seed=99):
    """fn(u, a, p, init) -> (h, final, ...); the values and the gradients of a fixed random loss."""
    g = torch.Generator().manual_seed(seed)
    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in (u, a, p, init)]
    out = fn(*leaves)
    h, final = out[0], out[1]
    # bf16-representable weights: a bf16 h passes dL/dh back through its cast unchanged.
    w_h = torch.randn(h.shape, generator=g).bfloat16().to(h.dtype if h.dtype == torch.float64 else torch.float32)
    w_f = torch.randn(final.shape, generator=g).to(final.dtype)
    ((h.to(w_h.dtype) * w_h).sum() + (final * w_f).sum()).backward()
    grads = [x.grad if x is not None else None for x in leaves]
    if cell == "gru":
        grads[2] = None  # p is not an input of the GRU
    return list(out) + grads


def rel_err(x, y):
    return ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-3)).item()


def true_residual(cell, h_states, u, params, init, reset):
    """max_t |state_t - f(state_{t-1}, u_t)| of a returned trajectory, recomputed in torch."""
    h_prev = _shift(h_states, init, reset)
    return (h_states - cell_of(cell).step(h_prev, u, params)).abs().max()


def chunked_newton(cell, u, params, init, reset, num_iters=3, tol=None, max_iters=None, damping=None):
    """The fused forward's schedule in torch, one (batch row, channel block, chunk) at a time:
    h^0 = f(shift(h_in, 0, ...)), then Newton steps d = scan(J, -r) from d = 0 (damped if asked)
    until max|r| <= tol over the block (exactly num_iters without tol; at most max_iters).
    Returns (states [B,T,D(,2)], residual)."""
    C = cell_of(cell)
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u = u.to(dtype)
    params = [x.to(dtype) for x in params]
    budget = num_iters if tol is None else (max_iters or 2 * num_iters)
    Bn, T, _, Dn = u.shape
    states = u.new_zeros((Bn, T, Dn) + C.state_suffix)
    residual = 0.0
    for b in range(Bn):
        for d0 in range(0, Dn, BLOCK_D):
            cs = slice(d0, d0 + BLOCK_D)
            p = [x[:, cs] for x in params]
            h_in = (init[b:b + 1, cs].to(dtype) if init is not None
                    else u.new_zeros((1, min(BLOCK_D, Dn - d0)) + C.state_suffix))
            for t0 in range(0, T, BLOCK_T):
                uu = u[b:b + 1, t0:t0 + BLOCK_T, :, cs]
                rr = None if reset is None else reset[b:b + 1, t0:t0 + BLOCK_T]
                h = C.step(_shift(torch.zeros_like(uu[:, :, 0]) if cell == "gru" else
                                  uu.new_zeros(uu[:, :, 0].shape + (2,)), h_in, rr), uu, p)
                k = 0
                while True:
                    hp = _shift(h, h_in, rr)
                    r = h - C.step(hp, uu, p)
                    err = r.abs().nan_to_num(nan=math.inf).max().item()
                    if not (err > (-1.0 if tol is None else tol) and k < budget):
                        break
                    d = linear_scan_sequential(C.jacobian(hp, uu, p), -r, reset=rr)
                    if damping is not None:
                        d = d.clamp(-damping, damping)
                    h = h + d
                    k += 1
                residual = max(residual, err)
                states[b, t0:t0 + BLOCK_T, cs] = h[0]
                h_in = h[:, -1]
    return states, torch.tensor(residual, dtype=dtype)


# --- converged: the sequential recurrence, values and every gradient -----------------------------


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("T", [1, 8, 37])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_converged_solution_and_gradients_match_the_loop(cell, T, dtype):
    u, a, p, h0, state0, reset = make_problem(T, dtype=dtype, seed=T)
    init = h0 if cell == "gru" else state0
    fp64 = dtype == torch.float64
    tol, rtol = (1e-12, 1e-9) if fp64 else (1e-6, 1e-5)
    out = with_grads(lambda *x: run(cell, "triton", *x, reset, tol=tol, max_iters=30), u, a, p, init, cell)
    assert out[2] <= tol, f"residual {out[2]:.2e}"
    # The loop in fp64 on the same inputs: the exact answer for both dtypes.
    loop = with_grads(lambda *x: run_sequential(cell, *[y.double() for y in x], reset), u, a, p, init, cell)
    names = ("h", "final state", "residual", "grad u", "grad a", "grad p", "grad init")
    for i, name in enumerate(names):
        if i == 2:
            continue
        x, y = out[i], loop[i - 1 if i > 2 else i]
        if y is None:
            assert x is None, name
            continue
        assert x.shape == y.shape and x.dtype == (dtype if name != "final state" else dtype), name
        err = rel_err(x, y)
        assert err <= (1e-10 if fp64 and i < 2 else rtol), f"{name}: relative error {err:.2e}"
    # The reference solver at its own convergence gives the same.
    ref = with_grads(lambda *x: run(cell, "torch", *x, reset, tol=tol, max_iters=60), u, a, p, init, cell)
    for i in (0, 1, 3, 4, 5, 6):
        if ref[i] is not None:
            assert rel_err(out[i], ref[i]) <= rtol, names[i]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_without_init_or_resets(cell):
    u, a, p, _, _, _ = make_problem(20, dtype=torch.float64, seed=1)
    out = with_grads(lambda *x: run(cell, "triton", *x, None, tol=1e-12, max_iters=30), u, a, p, None, cell)
    loop = with_grads(lambda *x: run_sequential(cell, *x, None), u, a, p, None, cell)
    for x, y in zip(out[:2] + out[3:], loop):
        if y is not None:
            assert rel_err(x, y) <= 1e-9
    assert out[6] is None  # no initial state, no gradient for it


# --- unconverged: the kernels' own schedule, the true residual ---------------------------------------


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_damped_iteration_is_the_chunked_schedule(cell, dtype):
    # One damped iteration from a rough start: far from the solution (the residual is large) and
    # the clamp is active. The fused kernel must return the chunked schedule's h, and report the
    # true residual of that h.
    u, a, p, h0, state0, reset = make_problem(37, dtype=dtype, seed=2, a_max=1.5)
    init = h0 if cell == "gru" else state0
    params = params_of(cell, a, p)
    h, final, residual = run(cell, "triton", u, a, p, init, reset, num_iters=1, damping=0.05)
    states, expected_residual = chunked_newton(cell, u, params, init, reset, num_iters=1, damping=0.05)
    assert expected_residual > 1e-2
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    h_ref = states if cell == "gru" else states[..., 1]
    assert rel_err(h, h_ref) <= tol and rel_err(final, states[:, -1]) <= tol
    assert abs(residual.item() - expected_residual.item()) <= tol * max(1.0, states.abs().max().item())
    # The reported residual is the true one of the returned trajectory (final state included).
    full = states if cell == "gru" else torch.cat((states[..., :1], h.unsqueeze(-1)), dim=-1)
    true = true_residual(cell, full, u, params, init, reset)
    torch.testing.assert_close(residual, true.to(residual.dtype), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_tol_stops_each_chunk_early_as_the_chunked_schedule(cell):
    # tol reached in a few iterations per chunk (different per chunk and channel block); the
    # result is the chunked schedule's with the same per-block stopping rule.
    u, a, p, h0, state0, reset = make_problem(37, dtype=torch.float64, seed=3, a_max=1.5)
    init = h0 if cell == "gru" else state0
    params = params_of(cell, a, p)
    h, final, residual = run(cell, "triton", u, a, p, init, reset, tol=1e-4, max_iters=20)
    states, expected = chunked_newton(cell, u, params, init, reset, tol=1e-4, max_iters=20)
    assert residual <= 1e-4 and abs(residual.item() - expected.item()) <= 1e-12
    assert rel_err(final, states[:, -1]) <= 1e-12
    # ...and early: a tighter tol changes the answer (so iterations were indeed skipped).
    h_tight, _, _ = run(cell, "triton", u, a, p, init, reset, tol=1e-12, max_iters=20)
    assert (h - h_tight).abs().max() > 1e-12


def test_unreachable_tol_reports_the_true_residual_and_warns():
    # Recurrent weights past the stability edge and one iteration per chunk: not converged.
    u, a, _, h0, _, reset = make_problem(37, seed=4, a_max=3.0)
    with pytest.warns(RuntimeWarning, match="residual"):
        h, _, residual = paragru(u, a, h0, reset, num_iters=1, tol=1e-6, max_iters=1, backend="triton")
    expected = true_residual("gru", h, u, (a,), h0, reset)
    assert expected > 1e-3 and residual > 1e-6
    torch.testing.assert_close(residual, expected, rtol=1e-5, atol=1e-7)
    # More iterations fix it, silently; at most BLOCK_T iterations solve a chunk exactly.
    h, _, residual = paragru(u, a, h0, reset, tol=1e-6, max_iters=BLOCK_T, backend="triton")
    assert residual <= 1e-6
    h_ref, _ = paragru_sequential(u.double(), a.double(), h0.double(), reset)
    assert (h.double() - h_ref).abs().max() <= 1e-5


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_nan_residual_is_reported_as_inf(cell):
    u, a, p, h0, state0, reset = make_problem(20, seed=5)
    u[0, 3, 1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="residual inf"):
        _, _, residual = run(cell, "triton", u, a, p, h0 if cell == "gru" else state0, reset, tol=1e-3, max_iters=3)
    assert residual == float("inf")
    # Without tol too (no early stop to hide behind).
    _, _, residual = run(cell, "triton", u, a, p, None, None, num_iters=2)
    assert residual == float("inf")


# --- dtypes and dispatch -------------------------------------------------------------------------


def test_bf16_input_is_fp32_math_on_the_bf16_values():
    u, a, p, _, state0, reset = make_problem(37, seed=7)
    u16 = u.bfloat16()

    def solve(u):
        return with_grads(lambda *x: run("lstm", "triton", *x, reset), u, a, p, state0, "lstm")

    out16, out32 = solve(u16), solve(u16.float())
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


def test_launch_config_at_the_shipped_shapes():
    # One warp per program, time across its 32 lanes, 4 channels per thread (see launch_config).
    for lstm in (False, True):
        for B, T, D in ((4, 4096, 2048), (1, 4096, 8192), (8, 256, 192)):
            assert LAUNCH_CONFIG(lstm, B, T, D) == (32, 4, 1)
    assert LAUNCH_CONFIG(True, 1, 4096, 8192, 16, 8) == (16, 8, 1)
