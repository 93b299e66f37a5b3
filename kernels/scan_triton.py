"""Linear recurrences h_t = A_t h_{t-1} + b_t as Triton kernels; same contract as kernels.scan.

One program owns one batch row and a block of BLOCK_D channels and walks the whole time axis in
chunks of BLOCK_T: inside a chunk, tl.associative_scan over time with the summary combine
    (P1, e1) then (P2, e2)  ->  (P2 P1, P2 e1 + e2)
gives every position's transition and state from the chunk start; the state entering the chunk
(the carry, held in registers) is then folded in, h_t = e_t + P_t h_in. Channels are independent
(A is diagonal or 2x2-block-diagonal), so no program waits for another.

Positions past T are identity transitions with zero input (A = 1, b = 0): they change neither the
trajectory nor the summary, so any T works. A reverse scan reads time backwards (t = T-1-i) and is
otherwise the same kernel. Inputs of any float dtype are loaded and converted to the accumulation
dtype, which is the output's: fp32, or fp64 when an input is fp64 (as in the reference).

The combine functions and _last_row are shared with the fused ParaRNN kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.scan import _check_shapes, _compute_dtype

# GPU defaults, not tuned on a GPU yet (see bench/results/pararnn.md). Tests pass block_t=16.
DEFAULT_BLOCK_T = 32
DEFAULT_BLOCK_D = 32


@triton.jit
def combine_diag(p1, e1, p2, e2):
    """(p1, e1) then (p2, e2): h = p2 (p1 h + e1) + e2."""
    return p2 * p1, p2 * e1 + e2


@triton.jit
def combine_block(p00, p01, p10, p11, e0, e1, q00, q01, q10, q11, f0, f1):
    """2x2 blocks: (P, e) then (Q, f) -> (Q P, Q e + f); P[i, j] maps component j to i."""
    return (q00 * p00 + q01 * p10, q00 * p01 + q01 * p11,
            q10 * p00 + q11 * p10, q10 * p01 + q11 * p11,
            q00 * e0 + q01 * e1 + f0, q10 * e0 + q11 * e1 + f1)


@triton.jit
def last_row(x, rows, BLOCK_T: tl.constexpr):
    """x[BLOCK_T - 1, :] of a [BLOCK_T, BLOCK_D] tile (a register tile cannot be indexed)."""
    return tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, x, 0.0), axis=0)


@triton.jit
def _scan_diag_kernel(A, Bv, H0, R, H, P, E, T, D,
                      HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, REVERSE: tl.constexpr,
                      SUMMARY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    acc = H.dtype.element_ty
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    rows = tl.arange(0, BLOCK_T)
    row_base = pid_b.to(tl.int64) * T * D
    if HAS_H0:
        h = tl.load(H0 + pid_b * D + cols, mask=cmask, other=0.0).to(acc)
    else:
        h = tl.zeros([BLOCK_D], dtype=acc)
    p_tot = tl.full([BLOCK_D], 1.0, dtype=acc)
    e_tot = tl.zeros([BLOCK_D], dtype=acc)
    for c in range(0, tl.cdiv(T, BLOCK_T)):
        i = c * BLOCK_T + rows
        if REVERSE:
            t = T - 1 - i
        else:
            t = i
        tmask = i < T
        m = tmask[:, None] & cmask[None, :]
        offs = row_base + t[:, None] * D + cols[None, :]
        a = tl.load(A + offs, mask=m, other=1.0).to(acc)
        b = tl.load(Bv + offs, mask=m, other=0.0).to(acc)
        if HAS_RESET:
            cut = tl.load(R + pid_b * T + t, mask=tmask, other=0)
            a = tl.where(cut[:, None] != 0, 0.0, a)
        cum_a, cum_b = tl.associative_scan((a, b), 0, combine_diag)
        h_chunk = cum_b + cum_a * h[None, :]
        tl.store(H + offs, h_chunk.to(H.dtype.element_ty), mask=m)
        h = last_row(h_chunk, rows, BLOCK_T)
        if SUMMARY:
            e_tot = last_row(cum_b + cum_a * e_tot[None, :], rows, BLOCK_T)
            p_tot = last_row(cum_a, rows, BLOCK_T) * p_tot
    if SUMMARY:
        tl.store(P + pid_b * D + cols, p_tot, mask=cmask)
        tl.store(E + pid_b * D + cols, e_tot, mask=cmask)


@triton.jit
def _scan_block_kernel(A, Bv, H0, R, H, P, E, T, D,
                       HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, REVERSE: tl.constexpr,
                       SUMMARY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # Layout as in the public API: A [B,T,D,2,2], b and h [B,T,D,2], h0 and e [B,D,2], P [B,D,2,2].
    pid_b = tl.program_id(0)
    acc = H.dtype.element_ty
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    rows = tl.arange(0, BLOCK_T)
    row_base = pid_b.to(tl.int64) * T * D
    if HAS_H0:
        h0_ptr = H0 + (pid_b * D + cols) * 2
        h_0 = tl.load(h0_ptr, mask=cmask, other=0.0).to(acc)
        h_1 = tl.load(h0_ptr + 1, mask=cmask, other=0.0).to(acc)
    else:
        h_0 = tl.zeros([BLOCK_D], dtype=acc)
        h_1 = tl.zeros([BLOCK_D], dtype=acc)
    p00 = tl.full([BLOCK_D], 1.0, dtype=acc)
    p01 = tl.zeros([BLOCK_D], dtype=acc)
    p10 = tl.zeros([BLOCK_D], dtype=acc)
    p11 = tl.full([BLOCK_D], 1.0, dtype=acc)
    e_0 = tl.zeros([BLOCK_D], dtype=acc)
    e_1 = tl.zeros([BLOCK_D], dtype=acc)
    for c in range(0, tl.cdiv(T, BLOCK_T)):
        i = c * BLOCK_T + rows
        if REVERSE:
            t = T - 1 - i
        else:
            t = i
        tmask = i < T
        m = tmask[:, None] & cmask[None, :]
        site = row_base + t[:, None] * D + cols[None, :]
        a00 = tl.load(A + site * 4, mask=m, other=1.0).to(acc)
        a01 = tl.load(A + site * 4 + 1, mask=m, other=0.0).to(acc)
        a10 = tl.load(A + site * 4 + 2, mask=m, other=0.0).to(acc)
        a11 = tl.load(A + site * 4 + 3, mask=m, other=1.0).to(acc)
        b0 = tl.load(Bv + site * 2, mask=m, other=0.0).to(acc)
        b1 = tl.load(Bv + site * 2 + 1, mask=m, other=0.0).to(acc)
        if HAS_RESET:
            cut = tl.load(R + pid_b * T + t, mask=tmask, other=0)[:, None] != 0
            a00 = tl.where(cut, 0.0, a00)
            a01 = tl.where(cut, 0.0, a01)
            a10 = tl.where(cut, 0.0, a10)
            a11 = tl.where(cut, 0.0, a11)
        c00, c01, c10, c11, f0, f1 = tl.associative_scan((a00, a01, a10, a11, b0, b1), 0, combine_block)
        y0 = f0 + c00 * h_0[None, :] + c01 * h_1[None, :]
        y1 = f1 + c10 * h_0[None, :] + c11 * h_1[None, :]
        tl.store(H + site * 2, y0.to(H.dtype.element_ty), mask=m)
        tl.store(H + site * 2 + 1, y1.to(H.dtype.element_ty), mask=m)
        h_0 = last_row(y0, rows, BLOCK_T)
        h_1 = last_row(y1, rows, BLOCK_T)
        if SUMMARY:
            n0 = last_row(f0 + c00 * e_0[None, :] + c01 * e_1[None, :], rows, BLOCK_T)
            n1 = last_row(f1 + c10 * e_0[None, :] + c11 * e_1[None, :], rows, BLOCK_T)
            e_0, e_1 = n0, n1
            q00 = last_row(c00, rows, BLOCK_T)
            q01 = last_row(c01, rows, BLOCK_T)
            q10 = last_row(c10, rows, BLOCK_T)
            q11 = last_row(c11, rows, BLOCK_T)
            p00, p01, p10, p11 = (q00 * p00 + q01 * p10, q00 * p01 + q01 * p11,
                                  q10 * p00 + q11 * p10, q10 * p01 + q11 * p11)
    if SUMMARY:
        s = pid_b * D + cols
        tl.store(P + s * 4, p00, mask=cmask)
        tl.store(P + s * 4 + 1, p01, mask=cmask)
        tl.store(P + s * 4 + 2, p10, mask=cmask)
        tl.store(P + s * 4 + 3, p11, mask=cmask)
        tl.store(E + s * 2, e_0, mask=cmask)
        tl.store(E + s * 2 + 1, e_1, mask=cmask)


def linear_scan_triton(A, b, h0=None, reset=None, reverse=False, return_summary=False, *,
                       block_t=DEFAULT_BLOCK_T, block_d=DEFAULT_BLOCK_D):
    """kernels.scan.linear_scan as one Triton launch; same arguments, returns and dtypes.

    Forward only: it records no autograd graph (kernels.scan.linear_scan sends calls that need
    one to the torch reference).
    """
    block = A.dim() == b.dim() + 1
    _check_shapes(A, b, h0, reset, block)
    dtype = _compute_dtype(A, b, h0)
    B, T, D = b.shape[:3]
    A, b = A.contiguous(), b.contiguous()
    h = torch.empty(b.shape, dtype=dtype, device=b.device)
    P = torch.empty((B, D, 2, 2) if block else (B, D), dtype=dtype, device=b.device)
    e = torch.empty(h.shape[:1] + h.shape[2:], dtype=dtype, device=b.device)
    h0_arg = h0.contiguous() if h0 is not None else e
    reset_arg = reset.to(torch.bool).contiguous().view(torch.uint8) if reset is not None else e
    kernel = _scan_block_kernel if block else _scan_diag_kernel
    grid = (B, triton.cdiv(D, block_d))
    if B * D and T:
        kernel[grid](A, b, h0_arg, reset_arg, h, P, e, T, D,
                     HAS_H0=h0 is not None, HAS_RESET=reset is not None, REVERSE=bool(reverse),
                     SUMMARY=bool(return_summary), BLOCK_T=block_t, BLOCK_D=block_d)
    return (h, (P, e)) if return_summary else h
