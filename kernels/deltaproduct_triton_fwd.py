"""Gated DeltaProduct forward kernels (Triton), and the jit helpers the backward shares.

The math and the notation are those of kernels/deltaproduct.py and kernels/deltaproduct_triton.py
(read their docstrings first). Per chunk of C sub-steps, with γ = cumsum(g) and seg = cumsum(reset)
inside the chunk:

    D_is = e^{γ_i-γ_s} [s ≤ i] [seg_s = seg_i]          s0d_i = e^{γ_i} [seg_i = 0]
    A    = strictly-lower(diag(β) (K Kᵀ) ⊙ D)           Tm = (I + A)^{-1}
    U    = Tm diag(β) V        Wk = Tm diag(β s0d) K     W = U - Wk S_c   (the effective updates)
    S_{c+1} = a_c S_c + Kdᵀ W, a_c = s0d_{C-1},  Kd = diag(D_{C-1,·}) K
    O    = scale (diag(s0d_q) Q S_c + (Q Kᵀ ⊙ D_q) W)   (rows: the tokens whose last sub-step
                                                         lies in the chunk, R of them at most)

Kernels, in launch order:
  wy_fwd_kernel      per (chunk, batch·head): A from one C×C dot, the blocked inverse Tm (16×16
                     diagonal blocks by forward substitution, merged with C×C dots; saved for the
                     backward), then U and Wk                                          (parallel)
  state_fwd_kernel   per (batch·head, dv block): walks the chunks with S in 64-row blocks,
                     stores each chunk's start state S_c and W, and the final state   (sequential)
  output_fwd_kernel  per (chunk, batch·head, dv block): O at the query rows only        (parallel)

Dot operands. 16-bit inputs: every dot multiplies 16-bit operands (tensor-core products are exact,
accumulation fp32); fp32 intermediates (P = QKᵀ ⊙ D, the state S, the decayed W, Tm) are rounded
to the 16-bit storage dtype first, as flash-linear-attention does. fp32 inputs: every dot
multiplies fp32 operands with input_precision PREC ("tf32x3", chosen by the host:
kernels/deltaproduct_triton.py says why). The inverse's merges use INV_PREC ("tf32" for 16-bit
inputs, whose Tm is then rounded to 16 bits; "tf32x3" for fp32).
"""

import triton
import triton.language as tl

# Triton 3.9's interpreter stores bf16 as raw uint16 and its tl.dot multiplies those bit patterns
# (kernels.triton_interpreter.emulate_dot_precision decodes them). Under TRITON_INTERPRET=1 the
# host sets this before each call (set_interpreter_bf16_upcast) when the dot in use would get
# bf16 wrong; mm and mma then hand bf16 operands over as fp32, which gives the same products
# (bf16 x bf16 is exact in fp32). Compiled kernels never see it set.
_UPCAST_BF16_DOTS = tl.constexpr(False)


