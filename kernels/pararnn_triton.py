"""ParaGRU / ParaLSTM Newton solves as fused Triton kernels; same math as kernels.pararnn.

Forward: Newton per chunk, on chip. A program owns one batch row and BLOCK_D channels (the cells
are channel-local, so these are independent systems) and walks the time axis once, in chunks of
BLOCK_T steps. For each chunk it loads u once and solves the chunk's own system
    F_t(h) = h_t - f(h_{t-1}, u_t) = 0,   t in the chunk,  h_{t-1} at the first step = h_in,
where h_in, the state entering the chunk, is the previous chunk's converged last state: a known
constant, not an unknown, so the Newton correction entering the chunk is zero (d_in = 0):
    h^0 = f(shift(h_in, 0, 0, ...));  repeat:  r = h - f(shift(h)),  J = df/dh_{t-1},
    d_t = J_t d_{t-1} - r_t  (tl.associative_scan over the chunk, d_{-1} = 0),  h += d,
until max|r| <= tol over the chunk (or exactly num_iters iterations without tol; at most max_iters
with it), then writes the chunk's h once and carries its last row to the next chunk. shift() is
a register gather (tl.gather), so the iterates never leave the chip: HBM traffic is u read once
and the state written once, nothing else (module docstring of kernels/pararnn.py for the math).

The fixed point is the sequential recurrence, as for the reference's global Newton; the iterates
differ (the reference runs every iteration over the whole sequence). The reported residual is
max_t |h_t - f(h_{t-1}, u_t)| of the returned h: each chunk's final residual is measured against
the h_in that was stored, so the max over chunks is exactly the global residual. NaN -> +inf.

Backward: one reverse pass per program, no Newton. With mu_t = J_t^T lambda_t (the adjoint sent
from step t back to h_{t-1}; zero where a document starts at t),
    mu_t = J_t^T (g_t + mu_{t+1})   (a reverse scan whose elements all live at row t),
    lambda_t = g_t + mu_{t+1},
then the VJP of f at (h_{t-1}, u_t) gives grad u_t and per-program partial sums over t of the
grads of a (and p); grad h0 = mu_0. h is read once (plus one row per chunk for h_{t-1} of the
chunk's last step), u, g once, grad u written once.

Accumulation dtype = the state buffer's: fp32, or fp64 for fp64 inputs. u may be any float dtype;
it is converted on load, and grad u is stored in u's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.scan_triton import combine_block, combine_diag, last_row

INF = tl.constexpr(float("inf"))  # NaN residuals are reported as +inf


def launch_config(lstm: bool, B: int, T: int, D: int, block_t: int | None = None,
                  block_d: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for a solve of B x D channels over T steps.

    One warp per program, time across its 32 lanes: BLOCK_D = 4 channels, each thread holds one
    step of 4 adjacent channels (a 16-byte fp32 / 8-byte bf16 vector). In that layout the loads,
    the time scans (warp shuffles) and the shift by one step (a warp-local tl.gather) need no
    shared memory and no layout conversion, and the kernels take 80-140 registers without spills
    (wider channel blocks put channels across lanes and warps: 150-255 registers, conversions
    through shared memory, spills in the backward). BLOCK_T = 32: one step per lane. At the 1B/7B
    shapes (B*D = 8192) that is 2048 one-warp programs, all resident at once on an H100 (about 25
    warps per SM fit at 80 registers), each walking T/32 chunks; neighbouring channel blocks run
    side by side (channel blocks are the grid's fast axis), so they share 32-byte sectors in L2.
    """
    return block_t or 32, block_d or 4, 1


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh x = 2 σ(2x) - 1: finite for every x (exp overflow gives exactly ±1).
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _load3(P, offs, m, acc, stride):
    """Three rows of a [.., 3, D]-shaped tensor (gates, or the weights a) at offs, offs+stride, ..."""
    x0 = tl.load(P + offs, mask=m, other=0.0).to(acc)
    x1 = tl.load((P + stride) + offs, mask=m, other=0.0).to(acc)
    x2 = tl.load((P + 2 * stride) + offs, mask=m, other=0.0).to(acc)
    return x0, x1, x2


