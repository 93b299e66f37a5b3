"""Gated DeltaProduct in Triton: chunkwise WY/UT forward and backward, state in/out, resets.

Same math, shapes and conventions as kernels/deltaproduct.py (read its docstrings first): the n_h
Householder sub-steps of each token are interleaved into L = T·n_h sub-steps, cut into chunks of
C sub-steps; within a chunk, with γ = cumsum(g) and seg = cumsum(reset) (segment id),

    D_is  = e^{γ_i-γ_s} [s ≤ i] [seg_s = seg_i]       s0d_i = e^{γ_i} [seg_i = 0]
    A     = strictly-lower(diag(β) (K Kᵀ) ⊙ D),       Tm = (I + A)^{-1}  (forward substitution)
    U     = Tm diag(β) V,   Wk = Tm diag(β s0d) K,    W = U - Wk S0      (the effective updates)
    S_end = s0d_C S0 + Kdᵀ W,                          Kd = diag(D_{C,·}) K
    O     = scale (diag(s0d) Q S0 + (Q Kᵀ ⊙ D) W)      (Q zero except at each token's last sub-step)

Kernels (all fp32 inside; dots in IEEE fp32 for fp32 inputs, TF32 for bf16/fp16 inputs):
  _wy_fwd_kernel        per chunk: D, A, Tm, U, Wk                                 (parallel)
  _state_fwd_kernel     per (batch·head, dv-block): walks the chunks carrying S,
                        writes each chunk's start state, W and the final state      (sequential)
  _output_fwd_kernel    per chunk and dv-block: O, written at query positions only  (parallel)
  _state_bwd_kernel     per (batch·head, dv-block): walks the chunks backwards carrying dS,
                        writes dS at each chunk end, dW and d(initial_state)       (sequential)
  _chunk_bwd_kernel     per chunk: dq, dk, dv, dβ and dγ (recomputing D, A, Tm)    (parallel)

The backward recomputes the forward's chunk terms (one more _wy_fwd + _state_fwd pass) instead
of saving them, so the autograd graph holds only the inputs. Done in torch, O(L·H) elementwise:
the chunk-local cumsums γ and seg before the kernels, and after them dg = the chunk-local
reverse cumsum of dγ read at each token's first sub-step.

Reset: reset[b, t] zeroes the state before token t; it acts at t's first sub-step (seg bumps).
T·n_h need not be a multiple of C: the tail chunk reads zeros (k = v = β = 0, g = 0), which
leave the state unchanged.

Dot shapes: Triton needs every dot dimension ≥ 16, so C, dk and dv must be ≥ 16 (dk and dv are
padded to powers of two internally and masked).
"""

import torch
import triton
import triton.language as tl

__all__ = ["deltaproduct_triton"]


# ---------------------------------------------------------------------------------------------
# Shared pieces


@triton.jit
def _decay(gamma, seg, C: tl.constexpr):
    """D (C×C intra-chunk decay and segment mask) and s0d (decay from the chunk start)."""
    rows = tl.arange(0, C)
    incl = (rows[:, None] >= rows[None, :]) & (seg[:, None] == seg[None, :])
    # exp of masked differences γ_i - γ_s ≤ 0 only: nothing overflows.
    D = tl.where(incl, tl.exp(tl.where(incl, gamma[:, None] - gamma[None, :], 0.0)), 0.0)
    s0d = tl.where(seg == 0, tl.exp(gamma), 0.0)
    return D, s0d


@triton.jit
def _last_row_decay(gamma, seg, gamma_last, seg_last):
    """D's last row e^{γ_C-γ_s}[seg_s = seg_C] and s0d_C = e^{γ_C}[seg_C = 0]."""
    dlast = tl.where(seg == seg_last, tl.exp(tl.where(seg == seg_last, gamma_last - gamma, 0.0)), 0.0)
    s0last = tl.where(seg_last == 0, tl.exp(gamma_last), 0.0)
    return dlast, s0last


@triton.jit
def _unit_lower_inverse(A, C: tl.constexpr):
    """(I + A)^{-1} for strictly lower A, by forward substitution: Tm_i = e_i - Σ_{j<i} A_ij Tm_j."""
    rows = tl.arange(0, C)
    Tm = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    for i in range(1, C):
        a_i = tl.sum(tl.where(rows[:, None] == i, A, 0.0), axis=0)  # row i of A (zero for j ≥ i)
        t_i = tl.where(rows == i, 1.0, 0.0) - tl.sum(a_i[:, None] * Tm, axis=0)
        Tm = tl.where(rows[:, None] == i, t_i[None, :], Tm)
    return Tm


