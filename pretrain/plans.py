"""Parallel plans: the styles a MixerSpec's tp_plan and sp_plan name, and the one function that
applies a plan to a module (as torchtitan's parallelize_module applies {path: style}).

Tensor parallelism (tp_plan: path -> style; a path names a submodule or a parameter):
    Column(shape, axis)   nn.Linear -> ColumnParallelLinear: output features split over tp. shape
                          is the output dim's layout when the split is not along its first axis,
                          e.g. ("nh", "H", "dk") split along axis 1 (H); names are the mixer's
                          attributes, ints are taken as they are.
    Row()                 nn.Linear -> RowParallelLinear: input features split, outputs summed.
    Headwise()            HeadwiseLinear -> HeadParallelHeadwiseLinear: whole heads per rank.
    Shard(dim, shape, axis)  a parameter cut along dim (same shape convention as Column).
    SharedNorm()          an RMSNorm applied per head whose weight every rank keeps whole: its
                          gradient is summed over tp.
Sharded parameters remember their cut as `shard_spec` = (dim, shape, axis), the arguments of
parallel.tensor_parallel.shard_tensor. Parameter names never change.

Sequence parallelism (sp_plan: path -> over): over(module, group) returns what replaces the
module's `sequence_op` (the one seam of every mixer and of ShortConv) so that it crosses the sp
ranks: pararnn_over_sp (Newton's scans over the group), deltaproduct_over_sp (chunk summaries),
conv_over_sp (a halo from the previous rank), attention_over_sp (Ulysses all-to-all).

A path absent from a module (an optional part: a conv or gate the config turns off) is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch.nn as nn

from parallel.mappings import copy_to_tp
from parallel.sequence_parallel import conv_with_halo, sp_deltaproduct, sp_pararnn_kwargs, ulysses_attention
from parallel.tensor_parallel import (ColumnParallelLinear, HeadParallelHeadwiseLinear, RowParallelLinear,
                                      shard_parameter)
from pretrain.mixers import rms_norm


def _layout(shape, owner):
    return None if shape is None else tuple(s if isinstance(s, int) else int(getattr(owner, s)) for s in shape)


@dataclass(frozen=True)
class Column:
    shape: tuple | None = None
    axis: int = 0

    def apply(self, linear: nn.Linear, owner: nn.Module, group) -> nn.Module:
        shape = _layout(self.shape, owner)
        layer = ColumnParallelLinear.from_linear(linear, group, shape=shape, axis=self.axis)
        layer.weight.shard_spec = (0, shape, self.axis)
        if layer.bias is not None:
            layer.bias.shard_spec = (0, shape, self.axis)
        return layer


@dataclass(frozen=True)
class Row:
    def apply(self, linear: nn.Linear, owner: nn.Module, group) -> nn.Module:
        layer = RowParallelLinear.from_linear(linear, group)
        layer.weight.shard_spec = (1, None, 0)
        return layer


@dataclass(frozen=True)
class Headwise:
    def apply(self, headwise: nn.Module, owner: nn.Module, group) -> nn.Module:
        layer = HeadParallelHeadwiseLinear.from_headwise(headwise.weight, headwise.bias, group)
        layer.weight.shard_spec, layer.bias.shard_spec = (0, None, 0), (1, None, 0)
        return layer


@dataclass(frozen=True)
class Shard:
    dim: int
    shape: tuple | None = None
    axis: int = 0

    def apply(self, param, owner: nn.Module, group) -> nn.Parameter:
        shape = _layout(self.shape, owner)
        p = shard_parameter(param, group, self.dim, shape, self.axis)
        p.shard_spec = (self.dim, shape, self.axis)
        return p


class _TPSharedRMSNorm(nn.Module):
    """An RMSNorm whose weight is shared by heads that live on different tp ranks: forward as is,
    its gradient summed over tp (copy_to_tp), so every rank holds the full, equal gradient."""

    def __init__(self, norm: nn.Module, group):
        super().__init__()
        self.eps, self.group, self.weight = norm.eps, group, norm.weight

    def forward(self, x):
        return rms_norm(x, copy_to_tp(self.weight, self.group), self.eps)


@dataclass(frozen=True)
class SharedNorm:
    def apply(self, norm: nn.Module, owner: nn.Module, group) -> nn.Module:
        return _TPSharedRMSNorm(norm, group)


def _resolve(module: nn.Module, path: str):
    """(parent, attribute name) of a dotted path, or None when a part is absent."""
    *parents, leaf = path.split(".")
    for name in parents:
        module = getattr(module, name, None)
        if module is None:
            return None
    return (module, leaf) if getattr(module, leaf, None) is not None else None


def apply_tp_plan(module: nn.Module, plan: dict, group) -> nn.Module:
    """Replace each planned submodule/parameter of `module` by its tensor-parallel version."""
    for path, style in plan.items():
        where = _resolve(module, path)
        if where is not None:
            parent, leaf = where
            setattr(parent, leaf, style.apply(getattr(parent, leaf), module, group))
    return module


def apply_sp_plan(module: nn.Module, plan: dict, group) -> nn.Module:
    """Swap the `sequence_op` of each planned part of `module` ("" = module) for one over the sp group."""
    for path, over in plan.items():
        target = module if path == "" else _resolve(module, path)
        if target is None:
            continue
        if path:
            target = getattr(*target)
        target.sequence_op = over(target, group)
    return module


# ----------------------------------------------------------------------------- sp styles

def pararnn_over_sp(mixer: nn.Module, group):
    """ParaRNN's Newton solve over the group: its linear solves and boundaries cross ranks."""
    return partial(mixer.sequence_op, **sp_pararnn_kwargs(group))


def deltaproduct_over_sp(mixer: nn.Module, group):
    """The chunkwise recurrence on this rank's piece, started from the earlier ranks' summaries."""
    return partial(sp_deltaproduct, group=group)


def conv_over_sp(conv: nn.Module, group):
    """A causal conv that sees the previous rank's last kernel_size - 1 positions."""
    return conv_with_halo(conv.sequence_op, conv.kernel_size - 1, group)


def attention_over_sp(mixer: nn.Module, group):
    """Attention over the whole sequence with heads split over the group (Ulysses)."""
    return partial(ulysses_attention, mixer.sequence_op, group=group)
