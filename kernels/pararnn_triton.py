"""ParaGRU / ParaLSTM Newton solves as fused Triton kernels; same math as kernels.pararnn.

Forward, one launch for everything: a program owns one batch row and BLOCK_D channels over the
whole time axis (the cells are channel-local, so these systems are independent) and runs
  h^0_t = f(h_prev0_t, u_t)                                   (pass 0)
  for k = 0..budget: one pass over T in chunks of BLOCK_T evaluating f, J = df/dh_{t-1} and
      r = h^k - f(h^k_{t-1}, u_t) (residual), scanning d_t = J_t d_{t-1} - r_t inside the chunk
      with tl.associative_scan and carrying d across chunks, and writing h^{k+1} = h^k + d;
  the last pass (k = budget, or the first with max|r| <= tol) only measures the residual.
Iterates live in two global buffers (read h^k from one, write h^{k+1} to the other), so the
shifted state h_{t-1} of a chunk's first row is never overwritten before it is read.

Early stop with tol is decided per program on its own residual; blocks are independent systems,
so the reported residual (max over programs) obeys the same rule as the reference, which stops
all blocks together. Without tol, every program runs exactly num_iters iterations, as the
reference does. A NaN residual is reported as +inf (never as a converged 0).

Backward, one launch: per program, the adjoint lambda_t = g_t + J_{t+1}^T lambda_{t+1} as a
reverse chunked scan (J_{t+1} re-evaluated at the solution), then in the same chunk the per-step
VJP of f: grad u_t, the h0 gradient at t = 0, and partial sums over t of the grads of a and p,
written per batch row and summed over rows by torch afterwards.

Accumulation dtype = the state buffers' dtype: fp32, or fp64 for fp64 inputs. u may be any float
dtype; it is converted on load, and grad u is stored in u's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.scan_triton import combine_block, combine_diag, last_row

# GPU defaults, not tuned on a GPU yet (see bench/results/pararnn.md). Tests pass block_t=16.
DEFAULT_BLOCK_T = 32
DEFAULT_BLOCK_D = 32
INF = tl.constexpr(float("inf"))  # NaN residuals are reported as +inf


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh x = 2 σ(2x) - 1: finite for every x (exp overflow gives exactly ±1).
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _load_gates(U, offs, m, acc, D):
    """Three gate pre-activations at U[b, t, g, d], offs pointing at gate 0."""
    g0 = tl.load(U + offs, mask=m, other=0.0).to(acc)
    g1 = tl.load(U + offs + D, mask=m, other=0.0).to(acc)
    g2 = tl.load(U + offs + 2 * D, mask=m, other=0.0).to(acc)
    return g0, g1, g2


# ---------------------------------------------------------------------------------------------
# Cells (same equations as kernels.pararnn.ParaGRUCell / ParaLSTMCell).


@triton.jit
def _gru_gates(hp, uz, ur, uh, az, ar, ah):
    z = _sigmoid(az * hp + uz)
    r = _sigmoid(ar * hp + ur)
    hh = _tanh(ah * (hp * r) + uh)
    return z, r, hh


@triton.jit
def _gru_step_jacobian(hp, uz, ur, uh, az, ar, ah):
    z, r, hh = _gru_gates(hp, uz, ur, uh, az, ar, ah)
    dz = z * (1.0 - z) * az
    dr = r * (1.0 - r) * ar
    dhh = (1.0 - hh * hh) * ah * (r + hp * dr)
    return z * hh + (1.0 - z) * hp, dz * (hh - hp) + z * dhh + (1.0 - z)


@triton.jit
def _lstm_gates(c, h, uf, uc, uo, af, ac, ao, pf, po):
    f = _sigmoid(af * h + uf + pf * c)
    ct = _tanh(ac * h + uc)
    cn = f * c + (1.0 - f) * ct
    o = _sigmoid(ao * h + uo + po * cn)
    return f, ct, cn, o, _tanh(cn)


@triton.jit
def _lstm_jacobian(c, h, f, ct, o, tc, af, ac, ao, pf, po):
    """J[i][j] = d state'_i / d state_j with state = (c, h)."""
    df = f * (1.0 - f)
    dcn_dc = f + df * pf * (c - ct)
    dcn_dh = df * af * (c - ct) + (1.0 - f) * (1.0 - ct * ct) * ac
    do = o * (1.0 - o)
    dhn_dcn = o * (1.0 - tc * tc)
    dhn_dc = (do * po * tc + dhn_dcn) * dcn_dc
    dhn_dh = do * (ao + po * dcn_dh) * tc + dhn_dcn * dcn_dh
    return dcn_dc, dcn_dh, dhn_dc, dhn_dh