def set_interpreter_bf16_upcast() -> None:
    """Probe the interpreter's tl.dot with bf16 ones; upcast bf16 dot operands if it is wrong."""
    import numpy as np
    from triton.runtime import interpreter

    one = interpreter.TensorHandle(np.full((16, 16), 0x3F80, dtype=np.uint16), tl.bfloat16)
    acc = interpreter.TensorHandle(np.zeros((16, 16), dtype=np.float32), tl.float32)
    out = interpreter.InterpreterBuilder.create_dot(None, one, one, acc,
                                                    interpreter._ir.INPUT_PRECISION.IEEE, 0)
    global _UPCAST_BF16_DOTS
    _UPCAST_BF16_DOTS = tl.constexpr(float(np.asarray(out.data)[0, 0]) != 16.0)


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """a @ b accumulated in fp32. Two 16-bit operands multiply as they are (exact products); if
    either is fp32, both go in as fp32 with input_precision PREC."""
    if a.dtype == tl.float32 or b.dtype == tl.float32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    elif _UPCAST_BF16_DOTS and a.dtype == tl.bfloat16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b, accumulating in place (as mm)."""
    if a.dtype == tl.float32 or b.dtype == tl.float32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    elif _UPCAST_BF16_DOTS and a.dtype == tl.bfloat16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


# ---------------------------------------------------------------------------------------------
# Loads and masks shared by the forward and backward kernels


@triton.jit
def query_rows(c, T, C: tl.constexpr, NH: tl.constexpr, R: tl.constexpr):
    """The tokens whose query is read in chunk c (token t's query sits at its last sub-step
    t·n_h + n_h - 1): t = t0 + r for r < R, valid where t < t1 and t < T; and that sub-step's
    position in the chunk. t0 = ⌊cC / n_h⌋ is the first token whose last sub-step is ≥ cC."""
    t0 = (c * C) // NH
    t1 = ((c + 1) * C) // NH
    t = t0 + tl.arange(0, R)
    valid = (t < t1) & (t < T)
    iq = tl.where(valid, t * NH + NH - 1 - c * C, 0)
    return t, iq, valid


@triton.jit
def chunk_gates(gamma_ptr, seg_ptr, bh, b, c, Lp, C: tl.constexpr):
    """γ [C] and seg [C] of chunk c (γ [B·H, Lp] fp32, seg [B, Lp] int32, padded to Lp)."""
    rows = c * C + tl.arange(0, C)
    gamma = tl.load(gamma_ptr + bh * Lp + rows)
    seg = tl.load(seg_ptr + b * Lp + rows)
    return gamma, seg


@triton.jit
def last_row_decay(gamma_ptr, seg_ptr, gamma, seg, bh, b, c, Lp, C: tl.constexpr):
    """D's last row e^{γ_{C-1}-γ_s}[seg_s = seg_{C-1}], and a = s0d_{C-1}."""
    g_last = tl.load(gamma_ptr + bh * Lp + c * C + C - 1)
    s_last = tl.load(seg_ptr + b * Lp + c * C + C - 1)
    same = seg == s_last
    # exp only of γ_{C-1} - γ_s ≤ 0 (γ is a cumsum of g ≤ 0): nothing overflows.
    dlast = tl.where(same, tl.exp(tl.where(same, g_last - gamma, 0.0)), 0.0)
    a = tl.where(s_last == 0, tl.exp(g_last), 0.0)
    return dlast, a


@triton.jit
def query_decay(gamma_ptr, seg_ptr, gamma, seg, iq, qvalid, bh, b, c, Lp, C: tl.constexpr):
    """D_q [R, C] = D's rows at the query sub-steps, and s0d_q [R]."""
    cols = tl.arange(0, C)
    gq = tl.load(gamma_ptr + bh * Lp + c * C + iq, mask=qvalid, other=0.0)
    sq = tl.load(seg_ptr + b * Lp + c * C + iq, mask=qvalid, other=0)
    keep = qvalid[:, None] & (cols[None, :] <= iq[:, None]) & (seg[None, :] == sq[:, None])
    Dq = tl.where(keep, tl.exp(tl.where(keep, gq[:, None] - gamma[None, :], 0.0)), 0.0)
    s0q = tl.where(qvalid & (sq == 0), tl.exp(gq), 0.0)
    return Dq, s0q


@triton.jit
def load_rows(ptr, row_base, rows, row_stride, rmask, cols, ncols):
    """x[rows, cols] of a row-major matrix whose row r starts at row_base + r·row_stride."""
    offs = row_base + rows[:, None].to(tl.int64) * row_stride + cols[None, :]
    return tl.load(ptr + offs, mask=rmask[:, None] & (cols[None, :] < ncols), other=0.0)


@triton.jit
def store_rows(ptr, row_base, rows, row_stride, rmask, cols, ncols, x):
    offs = row_base + rows[:, None].to(tl.int64) * row_stride + cols[None, :]
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=rmask[:, None] & (cols[None, :] < ncols))


# ---------------------------------------------------------------------------------------------
# WY representation with the blocked unit-lower-triangular inverse


@triton.jit
def _unit_lower_inverse_16(a):
    """(I + a)^{-1} for strictly lower 16×16 a, by forward substitution:
    T_i = e_i - Σ_{j<i} a_ij T_j.

    t holds T - I; rows 0 and 1 of -a are already final (T_1 - e_1 = -a_10 e_0)."""
    o = tl.arange(0, 16)
    t = -a
    for i in range(2, 16):
        row = tl.sum(tl.where(o[:, None] == i, -a, 0.0), 0)  # -a_i·, zero for j ≥ i
        row = row + tl.sum(row[:, None] * t, 0)  # -a_i· - Σ_j a_ij (T_j - e_j) = T_i - e_i
        t = tl.where(o[:, None] == i, row[None, :], t)
    return t + tl.where(o[:, None] == o[None, :], 1.0, 0.0)


@triton.jit
def _invert_diagonal_block(scr_ptr, i: tl.constexpr):
    """Replace the i-th 16×16 block a at scr_ptr ([C, 16] fp32, row-major) by (I + a)^{-1}. The
    block is read in a blocked layout (two numbers per thread at 4 warps; a [16,16] dot result
    would be replicated on every warp)."""
    o = tl.arange(0, 16)
    offs = (16 * i + o[:, None]) * 16 + o[None, :]
    t = _unit_lower_inverse_16(tl.load(scr_ptr + offs))
    tl.debug_barrier()  # all of the block is read before any of it is overwritten
    tl.store(scr_ptr + offs, t)


