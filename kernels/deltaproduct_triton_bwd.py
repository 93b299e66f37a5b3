"""Gated DeltaProduct backward kernels (Triton), in the structure of flash-linear-attention's
chunk_gated_delta_rule backward. Notation: kernels/deltaproduct_triton_fwd.py.

Given dO (at the query rows) and dS_final, with g_c := ∂L/∂S_{c+1} (the gradient reaching the end
of chunk c from everything after it):

  dv_local_kernel   per (chunk, batch·head):  dW_loc = scale (Q Kᵀ ⊙ D_q)ᵀ dO      (parallel)
  state_bwd_kernel  per (batch·head, dv block), chunks in reverse:                 (sequential)
                        dW_c    = dW_loc + Kd g_c                   (stored: dU of the WY form)
                        g_{c-1} = a_c g_c + scale Qᵀ diag(s0d_q) dO - Wkᵀ dW_c
                    storing g_c per chunk and g_{-1} = d(initial state)
  dq_kernel         per (dk block, chunk, batch·head), looping over dv blocks:     (parallel)
                        dQ  = scale (diag(s0d_q) dO S_cᵀ + (dO Wᵀ ⊙ D_q) K)
                        dK ∋ scale (dO Wᵀ ⊙ D_q)ᵀ Q,  and γ's gradient through D_q, s0d_q
                    and (16-bit inputs, STATE) in the same pass over the dv blocks:
                        dK ∋ diag(dlast) W g_cᵀ,  dWk = -dW_c S_cᵀ,  γ through dlast and a
  dkw_kernel        that state part in a kernel of its own, for fp32 inputs (registers)
  wy_bwd_kernel     per (chunk, batch·head): through U = Tm diag(β) V, Wk = Tm diag(β s0d) K and
                    Tm = (I + A)^{-1} (the inverse saved by the forward):
                        dA = -Tmᵀ dTm Tmᵀ = -(Tmᵀ dU Uᵀ + Tmᵀ dWk Wkᵀ)   (strictly lower)
                    then dk, dv, dβ, dγ in full.

Every γ-gradient is "∂L/∂γ_i" of the chunk-local cumsum; the host turns it into dg.
"""

import triton
import triton.language as tl

from kernels.deltaproduct_triton_fwd import (chunk_gates, last_row_decay, load_rows, mm, mma,
                                             query_decay, query_rows, state_block_load,
                                             state_block_store, store_rows)


@triton.jit
def dv_local_kernel(q_ptr, k_ptr, gamma_ptr, seg_ptr, do_ptr, dwl_ptr, scale, T, L, Lp,
                    NH: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                    C: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    PREC: tl.constexpr):
    """dW_loc = scale Pᵀ dO with P = Q Kᵀ ⊙ D_q: the outputs' direct dependence on W."""
    c, bh = tl.program_id(0), tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    bh = bh.to(tl.int64)
    rows = tl.arange(0, C)
    p = c * C + rows
    t, iq, qvalid = query_rows(c, T, C, NH, R)
    QK = tl.zeros([R, C], dtype=tl.float32)
    for kb in range(0, DK, BK):
        cols = kb + tl.arange(0, BK)
        Q = load_rows(q_ptr, b * T * H * DK + h * DK, t, H * DK, qvalid, cols, DK)
        K = load_rows(k_ptr, b * L * H * DK + h * DK, p, H * DK, p < L, cols, DK)
        QK = mma(Q, tl.trans(K), QK, PREC)
    gamma, seg = chunk_gates(gamma_ptr, seg_ptr, bh, b, c, Lp, C)
    Dq, s0q = query_decay(gamma_ptr, seg_ptr, gamma, seg, iq, qvalid, bh, b, c, Lp, C)
    SD: tl.constexpr = dwl_ptr.dtype.element_ty
    Pt = tl.trans(QK * Dq).to(SD)
    for vb in range(0, DV, BV):
        cols = vb + tl.arange(0, BV)
        dO = load_rows(do_ptr, b * T * H * DV + h * DV, t, H * DV, qvalid, cols, DV)
        dWl = scale * mm(Pt, dO.to(SD), PREC)
        store_rows(dwl_ptr, bh * Lp * DV, p, DV, rows < C, cols, DV, dWl)