@triton.jit
def _load_chunk_k(k_ptr, b, h, p, valid, d, L, H: tl.constexpr, DK: tl.constexpr):
    """K rows [C, BK] of sub-steps p; k is [B, T, n_h, H, dk] = [B, L, H, dk] contiguous."""
    ptr = k_ptr + b * L * H * DK + p[:, None] * (H * DK) + h * DK + d[None, :]
    return tl.load(ptr, mask=valid[:, None] & (d[None, :] < DK), other=0.0).to(tl.float32)


@triton.jit
def _load_chunk_q(q_ptr, b, h, p, is_q, d, T, NH: tl.constexpr, H: tl.constexpr, DK: tl.constexpr):
    """Q rows [C, BK]: token p // n_h's query at its last sub-step, zero elsewhere."""
    t = p // NH
    ptr = q_ptr + b * T * H * DK + t[:, None] * (H * DK) + h * DK + d[None, :]
    return tl.load(ptr, mask=is_q[:, None] & (d[None, :] < DK), other=0.0).to(tl.float32)


# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _wy_fwd_kernel(k_ptr, v_ptr, beta_ptr, gamma_ptr, seg_ptr, u_ptr, wk_ptr, L, Lp,
                   H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                   BK: tl.constexpr, BVF: tl.constexpr, PREC: tl.constexpr):
    pid_c, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), pid_bh % H
    p = pid_c * C + tl.arange(0, C)
    valid = p < L
    dk_i, dv_i = tl.arange(0, BK), tl.arange(0, BVF)
    K = _load_chunk_k(k_ptr, b, h, p, valid, dk_i, L, H, DK)
    V = tl.load(v_ptr + b * L * H * DV + p[:, None] * (H * DV) + h * DV + dv_i[None, :],
                mask=valid[:, None] & (dv_i[None, :] < DV), other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + b * L * H + p * H + h, mask=valid, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + pid_bh.to(tl.int64) * Lp + p)
    seg = tl.load(seg_ptr + b * Lp + p)

    D, s0d = _decay(gamma, seg, C)
    rows = tl.arange(0, C)
    KK = tl.dot(K, tl.trans(K), input_precision=PREC)
    A = tl.where(rows[:, None] > rows[None, :], beta[:, None] * KK * D, 0.0)
    Tm = _unit_lower_inverse(A, C)
    U = tl.dot(Tm, beta[:, None] * V, input_precision=PREC)
    Wk = tl.dot(Tm, (beta * s0d)[:, None] * K, input_precision=PREC)

    base = pid_bh.to(tl.int64) * Lp
    tl.store(u_ptr + (base + p[:, None]) * DV + dv_i[None, :], U, mask=dv_i[None, :] < DV)
    tl.store(wk_ptr + (base + p[:, None]) * DK + dk_i[None, :], Wk, mask=dk_i[None, :] < DK)