@triton.jit
def _abs_residual(r, m):
    """|r| with NaN -> +inf and masked entries -> 0."""
    err = tl.abs(r)
    err = tl.where(err == err, err, INF)
    return tl.where(m, err, 0.0)


# ---------------------------------------------------------------------------------------------
# ParaGRU. State buffers [B,T,D]; u [B,T,3,D]; a [3,D].


@triton.jit
def _paragru_fwd_kernel(U, W, H0, R, BUF0, BUF1, RES, T, D, budget, tol, damping,
                        HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, DAMP: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    acc = BUF0.dtype.element_ty
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    rows = tl.arange(0, BLOCK_T)
    az = tl.load(W + cols, mask=cmask, other=0.0).to(acc)
    ar = tl.load(W + D + cols, mask=cmask, other=0.0).to(acc)
    ah = tl.load(W + 2 * D + cols, mask=cmask, other=0.0).to(acc)
    if HAS_H0:
        h0 = tl.load(H0 + pid_b * D + cols, mask=cmask, other=0.0).to(acc)
    else:
        h0 = tl.zeros([BLOCK_D], dtype=acc)
    s_base = pid_b.to(tl.int64) * T * D
    n_chunks = tl.cdiv(T, BLOCK_T)

    # Pass 0: h^0_t = f(h_prev, u_t) with h_prev = h0 at t = 0 and 0 elsewhere or at a reset.
    for c in range(0, n_chunks):
        t = c * BLOCK_T + rows
        tmask = t < T
        m = tmask[:, None] & cmask[None, :]
        offs = s_base + t[:, None] * D + cols[None, :]
        hp = tl.where((t == 0)[:, None], h0[None, :], 0.0)
        if HAS_RESET:
            cut = tl.load(R + pid_b * T + t, mask=tmask, other=0)[:, None] != 0
            hp = tl.where(cut, 0.0, hp)
        uz, ur, uh = _load_gates(U, s_base * 3 + t[:, None] * 3 * D + cols[None, :], m, acc, D)
        z, r, hh = _gru_gates(hp, uz, ur, uh, az, ar, ah)
        tl.store(BUF0 + offs, z * hh + (1.0 - z) * hp, mask=m)
    tl.debug_barrier()

    active = pid_b * 0 + 1
    parity = pid_b * 0
    res = tl.zeros([BLOCK_D], dtype=acc)
    for k in range(0, budget + 1):
        if active != 0:
            if k % 2 == 0:
                src = BUF0
                dst = BUF1
            else:
                src = BUF1
                dst = BUF0
            res_k = tl.zeros([BLOCK_D], dtype=acc)
            d_in = tl.zeros([BLOCK_D], dtype=acc)
            for c in range(0, n_chunks):
                t = c * BLOCK_T + rows
                tmask = t < T
                m = tmask[:, None] & cmask[None, :]
                offs = s_base + t[:, None] * D + cols[None, :]
                h = tl.load(src + offs, mask=m, other=0.0)
                hp = tl.load(src + offs - D, mask=m & (t >= 1)[:, None], other=0.0)
                hp = tl.where((t == 0)[:, None], h0[None, :], hp)
                if HAS_RESET:
                    cut = tl.load(R + pid_b * T + t, mask=tmask, other=0)[:, None] != 0
                    hp = tl.where(cut, 0.0, hp)
                uz, ur, uh = _load_gates(U, s_base * 3 + t[:, None] * 3 * D + cols[None, :], m, acc, D)
                f, J = _gru_step_jacobian(hp, uz, ur, uh, az, ar, ah)
                r = h - f
                res_k = tl.maximum(res_k, tl.max(_abs_residual(r, m), axis=0))
                if k < budget:
                    # d_t = J_t d_{t-1} - r_t; J_t := 0 at a reset; identity past T.
                    if HAS_RESET:
                        J = tl.where(cut, 0.0, J)
                    J = tl.where(m, J, 1.0)
                    cum_a, cum_b = tl.associative_scan((J, tl.where(m, -r, 0.0)), 0, combine_diag)
                    d = cum_b + cum_a * d_in[None, :]
                    d_in = last_row(d, rows, BLOCK_T)
                    if DAMP:
                        d = tl.minimum(tl.maximum(d, -damping), damping)
                    tl.store(dst + offs, h + d, mask=m)
            tl.debug_barrier()
            res = res_k
            if (tl.max(res_k, axis=0) <= tol) | (k >= budget):
                active = active * 0
                parity = parity * 0 + k % 2

    if parity != 0:  # the answer is in BUF1: the caller reads BUF0
        for c in range(0, n_chunks):
            t = c * BLOCK_T + rows
            m = (t < T)[:, None] & cmask[None, :]
            offs = s_base + t[:, None] * D + cols[None, :]
            tl.store(BUF0 + offs, tl.load(BUF1 + offs, mask=m, other=0.0), mask=m)
    tl.store(RES + pid_b * D + cols, res, mask=cmask)


@triton.jit
def _paragru_bwd_kernel(U, W, H0, R, HS, G, GU, GA, GH0, T, D,
                        HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    acc = HS.dtype.element_ty
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    rows = tl.arange(0, BLOCK_T)
    az = tl.load(W + cols, mask=cmask, other=0.0).to(acc)
    ar = tl.load(W + D + cols, mask=cmask, other=0.0).to(acc)
    ah = tl.load(W + 2 * D + cols, mask=cmask, other=0.0).to(acc)
    if HAS_H0:
        h0 = tl.load(H0 + pid_b * D + cols, mask=cmask, other=0.0).to(acc)
    else:
        h0 = tl.zeros([BLOCK_D], dtype=acc)
    s_base = pid_b.to(tl.int64) * T * D
    lam_in = tl.zeros([BLOCK_D], dtype=acc)
    ga_z = tl.zeros([BLOCK_D], dtype=acc)
    ga_r = tl.zeros([BLOCK_D], dtype=acc)
    ga_h = tl.zeros([BLOCK_D], dtype=acc)
    gh0 = tl.zeros([BLOCK_D], dtype=acc)
    for c in range(0, tl.cdiv(T, BLOCK_T)):
        i = c * BLOCK_T + rows
        t = T - 1 - i  # row i of the chunk walks time backwards
        tmask = i < T
        m = tmask[:, None] & cmask[None, :]
        offs = s_base + t[:, None] * D + cols[None, :]
        u_offs = s_base * 3 + t[:, None] * 3 * D + cols[None, :]
        h = tl.load(HS + offs, mask=m, other=0.0)
        # lambda_t = J_{t+1}^T lambda_{t+1} + g_t, with J_{t+1} at (h_t, u_{t+1}); cut where
        # t+1 starts a document or is past the end.
        nxt = tmask & (t + 1 < T)
        m1 = nxt[:, None] & cmask[None, :]
        uz1, ur1, uh1 = _load_gates(U, u_offs + 3 * D, m1, acc, D)
        _, J1 = _gru_step_jacobian(h, uz1, ur1, uh1, az, ar, ah)
        if HAS_RESET:
            nxt = nxt & (tl.load(R + pid_b * T + t + 1, mask=nxt, other=0) == 0)
        A = tl.where(nxt[:, None], J1, 0.0)
        A = tl.where(tmask[:, None], A, 1.0)
        g = tl.load(G + offs, mask=m, other=0.0).to(acc)
        cum_a, cum_b = tl.associative_scan((A, g), 0, combine_diag)
        lam = cum_b + cum_a * lam_in[None, :]
        lam_in = last_row(lam, rows, BLOCK_T)
        # VJP of f at (h_{t-1}, u_t).
        hp = tl.load(HS + offs - D, mask=m & (t >= 1)[:, None], other=0.0)
        hp = tl.where((t == 0)[:, None], h0[None, :], hp)
        keep = tmask & (t == 0)
        if HAS_RESET:
            cut = tl.load(R + pid_b * T + t, mask=tmask, other=0)[:, None] != 0
            hp = tl.where(cut, 0.0, hp)
            keep = keep & (tl.load(R + pid_b * T + t, mask=tmask, other=0) == 0)
        uz, ur, uh = _load_gates(U, u_offs, m, acc, D)
        z, r, hh = _gru_gates(hp, uz, ur, uh, az, ar, ah)
        dz = lam * (hh - hp) * z * (1.0 - z)  # d pre-activation of z
        dh = lam * z * (1.0 - hh * hh)  # of ĥ
        dr = dh * ah * hp * r * (1.0 - r)  # of r
        dz = tl.where(m, dz, 0.0)
        dh = tl.where(m, dh, 0.0)
        dr = tl.where(m, dr, 0.0)
        gu = GU.dtype.element_ty
        tl.store(GU + u_offs, dz.to(gu, fp_downcast_rounding="rtne"), mask=m)
        tl.store(GU + u_offs + D, dr.to(gu, fp_downcast_rounding="rtne"), mask=m)
        tl.store(GU + u_offs + 2 * D, dh.to(gu, fp_downcast_rounding="rtne"), mask=m)
        ga_z += tl.sum(dz * hp, axis=0)
        ga_r += tl.sum(dr * hp, axis=0)
        ga_h += tl.sum(dh * hp * r, axis=0)
        dhp = lam * (1.0 - z) + dz * az + dr * ar + dh * ah * r
        gh0 += tl.sum(tl.where(keep[:, None], dhp, 0.0), axis=0)
    base = pid_b * 3 * D + cols
    tl.store(GA + base, ga_z, mask=cmask)
    tl.store(GA + base + D, ga_r, mask=cmask)
    tl.store(GA + base + 2 * D, ga_h, mask=cmask)
    tl.store(GH0 + pid_b * D + cols, gh0, mask=cmask)


# ---------------------------------------------------------------------------------------------
# ParaLSTM. State buffers component-major [2,B,T,D] (0 = c, 1 = h); u [B,T,3,D]; a [3,D]; p [2,D].


@triton.jit
def _paralstm_fwd_kernel(U, W, PW, S0, R, BUF0, BUF1, RES, T, D, comp, budget, tol, damping,
                         HAS_S0: tl.constexpr, HAS_RESET: tl.constexpr, DAMP: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # comp = B*T*D, the stride between the c and h components of a state buffer.
    pid_b = tl.program_id(0)
    acc = BUF0.dtype.element_ty
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    rows = tl.arange(0, BLOCK_T)
    af = tl.load(W + cols, mask=cmask, other=0.0).to(acc)
    ac = tl.load(W + D + cols, mask=cmask, other=0.0).to(acc)
    ao = tl.load(W + 2 * D + cols, mask=cmask, other=0.0).to(acc)
    pf = tl.load(PW + cols, mask=cmask, other=0.0).to(acc)
    po = tl.load(PW + D + cols, mask=cmask, other=0.0).to(acc)
    if HAS_S0:  # S0 [B,D,2] = (c, h)
        c0 = tl.load(S0 + (pid_b * D + cols) * 2, mask=cmask, other=0.0).to(acc)
        h0 = tl.load(S0 + (pid_b * D + cols) * 2 + 1, mask=cmask, other=0.0).to(acc)
    else:
        c0 = tl.zeros([BLOCK_D], dtype=acc)
        h0 = tl.zeros([BLOCK_D], dtype=acc)
    s_base = pid_b.to(tl.int64) * T * D
    n_chunks = tl.cdiv(T, BLOCK_T)

    for c in range(0, n_chunks):
        t = c * BLOCK_T + rows
        tmask = t < T
        m = tmask[:, None] & cmask[None, :]
        offs = s_base + t[:, None] * D + cols[None, :]
        first = (t == 0)[:, None]
        cp = tl.where(first, c0[None, :], 0.0)
        hp = tl.where(first, h0[None, :], 0.0)
        if HAS_RESET:
            cut = tl.load(R + pid_b * T + t, mask=tmask, other=0)[:, None] != 0
            cp = tl.where(cut, 0.0, cp)
            hp = tl.where(cut, 0.0, hp)
        uf, uc, uo = _load_gates(U, s_base * 3 + t[:, None] * 3 * D + cols[None, :], m, acc, D)
        f, ct, cn, o, tc = _lstm_gates(cp, hp, uf, uc, uo, af, ac, ao, pf, po)
        tl.store(BUF0 + offs, cn, mask=m)
        tl.store(BUF0 + comp + offs, o * tc, mask=m)
    tl.debug_barrier()

    active = pid_b * 0 + 1
    parity = pid_b * 0
    res = tl.zeros([BLOCK_D], dtype=acc)
    for k in range(0, budget + 1):
        if active != 0:
            if k % 2 == 0:
                src = BUF0
                dst = BUF1
            else:
                src = BUF1
                dst = BUF0
            res_k = tl.zeros([BLOCK_D], dtype=acc)
            dc_in = tl.zeros([BLOCK_D], dtype=acc)
            dh_in = tl.zeros([BLOCK_D], dtype=acc)
            for c in range(0, n_chunks):
                t = c * BLOCK_T + rows
                tmask = t < T
                m = tmask[:, None] & cmask[None, :]
                offs = s_base + t[:, None] * D + cols[None, :]
                cs = tl.load(src + offs, mask=m, other=0.0)
                hs = tl.load(src + comp + offs, mask=m, other=0.0)
                mp = m & (t >= 1)[:, None]
                cp = tl.load(src + offs - D, mask=mp, other=0.0)
                hp = tl.load(src + comp + offs - D, mask=mp, other=0.0)
                first = (t == 0)[:, None]
                cp = tl.where(first, c0[None, :], cp)
                hp = tl.where(first, h0[None, :], hp)
                if HAS_RESET:
                    cut = tl.load(R + pid_b * T + t, mask=tmask, other=0)[:, None] != 0
                    cp = tl.where(cut, 0.0, cp)
                    hp = tl.where(cut, 0.0, hp)
                uf, uc, uo = _load_gates(U, s_base * 3 + t[:, None] * 3 * D + cols[None, :], m, acc, D)
                f, ct, cn, o, tc = _lstm_gates(cp, hp, uf, uc, uo, af, ac, ao, pf, po)
                rc = cs - cn
                rh = hs - o * tc
                res_k = tl.maximum(res_k, tl.max(tl.maximum(_abs_residual(rc, m), _abs_residual(rh, m)), axis=0))
                if k < budget:
                    j00, j01, j10, j11 = _lstm_jacobian(cp, hp, f, ct, o, tc, af, ac, ao, pf, po)
                    if HAS_RESET:
                        j00 = tl.where(cut, 0.0, j00)
                        j01 = tl.where(cut, 0.0, j01)
                        j10 = tl.where(cut, 0.0, j10)
                        j11 = tl.where(cut, 0.0, j11)
                    j00 = tl.where(m, j00, 1.0)
                    j01 = tl.where(m, j01, 0.0)
                    j10 = tl.where(m, j10, 0.0)
                    j11 = tl.where(m, j11, 1.0)
                    q00, q01, q10, q11, e0, e1 = tl.associative_scan(
                        (j00, j01, j10, j11, tl.where(m, -rc, 0.0), tl.where(m, -rh, 0.0)), 0, combine_block)
                    dc = e0 + q00 * dc_in[None, :] + q01 * dh_in[None, :]
                    dh = e1 + q10 * dc_in[None, :] + q11 * dh_in[None, :]
                    dc_in = last_row(dc, rows, BLOCK_T)
                    dh_in = last_row(dh, rows, BLOCK_T)
                    if DAMP:
                        dc = tl.minimum(tl.maximum(dc, -damping), damping)
                        dh = tl.minimum(tl.maximum(dh, -damping), damping)
                    tl.store(dst + offs, cs + dc, mask=m)
                    tl.store(dst + comp + offs, hs + dh, mask=m)
            tl.debug_barrier()
            res = res_k
            if (tl.max(res_k, axis=0) <= tol) | (k >= budget):
                active = active * 0
                parity = parity * 0 + k % 2

    if parity != 0:
        for c in range(0, n_chunks):
            t = c * BLOCK_T + rows
            m = (t < T)[:, None] & cmask[None, :]
            offs = s_base + t[:, None] * D + cols[None, :]
            tl.store(BUF0 + offs, tl.load(BUF1 + offs, mask=m, other=0.0), mask=m)
            tl.store(BUF0 + comp + offs, tl.load(BUF1 + comp + offs, mask=m, other=0.0), mask=m)
    tl.store(RES + pid_b * D + cols, res, mask=cmask)


@triton.jit
def _paralstm_bwd_kernel(U, W, PW, S0, R, HS, G, GU, GA, GP, GS0, T, D, comp,
                         HAS_S0: tl.constexpr, HAS_RESET: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    acc = HS.dtype.element_ty
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    rows = tl.arange(0, BLOCK_T)
    af = tl.load(W + cols, mask=cmask, other=0.0).to(acc)
    ac = tl.load(W + D + cols, mask=cmask, other=0.0).to(acc)
    ao = tl.load(W + 2 * D + cols, mask=cmask, other=0.0).to(acc)
    pf = tl.load(PW + cols, mask=cmask, other=0.0).to(acc)
    po = tl.load(PW + D + cols, mask=cmask, other=0.0).to(acc)
    if HAS_S0:
        c0 = tl.load(S0 + (pid_b * D + cols) * 2, mask=cmask, other=0.0).to(acc)
        h0 = tl.load(S0 + (pid_b * D + cols) * 2 + 1, mask=cmask, other=0.0).to(acc)
    else:
        c0 = tl.zeros([BLOCK_D], dtype=acc)
        h0 = tl.zeros([BLOCK_D], dtype=acc)
    s_base = pid_b.to(tl.int64) * T * D
    lc_in = tl.zeros([BLOCK_D], dtype=acc)
    lh_in = tl.zeros([BLOCK_D], dtype=acc)
    ga_f = tl.zeros([BLOCK_D], dtype=acc)
    ga_c = tl.zeros([BLOCK_D], dtype=acc)
    ga_o = tl.zeros([BLOCK_D], dtype=acc)
    gp_f = tl.zeros([BLOCK_D], dtype=acc)
    gp_o = tl.zeros([BLOCK_D], dtype=acc)
    gc0 = tl.zeros([BLOCK_D], dtype=acc)
    gh0 = tl.zeros([BLOCK_D], dtype=acc)
    for c in range(0, tl.cdiv(T, BLOCK_T)):
        i = c * BLOCK_T + rows
        t = T - 1 - i
        tmask = i < T
        m = tmask[:, None] & cmask[None, :]
        offs = s_base + t[:, None] * D + cols[None, :]
        u_offs = s_base * 3 + t[:, None] * 3 * D + cols[None, :]
        cs = tl.load(HS + offs, mask=m, other=0.0)
        hs = tl.load(HS + comp + offs, mask=m, other=0.0)
        # lambda_t = J_{t+1}^T lambda_{t+1} + g_t, J_{t+1} at (state_t, u_{t+1}).
        nxt = tmask & (t + 1 < T)
        m1 = nxt[:, None] & cmask[None, :]
        uf1, uc1, uo1 = _load_gates(U, u_offs + 3 * D, m1, acc, D)
        f1, ct1, cn1, o1, tc1 = _lstm_gates(cs, hs, uf1, uc1, uo1, af, ac, ao, pf, po)
        j00, j01, j10, j11 = _lstm_jacobian(cs, hs, f1, ct1, o1, tc1, af, ac, ao, pf, po)
        if HAS_RESET:
            nxt = nxt & (tl.load(R + pid_b * T + t + 1, mask=nxt, other=0) == 0)
        keep1 = nxt[:, None]
        pad = tmask[:, None]
        # Transposed: A[i][j] = J[j][i].
        a00 = tl.where(pad, tl.where(keep1, j00, 0.0), 1.0)
        a01 = tl.where(keep1, j10, 0.0)
        a10 = tl.where(keep1, j01, 0.0)
        a11 = tl.where(pad, tl.where(keep1, j11, 0.0), 1.0)
        g_c = tl.load(G + offs, mask=m, other=0.0).to(acc)
        g_h = tl.load(G + comp + offs, mask=m, other=0.0).to(acc)
        q00, q01, q10, q11, e0, e1 = tl.associative_scan((a00, a01, a10, a11, g_c, g_h), 0, combine_block)
        lc = e0 + q00 * lc_in[None, :] + q01 * lh_in[None, :]
        lh = e1 + q10 * lc_in[None, :] + q11 * lh_in[None, :]
        lc_in = last_row(lc, rows, BLOCK_T)
        lh_in = last_row(lh, rows, BLOCK_T)
        # VJP of f at (state_{t-1}, u_t).
        mp = m & (t >= 1)[:, None]
        cp = tl.load(HS + offs - D, mask=mp, other=0.0)
        hp = tl.load(HS + comp + offs - D, mask=mp, other=0.0)
        first = (t == 0)[:, None]
        cp = tl.where(first, c0[None, :], cp)
        hp = tl.where(first, h0[None, :], hp)
        keep = tmask & (t == 0)
        if HAS_RESET:
            cut_t = tl.load(R + pid_b * T + t, mask=tmask, other=0) != 0
            cp = tl.where(cut_t[:, None], 0.0, cp)
            hp = tl.where(cut_t[:, None], 0.0, hp)
            keep = keep & (cut_t == 0)
        uf, uc, uo = _load_gates(U, u_offs, m, acc, D)
        f, ct, cn, o, tc = _lstm_gates(cp, hp, uf, uc, uo, af, ac, ao, pf, po)
        do = tl.where(m, lh * tc * o * (1.0 - o), 0.0)  # d pre-activation of o
        g_cn = lc + lh * o * (1.0 - tc * tc) + do * po  # dL/dc'
        df = tl.where(m, g_cn * (cp - ct) * f * (1.0 - f), 0.0)  # of f
        dct = tl.where(m, g_cn * (1.0 - f) * (1.0 - ct * ct), 0.0)  # of c̃
        gu = GU.dtype.element_ty
        tl.store(GU + u_offs, df.to(gu, fp_downcast_rounding="rtne"), mask=m)
        tl.store(GU + u_offs + D, dct.to(gu, fp_downcast_rounding="rtne"), mask=m)
        tl.store(GU + u_offs + 2 * D, do.to(gu, fp_downcast_rounding="rtne"), mask=m)
        ga_f += tl.sum(df * hp, axis=0)
        ga_c += tl.sum(dct * hp, axis=0)
        ga_o += tl.sum(do * hp, axis=0)
        gp_f += tl.sum(df * cp, axis=0)
        gp_o += tl.sum(do * cn, axis=0)
        k0 = keep[:, None]
        gc0 += tl.sum(tl.where(k0, g_cn * f + df * pf, 0.0), axis=0)
        gh0 += tl.sum(tl.where(k0, df * af + dct * ac + do * ao, 0.0), axis=0)
    base = pid_b * 3 * D + cols
    tl.store(GA + base, ga_f, mask=cmask)
    tl.store(GA + base + D, ga_c, mask=cmask)
    tl.store(GA + base + 2 * D, ga_o, mask=cmask)
    tl.store(GP + pid_b * 2 * D + cols, gp_f, mask=cmask)
    tl.store(GP + pid_b * 2 * D + D + cols, gp_o, mask=cmask)
    tl.store(GS0 + (pid_b * D + cols) * 2, gc0, mask=cmask)
    tl.store(GS0 + (pid_b * D + cols) * 2 + 1, gh0, mask=cmask)


# ---------------------------------------------------------------------------------------------
# Autograd wrapper.


class FusedNewtonSolve(torch.autograd.Function):
    """kernels.pararnn._NewtonSolve with the fused kernels; same inputs (minus linear_solve) and outputs.

    forward(ctx, cell_name, opts, u, init, reset, *params) with opts = (num_iters, tol,
    max_iters, damping, block_t, block_d); returns (states [B,T,D] or [B,T,D,2], residual).
    """

    @staticmethod
    def forward(ctx, cell_name, opts, u, init, reset, *params):
        num_iters, tol, max_iters, damping, block_t, block_d = opts
        lstm = cell_name == "paralstm"
        B, T, _, D = u.shape
        dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
        u = u.contiguous()
        params = [p.to(dtype).contiguous() for p in params]
        init = None if init is None else init.to(dtype).contiguous()
        reset_u8 = None if reset is None else reset.to(torch.bool).contiguous().view(torch.uint8)
        shape = (2, B, T, D) if lstm else (B, T, D)
        buf0 = torch.empty(shape, dtype=dtype, device=u.device)
        buf1 = torch.empty_like(buf0)
        res = torch.zeros(B, D, dtype=dtype, device=u.device)
        budget = num_iters if tol is None else max_iters
        flags = dict(HAS_RESET=reset is not None, DAMP=damping is not None, BLOCK_T=block_t, BLOCK_D=block_d)
        scalars = (budget, -1.0 if tol is None else float(tol), 0.0 if damping is None else float(damping))
        dummy = res
        grid = (B, triton.cdiv(D, block_d))
        if B * T * D:
            if lstm:
                _paralstm_fwd_kernel[grid](
                    u, params[0], params[1], dummy if init is None else init, dummy if reset is None else reset_u8,
                    buf0, buf1, res, T, D, B * T * D, *scalars, HAS_S0=init is not None, **flags)
            else:
                _paragru_fwd_kernel[grid](
                    u, params[0], dummy if init is None else init, dummy if reset is None else reset_u8,
                    buf0, buf1, res, T, D, *scalars, HAS_H0=init is not None, **flags)
        del buf1
        residual = res.max() if res.numel() else res.new_zeros(())
        ctx.lstm, ctx.blocks = lstm, (block_t, block_d)
        ctx.has_init, ctx.has_reset = init is not None, reset is not None
        ctx.save_for_backward(buf0, u, init if init is not None else res.new_empty(0),
                              reset_u8 if reset is not None else res.new_empty(0), *params)
        ctx.mark_non_differentiable(residual)
        states = buf0.permute(1, 2, 3, 0) if lstm else buf0
        return states, residual

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states, _grad_residual):
        hs, u, init, reset_u8, *params = ctx.saved_tensors
        lstm = ctx.lstm
        block_t, block_d = ctx.blocks
        B, T, _, D = u.shape
        grad_states = grad_states.to(hs.dtype)
        g = grad_states.permute(3, 0, 1, 2).contiguous() if lstm else grad_states.contiguous()
        grad_u = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        grad_a = torch.zeros(B, 3, D, dtype=hs.dtype, device=u.device)
        grad_init = torch.zeros((B, D, 2) if lstm else (B, D), dtype=hs.dtype, device=u.device)
        init_arg = init if ctx.has_init else grad_a
        reset_arg = reset_u8 if ctx.has_reset else grad_a
        flags = dict(HAS_RESET=ctx.has_reset, BLOCK_T=block_t, BLOCK_D=block_d)
        grid = (B, triton.cdiv(D, block_d))
        if lstm:
            grad_p = torch.zeros(B, 2, D, dtype=hs.dtype, device=u.device)
            if B * T * D:
                _paralstm_bwd_kernel[grid](u, params[0], params[1], init_arg, reset_arg, hs, g, grad_u,
                                           grad_a, grad_p, grad_init, T, D, B * T * D,
                                           HAS_S0=ctx.has_init, **flags)
            grad_params = (grad_a.sum(0), grad_p.sum(0))
        else:
            if B * T * D:
                _paragru_bwd_kernel[grid](u, params[0], init_arg, reset_arg, hs, g, grad_u, grad_a,
                                          grad_init, T, D, HAS_H0=ctx.has_init, **flags)
            grad_params = (grad_a.sum(0),)
        return (None, None, grad_u, grad_init if ctx.has_init else None, None, *grad_params)