@triton.jit
def state_bwd_kernel(q_ptr, k_ptr, wk_ptr, gamma_ptr, seg_ptr, do_ptr, dwl_ptr, dfinal_ptr,
                     dsend_ptr, dw_ptr, ds0_ptr, scale, T, L, Lp, NC,
                     NH: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                     C: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     HAS_DFINAL: tl.constexpr, PREC: tl.constexpr):
    """The reverse walk: dS carried in fp32 as up to four blocks of BK rows (as the forward's S),
    entering the dots rounded to the states' storage dtype."""
    bh, pid_v = tl.program_id(0), tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    bh = bh.to(tl.int64)
    NS: tl.constexpr = triton.cdiv(DK, BK)
    SD: tl.constexpr = dw_ptr.dtype.element_ty
    XD: tl.constexpr = dsend_ptr.dtype.element_ty
    kc = tl.arange(0, BK)  # the columns of row block j of dS are j·kc1
    kc1, kc2, kc3 = BK + kc, 2 * BK + kc, 3 * BK + kc
    wkb = bh * Lp * DK
    vcols = pid_v * BV + tl.arange(0, BV)
    rows = tl.arange(0, C)
    s0b = bh * DK * DV
    if HAS_DFINAL:
        G0 = state_block_load(dfinal_ptr, s0b, 0, vcols, DK, DV, BK)
        if NS >= 2:
            G1 = state_block_load(dfinal_ptr, s0b, 1, vcols, DK, DV, BK)
        if NS >= 3:
            G2 = state_block_load(dfinal_ptr, s0b, 2, vcols, DK, DV, BK)
        if NS >= 4:
            G3 = state_block_load(dfinal_ptr, s0b, 3, vcols, DK, DV, BK)
    else:
        G0 = tl.zeros([BK, BV], dtype=tl.float32)
        if NS >= 2:
            G1 = tl.zeros([BK, BV], dtype=tl.float32)
        if NS >= 3:
            G2 = tl.zeros([BK, BV], dtype=tl.float32)
        if NS >= 4:
            G3 = tl.zeros([BK, BV], dtype=tl.float32)
    krow0 = b * L * H * DK + h * DK
    qrow0 = b * T * H * DK + h * DK
    for i in range(NC):
        c = NC - 1 - i
        sb = (bh * NC + c) * DK * DV
        p = c * C + rows
        kvalid = p < L
        # dW = dW_loc + diag(dlast) K g_c, g_c = ∂L/∂S_{c+1} (the blocks G0..G3)
        state_block_store(dsend_ptr, sb, 0, vcols, G0, DK, DV, BK)
        KG = mm(load_rows(k_ptr, krow0, p, H * DK, kvalid, kc, DK), G0.to(XD), PREC)
        if NS >= 2:
            state_block_store(dsend_ptr, sb, 1, vcols, G1, DK, DV, BK)
            KG = mma(load_rows(k_ptr, krow0, p, H * DK, kvalid, kc1, DK), G1.to(XD), KG, PREC)
        if NS >= 3:
            state_block_store(dsend_ptr, sb, 2, vcols, G2, DK, DV, BK)
            KG = mma(load_rows(k_ptr, krow0, p, H * DK, kvalid, kc2, DK), G2.to(XD), KG, PREC)
        if NS >= 4:
            state_block_store(dsend_ptr, sb, 3, vcols, G3, DK, DV, BK)
            KG = mma(load_rows(k_ptr, krow0, p, H * DK, kvalid, kc3, DK), G3.to(XD), KG, PREC)
        gamma, seg = chunk_gates(gamma_ptr, seg_ptr, bh, b, c, Lp, C)
        dlast, a = last_row_decay(gamma_ptr, seg_ptr, gamma, seg, bh, b, c, Lp, C)
        dWl = load_rows(dwl_ptr, bh * Lp * DV, p, DV, rows < C, vcols, DV)
        dWf = dWl.to(tl.float32) + dlast[:, None] * KG
        store_rows(dw_ptr, bh * Lp * DV, p, DV, rows < C, vcols, DV, dWf)
        # g_{c-1} = a g_c + scale Qᵀ diag(s0d_q) dO - Wkᵀ dW
        t, iq, qvalid = query_rows(c, T, C, NH, R)
        sq = tl.load(seg_ptr + b * Lp + c * C + iq, mask=qvalid, other=1)
        gq = tl.load(gamma_ptr + bh * Lp + c * C + iq, mask=qvalid, other=0.0)
        s0q = tl.where(qvalid & (sq == 0), tl.exp(gq), 0.0)
        dOs = (scale * s0q[:, None] * load_rows(do_ptr, b * T * H * DV + h * DV, t, H * DV, qvalid,
                                                vcols, DV).to(tl.float32)).to(XD)
        mW = (-dWf).to(SD)  # -dW as stored (negated in fp32: the interpreter's bf16 is raw bits)
        G0 = mma(tl.trans(load_rows(q_ptr, qrow0, t, H * DK, qvalid, kc, DK)), dOs, a * G0, PREC)
        G0 = mma(tl.trans(load_rows(wk_ptr, wkb, p, DK, rows < C, kc, DK)), mW, G0, PREC)
        if NS >= 2:
            G1 = mma(tl.trans(load_rows(q_ptr, qrow0, t, H * DK, qvalid, kc1, DK)), dOs, a * G1, PREC)
            G1 = mma(tl.trans(load_rows(wk_ptr, wkb, p, DK, rows < C, kc1, DK)), mW, G1, PREC)
        if NS >= 3:
            G2 = mma(tl.trans(load_rows(q_ptr, qrow0, t, H * DK, qvalid, kc2, DK)), dOs, a * G2, PREC)
            G2 = mma(tl.trans(load_rows(wk_ptr, wkb, p, DK, rows < C, kc2, DK)), mW, G2, PREC)
        if NS >= 4:
            G3 = mma(tl.trans(load_rows(q_ptr, qrow0, t, H * DK, qvalid, kc3, DK)), dOs, a * G3, PREC)
            G3 = mma(tl.trans(load_rows(wk_ptr, wkb, p, DK, rows < C, kc3, DK)), mW, G3, PREC)
    state_block_store(ds0_ptr, s0b, 0, vcols, G0, DK, DV, BK)
    if NS >= 2:
        state_block_store(ds0_ptr, s0b, 1, vcols, G1, DK, DV, BK)
    if NS >= 3:
        state_block_store(ds0_ptr, s0b, 2, vcols, G2, DK, DV, BK)
    if NS >= 4:
        state_block_store(ds0_ptr, s0b, 3, vcols, G3, DK, DV, BK)