@triton.jit
def _state_fwd_kernel(k_ptr, u_ptr, wk_ptr, gamma_ptr, seg_ptr, s0_ptr, sstart_ptr, w_ptr,
                      final_ptr, L, Lp, NC,
                      H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr,
                      PREC: tl.constexpr):
    """S_{c+1} = s0d_C S_c + Kdᵀ (U - Wk S_c), for one dv-block of one (batch, head)."""
    pid_bh, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), pid_bh % H
    bh = pid_bh.to(tl.int64)
    dk_i = tl.arange(0, BK)
    dv_i = pid_v * BV + tl.arange(0, BV)
    s_mask = (dk_i[:, None] < DK) & (dv_i[None, :] < DV)
    s_off = dk_i[:, None] * DV + dv_i[None, :]
    if HAS_INIT:
        S = tl.load(s0_ptr + bh * DK * DV + s_off, mask=s_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(NC):
        tl.store(sstart_ptr + (bh * NC + c) * DK * DV + s_off, S, mask=s_mask)
        p = c * C + tl.arange(0, C)
        valid = p < L
        K = _load_chunk_k(k_ptr, b, h, p, valid, dk_i, L, H, DK)
        Wk = tl.load(wk_ptr + (bh * Lp + p[:, None]) * DK + dk_i[None, :],
                     mask=dk_i[None, :] < DK, other=0.0)
        U = tl.load(u_ptr + (bh * Lp + p[:, None]) * DV + dv_i[None, :],
                    mask=dv_i[None, :] < DV, other=0.0)
        W = U - tl.dot(Wk, S, input_precision=PREC)
        tl.store(w_ptr + (bh * Lp + p[:, None]) * DV + dv_i[None, :], W, mask=dv_i[None, :] < DV)
        gamma = tl.load(gamma_ptr + bh * Lp + p)
        seg = tl.load(seg_ptr + b * Lp + p)
        gamma_last = tl.load(gamma_ptr + bh * Lp + c * C + C - 1)
        seg_last = tl.load(seg_ptr + b * Lp + c * C + C - 1)
        dlast, s0last = _last_row_decay(gamma, seg, gamma_last, seg_last)
        S = s0last * S + tl.dot(tl.trans(dlast[:, None] * K), W, input_precision=PREC)
    tl.store(final_ptr + bh * DK * DV + s_off, S, mask=s_mask)


@triton.jit
def _output_fwd_kernel(q_ptr, k_ptr, gamma_ptr, seg_ptr, sstart_ptr, w_ptr, o_ptr, scale,
                       T, L, Lp, NC,
                       NH: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """O = scale (diag(s0d) Q S0 + (Q Kᵀ ⊙ D) W), stored at each token's last sub-step."""
    pid_c, pid_bh, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (pid_bh // H).to(tl.int64), pid_bh % H
    bh = pid_bh.to(tl.int64)
    p = pid_c * C + tl.arange(0, C)
    valid = p < L
    is_q = valid & (p % NH == NH - 1)
    dk_i = tl.arange(0, BK)
    dv_i = pid_v * BV + tl.arange(0, BV)
    Q = _load_chunk_q(q_ptr, b, h, p, is_q, dk_i, T, NH, H, DK)
    K = _load_chunk_k(k_ptr, b, h, p, valid, dk_i, L, H, DK)
    gamma = tl.load(gamma_ptr + bh * Lp + p)
    seg = tl.load(seg_ptr + b * Lp + p)
    D, s0d = _decay(gamma, seg, C)
    S0 = tl.load(sstart_ptr + (bh * NC + pid_c) * DK * DV + dk_i[:, None] * DV + dv_i[None, :],
                 mask=(dk_i[:, None] < DK) & (dv_i[None, :] < DV), other=0.0)
    W = tl.load(w_ptr + (bh * Lp + p[:, None]) * DV + dv_i[None, :], mask=dv_i[None, :] < DV,
                other=0.0)
    P = tl.dot(Q, tl.trans(K), input_precision=PREC) * D
    O = scale * (s0d[:, None] * tl.dot(Q, S0, input_precision=PREC)
                 + tl.dot(P, W, input_precision=PREC))
    t = p // NH
    tl.store(o_ptr + b * T * H * DV + t[:, None] * (H * DV) + h * DV + dv_i[None, :],
             O.to(o_ptr.dtype.element_ty), mask=is_q[:, None] & (dv_i[None, :] < DV))


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _state_bwd_kernel(q_ptr, k_ptr, wk_ptr, gamma_ptr, seg_ptr, do_ptr, dfinal_ptr, dsend_ptr,
                      dw_ptr, ds0_ptr, scale, T, L, Lp, NC,
                      NH: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      HAS_DFINAL: tl.constexpr, PREC: tl.constexpr):
    """Reverse walk: dW = scale Pᵀ dO + Kd dS_end;  dS_start = s0d_C dS_end
    + scale Qᵀ diag(s0d) dO - Wkᵀ dW  (= Mᵀ dS_end + scale Q_effᵀ dO)."""
    pid_bh, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), pid_bh % H
    bh = pid_bh.to(tl.int64)
    dk_i = tl.arange(0, BK)
    dv_i = pid_v * BV + tl.arange(0, BV)
    s_mask = (dk_i[:, None] < DK) & (dv_i[None, :] < DV)
    s_off = dk_i[:, None] * DV + dv_i[None, :]
    if HAS_DFINAL:
        dS = tl.load(dfinal_ptr + bh * DK * DV + s_off, mask=s_mask, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(NC):
        c = NC - 1 - i
        tl.store(dsend_ptr + (bh * NC + c) * DK * DV + s_off, dS, mask=s_mask)
        p = c * C + tl.arange(0, C)
        valid = p < L
        is_q = valid & (p % NH == NH - 1)
        Q = _load_chunk_q(q_ptr, b, h, p, is_q, dk_i, T, NH, H, DK)
        K = _load_chunk_k(k_ptr, b, h, p, valid, dk_i, L, H, DK)
        t = p // NH
        dO = tl.load(do_ptr + b * T * H * DV + t[:, None] * (H * DV) + h * DV + dv_i[None, :],
                     mask=is_q[:, None] & (dv_i[None, :] < DV), other=0.0).to(tl.float32)
        Wk = tl.load(wk_ptr + (bh * Lp + p[:, None]) * DK + dk_i[None, :],
                     mask=dk_i[None, :] < DK, other=0.0)
        gamma = tl.load(gamma_ptr + bh * Lp + p)
        seg = tl.load(seg_ptr + b * Lp + p)
        gamma_last = tl.load(gamma_ptr + bh * Lp + c * C + C - 1)
        seg_last = tl.load(seg_ptr + b * Lp + c * C + C - 1)
        D, s0d = _decay(gamma, seg, C)
        dlast, s0last = _last_row_decay(gamma, seg, gamma_last, seg_last)
        P = tl.dot(Q, tl.trans(K), input_precision=PREC) * D
        dW = scale * tl.dot(tl.trans(P), dO, input_precision=PREC) \
            + tl.dot(dlast[:, None] * K, dS, input_precision=PREC)
        tl.store(dw_ptr + (bh * Lp + p[:, None]) * DV + dv_i[None, :], dW, mask=dv_i[None, :] < DV)
        dS = s0last * dS + scale * tl.dot(tl.trans(Q), s0d[:, None] * dO, input_precision=PREC) \
            - tl.dot(tl.trans(Wk), dW, input_precision=PREC)
    tl.store(ds0_ptr + bh * DK * DV + s_off, dS, mask=s_mask)


@triton.jit
def _chunk_bwd_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, gamma_ptr, seg_ptr, do_ptr, sstart_ptr,
                      dsend_ptr, w_ptr, dw_ptr, dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dgamma_ptr,
                      scale, T, L, Lp, NC,
                      NH: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      C: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr, PREC: tl.constexpr):
    """Given S0, dS_end, W and dW of a chunk: the gradients of its q, k, v, β and γ.

    W = Tm R with R = diag(β)(V - diag(s0d) K S0), so dR = Tmᵀ dW and dA = -dR Wᵀ (strictly
    lower); A = diag(β)(K Kᵀ) ⊙ D; P = Q Kᵀ ⊙ D with dP = scale dO Wᵀ; S_end = s0d_C S0 + Kdᵀ W.
    """
    pid_c, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), pid_bh % H
    bh = pid_bh.to(tl.int64)
    p = pid_c * C + tl.arange(0, C)
    rows = tl.arange(0, C)
    valid = p < L
    is_q = valid & (p % NH == NH - 1)
    t = p // NH
    dk_i, dv_i = tl.arange(0, BK), tl.arange(0, BVF)
    kmask, vmask = dk_i[None, :] < DK, dv_i[None, :] < DV
    Q = _load_chunk_q(q_ptr, b, h, p, is_q, dk_i, T, NH, H, DK)
    K = _load_chunk_k(k_ptr, b, h, p, valid, dk_i, L, H, DK)
    V = tl.load(v_ptr + b * L * H * DV + p[:, None] * (H * DV) + h * DV + dv_i[None, :],
                mask=valid[:, None] & vmask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + b * L * H + p * H + h, mask=valid, other=0.0).to(tl.float32)
    dO = tl.load(do_ptr + b * T * H * DV + t[:, None] * (H * DV) + h * DV + dv_i[None, :],
                 mask=is_q[:, None] & vmask, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + bh * Lp + p)
    seg = tl.load(seg_ptr + b * Lp + p)
    gamma_last = tl.load(gamma_ptr + bh * Lp + pid_c * C + C - 1)
    seg_last = tl.load(seg_ptr + b * Lp + pid_c * C + C - 1)
    s_off = dk_i[:, None] * DV + dv_i[None, :]
    s_mask = (dk_i[:, None] < DK) & vmask
    S0 = tl.load(sstart_ptr + (bh * NC + pid_c) * DK * DV + s_off, mask=s_mask, other=0.0)
    dSe = tl.load(dsend_ptr + (bh * NC + pid_c) * DK * DV + s_off, mask=s_mask, other=0.0)
    W = tl.load(w_ptr + (bh * Lp + p[:, None]) * DV + dv_i[None, :], mask=vmask, other=0.0)
    dW = tl.load(dw_ptr + (bh * Lp + p[:, None]) * DV + dv_i[None, :], mask=vmask, other=0.0)

    D, s0d = _decay(gamma, seg, C)
    dlast, s0last = _last_row_decay(gamma, seg, gamma_last, seg_last)
    strict = rows[:, None] > rows[None, :]
    KK = tl.dot(K, tl.trans(K), input_precision=PREC)
    Tm = _unit_lower_inverse(tl.where(strict, beta[:, None] * KK * D, 0.0), C)

    # Through R = diag(β)(V - diag(s0d) K S0).
    dR = tl.dot(tl.trans(Tm), dW, input_precision=PREC)
    KS0 = tl.dot(K, S0, input_precision=PREC)
    dV = beta[:, None] * dR
    dbeta = tl.sum(dR * (V - s0d[:, None] * KS0), axis=1)
    dK = -(beta * s0d)[:, None] * tl.dot(dR, tl.trans(S0), input_precision=PREC)
    ds0d = -beta * tl.sum(KS0 * dR, axis=1)

    # Through Tm = (I + A)^{-1}: dA = -dR Wᵀ on the strict lower part.
    dA = tl.where(strict, -tl.dot(dR, tl.trans(W), input_precision=PREC), 0.0)
    dbeta += tl.sum(dA * KK * D, axis=1)
    G = dA * D * beta[:, None]
    dK += tl.dot(G, K, input_precision=PREC) + tl.dot(tl.trans(G), K, input_precision=PREC)
    dD = dA * beta[:, None] * KK

    # Through O = scale (diag(s0d) Q S0 + (Q Kᵀ ⊙ D) W).
    dP = scale * tl.dot(dO, tl.trans(W), input_precision=PREC)
    dPD = dP * D
    dQ = tl.dot(dPD, K, input_precision=PREC) \
        + scale * s0d[:, None] * tl.dot(dO, tl.trans(S0), input_precision=PREC)
    dK += tl.dot(tl.trans(dPD), Q, input_precision=PREC)
    dD += dP * tl.dot(Q, tl.trans(K), input_precision=PREC)
    ds0d += scale * tl.sum(tl.dot(Q, S0, input_precision=PREC) * dO, axis=1)

    # Through S_end = s0d_C S0 + (diag(dlast) K)ᵀ W.
    dKd = tl.dot(W, tl.trans(dSe), input_precision=PREC)
    dK += dlast[:, None] * dKd
    ddlast = tl.sum(K * dKd, axis=1)
    ds0last = tl.sum(tl.sum(S0 * dSe, axis=1), axis=0)

    # γ enters as e^{γ_i-γ_s} (D, dlast) and e^{γ_i} (s0d, s0d_C).
    E = dD * D
    last_terms = tl.sum(ddlast * dlast, axis=0) + ds0last * s0last
    dgamma = tl.sum(E, axis=1) - tl.sum(E, axis=0) + ds0d * s0d - ddlast * dlast \
        + tl.where(rows == C - 1, last_terms, 0.0)

    tl.store(dq_ptr + b * T * H * DK + t[:, None] * (H * DK) + h * DK + dk_i[None, :], dQ,
             mask=is_q[:, None] & kmask)
    tl.store(dk_ptr + b * L * H * DK + p[:, None] * (H * DK) + h * DK + dk_i[None, :], dK,
             mask=valid[:, None] & kmask)
    tl.store(dv_ptr + b * L * H * DV + p[:, None] * (H * DV) + h * DV + dv_i[None, :], dV,
             mask=valid[:, None] & vmask)
    tl.store(dbeta_ptr + b * L * H + p * H + h, dbeta, mask=valid)
    tl.store(dgamma_ptr + bh * Lp + p, dgamma)


# ---------------------------------------------------------------------------------------------
# Host side


def _gate_and_segments(g, reset, B, T, n_h, H, C, device):
    """γ [B,H,Lp] fp32 (chunk-local cumsum of the sub-step gates) and seg [B,Lp] int32."""
    L = T * n_h
    NC = -(-L // C)
    Lp = NC * C
    if g is None:
        gamma = torch.zeros(B, H, Lp, dtype=torch.float32, device=device)
    else:
        g_sub = torch.zeros(B, T, n_h, H, dtype=torch.float32, device=device)
        g_sub[:, :, 0] = g.float()
        g_sub = torch.nn.functional.pad(g_sub.reshape(B, L, H), (0, 0, 0, Lp - L))
        gamma = g_sub.view(B, NC, C, H).cumsum(2).permute(0, 3, 1, 2).reshape(B, H, Lp)
        gamma = gamma.contiguous()
    if reset is None:
        seg = torch.zeros(B, Lp, dtype=torch.int32, device=device)
    else:
        r_sub = torch.zeros(B, T, n_h, dtype=torch.int32, device=device)
        r_sub[:, :, 0] = reset.to(torch.int32)
        r_sub = torch.nn.functional.pad(r_sub.reshape(B, L), (0, Lp - L))
        seg = r_sub.view(B, NC, C).cumsum(2, dtype=torch.int32).reshape(B, Lp).contiguous()
    return gamma, seg


def _pow2(n):
    return max(16, triton.next_power_of_2(n))


class _Launch:
    """Sizes and launch parameters of one call."""

    def __init__(self, q, k, v, C):
        self.B, self.T, self.n_h, self.H, self.dk = k.shape
        self.dv = v.shape[-1]
        self.C = C
        self.L = self.T * self.n_h
        self.NC = -(-self.L // C)
        self.Lp = self.NC * C
        self.BK, self.BVF = _pow2(self.dk), _pow2(self.dv)
        self.BV = min(self.BVF, 64 if self.BK <= 128 else 32)
        # IEEE fp32 dots for fp32 inputs (exact tests); TF32 for half inputs, whose own
        # rounding (8-11 mantissa bits) dominates TF32's 10.
        self.prec = "ieee" if q.dtype == torch.float32 else "tf32"
        self.consts = dict(H=self.H, DK=self.dk, C=C, BK=self.BK, PREC=self.prec)


def _forward_terms(q, k, v, beta, gamma, seg, initial_state, lc):
    """Run the WY and state kernels; return (Wk, S_start, W, final_state), all fp32."""
    f32 = dict(dtype=torch.float32, device=k.device)
    B, H, Lp, NC = lc.B, lc.H, lc.Lp, lc.NC
    U = torch.empty(B, H, Lp, lc.dv, **f32)
    Wk = torch.empty(B, H, Lp, lc.dk, **f32)
    _wy_fwd_kernel[(NC, B * H)](k, v, beta, gamma, seg, U, Wk, lc.L, Lp, DV=lc.dv, BVF=lc.BVF,
                                num_warps=8, **lc.consts)
    S_start = torch.empty(B, H, NC, lc.dk, lc.dv, **f32)
    W = torch.empty(B, H, Lp, lc.dv, **f32)
    final = torch.empty(B, H, lc.dk, lc.dv, **f32)
    s0 = initial_state.contiguous() if initial_state is not None else final
    _state_fwd_kernel[(B * H, triton.cdiv(lc.dv, lc.BV))](
        k, U, Wk, gamma, seg, s0, S_start, W, final, lc.L, Lp, NC, DV=lc.dv, BV=lc.BV,
        HAS_INIT=initial_state is not None, **lc.consts)
    return Wk, S_start, W, final


class DeltaProductTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, reset, scale, chunk_size):
        q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
        lc = _Launch(q, k, v, chunk_size)
        gamma, seg = _gate_and_segments(g, reset, lc.B, lc.T, lc.n_h, lc.H, chunk_size, k.device)
        _, S_start, W, final = _forward_terms(q, k, v, beta, gamma, seg, initial_state, lc)
        o = torch.empty(lc.B, lc.T, lc.H, lc.dv, dtype=q.dtype, device=q.device)
        _output_fwd_kernel[(lc.NC, lc.B * lc.H, triton.cdiv(lc.dv, lc.BV))](
            q, k, gamma, seg, S_start, W, o, scale, lc.T, lc.L, lc.Lp, lc.NC, NH=lc.n_h,
            DV=lc.dv, BV=lc.BV, **lc.consts)
        ctx.save_for_backward(q, k, v, beta, g, initial_state, reset)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, beta, g, initial_state, reset = ctx.saved_tensors
        scale, C = ctx.scale, ctx.chunk_size
        lc = _Launch(q, k, v, C)
        B, T, n_h, H, L, Lp, NC = lc.B, lc.T, lc.n_h, lc.H, lc.L, lc.Lp, lc.NC
        gamma, seg = _gate_and_segments(g, reset, B, T, n_h, H, C, k.device)
        # Recompute the forward's chunk terms rather than keeping them alive between passes.
        Wk, S_start, W, _ = _forward_terms(q, k, v, beta, gamma, seg, initial_state, lc)

        f32 = dict(dtype=torch.float32, device=k.device)
        do = do.contiguous() if do is not None else torch.zeros(B, T, H, lc.dv, **f32)
        dS_end = torch.empty(B, H, NC, lc.dk, lc.dv, **f32)
        dW = torch.empty(B, H, Lp, lc.dv, **f32)
        ds0 = torch.empty(B, H, lc.dk, lc.dv, **f32)
        has_dfinal = dfinal is not None
        _state_bwd_kernel[(B * H, triton.cdiv(lc.dv, lc.BV))](
            q, k, Wk, gamma, seg, do, dfinal.contiguous() if has_dfinal else ds0, dS_end, dW, ds0,
            scale, T, L, Lp, NC, NH=n_h, DV=lc.dv, BV=lc.BV, HAS_DFINAL=has_dfinal, **lc.consts)

        dq = torch.zeros(B, T, H, lc.dk, **f32)  # written at query rows only: all rows covered
        dk = torch.empty(B, T, n_h, H, lc.dk, **f32)
        dv = torch.empty(B, T, n_h, H, lc.dv, **f32)
        dbeta = torch.empty(B, T, n_h, H, **f32)
        dgamma = torch.empty(B, H, Lp, **f32)
        _chunk_bwd_kernel[(NC, B * H)](
            q, k, v, beta, gamma, seg, do, S_start, dS_end, W, dW, dq, dk, dv, dbeta, dgamma,
            scale, T, L, Lp, NC, NH=n_h, DV=lc.dv, BVF=lc.BVF, num_warps=8, **lc.consts)

        dg = None
        if g is not None:
            # γ = chunk-local cumsum of the sub-step gates -> dg_sub = chunk-local reverse cumsum.
            dg_sub = dgamma.view(B, H, NC, C).flip(-1).cumsum(-1).flip(-1).reshape(B, H, Lp)
            dg = dg_sub[:, :, :L].reshape(B, H, T, n_h)[..., 0].transpose(1, 2).to(g.dtype)
        ds0_out = ds0.to(initial_state.dtype) if initial_state is not None else None
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype), dg,
                ds0_out, None, None, None)


def deltaproduct_triton(q, k, v, beta, g=None, scale=None, initial_state=None, reset=None,
                        chunk_size=64):
    """Gated DeltaProduct through the Triton kernels; same contract as deltaproduct_chunkwise.

    Shapes are checked by the caller (kernels.deltaproduct.deltaproduct). Returns
    (o [B,T,H,dv] in q's dtype, final_state [B,H,dk,dv] fp32).
    """
    dk, dv = k.shape[-1], v.shape[-1]
    if chunk_size < 16 or chunk_size & (chunk_size - 1) or dk < 16 or dv < 16:
        raise ValueError(
            f"the Triton DeltaProduct needs chunk_size a power of two >= 16 and dk, dv >= 16; "
            f"got chunk_size={chunk_size}, dk={dk}, dv={dv}")
    scale = dk**-0.5 if scale is None else float(scale)
    return DeltaProductTritonFunction.apply(q, k, v, beta, g, initial_state, reset, scale,
                                            chunk_size)