@triton.jit
def _blocked_inverse(A, scr_ptr, C: tl.constexpr, PREC: tl.constexpr):
    """Tm = (I + A)^{-1} for strictly lower A [C, C] fp32 (C = 16·NB, NB ∈ {1, 2, 4}), as
    flash-linear-attention's solve_tril: the 16×16 diagonal blocks by forward substitution, then
    merged with C×C dots. With D_b = I + (A's diagonal blocks) and N = A's off-diagonal blocks,
    I + A = D_b (I + X), X = D_b^{-1} N strictly block-lower, X^NB = 0:
        Tm = (I - X + X² - ... ± X^{NB-1}) D_b^{-1}   (Horner: Y <- I - X Y, NB-1 times).
    The diagonal blocks go through scr_ptr ([C, 16] fp32 scratch): Triton cannot slice a tensor."""
    NB: tl.constexpr = C // 16
    rows = tl.arange(0, C)
    same = (rows[:, None] // 16) == (rows[None, :] // 16)
    scr = scr_ptr + rows[:, None] * 16 + rows[None, :] % 16  # row r's diagonal block entries
    tl.store(scr, A, mask=same)
    tl.debug_barrier()  # written by other threads of this program
    for i in tl.static_range(NB):
        _invert_diagonal_block(scr_ptr, i)
    tl.debug_barrier()
    Dinv = tl.load(scr, mask=same, other=0.0)
    if NB == 1:
        Tm = Dinv
    else:
        X = tl.dot(Dinv, tl.where(same, 0.0, A), input_precision=PREC)
        eye = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
        Y = eye - X
        for _ in tl.static_range(NB - 2):
            Y = eye - tl.dot(X, Y, input_precision=PREC)
        Tm = tl.dot(Y, Dinv, input_precision=PREC)
    return Tm


@triton.jit
def wy_fwd_kernel(k_ptr, v_ptr, beta_ptr, gamma_ptr, seg_ptr, scr_ptr, tm_ptr, u_ptr, wk_ptr, L, Lp,
                  H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, TM_PREC: tl.constexpr,
                  INV_PREC: tl.constexpr):
    """Tm = (I + A)^{-1}, U = Tm diag(β) V, Wk = Tm diag(β s0d) K for one chunk of one head.

    A = strict(β KKᵀ ⊙ D) comes from one C×C dot; the blocked inverse (merges in INV_PREC) gives
    Tm, stored in tm_ptr's dtype for the backward; U and Wk use Tm as stored (TM_PREC when that
    is fp32)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    bh = bh.to(tl.int64)
    rows = tl.arange(0, C)
    p = c * C + rows
    valid = p < L
    krow0 = b * L * H * DK + h * DK  # k is [B, L, H, dk]: row p at krow0 + p·H·DK
    beta = tl.load(beta_ptr + b * L * H + p * H + h, mask=valid, other=0.0).to(tl.float32)
    gamma, seg = chunk_gates(gamma_ptr, seg_ptr, bh, b, c, Lp, C)
    KK = tl.zeros([C, C], dtype=tl.float32)
    for kb in range(0, DK, BK):
        K = load_rows(k_ptr, krow0, p, H * DK, valid, kb + tl.arange(0, BK), DK)
        KK = mma(K, tl.trans(K), KK, PREC)
    keep = (rows[:, None] > rows[None, :]) & (seg[:, None] == seg[None, :])
    # exp only of γ_i - γ_s ≤ 0 (s < i): nothing overflows.
    decay = tl.exp(tl.where(keep, gamma[:, None] - gamma[None, :], 0.0))
    A = tl.where(keep, beta[:, None] * KK * decay, 0.0)
    Tm = _blocked_inverse(A, scr_ptr + (bh * Lp + c * C) * 16, C, INV_PREC)
    TD: tl.constexpr = tm_ptr.dtype.element_ty
    Tm = Tm.to(TD)
    tm_offs = bh * Lp * C + c * C * C + rows[:, None] * C + rows[None, :]  # Tm is [B·H, Lp, C]
    tl.store(tm_ptr + tm_offs, Tm)

    s0d = tl.where(seg == 0, tl.exp(gamma), 0.0)
    vrow0 = b * L * H * DV + h * DV
    for vb in range(0, DV, BV):
        cols = vb + tl.arange(0, BV)
        V = load_rows(v_ptr, vrow0, p, H * DV, valid, cols, DV)
        U = mm(Tm, (beta[:, None] * V.to(tl.float32)).to(TD), TM_PREC)
        store_rows(u_ptr, bh * Lp * DV, p, DV, rows < C, cols, DV, U)
    for kb in range(0, DK, BK):
        cols = kb + tl.arange(0, BK)
        K = load_rows(k_ptr, krow0, p, H * DK, valid, cols, DK)
        Wk = mm(Tm, ((beta * s0d)[:, None] * K.to(tl.float32)).to(TD), TM_PREC)
        store_rows(wk_ptr, bh * Lp * DK, p, DK, rows < C, cols, DK, Wk)


# ---------------------------------------------------------------------------------------------
# The state walk and the outputs


@triton.jit
def state_block_load(ptr, base, j: tl.constexpr, vcols, DK: tl.constexpr, DV: tl.constexpr,
                     BK: tl.constexpr):
    """Rows [j·BK, (j+1)·BK) of a dk×dv state at ptr + base, columns vcols, as fp32."""
    krows = j * BK + tl.arange(0, BK)
    return tl.load(ptr + base + krows[:, None] * DV + vcols[None, :],
                   mask=(krows[:, None] < DK) & (vcols[None, :] < DV), other=0.0).to(tl.float32)


@triton.jit
def state_block_store(ptr, base, j: tl.constexpr, vcols, x, DK: tl.constexpr, DV: tl.constexpr,
                      BK: tl.constexpr):
    krows = j * BK + tl.arange(0, BK)
    tl.store(ptr + base + krows[:, None] * DV + vcols[None, :], x.to(ptr.dtype.element_ty),
             mask=(krows[:, None] < DK) & (vcols[None, :] < DV))


@triton.jit
def state_fwd_kernel(k_ptr, u_ptr, wk_ptr, gamma_ptr, seg_ptr, s0_ptr, sstart_ptr, w_ptr, final_ptr,
                     L, Lp, NC,
                     H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr,
                     PREC: tl.constexpr):
    """S_{c+1} = a_c S_c + Kdᵀ W_c with W_c = U_c - Wk_c S_c, for one dv block of one head.

    S is carried in fp32 as up to four blocks of BK rows (S0..S3, as flash-linear-attention), so
    that no dot has a dk-wide operand; it enters the dots rounded to the states' storage dtype
    (as stored for the output and backward kernels); the update uses W as stored, so every
    kernel sees one W."""
    bh, pid_v = tl.program_id(0), tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    bh = bh.to(tl.int64)
    NS: tl.constexpr = triton.cdiv(DK, BK)
    SD: tl.constexpr = w_ptr.dtype.element_ty
    XD: tl.constexpr = sstart_ptr.dtype.element_ty
    kc = tl.arange(0, BK)  # the columns of row block j of S are j·kc1
    kc1, kc2, kc3 = BK + kc, 2 * BK + kc, 3 * BK + kc
    wkb = bh * Lp * DK
    vcols = pid_v * BV + tl.arange(0, BV)
    rows = tl.arange(0, C)
    s0b = bh * DK * DV
    if HAS_INIT:
        S0 = state_block_load(s0_ptr, s0b, 0, vcols, DK, DV, BK)
        if NS >= 2:
            S1 = state_block_load(s0_ptr, s0b, 1, vcols, DK, DV, BK)
        if NS >= 3:
            S2 = state_block_load(s0_ptr, s0b, 2, vcols, DK, DV, BK)
        if NS >= 4:
            S3 = state_block_load(s0_ptr, s0b, 3, vcols, DK, DV, BK)
    else:
        S0 = tl.zeros([BK, BV], dtype=tl.float32)
        if NS >= 2:
            S1 = tl.zeros([BK, BV], dtype=tl.float32)
        if NS >= 3:
            S2 = tl.zeros([BK, BV], dtype=tl.float32)
        if NS >= 4:
            S3 = tl.zeros([BK, BV], dtype=tl.float32)
    krow0 = b * L * H * DK + h * DK
    for c in range(NC):
        sb = (bh * NC + c) * DK * DV
        p = c * C + rows
        kvalid = p < L
        state_block_store(sstart_ptr, sb, 0, vcols, S0, DK, DV, BK)
        WS = mm(load_rows(wk_ptr, wkb, p, DK, rows < C, kc, DK), S0.to(XD), PREC)
        if NS >= 2:
            state_block_store(sstart_ptr, sb, 1, vcols, S1, DK, DV, BK)
            WS = mma(load_rows(wk_ptr, wkb, p, DK, rows < C, kc1, DK), S1.to(XD), WS, PREC)
        if NS >= 3:
            state_block_store(sstart_ptr, sb, 2, vcols, S2, DK, DV, BK)
            WS = mma(load_rows(wk_ptr, wkb, p, DK, rows < C, kc2, DK), S2.to(XD), WS, PREC)
        if NS >= 4:
            state_block_store(sstart_ptr, sb, 3, vcols, S3, DK, DV, BK)
            WS = mma(load_rows(wk_ptr, wkb, p, DK, rows < C, kc3, DK), S3.to(XD), WS, PREC)
        U = load_rows(u_ptr, bh * Lp * DV, p, DV, rows < C, vcols, DV)
        W = (U.to(tl.float32) - WS).to(SD)
        store_rows(w_ptr, bh * Lp * DV, p, DV, rows < C, vcols, DV, W)
        gamma, seg = chunk_gates(gamma_ptr, seg_ptr, bh, b, c, Lp, C)
        dlast, a = last_row_decay(gamma_ptr, seg_ptr, gamma, seg, bh, b, c, Lp, C)
        Wd = (dlast[:, None] * W.to(tl.float32)).to(XD)
        S0 = mma(tl.trans(load_rows(k_ptr, krow0, p, H * DK, kvalid, kc, DK)), Wd, a * S0, PREC)
        if NS >= 2:
            S1 = mma(tl.trans(load_rows(k_ptr, krow0, p, H * DK, kvalid, kc1, DK)), Wd, a * S1, PREC)
        if NS >= 3:
            S2 = mma(tl.trans(load_rows(k_ptr, krow0, p, H * DK, kvalid, kc2, DK)), Wd, a * S2, PREC)
        if NS >= 4:
            S3 = mma(tl.trans(load_rows(k_ptr, krow0, p, H * DK, kvalid, kc3, DK)), Wd, a * S3, PREC)
    state_block_store(final_ptr, s0b, 0, vcols, S0, DK, DV, BK)
    if NS >= 2:
        state_block_store(final_ptr, s0b, 1, vcols, S1, DK, DV, BK)
    if NS >= 3:
        state_block_store(final_ptr, s0b, 2, vcols, S2, DK, DV, BK)
    if NS >= 4:
        state_block_store(final_ptr, s0b, 3, vcols, S3, DK, DV, BK)


@triton.jit
def output_fwd_kernel(q_ptr, k_ptr, gamma_ptr, seg_ptr, sstart_ptr, w_ptr, o_ptr, scale,
                      T, L, Lp, NC,
                      NH: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      C: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      PREC: tl.constexpr):
    """O = scale (diag(s0d_q) Q S_c + (Q Kᵀ ⊙ D_q) W) at the R query rows of chunk c."""
    c, bh, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = bh % H
    bh = bh.to(tl.int64)
    SD: tl.constexpr = w_ptr.dtype.element_ty
    rows = tl.arange(0, C)
    p = c * C + rows
    vcols = pid_v * BV + tl.arange(0, BV)
    t, iq, qvalid = query_rows(c, T, C, NH, R)
    QK = tl.zeros([R, C], dtype=tl.float32)
    QS = tl.zeros([R, BV], dtype=tl.float32)
    for kb in range(0, DK, BK):
        cols = kb + tl.arange(0, BK)
        Q = load_rows(q_ptr, b * T * H * DK + h * DK, t, H * DK, qvalid, cols, DK)
        K = load_rows(k_ptr, b * L * H * DK + h * DK, p, H * DK, p < L, cols, DK)
        S = tl.load(sstart_ptr + (bh * NC + c) * DK * DV + cols[:, None] * DV + vcols[None, :],
                    mask=(cols[:, None] < DK) & (vcols[None, :] < DV), other=0.0)
        QK = mma(Q, tl.trans(K), QK, PREC)
        QS = mma(Q, S, QS, PREC)
    gamma, seg = chunk_gates(gamma_ptr, seg_ptr, bh, b, c, Lp, C)
    Dq, s0q = query_decay(gamma_ptr, seg_ptr, gamma, seg, iq, qvalid, bh, b, c, Lp, C)
    W = load_rows(w_ptr, bh * Lp * DV, p, DV, rows < C, vcols, DV)
    O = scale * (s0q[:, None] * QS + mm((QK * Dq).to(SD), W, PREC))
    store_rows(o_ptr, b * T * H * DV + h * DV, t, H * DV, qvalid, vcols, DV, O)