@triton.jit
def dq_kernel(q_ptr, k_ptr, gamma_ptr, seg_ptr, do_ptr, sstart_ptr, w_ptr, dsend_ptr, dw_ptr,
              dq_ptr, dko_ptr, dwk_ptr, dgp_ptr, scale, T, L, Lp, NC, BHLp,
              NH: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
              C: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              STATE: tl.constexpr, PREC: tl.constexpr):
    """Through the outputs, for one dk block of a chunk: O = scale (diag(s0d_q) Q S + P W) with
    P = Q Kᵀ ⊙ D_q, so with dP = scale dO Wᵀ:
        dQ = scale diag(s0d_q) dO Sᵀ + (dP ⊙ D_q) K   (final),   dK ∋ (dP ⊙ D_q)ᵀ Q,
    and γ's gradient through D_q and s0d_q. With STATE (16-bit inputs) also dkw_kernel's part in
    the same pass over the dv blocks: dK ∋ diag(dlast) W g_cᵀ, dWk = -dW Sᵀ, γ through dlast and
    a. Contractions over dk split exactly over dk blocks, so each block writes its own part of
    γ's gradient (summed in wy_bwd_kernel)."""
    kb, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = bh % H
    bh = bh.to(tl.int64)
    CD: tl.constexpr = k_ptr.dtype.element_ty
    rows = tl.arange(0, C)
    p = c * C + rows
    kcols = kb * BK + tl.arange(0, BK)
    t, iq, qvalid = query_rows(c, T, C, NH, R)
    dP = tl.zeros([R, C], dtype=tl.float32)
    dQS = tl.zeros([R, BK], dtype=tl.float32)
    if STATE:
        dKd = tl.zeros([C, BK], dtype=tl.float32)
        mdWk = tl.zeros([C, BK], dtype=tl.float32)
        da = tl.zeros([BK], dtype=tl.float32)
    s_base = (bh * NC + c) * DK * DV
    for vb in range(0, DV, BV):
        vcols = vb + tl.arange(0, BV)
        dO = load_rows(do_ptr, b * T * H * DV + h * DV, t, H * DV, qvalid, vcols, DV)
        W = load_rows(w_ptr, bh * Lp * DV, p, DV, rows < C, vcols, DV)
        S = load_rows(sstart_ptr, s_base, kcols, DV, kcols < DK, vcols, DV)
        dP = mma(dO, tl.trans(W), dP, PREC)
        dQS = mma(dO, tl.trans(S), dQS, PREC)
        if STATE:
            dW = load_rows(dw_ptr, bh * Lp * DV, p, DV, rows < C, vcols, DV)
            dSe = load_rows(dsend_ptr, s_base, kcols, DV, kcols < DK, vcols, DV)
            dKd = mma(W, tl.trans(dSe), dKd, PREC)
            mdWk = mma(dW, tl.trans(S), mdWk, PREC)
            da += tl.sum(S.to(tl.float32) * dSe.to(tl.float32), 1)
    Q = load_rows(q_ptr, b * T * H * DK + h * DK, t, H * DK, qvalid, kcols, DK)
    K = load_rows(k_ptr, b * L * H * DK + h * DK, p, H * DK, p < L, kcols, DK)
    gamma, seg = chunk_gates(gamma_ptr, seg_ptr, bh, b, c, Lp, C)
    Dq, s0q = query_decay(gamma_ptr, seg_ptr, gamma, seg, iq, qvalid, bh, b, c, Lp, C)
    dPD = scale * dP * Dq
    dQ = mma(dPD.to(CD), K, scale * s0q[:, None] * dQS, PREC)
    store_rows(dq_ptr, b * T * H * DK + h * DK, t, H * DK, qvalid, kcols, DK, dQ)
    dK = mm(tl.trans(dPD).to(CD), Q, PREC)
    if STATE:
        dlast, a = last_row_decay(gamma_ptr, seg_ptr, gamma, seg, bh, b, c, Lp, C)
        ed = dlast * tl.sum(K.to(tl.float32) * dKd, 1)  # ∂L/∂dlast · dlast
        last = tl.sum(ed, 0) + a * tl.sum(da, 0)
        dK += dlast[:, None] * dKd
        store_rows(dwk_ptr, bh * Lp * DK, p, DK, rows < C, kcols, DK, -mdWk)
    store_rows(dko_ptr, bh * Lp * DK, p, DK, rows < C, kcols, DK, dK)
    # γ enters as e^{γ_iq-γ_s} (D_q) and e^{γ_iq} (s0d_q). With E = dPD ⊙ Q Kᵀ = ∂L/∂(γ_iq - γ_s),
    # Σ_s E_rs + scale s0d_q (Q ⊙ dO Sᵀ)_r· = (Q ⊙ dQ)_r·  and  Σ_r E_rs = (K ⊙ dK)_s·, so no
    # Q Kᵀ is formed (this dk block's part of each sum). With STATE, (K ⊙ dK)_s· also holds
    # dlast_s ∂L/∂dlast_s, which enters γ_s with the same sign.
    eq = tl.sum(Q.to(tl.float32) * dQ, 1)
    at_q = (rows[None, :] == iq[:, None]) & qvalid[:, None]
    dgam = tl.sum(tl.where(at_q, eq[:, None], 0.0), 0) - tl.sum(K.to(tl.float32) * dK, 1)
    if STATE:
        dgam += tl.where(rows == C - 1, last, 0.0)
    tl.store(dgp_ptr + kb * BHLp + bh * Lp + p, dgam)