@triton.jit
def _shift(x, idx, edge, x_edge):
    """The chunk tile x with its rows moved by one step of time (idx = the source row of each
    row); the row marked edge, whose source lies outside the chunk, takes x_edge [BLOCK_D]."""
    return tl.where(edge, x_edge[None, :], tl.gather(x, idx, 0))


@triton.jit
def _abs_residual(r):
    """|r| with NaN -> +inf."""
    err = tl.abs(r)
    return tl.where(err == err, err, INF)


@triton.jit
def _keep_rows(R_row, t, tmask, HAS_RESET: tl.constexpr):
    """[BLOCK_T, 1]: the step at t sees its h_{t-1} (false where a document starts, and past T).

    Past T (and past D) u loads as 0 and h_{t-1} is cut, so f = 0 there: h = 0 and r = 0 exactly,
    and the padding needs no mask of its own in the Newton loop."""
    keep = tmask
    if HAS_RESET:
        keep = keep & (tl.load(R_row + t, mask=tmask, other=1) == 0)
    return keep[:, None]


@triton.jit
def _store_gates(GU, offs, m, g0, g1, g2, D):
    gu = GU.dtype.element_ty
    tl.store(GU + offs, g0.to(gu, fp_downcast_rounding="rtne"), mask=m)
    tl.store((GU + D) + offs, g1.to(gu, fp_downcast_rounding="rtne"), mask=m)
    tl.store((GU + 2 * D) + offs, g2.to(gu, fp_downcast_rounding="rtne"), mask=m)


# ---------------------------------------------------------------------------------------------
# Cells (same equations as kernels.pararnn.ParaGRUCell / ParaLSTMCell).


@triton.jit
def _gru_gates(hp, uz, ur, uh, az, ar, ah):
    z = _sigmoid(az * hp + uz)
    r = _sigmoid(ar * hp + ur)
    hh = _tanh(ah * (hp * r) + uh)
    return z, r, hh


@triton.jit
def _gru_jacobian(hp, z, r, hh, az, ar, ah):
    # h' = z ĥ + (1-z) h  =>  dh'/dh = dz (ĥ - h) + z dĥ + (1 - z)
    dz = z * (1.0 - z) * az
    dr = r * (1.0 - r) * ar
    dhh = (1.0 - hh * hh) * ah * (r + hp * dr)
    return dz * (hh - hp) + z * dhh + (1.0 - z)


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


# ---------------------------------------------------------------------------------------------
# ParaGRU. States [B,T,D]; u [B,T,3,D]; a [3,D].


