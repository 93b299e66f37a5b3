"""kernels/pararnn.py (torch reference path): packed documents and convergence reporting.

Two cases the issue asks for by name: two documents packed in one row (a reset between them) give
exactly what each gives alone, values and gradients; and a problem where the default three Newton
iterations are not enough is detected, reported with the true residual, and warned about.
"""

import pytest
import torch

from kernels.pararnn import ParaGRUCell, paragru, paragru_sequential, paralstm

D = 8


def make_doc(T, seed, a_max=1.0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2, T, 3, D, dtype=torch.float64, generator=g)
    a = torch.empty(3, D, dtype=torch.float64).uniform_(-a_max, a_max, generator=g)
    p = torch.empty(2, D, dtype=torch.float64).uniform_(-a_max, a_max, generator=g)
    state0 = torch.randn(2, D, 2, dtype=torch.float64, generator=g)
    return u, a, p, state0


def run(cell, u, a, p, init, reset):
    kw = dict(tol=1e-13, max_iters=60)
    if cell == "gru":
        h, final, _ = paragru(u, a, None if init is None else init[..., 1], reset, **kw)
    else:
        h, final, _ = paralstm(u, a, p, init, reset, **kw)
    return h, final


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_two_documents_packed_in_one_row_equal_each_run_alone(cell):
    T1, T2 = 40, 25
    u, a, p, state0 = make_doc(T1 + T2, seed=0)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, T1 + T2, D, dtype=torch.float64, generator=g)

    def grads(u, a, p, state0, pieces):
        leaves = [x.clone().requires_grad_(True) for x in (u, a, p, state0)]
        hs = []
        for (i, j), init in zip(pieces, (leaves[3], None)):
            reset = None
            if len(pieces) == 1:  # packed: the second document starts at T1
                reset = torch.zeros(2, T1 + T2, dtype=torch.bool)
                reset[:, T1] = True
            h, _ = run(cell, leaves[0][:, i:j], leaves[1], leaves[2], init, reset)
            hs.append(h)
        h = torch.cat(hs, dim=1)
        (h * w).sum().backward()
        return [h] + [x.grad for x in leaves]

    packed = grads(u, a, p, state0, [(0, T1 + T2)])
    alone = grads(u, a, p, state0, [(0, T1), (T1, T1 + T2)])  # second document from a zero state
    for name, x, y in zip(("h", "grad u", "grad a", "grad p", "grad state0"), packed, alone):
        if cell == "gru" and name == "grad p":
            continue
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10, msg=name)


def test_three_iterations_not_enough_is_detected_and_reported():
    # Recurrent weights past the stability edge (|a| up to 3) and a long row: after the default
    # three iterations the solution is visibly wrong, and the solver must say so.
    u, a, _, _ = make_doc(300, seed=2, a_max=3.0)
    u, a = u.float(), a.float()
    with pytest.warns(RuntimeWarning, match=r"residual .* > tol=1\.000e-05 after max_iters=3"):
        h, _, residual = paragru(u, a, tol=1e-5, max_iters=3)
    # The reported residual is the true one of the returned h...
    h_prev = torch.cat((torch.zeros_like(h[:, :1]), h[:, :-1]), dim=1)
    true_residual = (h - ParaGRUCell.step(h_prev, u, (a,))).abs().max()
    torch.testing.assert_close(residual, true_residual, rtol=1e-6, atol=0)
    # ...and it is right to complain: h is far from the sequential solution.
    h_ref, _ = paragru_sequential(u.double(), a.double())
    assert residual > 1e-5 and (h.double() - h_ref).abs().max() > 1e-3
    # Without tol the default run returns the same (unconverged) residual for the caller to log.
    _, _, residual_default = paragru(u, a)
    torch.testing.assert_close(residual_default, residual, rtol=0, atol=0)
    # More iterations fix it, silently.
    h, _, residual = paragru(u, a, tol=1e-5, max_iters=300)
    assert residual <= 1e-5 and (h.double() - h_ref).abs().max() <= 1e-4
