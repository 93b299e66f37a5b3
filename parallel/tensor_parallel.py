"""Tensor-parallel layers (Megatron-Core layers.py), built on parallel/mappings.py.

Every layer is constructible from the full single-device weight (`from_linear`,
`from_embedding`): it keeps this rank's slice, so a plan can swap a trained or freshly initialised
module for its parallel version and tests can compare against the unsharded module.

Sharded parameters carry `tensor_model_parallel = True` (with `partition_dim`), the attribute
DeepSpeed's grad-norm code (deepspeed.runtime.utils.is_model_parallel_parameter) reads: sharded
parameters are summed over tp ranks, replicated ones counted on tp rank 0 only, so the global
norm counts each weight once.

Sharding a dim that is a product of factors (heads inside (n_h, H, dk), or (3, H, hd)) is
expressed by `shape` and `axis`: view the dim as `shape`, keep this rank's contiguous part of
`shape[axis]`, flatten back. The local layout is then the same product with shape[axis] / tp.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from parallel.mappings import (copy_to_tp, gather_from_tp, group_rank, group_size,
                               reduce_from_tp, scatter_to_tp)


def mark_tensor_parallel(param: nn.Parameter, dim: int) -> nn.Parameter:
    """Tag a parameter as sharded over tp along `dim` (DeepSpeed's attribute names)."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1
    return param


def shard_tensor(full: torch.Tensor, group, dim: int, shape=None, axis: int = 0) -> torch.Tensor:
    """This rank's shard of `full` along `dim` (a copy).

    shape/axis: view dim `dim` as `shape` (product = its size) and shard `shape[axis]`.
    """
    n, r = group_size(group), group_rank(group)
    dim = dim % full.dim()
    size = full.shape[dim]
    shape = (size,) if shape is None else tuple(shape)
    if math.prod(shape) != size:
        raise ValueError(f"shard_tensor: shape {shape} does not factor dim {dim} of size {size}")
    if shape[axis] % n:
        raise ValueError(f"shard_tensor: size {shape[axis]} (axis {axis} of {shape}) is not divisible "
                         f"by the tp degree {n}")
    x = full.detach().reshape(full.shape[:dim] + shape + full.shape[dim + 1:])
    x = x.chunk(n, dim=dim + axis)[r]
    return x.reshape(full.shape[:dim] + (-1,) + full.shape[dim + 1:]).clone()


def shard_parameter(full: torch.Tensor, group, dim: int, shape=None, axis: int = 0) -> nn.Parameter:
    """A marked nn.Parameter holding this rank's shard (see shard_tensor)."""
    p = nn.Parameter(shard_tensor(full, group, dim, shape, axis), requires_grad=full.requires_grad)
    return mark_tensor_parallel(p, dim) if group_size(group) > 1 else p


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's output dim sharded: each rank computes its slice of y.

    Input replicated over tp (copy_to_tp: its gradient is summed over tp in backward); output
    sharded along the last dim unless gather_output (then all-gathered).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, gather_output: bool = False):
        super().__init__()
        self.group, self.gather_output = group, gather_output
        self.weight = mark_tensor_parallel(nn.Parameter(weight), 0) if group_size(group) > 1 else nn.Parameter(weight)
        self.bias = None
        if bias is not None:
            self.bias = mark_tensor_parallel(nn.Parameter(bias), 0) if group_size(group) > 1 else nn.Parameter(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, gather_output: bool = False, shape=None, axis: int = 0):
        """Shard nn.Linear's output features (viewed as `shape`, sharded along `axis`)."""
        w = shard_tensor(linear.weight, group, 0, shape, axis)
        b = None if linear.bias is None else shard_tensor(linear.bias, group, 0, shape, axis)
        return cls(w, b, group, gather_output)

    def forward(self, x):
        y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
        return gather_from_tp(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's input dim sharded: partial products summed over tp (reduce_from_tp).

    Input sharded along the last dim (input_is_parallel, the output of a column-parallel layer)
    or replicated (then scattered). Bias replicated, added once after the sum.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, input_is_parallel: bool = True):
        super().__init__()
        self.group, self.input_is_parallel = group, input_is_parallel
        self.weight = mark_tensor_parallel(nn.Parameter(weight), 1) if group_size(group) > 1 else nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, input_is_parallel: bool = True, shape=None, axis: int = 0):
        """Shard nn.Linear's input features (viewed as `shape`, sharded along `axis`)."""
        w = shard_tensor(linear.weight, group, 1, shape, axis)
        b = None if linear.bias is None else linear.bias.detach().clone()
        return cls(w, b, group, input_is_parallel)

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class HeadParallelHeadwiseLinear(nn.Module):
    """Block-diagonal-over-heads linear map with the heads sharded over tp.

    The same math as pretrain.mixers.HeadwiseLinear (weight [H, d_in/H, G, d_out/H], bias
    [G, d_out]; x [..., H*d_in/H] -> [..., G, H*d_out/H]) on this rank's H/tp heads: the input's
    head slice is taken locally (scatter_to_tp), no communication in forward, the output is
    this rank's channels of every gate, ready for a channel-sharded ParaRNN.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, group):
        super().__init__()
        self.group = group
        self.num_heads, self.num_gates = weight.shape[0], weight.shape[2]
        sharded = group_size(group) > 1
        self.weight = mark_tensor_parallel(nn.Parameter(weight), 0) if sharded else nn.Parameter(weight)
        self.bias = mark_tensor_parallel(nn.Parameter(bias), 1) if sharded else nn.Parameter(bias)

    @classmethod
    def from_headwise(cls, weight: torch.Tensor, bias: torch.Tensor, group):
        """From a full HeadwiseLinear's weight [H, i, G, j] and bias [G, H*j]."""
        # bias [G, H*j] is head-major along dim 1, so heads are a contiguous slice of it.
        return cls(shard_tensor(weight, group, 0), shard_tensor(bias, group, 1), group)

    def forward(self, x):
        xh = scatter_to_tp(x, self.group).unflatten(-1, (self.num_heads, -1))
        u = torch.einsum("...hi,higj->...ghj", xh, self.weight)
        return u.flatten(-2) + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary rows sharded: each rank looks up the ids in its range, zeros
    elsewhere, and the sum over tp (reduce_from_tp) assembles the full embedding."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, group):
        super().__init__()
        self.group, self.vocab_size = group, vocab_size
        n = group_size(group)
        self.per_rank = vocab_size // n
        self.vocab_start = group_rank(group) * self.per_rank
        self.weight = mark_tensor_parallel(nn.Parameter(weight), 0) if n > 1 else nn.Parameter(weight)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group):
        V = embedding.num_embeddings
        return cls(shard_tensor(embedding.weight, group, 0), V, group)

    def forward(self, ids):
        if group_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss_i = log Σ_v exp(z_iv) - z_i,target with z sharded over vocab: three all-reduces of
    [N] tensors (max, target logit, Σ exp); backward softmax - onehot on the local shard."""

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, ignore_index):
        z = logits.double() if logits.dtype == torch.float64 else logits.float()  # fp32 at least
        z_max = z.max(dim=-1).values
        dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=group)
        z = z - z_max.unsqueeze(-1)
        V_local = z.shape[-1]
        local = target - vocab_start
        ignored = target == ignore_index
        outside = (local < 0) | (local >= V_local) | ignored
        local = local.masked_fill(outside, 0)
        z_target = z.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(z_target, group=group)
        exp_z = z.exp()
        sum_exp = exp_z.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = (sum_exp.log() - z_target).masked_fill(ignored, 0.0)
        softmax = exp_z / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, local, outside, ignored)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local, outside, ignored = ctx.saved_tensors
        grad = softmax.clone()
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local.unsqueeze(-1), -hit.unsqueeze(-1))
        grad = grad * g.masked_fill(ignored, 0.0).unsqueeze(-1)
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy [...] (fp32; fp64 for fp64 logits) from vocab-sharded logits [..., V/tp].

    The full [..., V] logits never exist on one rank. Tokens with target == ignore_index get
    loss 0 and no gradient; the caller divides the sum by its token count.
    """
    if group_size(group) == 1:
        z = logits if logits.dtype == torch.float64 else logits.float()
        return F.cross_entropy(z.flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                               reduction="none").view(target.shape)
    vocab_start = group_rank(group) * logits.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_start, ignore_index)

