"""Plans applied to a built LanguageModel from the outside (torchtitan style): the model file stays
single-device code, and these functions swap its layers for parallel/ ones or wrap their forwards.

    model = LanguageModel(cfg.model)           # full weights, the same seed on every rank
    validate_parallel(cfg, dims)               # clear errors before anything is built
    apply_tensor_parallel(model, dims)         # keep this rank's shard of every sharded weight
    apply_sequence_parallel(model, dims)       # scans, convs and attention cross sp ranks
    apply_activation_checkpointing(model)      # optional

Sharded parameters remember how they were cut (`shard_spec` = (dim, shape, axis), the arguments
of parallel.tensor_parallel.shard_tensor), so tests and exports can cut or reassemble the full
tensor the same way. Parameter names never change.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from parallel.mappings import copy_to_tp
from parallel.sequence_parallel import (halo_conv_forward, sp_deltaproduct, sp_pararnn_kwargs, sp_token_count,
                                        ulysses_attention)
from parallel.tensor_parallel import (ColumnParallelLinear, HeadParallelHeadwiseLinear, RowParallelLinear,
                                      VocabParallelEmbedding, shard_parameter, vocab_parallel_cross_entropy)
from parallel.topology import ParallelDims
from pretrain.config import Config, ConfigError
from pretrain.mixers import AttentionMixer, DeltaProductMixer, ParaRNNMixer, rms_norm


def validate_parallel(cfg: Config, dims: ParallelDims) -> None:
    """Every shape the degrees must divide, checked up front with the config key named."""
    m, tp, sp = cfg.model, dims.tp, dims.sp
    need = []
    if tp > 1:
        need.append((m.vocab_size, "model.vocab_size", tp, "parallel.tp"))
    mixers = set(m.layer_mixers())
    for name in ("paragru", "paralstm"):
        if name in mixers:
            need.append((getattr(m, name).num_heads, f"model.{name}.num_heads", tp, "parallel.tp"))
    if "deltaproduct" in mixers:
        need.append((m.deltaproduct.num_heads, "model.deltaproduct.num_heads", tp, "parallel.tp"))
    if "attention" in mixers:
        need.append((m.attention.num_heads, "model.attention.num_heads", tp * sp, "parallel.tp x parallel.sp"))
    need.append((cfg.data.seq_len, "data.seq_len", sp, "parallel.sp"))
    for value, key, degree, degree_key in need:
        if value % degree:
            raise ConfigError(f"{key}={value} is not divisible by {degree_key}={degree}; choose degrees that divide it")
    if sp > 1 and "deltaproduct" in mixers and m.deltaproduct.use_short_conv:
        if cfg.data.seq_len // sp < m.deltaproduct.conv_size - 1:
            raise ConfigError(f"data.seq_len / parallel.sp = {cfg.data.seq_len // sp} is shorter than the short conv's "
                              f"halo ({m.deltaproduct.conv_size - 1}); use a longer seq_len or a smaller sp")


# ----------------------------------------------------------------------------- tensor parallel


def _column(linear: nn.Linear, group, shape=None, axis: int = 0) -> ColumnParallelLinear:
    layer = ColumnParallelLinear.from_linear(linear, group, shape=shape, axis=axis)
    layer.weight.shard_spec = (0, shape, axis)
    if layer.bias is not None:
        layer.bias.shard_spec = (0, shape, axis)
    return layer


def _row(linear: nn.Linear, group) -> RowParallelLinear:
    layer = RowParallelLinear.from_linear(linear, group)
    layer.weight.shard_spec = (1, None, 0)
    return layer


def _shard(param: torch.Tensor, group, dim: int, shape=None, axis: int = 0) -> nn.Parameter:
    p = shard_parameter(param, group, dim, shape, axis)
    p.shard_spec = (dim, shape, axis)
    return p


class _TPSharedRMSNorm(nn.Module):
    """An RMSNorm whose weight is shared by heads that live on different tp ranks: forward as is,
    its gradient summed over tp (copy_to_tp), so every rank holds the full, equal gradient."""

    def __init__(self, norm: nn.Module, group):
        super().__init__()
        self.eps, self.group, self.weight = norm.eps, group, norm.weight

    def forward(self, x):
        return rms_norm(x, copy_to_tp(self.weight, self.group), self.eps)


def apply_tensor_parallel(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Megatron-style: embedding and head over the vocabulary, MLPs column then row, ParaRNN over
    channels (no communication inside the Newton solve), DeltaProduct and attention over heads."""
    tp = dims.tp_group
    if dims.tp == 1:
        return model
    tied = model.cfg.tie_embeddings
    model.embed = VocabParallelEmbedding.from_embedding(model.embed, tp)
    model.embed.weight.shard_spec = (0, None, 0)
    model.head = _column(model.head, tp)
    if tied:
        model.head.weight = model.embed.weight
    model.loss_fn = make_parallel_loss(tp, dims.sp_group if dims.sp > 1 else None)

    for block in model.blocks:
        mlp = block.mlp
        mlp.w_gate, mlp.w_up, mlp.w_down = _column(mlp.w_gate, tp), _column(mlp.w_up, tp), _row(mlp.w_down, tp)
        mixer = block.mixer
        if isinstance(mixer, ParaRNNMixer):
            inner = mixer.in_proj
            mixer.in_proj = HeadParallelHeadwiseLinear.from_headwise(inner.weight, inner.bias, tp)
            mixer.in_proj.weight.shard_spec, mixer.in_proj.bias.shard_spec = (0, None, 0), (1, None, 0)
            mixer.recurrent = _shard(mixer.recurrent, tp, dim=1)
            if hasattr(mixer, "peephole"):
                mixer.peephole = _shard(mixer.peephole, tp, dim=1)
            mixer.out_proj = _row(mixer.out_proj, tp)
        elif isinstance(mixer, DeltaProductMixer):
            H, dk, dv, nh = mixer.H, mixer.dk, mixer.dv, mixer.nh
            mixer.q_proj = _column(mixer.q_proj, tp)
            mixer.k_proj = _column(mixer.k_proj, tp, shape=(nh, H, dk), axis=1)
            mixer.v_proj = _column(mixer.v_proj, tp, shape=(nh, H, dv), axis=1)
            mixer.b_proj = _column(mixer.b_proj, tp, shape=(nh, H), axis=1)
            mixer.g_proj = _column(mixer.g_proj, tp)
            if mixer.c.use_forget_gate:
                mixer.a_proj = _column(mixer.a_proj, tp)
                mixer.A_log = _shard(mixer.A_log, tp, dim=0)
                mixer.dt_bias = _shard(mixer.dt_bias, tp, dim=0)
            if mixer.c.use_short_conv:
                mixer.q_conv.weight = _shard(mixer.q_conv.weight, tp, dim=0)
                mixer.k_conv.weight = _shard(mixer.k_conv.weight, tp, dim=0, shape=(nh, H, dk), axis=1)
                mixer.v_conv.weight = _shard(mixer.v_conv.weight, tp, dim=0, shape=(nh, H, dv), axis=1)
            mixer.o_norm = _TPSharedRMSNorm(mixer.o_norm, tp)
            mixer.out_proj = _row(mixer.out_proj, tp)
        elif isinstance(mixer, AttentionMixer):
            mixer.qkv_proj = _column(mixer.qkv_proj, tp, shape=(3, mixer.H, mixer.hd), axis=1)
            mixer.out_proj = _row(mixer.out_proj, tp)
    return model


