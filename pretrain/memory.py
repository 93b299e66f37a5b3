"""Per-rank memory of a training configuration, estimated before anything is allocated.

Model states (bf16 mixed precision, as DeepSpeed runs on GPU; the ZeRO paper's 2 + 2 + 12 bytes
per parameter): bf16 weights (2), bf16 gradients (2), AdamW's fp32 master copy and two moments
(12). Parameters are sharded over tp (all but the RMSNorm weights); ZeRO shards over the dp x sp
ranks that hold the same weights: stage 1 the optimizer state, stage 2 also the gradients,
stage 3 also the weights. fp32 training (CPU) is 4 + 4 + 8 bytes.

Activations: the bytes the layers keep for backward per token of the micro-batch
(micro_batch_size x seq_len / sp tokens per rank), counted from the tensors each layer saves:
norms keep fp32 x and x/rms (8 bytes per channel), matmuls their input, SwiGLU its three
hidden-size intermediates and product, ParaRNN's solver its pre-activations u and fp32 states,
DeltaProduct's Triton kernels q, k, v, beta, g only (they recompute the chunk terms), the torch
chunkwise form every chunk term (C x C and C x d matrices per chunk and head), attention q, k, v
and its output, the loss the fp32 log-softmax. Channel/head-sharded tensors divide by tp;
d_model-sized ones (block inputs, norms) are replicated over tp. With activation checkpointing a
block keeps only its input, and one block's activations exist again while it is recomputed. On
top comes the largest transient workspace of one layer (the Newton solver's J, r, d buffers, the
DeltaProduct backward's recomputed W and chunk states, fp32 logits during the loss).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GiB = 1024 ** 3
REPLICATED_SUFFIXES = ("norm1.weight", "norm2.weight", "o_norm.weight")  # and the final norm


def parameter_counts(model_cfg) -> tuple[int, int]:
    """(total parameters, parameters replicated over tp) from a meta-device build."""
    from pretrain.model import LanguageModel

    with torch.device("meta"):
        model = LanguageModel(model_cfg)
    total = replicated = 0
    for name, p in model.named_parameters():  # named_parameters() yields a tied weight once
        total += p.numel()
        if name.endswith(REPLICATED_SUFFIXES) or name == "norm.weight":
            replicated += p.numel()
    return total, replicated


@dataclass
class ModelStateBytes:
    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def model_state_bytes(total_params: int, replicated_params: int, tp: int, dp_sp: int, zero_stage: int,
                      bf16: bool = True) -> ModelStateBytes:
    """Per-rank bytes of weights, gradients and optimizer state."""
    per_rank = (total_params - replicated_params) / tp + replicated_params
    w, g, o = (2, 2, 12) if bf16 else (4, 4, 8)
    return ModelStateBytes(
        weights=per_rank * w / (dp_sp if zero_stage >= 3 else 1),
        gradients=per_rank * g / (dp_sp if zero_stage >= 2 else 1),
        optimizer=per_rank * o / (dp_sp if zero_stage >= 1 else 1),
    )


def _swiglu_hidden(cfg) -> int:
    return cfg.mlp_multiple * math.ceil(cfg.mlp_ratio * cfg.d_model / cfg.mlp_multiple)


def layer_activation_bytes(cfg, mixer: str, seq_len: int, tp: int = 1, act_bytes: int = 2,
                           backend: str = "triton") -> tuple[float, float]:
    """(saved for backward, transient workspace) bytes per token of one block.

    backend: "triton" (the GPU kernels) or "torch" (the CPU references, what the tests measure).
    """
    from pretrain.registry import mixer_spec  # the registry imports this module for its formulas

    a, d = act_bytes, cfg.d_model
    f = _swiglu_hidden(cfg) / tp
    # norm1 + norm2 (fp32 x and x/rms), the MLP's input, gate/silu/up/product, the mixer's input
    saved = 2 * 8 * d + a * d + 4 * a * f + a * d
    spec = mixer_spec(mixer)
    mixer_saved, transient = spec.activation_bytes(cfg, spec.section_of(cfg), seq_len, tp, a, backend)
    return saved + mixer_saved, transient


def pararnn_activation_bytes(cfg, c, seq_len: int, tp: int, a: int, backend: str, *, cell: str):
    """(saved, transient) bytes per token of a ParaRNN mixer (cell "paragru" or "paralstm")."""
    D = int(c.expand * cfg.d_model) / tp
    s = 2 if cell == "paralstm" else 1               # state numbers per channel: h or (c, h)
    u_bytes = a if backend == "triton" else 4        # the reference solves on an fp32 copy of u
    saved = u_bytes * 3 * D + 4 * s * D              # pre-activations u, fp32 states
    if a != 4:
        saved += a * D                               # h in the model dtype for out_proj
    # Newton: h_prev, r, d, the gates and J (s x s per channel); backward: J, lambda, grad u
    transient = 4 * D * (s * 4 + s * s + 3) + a * 3 * D
    return saved, transient


def deltaproduct_activation_bytes(cfg, c, seq_len: int, tp: int, a: int, backend: str):
    """(saved, transient) bytes per token of a DeltaProduct mixer (section c)."""
    H, dk, nh = c.num_heads / tp, c.head_dim, c.num_householder
    dv = int(dk * c.expand_v)
    cq, ck, cv = H * dk, nh * H * dk, nh * H * dv
    saved = 0.0
    if c.use_short_conv:                             # each tap's shifted, masked input
        saved += a * 2 * (c.conv_size - 1) * (cq + ck + cv)
    saved += (4 + a) * (cq + ck) + a * cv             # L2-normalised q, k (fp32 in, a out), v
    saved += 4 * 4 * nh * H                          # beta, g and their gates (fp32, small)
    saved += 8 * H * dv + 3 * a * H * dv + a * H * dv  # o_norm, the output gate, out_proj input
    C = c.chunk_size
    chunk_heads_per_token = H * nh / C
    if backend == "torch":
        # autograd of deltaproduct_chunkwise keeps, per chunk and head (fp32), about 7 C x C
        # matrices (decay, masks, A, (I+A)^-1, QK^T...), 13 C x d (k, v, U, Wk, rhs, q...) and
        # 3 dk x dv (M, the chunk start states)
        saved += 4 * chunk_heads_per_token * (7 * C * C + 13 * C * (dk + dv) / 2 + 3 * dk * dv)
        # backward: recomputed Wk, W, chunk start states, dS, dW, and fp32 dq, dk, dv
        transient = 4 * H * (nh * (dk + 2 * dv) + 2 * (nh / C) * dk * dv + dk + nh * (dk + dv))
    else:
        s, transient = deltaproduct_triton_bytes(H, dk, dv, nh, min(C, 32) if a == 4 else C, a)
        saved += s
    return saved, transient


def attention_activation_bytes(cfg, c, seq_len: int, tp: int, a: int, backend: str):
    """(saved, transient) bytes per token of an attention mixer."""
    hd = cfg.d_model / tp
    saved = a * (3 * hd + hd + hd) + 4 * c.num_heads / tp  # q,k,v, out, out_proj in, lse
    if backend == "torch":
        saved += a * 3 * hd + (4 * seq_len if c.doc_mask else 0)  # SDPA's math path, mask
    return saved, a * 3 * hd


def deltaproduct_triton_bytes(H: float, dk: int, dv: int, nh: int, C: int, a: int) -> tuple[float, float]:
    """(saved, backward workspace) bytes per token of kernels/deltaproduct_triton.py's autograd
    Function beyond its inputs, for H heads, chunk C and a-byte inputs (a == 4: fp32 storage).

    Saved per sub-step (nh per token) and head: the blocked inverse Tm (C), Wk (dk), W (dv) in the
    storage dtype, the chunk-local gate cumsum (fp32); per chunk and head the start state (dk x dv);
    per sub-step the int32 segment ids. The backward allocates dW_local, dW, dWk (storage dtype),
    dK (fp32; twice for fp32 inputs, whose state part runs in its own kernel), the gate partials
    (fp32, one per key block of 64, twice for fp32), dgamma (fp32), the chunk-end state gradients
    and fp32-size dq/dk/dv/dbeta outputs in the inputs' dtype.
    """
    sub = nh  # sub-steps per token
    saved = sub * (H * (a * (C + dk + dv) + 4 + a * dk * dv / C) + 4)
    split = 2 if a == 4 else 1
    nk = -(-dk // 64)
    work = sub * H * (a * (2 * dv + dk) + 4 * dk * split + 4 * split * nk + 4 + a * dk * dv / C)
    work += a * H * dk + a * sub * H * (dk + dv + 1)  # dq, and dk/dv/dbeta over the sub-steps
    return saved, work


@dataclass
class ActivationBytes:
    saved: float         # kept for backward over the whole forward
    transient: float     # the largest one-layer workspace on top
    per_kind: dict       # mixer -> saved bytes of one such block

    @property
    def total(self) -> float:
        return self.saved + self.transient


def activation_bytes(cfg, micro_batch: int, seq_len: int, tp: int = 1, sp: int = 1, act_bytes: int = 2,
                     checkpointing: bool = False, backend: str = "triton") -> ActivationBytes:
    """Per-rank activation bytes of one micro-batch (micro_batch x seq_len/sp tokens)."""
    tokens = micro_batch * seq_len / sp
    m, a = cfg, act_bytes
    per_kind, saved, transient = {}, 0.0, 0.0
    for mixer in m.layer_mixers():
        s, t = layer_activation_bytes(m, mixer, seq_len, tp, a, backend)
        per_kind[mixer] = s * tokens
        transient = max(transient, t * tokens)
    # ids (int64), the final norm, the head's input, the loss's fp32 log-softmax over V/tp
    head = 8 + 8 * m.d_model + a * m.d_model + 4 * m.vocab_size / tp
    head_transient = 2 * 4 * m.vocab_size / tp  # the fp32 logits and their gradient
    transient = max(transient, head_transient * tokens)
    blocks = [per_kind[x] for x in m.layer_mixers()]
    if checkpointing:
        saved = len(blocks) * a * m.d_model * tokens + max(blocks)  # inputs + one recomputed block
    else:
        saved = sum(blocks)
    saved += head * tokens
    return ActivationBytes(saved=saved, transient=transient, per_kind=per_kind)