@triton.jit
def _paragru_fwd_kernel(U, W, H0, R, H, RES, T, D, budget, tol, damping,
                        HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, DAMP: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(1)
    acc = H.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    rows = tl.arange(0, BLOCK_T)
    first = (rows == 0)[:, None]
    prev = tl.maximum(rows - 1, 0)[:, None] + tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
    az, ar, ah = _load3(W, cols, cmask, acc, D)
    if HAS_H0:
        h_in = tl.load(H0 + pid_b * D + cols, mask=cmask, other=0.0).to(acc)
    else:
        h_in = tl.zeros([BLOCK_D], dtype=acc)
    s_base = pid_b.to(tl.int64) * T * D
    res = tl.zeros([BLOCK_D], dtype=acc)
    for c in range(0, tl.cdiv(T, BLOCK_T)):
        t = c * BLOCK_T + rows
        tmask = t < T
        m = tmask[:, None] & cmask[None, :]
        u_offs = s_base * 3 + t[:, None] * 3 * D + cols[None, :]
        uz, ur, uh = _load3(U, u_offs, m, acc, D)
        keep = _keep_rows(R + pid_b * T, t, tmask, HAS_RESET)
        # h^0_t = f(h_in at the chunk's first step, 0 elsewhere)
        hp = tl.where(first & keep, h_in[None, :], 0.0)
        z, r, hh = _gru_gates(hp, uz, ur, uh, az, ar, ah)
        h = z * hh + (1.0 - z) * hp
        k = pid_b * 0
        go = k == 0
        err = res
        while go:
            hp = tl.where(keep, _shift(h, prev, first, h_in), 0.0)
            z, r, hh = _gru_gates(hp, uz, ur, uh, az, ar, ah)
            rsd = h - (z * hh + (1.0 - z) * hp)
            err = tl.max(_abs_residual(rsd), axis=0)
            go = (tl.max(err, axis=0) > tol) & (k < budget)
            if go:
                # d_t = J_t d_{t-1} - r_t from d = 0, J_t := 0 where h_{t-1} is cut
                J = tl.where(keep, _gru_jacobian(hp, z, r, hh, az, ar, ah), 0.0)
                _, d = tl.associative_scan((J, -rsd), 0, combine_diag)
                if DAMP:
                    d = tl.minimum(tl.maximum(d, -damping), damping)
                h = h + d
                k += 1
        res = tl.maximum(res, err)
        tl.store(H + s_base + t[:, None] * D + cols[None, :], h, mask=m)
        h_in = last_row(h, rows, BLOCK_T)
    tl.store(RES + pid_b * D + cols, res, mask=cmask)


@triton.jit
def _paragru_bwd_kernel(U, W, H0, R, HS, G, GU, GA, GH0, T, D, sg_b, sg_t,
                        HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # Row i of chunk c is time t = T-1-(c*BLOCK_T + i): the scan over rows runs backwards in time.
    pid_b = tl.program_id(1)
    acc = HS.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    rows = tl.arange(0, BLOCK_T)
    zero_i = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
    earlier = tl.minimum(rows + 1, BLOCK_T - 1)[:, None] + zero_i  # row of t-1
    later = tl.maximum(rows - 1, 0)[:, None] + zero_i  # row of t+1
    first = (rows == 0)[:, None]
    last = (rows == BLOCK_T - 1)[:, None]
    az, ar, ah = _load3(W, cols, cmask, acc, D)
    if HAS_H0:
        h0 = tl.load(H0 + pid_b * D + cols, mask=cmask, other=0.0).to(acc)
    else:
        h0 = tl.zeros([BLOCK_D], dtype=acc)
    # This batch row's tensors; offsets inside a row are int32 (the wrapper checks 3*T*D < 2^31).
    row = pid_b.to(tl.int64) * T * D
    U += 3 * row
    GU += 3 * row
    HS += row
    G += pid_b.to(tl.int64) * sg_b
    mu_in = tl.zeros([BLOCK_D], dtype=acc)  # mu_{t+1} of the chunk's first row
    ga_z = tl.zeros([BLOCK_D], dtype=acc)
    ga_r = tl.zeros([BLOCK_D], dtype=acc)
    ga_h = tl.zeros([BLOCK_D], dtype=acc)
    gh0 = tl.zeros([BLOCK_D], dtype=acc)
    for c in range(0, tl.cdiv(T, BLOCK_T)):
        i = c * BLOCK_T + rows
        t = T - 1 - i
        tmask = i < T
        m = tmask[:, None] & cmask[None, :]
        h = tl.load(HS + t[:, None] * D + cols[None, :], mask=m, other=0.0)
        # h_{t-1}: the next row, or for the chunk's last row the state just before the chunk.
        t_edge = T - 2 - c * BLOCK_T - (BLOCK_T - 1)
        h_edge = tl.load(HS + t_edge * D + cols, mask=cmask & (cols * 0 + t_edge >= 0), other=0.0)
        hp = tl.where((t == 0)[:, None], h0[None, :], _shift(h, earlier, last, h_edge))
        keep = _keep_rows(R + pid_b * T, t, tmask, HAS_RESET)
        hp = tl.where(keep, hp, 0.0)
        u_offs = t[:, None] * (3 * D) + cols[None, :]
        uz, ur, uh = _load3(U, u_offs, m, acc, D)
        g = tl.load(G + t[:, None] * sg_t + cols[None, :], mask=m, other=0.0).to(acc)
        z, r, hh = _gru_gates(hp, uz, ur, uh, az, ar, ah)
        # mu_t = J_t (g_t + mu_{t+1}), J_t := 0 where h_{t-1} is cut (padding rows come last).
        J = tl.where(keep, _gru_jacobian(hp, z, r, hh, az, ar, ah), 0.0)
        # (mu_{t+1} of the first row, from the previous chunk, enters through its b)
        lam = g + tl.where(first, mu_in[None, :], 0.0)
        _, mu = tl.associative_scan((J, J * lam), 0, combine_diag)
        lam = tl.where(tmask[:, None], g + _shift(mu, later, first, mu_in), 0.0)
        mu_in = last_row(mu, rows, BLOCK_T)
        # VJP of f at (h_{t-1}, u_t).
        dz = lam * (hh - hp) * z * (1.0 - z)  # d pre-activation of z
        dh = lam * z * (1.0 - hh * hh)  # of ĥ
        dr = dh * ah * hp * r * (1.0 - r)  # of r
        _store_gates(GU, u_offs, m, dz, dr, dh, D)
        ga_z += tl.sum(dz * hp, axis=0)
        ga_r += tl.sum(dr * hp, axis=0)
        ga_h += tl.sum(dh * hp * r, axis=0)
        if HAS_H0:
            gh0 += tl.sum(tl.where((t == 0)[:, None] & m, mu, 0.0), axis=0)
    base = pid_b * 3 * D + cols
    tl.store(GA + base, ga_z, mask=cmask)
    tl.store(GA + base + D, ga_r, mask=cmask)
    tl.store(GA + base + 2 * D, ga_h, mask=cmask)
    if HAS_H0:
        tl.store(GH0 + pid_b * D + cols, gh0, mask=cmask)


# ---------------------------------------------------------------------------------------------
# ParaLSTM. States component-major [2,B,T,D] (0 = c, 1 = h); u [B,T,3,D]; a [3,D]; p [2,D].


@triton.jit
def _paralstm_fwd_kernel(U, W, PW, S0, R, H, RES, T, D, comp, budget, tol, damping,
                         HAS_S0: tl.constexpr, HAS_RESET: tl.constexpr, DAMP: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # comp = B*T*D, the stride between the c and h components of the state buffer.
    pid_b = tl.program_id(1)
    acc = H.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    rows = tl.arange(0, BLOCK_T)
    first = (rows == 0)[:, None]
    prev = tl.maximum(rows - 1, 0)[:, None] + tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
    af, ac, ao = _load3(W, cols, cmask, acc, D)
    pf = tl.load(PW + cols, mask=cmask, other=0.0).to(acc)
    po = tl.load(PW + D + cols, mask=cmask, other=0.0).to(acc)
    if HAS_S0:  # S0 [B,D,2] = (c, h)
        c_in = tl.load(S0 + (pid_b * D + cols) * 2, mask=cmask, other=0.0).to(acc)
        h_in = tl.load(S0 + (pid_b * D + cols) * 2 + 1, mask=cmask, other=0.0).to(acc)
    else:
        c_in = tl.zeros([BLOCK_D], dtype=acc)
        h_in = tl.zeros([BLOCK_D], dtype=acc)
    s_base = pid_b.to(tl.int64) * T * D
    res = tl.zeros([BLOCK_D], dtype=acc)
    for c in range(0, tl.cdiv(T, BLOCK_T)):
        t = c * BLOCK_T + rows
        tmask = t < T
        m = tmask[:, None] & cmask[None, :]
        uf, uc, uo = _load3(U, s_base * 3 + t[:, None] * 3 * D + cols[None, :], m, acc, D)
        keep = _keep_rows(R + pid_b * T, t, tmask, HAS_RESET)
        cp = tl.where(first & keep, c_in[None, :], 0.0)
        hp = tl.where(first & keep, h_in[None, :], 0.0)
        f, ct, cs, o, tc = _lstm_gates(cp, hp, uf, uc, uo, af, ac, ao, pf, po)
        hs = o * tc
        k = pid_b * 0
        go = k == 0
        err = res
        while go:
            cp = tl.where(keep, _shift(cs, prev, first, c_in), 0.0)
            hp = tl.where(keep, _shift(hs, prev, first, h_in), 0.0)
            f, ct, cn, o, tc = _lstm_gates(cp, hp, uf, uc, uo, af, ac, ao, pf, po)
            rc = cs - cn
            rh = hs - o * tc
            err = tl.max(tl.maximum(_abs_residual(rc), _abs_residual(rh)), axis=0)
            go = (tl.max(err, axis=0) > tol) & (k < budget)
            if go:
                j00, j01, j10, j11 = _lstm_jacobian(cp, hp, f, ct, o, tc, af, ac, ao, pf, po)
                j00 = tl.where(keep, j00, 0.0)
                j01 = tl.where(keep, j01, 0.0)
                j10 = tl.where(keep, j10, 0.0)
                j11 = tl.where(keep, j11, 0.0)
                _, _, _, _, dc, dh = tl.associative_scan((j00, j01, j10, j11, -rc, -rh), 0, combine_block)
                if DAMP:
                    dc = tl.minimum(tl.maximum(dc, -damping), damping)
                    dh = tl.minimum(tl.maximum(dh, -damping), damping)
                cs = cs + dc
                hs = hs + dh
                k += 1
        res = tl.maximum(res, err)
        offs = s_base + t[:, None] * D + cols[None, :]
        tl.store(H + offs, cs, mask=m)
        tl.store(H + comp + offs, hs, mask=m)
        c_in = last_row(cs, rows, BLOCK_T)
        h_in = last_row(hs, rows, BLOCK_T)
    tl.store(RES + pid_b * D + cols, res, mask=cmask)


@triton.jit
def _paralstm_bwd_kernel(U, W, PW, S0, R, HS, G, GU, GA, GP, GS0, T, D, comp, sg_b, sg_t, sg_d, sg_c,
                         HAS_S0: tl.constexpr, HAS_RESET: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # G [B,T,D,2] with any strides (autograd hands it over as it comes, no copy).
    pid_b = tl.program_id(1)
    acc = HS.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    rows = tl.arange(0, BLOCK_T)
    zero_i = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
    earlier = tl.minimum(rows + 1, BLOCK_T - 1)[:, None] + zero_i
    later = tl.maximum(rows - 1, 0)[:, None] + zero_i
    first = (rows == 0)[:, None]
    last = (rows == BLOCK_T - 1)[:, None]
    af, ac, ao = _load3(W, cols, cmask, acc, D)
    pf = tl.load(PW + cols, mask=cmask, other=0.0).to(acc)
    po = tl.load(PW + D + cols, mask=cmask, other=0.0).to(acc)
    if HAS_S0:
        c0 = tl.load(S0 + (pid_b * D + cols) * 2, mask=cmask, other=0.0).to(acc)
        h0 = tl.load(S0 + (pid_b * D + cols) * 2 + 1, mask=cmask, other=0.0).to(acc)
    else:
        c0 = tl.zeros([BLOCK_D], dtype=acc)
        h0 = tl.zeros([BLOCK_D], dtype=acc)
    s_base = pid_b.to(tl.int64) * T * D
    muc_in = tl.zeros([BLOCK_D], dtype=acc)
    muh_in = tl.zeros([BLOCK_D], dtype=acc)
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
        t_edge = T - 2 - c * BLOCK_T - (BLOCK_T - 1)
        e_offs = s_base + t_edge * D + cols
        e_mask = cmask & (cols * 0 + t_edge >= 0)
        at0 = (t == 0)[:, None]
        keep = _keep_rows(R + pid_b * T, t, tmask, HAS_RESET)
        cs = tl.load(HS + offs, mask=m, other=0.0)
        cp = tl.where(at0, c0[None, :], _shift(cs, earlier, last, tl.load(HS + e_offs, mask=e_mask, other=0.0)))
        cp = tl.where(keep, cp, 0.0)
        hs = tl.load(HS + comp + offs, mask=m, other=0.0)
        hp = tl.where(at0, h0[None, :], _shift(hs, earlier, last, tl.load(HS + comp + e_offs, mask=e_mask, other=0.0)))
        hp = tl.where(keep, hp, 0.0)
        uf, uc, uo = _load3(U, s_base * 3 + t[:, None] * 3 * D + cols[None, :], m, acc, D)
        g_offs = pid_b.to(tl.int64) * sg_b + t[:, None] * sg_t + cols[None, :] * sg_d
        g_c = tl.load(G + g_offs, mask=m, other=0.0).to(acc)
        g_h = tl.load(G + g_offs + sg_c, mask=m, other=0.0).to(acc)
        f, ct, cn, o, tc = _lstm_gates(cp, hp, uf, uc, uo, af, ac, ao, pf, po)
        j00, j01, j10, j11 = _lstm_jacobian(cp, hp, f, ct, o, tc, af, ac, ao, pf, po)
        # mu_t = J_t^T (g_t + mu_{t+1}): transposed blocks A[i][j] = J[j][i], cut where h_{t-1} is.
        a00 = tl.where(keep, j00, 0.0)
        a01 = tl.where(keep, j10, 0.0)
        a10 = tl.where(keep, j01, 0.0)
        a11 = tl.where(keep, j11, 0.0)
        # (mu_{t+1} of the first row, from the previous chunk, enters through its b)
        lc = g_c + tl.where(first, muc_in[None, :], 0.0)
        lh = g_h + tl.where(first, muh_in[None, :], 0.0)
        _, _, _, _, mu_c, mu_h = tl.associative_scan(
            (a00, a01, a10, a11, a00 * lc + a01 * lh, a10 * lc + a11 * lh), 0, combine_block)
        valid = tmask[:, None]
        lc = tl.where(valid, g_c + _shift(mu_c, later, first, muc_in), 0.0)
        lh = tl.where(valid, g_h + _shift(mu_h, later, first, muh_in), 0.0)
        muc_in = last_row(mu_c, rows, BLOCK_T)
        muh_in = last_row(mu_h, rows, BLOCK_T)
        # VJP of f at (state_{t-1}, u_t).
        do = lh * tc * o * (1.0 - o)  # d pre-activation of o
        g_cn = lc + lh * o * (1.0 - tc * tc) + do * po  # dL/dc'
        df = g_cn * (cp - ct) * f * (1.0 - f)  # of f
        dct = g_cn * (1.0 - f) * (1.0 - ct * ct)  # of c̃
        _store_gates(GU, s_base * 3 + t[:, None] * 3 * D + cols[None, :], m, df, dct, do, D)
        ga_f += tl.sum(df * hp, axis=0)
        ga_c += tl.sum(dct * hp, axis=0)
        ga_o += tl.sum(do * hp, axis=0)
        gp_f += tl.sum(df * cp, axis=0)
        gp_o += tl.sum(do * cn, axis=0)
        if HAS_S0:
            gc0 += tl.sum(tl.where(at0 & m, mu_c, 0.0), axis=0)
            gh0 += tl.sum(tl.where(at0 & m, mu_h, 0.0), axis=0)
    base = pid_b * 3 * D + cols
    tl.store(GA + base, ga_f, mask=cmask)
    tl.store(GA + base + D, ga_c, mask=cmask)
    tl.store(GA + base + 2 * D, ga_o, mask=cmask)
    tl.store(GP + pid_b * 2 * D + cols, gp_f, mask=cmask)
    tl.store(GP + pid_b * 2 * D + D + cols, gp_o, mask=cmask)
    if HAS_S0:
        tl.store(GS0 + (pid_b * D + cols) * 2, gc0, mask=cmask)
        tl.store(GS0 + (pid_b * D + cols) * 2 + 1, gh0, mask=cmask)


# ---------------------------------------------------------------------------------------------
# Autograd wrapper.


class FusedNewtonSolve(torch.autograd.Function):
    """kernels.pararnn._NewtonSolve with the fused kernels; same inputs (minus linear_solve) and outputs.

    forward(ctx, cell_name, opts, u, init, reset, *params) with opts = (num_iters, tol,
    max_iters, damping, block_t, block_d), block sizes None = launch_config's choice; returns
    (states [B,T,D] or [B,T,D,2], residual), the residual a 0-dim device tensor (no host sync).
    """

    @staticmethod
    def forward(ctx, cell_name, opts, u, init, reset, *params):
        num_iters, tol, max_iters, damping, block_t, block_d = opts
        lstm = cell_name == "paralstm"
        B, T, _, D = u.shape
        if 3 * T * D >= 2 ** 31:  # offsets inside one batch row are int32
            raise ValueError(f"{cell_name}: 3*T*D = {3 * T * D} must be < 2^31 for the fused kernels; "
                             f"split the sequence (sequence parallelism) or the channels (tensor parallelism)")
        dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
        u = u.contiguous()
        params = [p.to(dtype).contiguous() for p in params]
        init = None if init is None else init.to(dtype).contiguous()
        reset_u8 = None if reset is None else reset.to(torch.bool).contiguous().view(torch.uint8)
        states = torch.empty((2, B, T, D) if lstm else (B, T, D), dtype=dtype, device=u.device)
        res = torch.zeros(B, D, dtype=dtype, device=u.device)
        budget = num_iters if tol is None else max_iters
        block_t, block_d, num_warps = launch_config(lstm, B, T, D, block_t, block_d)
        flags = dict(HAS_RESET=reset is not None, DAMP=damping is not None, BLOCK_T=block_t, BLOCK_D=block_d,
                     num_warps=num_warps)
        scalars = (budget, -1.0 if tol is None else float(tol), 0.0 if damping is None else float(damping))
        dummy = res
        grid = (triton.cdiv(D, block_d), B)  # channel blocks fastest: neighbours share sectors
        if B * T * D:
            if lstm:
                _paralstm_fwd_kernel[grid](
                    u, params[0], params[1], dummy if init is None else init, dummy if reset is None else reset_u8,
                    states, res, T, D, B * T * D, *scalars, HAS_S0=init is not None, **flags)
            else:
                _paragru_fwd_kernel[grid](
                    u, params[0], dummy if init is None else init, dummy if reset is None else reset_u8,
                    states, res, T, D, *scalars, HAS_H0=init is not None, **flags)
        residual = res.max() if res.numel() else res.new_zeros(())
        ctx.lstm, ctx.blocks = lstm, (block_t, block_d)
        ctx.has_init, ctx.has_reset = init is not None, reset is not None
        ctx.save_for_backward(states, u, init if init is not None else res.new_empty(0),
                              reset_u8 if reset is not None else res.new_empty(0), *params)
        ctx.mark_non_differentiable(residual)
        return (states.permute(1, 2, 3, 0) if lstm else states), residual

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states, _grad_residual):
        hs, u, init, reset_u8, *params = ctx.saved_tensors
        lstm = ctx.lstm
        B, T, _, D = u.shape
        block_t, block_d, num_warps = launch_config(lstm, B, T, D, *ctx.blocks)
        g = grad_states if grad_states.dtype == hs.dtype else grad_states.to(hs.dtype)
        if not lstm and g.stride(2) != 1:  # the GRU kernel reads rows of channels contiguously
            g = g.contiguous()
        new = torch.empty if B * T * D else torch.zeros  # the kernels write every element, if launched
        grad_u = new(u.shape, dtype=u.dtype, device=u.device)
        grad_a = new(B, 3, D, dtype=hs.dtype, device=u.device)
        grad_init = new((B, D, 2) if lstm else (B, D), dtype=hs.dtype, device=u.device) if ctx.has_init else None
        init_arg = init if ctx.has_init else grad_a
        reset_arg = reset_u8 if ctx.has_reset else grad_a
        flags = dict(HAS_RESET=ctx.has_reset, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
        grid = (triton.cdiv(D, block_d), B)  # channel blocks fastest: neighbours share sectors
        if lstm:
            grad_p = new(B, 2, D, dtype=hs.dtype, device=u.device)
            if B * T * D:
                _paralstm_bwd_kernel[grid](u, params[0], params[1], init_arg, reset_arg, hs, g, grad_u,
                                           grad_a, grad_p, grad_a if grad_init is None else grad_init,
                                           T, D, B * T * D, *g.stride(), HAS_S0=ctx.has_init, **flags)
            grad_params = (grad_a.sum(0), grad_p.sum(0))
        else:
            if B * T * D:
                _paragru_bwd_kernel[grid](u, params[0], init_arg, reset_arg, hs, g, grad_u, grad_a,
                                          grad_a if grad_init is None else grad_init, T, D,
                                          g.stride(0), g.stride(1), HAS_H0=ctx.has_init, **flags)
            grad_params = (grad_a.sum(0),)
        return (None, None, grad_u, grad_init, None, *grad_params)