def make_parallel_loss(tp_group, sp_group):
    """Mean next-token loss over the whole (global) sequences from vocab-sharded logits and a
    sequence piece: the per-token losses' sum divided by the token count over the sp group.
    DeepSpeed sums gradients over sp (and averages over dp), which makes this the single-device
    mean loss's gradient."""

    def loss_fn(logits, labels):
        per_token = vocab_parallel_cross_entropy(logits, labels, tp_group)
        return per_token.sum() / sp_token_count(labels.numel(), sp_group).to(per_token.dtype)

    return loss_fn


# ----------------------------------------------------------------------------- sequence parallel


def apply_sequence_parallel(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Each sp rank runs its contiguous piece of every sequence; the recurrences continue across
    pieces by summaries, convs by a halo, attention by Ulysses all-to-all."""
    if dims.sp == 1:
        return model
    sp = dims.sp_group
    model.loss_fn = make_parallel_loss(dims.tp_group if dims.tp > 1 else None, sp)
    for block in model.blocks:
        mixer = block.mixer
        if isinstance(mixer, ParaRNNMixer):
            mixer.solver_extra = sp_pararnn_kwargs(sp)
        elif isinstance(mixer, DeltaProductMixer):
            mixer.recurrence = _partial_sp_deltaproduct(sp)
            if mixer.c.use_short_conv:
                for conv in (mixer.q_conv, mixer.k_conv, mixer.v_conv):
                    conv.forward = halo_conv_forward(conv, sp)
        elif isinstance(mixer, AttentionMixer):
            attend = mixer.attend
            mixer.attend = lambda q, k, v, doc_start=None, _attend=attend: ulysses_attention(
                _attend, q, k, v, doc_start, sp)
    return model


def _partial_sp_deltaproduct(group):
    def recurrence(q, k, v, beta, g=None, reset=None, chunk_size=64, backend="auto"):
        return sp_deltaproduct(q, k, v, beta, g, reset=reset, group=group, chunk_size=chunk_size, backend=backend)

    return recurrence


def set_kernel_backend(model: nn.Module, backend: str) -> nn.Module:
    """auto | torch | triton for every recurrent mixer (train.kernel_backend)."""
    for block in model.blocks:
        if hasattr(block.mixer, "kernel_backend"):
            block.mixer.kernel_backend = backend
    return model


def sequence_slice(batch: dict, dims: ParallelDims) -> dict:
    """This sp rank's contiguous piece of every [B, T] tensor of a batch."""
    if dims.sp == 1:
        return batch
    T = batch["input_ids"].shape[1]
    n = T // dims.sp
    lo = dims.sp_rank * n
    return {k: v[:, lo:lo + n] for k, v in batch.items()}


# ----------------------------------------------------------------------------- memory


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's forward in backward instead of keeping its activations.

    The block's forward is wrapped in place (no wrapper module), so parameter names, checkpoints
    and exports are the same with and without it.
    """
    for block in model.blocks:
        if getattr(block, "activation_checkpointing", False):
            continue
        inner = block.forward

        def forward(x, doc_start=None, _inner=inner, _block=block):
            if not (_block.training and x.requires_grad):
                return _inner(x, doc_start)
            return checkpoint(_inner, x, doc_start, use_reentrant=False)

        block.forward = forward
        block.activation_checkpointing = True
    return model