@triton.jit
def dkw_kernel(k_ptr, gamma_ptr, seg_ptr, sstart_ptr, dsend_ptr, w_ptr, dw_ptr, dks_ptr, dwk_ptr,
               dgp_ptr, L, Lp, NC, BHLp,
               H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Through the state walk, for one dk block of a chunk (fp32 inputs; 16-bit inputs do this
    inside dq_kernel), with g_c = ∂L/∂S_{c+1}:
        S_{c+1} = a S_c + Kdᵀ W  ->  dK ∋ diag(dlast) W g_cᵀ,  da = <S_c, g_c>
        W = U - Wk S_c           ->  dWk = -dW S_cᵀ
    and γ's gradient through dlast = e^{γ_{C-1}-γ_s} and a = e^{γ_{C-1}} (per dk block)."""
    kb, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = bh % H
    bh = bh.to(tl.int64)
    rows = tl.arange(0, C)
    p = c * C + rows
    kcols = kb * BK + tl.arange(0, BK)
    dKd = tl.zeros([C, BK], dtype=tl.float32)
    mdWk = tl.zeros([C, BK], dtype=tl.float32)
    da = tl.zeros([BK], dtype=tl.float32)
    s_base = (bh * NC + c) * DK * DV
    for vb in range(0, DV, BV):
        vcols = vb + tl.arange(0, BV)
        W = load_rows(w_ptr, bh * Lp * DV, p, DV, rows < C, vcols, DV)
        dW = load_rows(dw_ptr, bh * Lp * DV, p, DV, rows < C, vcols, DV)
        S = load_rows(sstart_ptr, s_base, kcols, DV, kcols < DK, vcols, DV)
        dSe = load_rows(dsend_ptr, s_base, kcols, DV, kcols < DK, vcols, DV)
        dKd = mma(W, tl.trans(dSe), dKd, PREC)
        mdWk = mma(dW, tl.trans(S), mdWk, PREC)
        da += tl.sum(S.to(tl.float32) * dSe.to(tl.float32), 1)
    gamma, seg = chunk_gates(gamma_ptr, seg_ptr, bh, b, c, Lp, C)
    dlast, a = last_row_decay(gamma_ptr, seg_ptr, gamma, seg, bh, b, c, Lp, C)
    store_rows(dks_ptr, bh * Lp * DK, p, DK, rows < C, kcols, DK, dlast[:, None] * dKd)
    store_rows(dwk_ptr, bh * Lp * DK, p, DK, rows < C, kcols, DK, -mdWk)
    K = load_rows(k_ptr, b * L * H * DK + h * DK, p, H * DK, p < L, kcols, DK)
    ed = dlast * tl.sum(K.to(tl.float32) * dKd, 1)  # ∂L/∂dlast · dlast
    last = tl.sum(ed, 0) + a * tl.sum(da, 0)
    tl.store(dgp_ptr + kb * BHLp + bh * Lp + p, tl.where(rows == C - 1, last, 0.0) - ed)


@triton.jit
def wy_bwd_kernel(k_ptr, v_ptr, beta_ptr, gamma_ptr, seg_ptr, tm_ptr, dw_ptr, dwk_ptr, dko_ptr,
                  dks_ptr, dgp_ptr, dk_ptr, dv_ptr, dbeta_ptr, dgamma_ptr, L, Lp, BHLp,
                  NGP: tl.constexpr, SPLIT: tl.constexpr,
                  H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                  C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                  TM_PREC: tl.constexpr):
    """Through U = Tm diag(β) V, Wk = Tm diag(β s0d) K, Tm = (I + A)^{-1}, A = strict(β KKᵀ ⊙ D).

    dU = dW (the state walk's), dWk from dkw_kernel. With X = Tmᵀ dU and Y = Tmᵀ dWk:
        dV = β X,  dK ∋ β s0d Y,  dβ ∋ Σ X⊙V + s0d Σ Y⊙K,  ds0d = β Σ Y⊙K,
        dA = -Tmᵀ dTm Tmᵀ = -(X Uᵀ + Y Wkᵀ)   (dTm = dU (βV)ᵀ + dWk (β s0d K)ᵀ, and Tm βV = U ...)
    on the strict lower part; U and Wk are recomputed here in fp32 from Tm, so every dot is
    C×C×(block) and no C×C×C product is formed. Then
        dβ ∋ Σ_s dA ⊙ KKᵀ ⊙ D,  dK ∋ (G + Gᵀ) K with G = diag(β) dA ⊙ D,  dD = diag(β) dA ⊙ KKᵀ
    (the last three without forming K Kᵀ, see below)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    bh = bh.to(tl.int64)
    CD: tl.constexpr = k_ptr.dtype.element_ty
    rows = tl.arange(0, C)
    p = c * C + rows
    valid = p < L
    tm_base = tm_ptr + bh * Lp * C + c * C * C
    Tm = tl.load(tm_base + rows[:, None] * C + rows[None, :])  # a dot operand: in shared memory
    TMD: tl.constexpr = tm_ptr.dtype.element_ty
    TmT = tl.trans(Tm)
    beta = tl.load(beta_ptr + b * L * H + p * H + h, mask=valid, other=0.0).to(tl.float32)
    gamma, seg = chunk_gates(gamma_ptr, seg_ptr, bh, b, c, Lp, C)
    s0d = tl.where(seg == 0, tl.exp(gamma), 0.0)
    krow0 = b * L * H * DK + h * DK
    vrow0 = b * L * H * DV + h * DV

    dA = tl.zeros([C, C], dtype=tl.float32)
    dbeta = tl.zeros([C], dtype=tl.float32)
    for vb in range(0, DV, BV):
        cols = vb + tl.arange(0, BV)
        V = load_rows(v_ptr, vrow0, p, H * DV, valid, cols, DV).to(tl.float32)
        dU = load_rows(dw_ptr, bh * Lp * DV, p, DV, rows < C, cols, DV)
        X = mm(TmT, dU.to(TMD), TM_PREC)
        U = mm(Tm, (beta[:, None] * V).to(TMD), TM_PREC)
        dA = mma((-X).to(TMD), tl.trans(U.to(TMD)), dA, TM_PREC)
        store_rows(dv_ptr, vrow0, p, H * DV, valid, cols, DV, beta[:, None] * X)
        dbeta += tl.sum(X * V, 1)
    ds0d = tl.zeros([C], dtype=tl.float32)
    for kb in range(0, DK, BK):
        cols = kb + tl.arange(0, BK)
        K = load_rows(k_ptr, krow0, p, H * DK, valid, cols, DK).to(tl.float32)
        dWk = load_rows(dwk_ptr, bh * Lp * DK, p, DK, rows < C, cols, DK)
        Y = mm(TmT, dWk.to(TMD), TM_PREC)
        Wk = mm(Tm, ((beta * s0d)[:, None] * K).to(TMD), TM_PREC)
        dA = mma((-Y).to(TMD), tl.trans(Wk.to(TMD)), dA, TM_PREC)
        z = tl.sum(Y * K, 1)
        dbeta += s0d * z
        ds0d += beta * z

    # GD = dA ⊙ D on A's support (strictly lower, one segment). With A = diag(β) (K Kᵀ) ⊙ D and
    # G = diag(β) GD = ∂L/∂(K Kᵀ):  dK ∋ (G + Gᵀ) K = β ⊙ (GD K) + Gᵀ K,  dβ_i ∋ k_i·(GD K)_i,
    # and E = G ⊙ K Kᵀ = ∂L/∂(γ_i - γ_s): Σ_s E_is = β_i k_i·(GD K)_i, Σ_i E_is = k_s·(Gᵀ K)_s.
    # So K Kᵀ itself is never formed.
    keep = (rows[:, None] > rows[None, :]) & (seg[:, None] == seg[None, :])
    GD = tl.where(keep, dA * tl.exp(tl.where(keep, gamma[:, None] - gamma[None, :], 0.0)), 0.0)
    GDc = GD.to(CD)
    GTc = tl.trans(beta[:, None] * GD).to(CD)
    ekk = tl.zeros([C], dtype=tl.float32)  # k_i·(GD K)_i
    ect = tl.zeros([C], dtype=tl.float32)  # k_s·(Gᵀ K)_s
    for kb in range(0, DK, BK):
        cols = kb + tl.arange(0, BK)
        K = load_rows(k_ptr, krow0, p, H * DK, valid, cols, DK)
        dWk = load_rows(dwk_ptr, bh * Lp * DK, p, DK, rows < C, cols, DK)
        dKp = load_rows(dko_ptr, bh * Lp * DK, p, DK, rows < C, cols, DK)
        if SPLIT:  # dkw_kernel's part, apart
            dKp += load_rows(dks_ptr, bh * Lp * DK, p, DK, rows < C, cols, DK)
        GDK = mm(GDc, K, PREC)
        GTK = mm(GTc, K, PREC)
        Kf = K.to(tl.float32)
        ekk += tl.sum(Kf * GDK, 1)
        ect += tl.sum(Kf * GTK, 1)
        Y = mm(TmT, dWk.to(TMD), TM_PREC)
        dK = dKp + (beta * s0d)[:, None] * Y + beta[:, None] * GDK + GTK
        store_rows(dk_ptr, krow0, p, H * DK, valid, cols, DK, dK)
    dbeta += ekk
    dgam = beta * ekk - ect + ds0d * s0d
    for i in range(NGP):  # dq_kernel's (and dkw_kernel's) parts per dk block
        dgam += tl.load(dgp_ptr + i * BHLp + bh * Lp + p)
    tl.store(dbeta_ptr + b * L * H + p * H + h, dbeta.to(dbeta_ptr.dtype.element_ty), mask=valid)
    tl.store(dgamma_ptr + bh * Lp + p, dgam)
