"""Plans applied to a built LanguageModel from the outside (torchtitan style): the model file stays
single-device code, and these functions swap its layers for parallel/ ones or swap the ops its
mixers run over the sequence. What each mixer needs is its registry entry's tp_plan and sp_plan
(pretrain/registry.py), applied by pretrain/plans.py's one generic function per kind.

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

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from parallel.sequence_parallel import sp_token_count
from parallel.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy
from parallel.topology import ParallelDims
from pretrain.config import Config, ConfigError
from pretrain.plans import Column, Row, apply_sp_plan, apply_tp_plan
from pretrain.registry import MIXERS


def validate_parallel(cfg: Config, dims: ParallelDims) -> None:
    """Every shape the degrees must divide, checked up front with the config key named: the
    vocabulary and the sequence here, each mixer's heads by its registry entry."""
    m, tp, sp = cfg.model, dims.tp, dims.sp
    if tp > 1 and m.vocab_size % tp:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={tp}; "
                          f"choose degrees that divide it")
    for name in dict.fromkeys(m.layer_mixers()):
        spec = MIXERS[name]
        error = spec.check_parallel(m, spec.section_of(m), f"model.{spec.section}", cfg.data.seq_len, tp, sp)
        if error:
            raise ConfigError(error)
    if cfg.data.seq_len % sp:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is not divisible by parallel.sp={sp}; "
                          f"choose degrees that divide it")


# ----------------------------------------------------------------------------- tensor parallel


def apply_tensor_parallel(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Megatron-style: embedding and head over the vocabulary, MLPs column then row, and each
    mixer by its registry entry's tp_plan (ParaRNN over channels with no communication inside
    the Newton solve, DeltaProduct and attention over heads)."""
    tp = dims.tp_group
    if dims.tp == 1:
        return model
    model.embed = VocabParallelEmbedding.from_embedding(model.embed, tp)
    model.embed.weight.shard_spec = (0, None, 0)
    apply_tp_plan(model, {"head": Column()}, tp)
    if model.cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    _install_parallel_loss(model, dims)
    for block in model.blocks:
        apply_tp_plan(block.mlp, MLP_TP_PLAN, tp)
        apply_tp_plan(block.mixer, MIXERS[block.mixer_name].tp_plan, tp)
    return model


MLP_TP_PLAN = {"w_gate": Column(), "w_up": Column(), "w_down": Row()}


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
    """Each sp rank runs its contiguous piece of every sequence; each mixer's sequence ops cross
    the pieces by its registry entry's sp_plan (recurrences by summaries, convs by a halo,
    attention by Ulysses all-to-all)."""
    if dims.sp == 1:
        return model
    _install_parallel_loss(model, dims)
    for block in model.blocks:
        apply_sp_plan(block.mixer, MIXERS[block.mixer_name].sp_plan, dims.sp_group)
    return model


def _install_parallel_loss(model: nn.Module, dims: ParallelDims) -> None:
    """The loss for whatever of tp and sp is on (both plans call this; it depends on dims only)."""
    model.loss_fn = make_parallel_loss(dims.tp_group if dims.tp > 1 else None, dims.sp_group if dims.sp > 1 else None)


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

