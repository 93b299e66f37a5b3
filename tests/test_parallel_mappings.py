"""parallel/mappings.py: each named collective against the single-process math (values and grads).

One spawn of 4 gloo processes; every collective is checked on groups of 2 (two groups side by
side, tp=2 in a dp=2 x tp=2 world) and on one group of 4. The "single process" is the same
computation written on the full tensors: every rank builds the same full tensors from a seed,
each rank r contributes the loss term sum(y_r * w_r), and the reference gradient is that of the
sum over ranks of those terms. fp64; tolerance 1e-12.
"""
import pytest
import torch

from parallel.mappings import (all_gather_list, all_to_all, copy_to_tp, from_next_rank, from_prev_rank,
                               gather_from_sp, gather_from_tp, group_rank, group_size, reduce_from_tp,
                               scatter_to_sp, scatter_to_tp)
from parallel.spawn import run_gloo
from parallel.topology import ParallelDims

TOL = 1e-12


def full(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def err(a, b):
    return (a.detach() - b.detach()).abs().max().item()


def run_collective_checks(group, tag):
    n, r = group_size(group), group_rank(group)
    out = {}
    B, S, C = 2, 4 * n, 3 * n  # S: sequence length, C: channels (both divisible by n)
    ws = [full(100 + j, B, S, C) for j in range(n)]  # rank j's loss weights
    X = full(1, B, S, C)
    Xs = [full(10 + j, B, S, C) for j in range(n)]  # a different tensor per rank

    # copy_to_tp: y = x on every rank; d/dx sum_j <x, w_j> = sum_j w_j
    x = X.clone().requires_grad_(True)
    y = copy_to_tp(x, group)
    (y * ws[r]).sum().backward()
    out["copy_to_tp"] = max(err(y, X), err(x.grad, sum(ws)))

    # reduce_from_tp: y = sum_j x_j (same on all ranks, counted once); d/dx_r <y, w> = w
    x = Xs[r].clone().requires_grad_(True)
    y = reduce_from_tp(x, group)
    (y * ws[0]).sum().backward()
    out["reduce_from_tp"] = max(err(y, sum(Xs)), err(x.grad, ws[0]))

    # scatter_to_tp: y_r = x[..., slice r]; d/dx sum_j <y_j, w[..., slice j]> = w
    x = X.clone().requires_grad_(True)
    y = scatter_to_tp(x, group)
    (y * ws[0].chunk(n, -1)[r]).sum().backward()
    out["scatter_to_tp"] = max(err(y, X.chunk(n, -1)[r]), err(x.grad, ws[0]))

    # gather_from_tp: y = cat_j x_j (same on all ranks, counted once); d/dx_r = w[..., slice r]
    x = X.chunk(n, -1)[r].clone().requires_grad_(True)
    y = gather_from_tp(x, group)
    (y * ws[0]).sum().backward()
    out["gather_from_tp"] = max(err(y, X), err(x.grad, ws[0].chunk(n, -1)[r]))

    # scatter_to_sp: y_r = x[:, piece r]; d/dx sum_j <y_j, w[:, piece j]> = w
    x = X.clone().requires_grad_(True)
    y = scatter_to_sp(x, group)
    (y * ws[0].chunk(n, 1)[r]).sum().backward()
    out["scatter_to_sp"] = max(err(y, X.chunk(n, 1)[r]), err(x.grad, ws[0]))

    # gather_from_sp: y = cat_j x_j on every rank, each rank its own loss term;
    # d/dx_r sum_j <y, w_j> = (sum_j w_j)[:, piece r]
    x = X.chunk(n, 1)[r].clone().requires_grad_(True)
    y = gather_from_sp(x, group)
    (y * ws[r]).sum().backward()
    out["gather_from_sp"] = max(err(y, X), err(x.grad, sum(ws).chunk(n, 1)[r]))

    # all_to_all [B, S/n, H, hd] -> [B, S, H/n, hd]: rank r receives heads r of the whole sequence
    H, hd = 2 * n, 3
    Q = full(2, B, S, H, hd)
    W = full(3, B, S, H, hd)
    x = Q.chunk(n, 1)[r].clone().requires_grad_(True)
    y = all_to_all(x, group, scatter_dim=2, gather_dim=1)
    (y * W.chunk(n, 2)[r]).sum().backward()
    back = all_to_all(y, group, scatter_dim=1, gather_dim=2)
    out["all_to_all"] = max(err(y, Q.chunk(n, 2)[r]), err(x.grad, W.chunk(n, 1)[r]), err(back, x))

    # from_prev_rank: y_r = x_{r-1} (0 on rank 0); d/dx_r sum_j <y_j, w_j> = w_{r+1} (0 on the last)
    x = Xs[r].clone().requires_grad_(True)
    y = from_prev_rank(x, group)
    (y * ws[r]).sum().backward()
    want_y = Xs[r - 1] if r > 0 else torch.zeros_like(X)
    want_g = ws[r + 1] if r < n - 1 else torch.zeros_like(X)
    out["from_prev_rank"] = max(err(y, want_y), err(x.grad, want_g))

    # from_next_rank: y_r = x_{r+1} (0 on the last); d/dx_r = w_{r-1} (0 on rank 0)
    x = Xs[r].clone().requires_grad_(True)
    y = from_next_rank(x, group)
    (y * ws[r]).sum().backward()
    want_y = Xs[r + 1] if r < n - 1 else torch.zeros_like(X)
    want_g = ws[r - 1] if r > 0 else torch.zeros_like(X)
    out["from_next_rank"] = max(err(y, want_y), err(x.grad, want_g))

    # all_gather_list (no autograd)
    out["all_gather_list"] = max(err(a, b) for a, b in zip(all_gather_list(Xs[r], group), Xs))
    return {f"{tag}/{k}": v for k, v in out.items()}


def run_checks(rank, world_size):
    tp2 = ParallelDims(dp=2, sp=1, tp=2, world_size=world_size).build_groups()
    tp4 = ParallelDims(dp=1, sp=1, tp=4, world_size=world_size).build_groups()
    out = run_collective_checks(tp2.tp_group, "group2")
    out.update(run_collective_checks(tp4.tp_group, "group4"))
    # group None = one process: every mapping is the identity, its gradient too.
    x = full(5, 2, 3).requires_grad_(True)
    y = gather_from_sp(scatter_to_tp(reduce_from_tp(copy_to_tp(x, None), None), None), None)
    y.sum().backward()
    out["none/identity"] = max(err(y, x), err(x.grad, torch.ones_like(x)))
    return out


@pytest.fixture(scope="module")
def results():
    return run_gloo(run_checks, 4)


NAMES = ["copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp", "scatter_to_sp",
         "gather_from_sp", "all_to_all", "from_prev_rank", "from_next_rank", "all_gather_list"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tag", ["group2", "group4"])
def test_collective_matches_single_process(results, tag, name):
    key = f"{tag}/{name}"
    for rank, out in enumerate(results):
        assert out[key] <= TOL, f"rank {rank} {key}: max error {out[key]:.3e} > {TOL}"


def test_group_none_is_identity(results):
    assert all(out["none/identity"] <= TOL for out in results)
