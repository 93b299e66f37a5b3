"""Named collectives as autograd functions on plain tensors (Megatron-Core's mappings.py).

Each forward collective has its dual as backward:

    copy_to_tp      identity            | all-reduce          (enter a tp region)
    reduce_from_tp  all-reduce          | identity            (leave a row-parallel region)
    scatter_to_tp   keep own last-dim slice | all-gather last dim
    gather_from_tp  all-gather last dim | keep own slice
    scatter_to_sp   keep own dim-1 piece | all-gather dim 1  (slice a replicated sequence)
    gather_from_sp  all-gather (dim 1)  | reduce-scatter     (every rank uses the whole)
    all_to_all      all-to-all          | the inverse all-to-all (Ulysses)
    from_prev_rank  x of rank r-1 (zeros on rank 0) | gradient back to rank r-1
    from_next_rank  x of rank r+1 (zeros on the last) | gradient back to rank r+1

`group=None` means a group of one process: every function is then the identity (so
single-device code can call them unconditionally).

gloo has no reduce-scatter, so reduce-scatter is an all-reduce and a slice; the halo/boundary
exchanges are an all-gather of a small tensor (a pair of point-to-point sends would move less
on NCCL; these tensors are [B, K-1, C] or [B, D] per layer, not worth a second code path yet).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ---------------------------------------------------------------------------------------------
# Raw (non-autograd) collectives.


def _all_reduce(x, group):
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x, group, dim):
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def all_gather_list(x, group) -> list[torch.Tensor]:
    """[x of rank 0, x of rank 1, ...]; no autograd."""
    if group_size(group) == 1:
        return [x]
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x, group=group)
    return parts


def _split(x, group, dim):
    n = group_size(group)
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {n} ranks")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def _reduce_scatter(x, group, dim):
    return _split(_all_reduce(x, group), group, dim)


def _all_to_all(x, group, scatter_dim, gather_dim):
    """Split x along scatter_dim into n parts, send part j to rank j, concat received along gather_dim."""
    n = group_size(group)
    if x.shape[scatter_dim] % n:
        raise ValueError(f"all_to_all: dim {scatter_dim} of size {x.shape[scatter_dim]} is not "
                         f"divisible by the group size {n}")
    inputs = [p.contiguous() for p in x.chunk(n, dim=scatter_dim)]
    outputs = [torch.empty_like(p) for p in inputs]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


def neighbour_value(x, group, offset: int):
    """x of rank r + offset in the group, zeros where that rank does not exist; no autograd."""
    n, r = group_size(group), group_rank(group)
    parts = all_gather_list(x, group)
    j = r + offset
    return parts[j] if 0 <= j < n else torch.zeros_like(x)


# ---------------------------------------------------------------------------------------------
# Autograd functions.


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group, ctx.dim), None, None


class _GatherFromGroup(torch.autograd.Function):
    """All-gather; backward keeps own slice (every rank holds the same downstream gradient)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.group, ctx.dim), None, None


class _GatherReduceScatterGrad(torch.autograd.Function):
    """All-gather; backward sums every rank's gradient of the whole and keeps own slice."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.group, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all(g, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


class _FromNeighbour(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, offset):
        ctx.group, ctx.offset = group, offset
        return neighbour_value(x, group, offset)

    @staticmethod
    def backward(ctx, g):
        # y_r = x_{r+o}  =>  dL/dx_r = g_{r-o}
        return neighbour_value(g, ctx.group, -ctx.offset), None, None


# ---------------------------------------------------------------------------------------------
# The public names.


def copy_to_tp(x, group):
    """Forward identity, backward all-reduce: the input of a column-parallel region."""
    return x if group_size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_tp(x, group):
    """Forward all-reduce (sum), backward identity: the output of a row-parallel region."""
    return x if group_size(group) == 1 else _ReduceFromGroup.apply(x, group)


def scatter_to_tp(x, group):
    """Forward: this rank's contiguous slice of the last dim; backward: all-gather it."""
    return x if group_size(group) == 1 else _ScatterToGroup.apply(x, group, x.dim() - 1)


def gather_from_tp(x, group):
    """Forward: all-gather along the last dim; backward: this rank's slice of the gradient."""
    return x if group_size(group) == 1 else _GatherFromGroup.apply(x, group, x.dim() - 1)


def scatter_to_sp(x, group, dim: int = 1):
    """Forward: this rank's contiguous piece of the sequence (dim 1); backward: all-gather."""
    return x if group_size(group) == 1 else _ScatterToGroup.apply(x, group, dim)


def gather_from_sp(x, group, dim: int = 1):
    """Forward: all-gather the pieces along `dim`; backward: reduce-scatter (sum over ranks).

    The sum is right whenever every rank computes its own loss term from the gathered tensor.
    """
    return x if group_size(group) == 1 else _GatherReduceScatterGrad.apply(x, group, dim)


def all_to_all(x, group, scatter_dim: int, gather_dim: int):
    """Split x along scatter_dim over the ranks and concatenate what arrives along gather_dim."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, group, scatter_dim, gather_dim)


def from_prev_rank(x, group):
    """x of the previous rank in the group (zeros on rank 0); gradients flow back to it."""
    return torch.zeros_like(x) if group_size(group) == 1 else _FromNeighbour.apply(x, group, -1)


def from_next_rank(x, group):
    """x of the next rank in the group (zeros on the last); gradients flow back to it."""
    return torch.zeros_like(x) if group_size(group) == 1 else _FromNeighbour.apply(x, group, 1)
