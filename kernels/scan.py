"""Linear recurrences h_t = A_t h_{t-1} + b_t: the torch reference (vectorised, no loop per token).

Two forms of A, chosen by shape:
  diagonal            A [B,T,D],      b [B,T,D],    h0 [B,D]
  2x2-block-diagonal  A [B,T,D,2,2],  b [B,T,D,2],  h0 [B,D,2]
                      (A[..., i, j] maps component j of h_{t-1} to component i of h_t)

A piece of the sequence has a *summary* (P, e): its total transition P = A_T ... A_1 and its end
state from a zero start e, so that end state = P h0 + e. Summaries compose associatively,
  (P2, e2) o (P1, e1) = (P2 P1, P2 e1 + e2),
which is what both the chunked scan below and sequence parallelism are built on.

Algorithm (O(T) work, O(log T) Python-level steps): pad T to a multiple of a chunk size C,
run a Hillis-Steele doubling scan inside every chunk at once (log2 C steps), take each chunk's
summary, scan the chunk summaries with this same function (recursion depth log_C T) to get every
chunk's incoming state h_in, and correct: h_t = h_local_t + cumP_t h_in.

Precision: bf16/fp16/fp32 inputs are computed and returned in fp32; fp64 inputs stay fp64
(tests use that to compare against the sequential loop at ~1e-12).
"""

from __future__ import annotations

import torch

from kernels import selfcheck
from kernels.backend import use_triton

DEFAULT_CHUNK_SIZE = 16  # measured on CPU: 16 slightly faster than 32 or 64 at T=4096


# ---------------------------------------------------------------------------------------------
# Summaries in the public layout: P [B,D] or [B,D,2,2], e [B,D] or [B,D,2].


def _is_block(P: torch.Tensor, e: torch.Tensor) -> bool:
    """A summary/transition is 2x2-block when it has one more dim than its state."""
    return P.dim() == e.dim() + 1


def compose_scan_summaries(first, second):
    """Summary of `first` followed by `second`: (P2, e2) o (P1, e1) = (P2 P1, P2 e1 + e2)."""
    P1, e1 = first
    P2, e2 = second
    if _is_block(P1, e1):
        return torch.matmul(P2, P1), torch.matmul(P2, e1.unsqueeze(-1)).squeeze(-1) + e2
    return P2 * P1, P2 * e1 + e2


def apply_summary(summary, h0: torch.Tensor) -> torch.Tensor:
    """End state of a piece with summary (P, e) started from h0: P h0 + e."""
    P, e = summary
    h0 = h0.to(e.dtype)
    if _is_block(P, e):
        return torch.matmul(P, h0.unsqueeze(-1)).squeeze(-1) + e
    return P * h0 + e


# ---------------------------------------------------------------------------------------------
# The chunked scan, in a component-major layout: A [2,2,B,T,D] / b [2,B,T,D] for blocks, plain
# [B,T,D] for diagonals; time is dim -2 in every case. Component-major makes each 2x2 product
# three broadcast elementwise ops on contiguous rows (3-4x faster on CPU than batched 2x2
# matmuls, which copied every strided slice).


def _compose(x: torch.Tensor, y: torch.Tensor, block: bool) -> torch.Tensor:
    """Transition y followed by x: x y. Blocks: (x y)[i,j] = x[i,0] y[0,j] + x[i,1] y[1,j]."""
    return x[:, 0:1] * y[0:1] + x[:, 1:2] * y[1:2] if block else x * y


def _apply(x: torch.Tensor, v: torch.Tensor, block: bool) -> torch.Tensor:
    """x v. Blocks: (x v)[i] = x[i,0] v[0] + x[i,1] v[1]."""
    return x[:, 0] * v[0:1] + x[:, 1] * v[1:2] if block else x * v


def _chunk_scan(A, b, h0, block, chunk_size):
    """Forward scan in the internal layout. Returns (h, P, e) in that layout; h0 None = zero."""
    T = b.shape[-2]
    # Chunk = smallest power of two >= T, capped at chunk_size: T=1 does no padding work.
    C = min(chunk_size, 1 << max(T - 1, 0).bit_length())
    N = -(-T // C)
    pad = N * C - T
    if pad:
        # Identity transitions with zero input leave the state unchanged, so padding at the end
        # changes neither the trajectory nor the summary.
        ident = A.new_zeros(A.shape[:-2] + (pad, A.shape[-1]))
        if block:
            ident[0, 0] = 1.0
            ident[1, 1] = 1.0
        else:
            ident.fill_(1.0)
        A = torch.cat((A, ident), dim=-2)
        b = torch.cat((b, b.new_zeros(b.shape[:-2] + (pad, b.shape[-1]))), dim=-2)
    cumA = A.reshape(A.shape[:-2] + (N, C, A.shape[-1]))
    loc = b.reshape(b.shape[:-2] + (N, C, b.shape[-1]))

    # Hillis-Steele inside every chunk: after the step with offset s, position t holds the
    # summary of (t-2s, t]; (A_t, b_t) <- (A_t A_{t-s}, A_t b_{t-s} + b_t) for t >= s.
    s = 1
    while s < C:
        later_A = cumA[..., s:, :]
        new_A = _compose(later_A, cumA[..., :-s, :], block)
        new_b = _apply(later_A, loc[..., :-s, :], block) + loc[..., s:, :]
        cumA = torch.cat((cumA[..., :s, :], new_A), dim=-2)
        loc = torch.cat((loc[..., :s, :], new_b), dim=-2)
        s *= 2
    # Now cumA[..., n, i, :] = A_i...A_0 of chunk n and loc[..., n, i, :] = its state from zero.

    chunk_P, chunk_e = cumA[..., -1, :], loc[..., -1, :]
    if N == 1:
        P, e = chunk_P[..., 0, :], chunk_e[..., 0, :]
        h_in = None if h0 is None else h0.unsqueeze(-2)
    else:
        # State after each chunk = the scan of the chunk summaries; chunk n starts from the
        # state after chunk n-1 (chunk 0 from h0).
        after, P, e = _chunk_scan(chunk_P, chunk_e, h0, block, chunk_size)
        first = h0.unsqueeze(-2) if h0 is not None else after.new_zeros(after.shape[:-2] + (1, after.shape[-1]))
        h_in = torch.cat((first, after[..., :-1, :]), dim=-2)
    h = loc if h_in is None else loc + _apply(cumA, h_in.unsqueeze(-2), block)
    h = h.reshape(h.shape[:-3] + (N * C, h.shape[-1]))[..., :T, :]
    return h, P, e


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_shapes(A, b, h0, reset, block):
    if block:
        if A.dim() != 5 or A.shape[-2:] != (2, 2) or b.shape != A.shape[:-1]:
            raise ValueError(f"linear_scan: 2x2-block form needs A [B,T,D,2,2] and b [B,T,D,2]; "
                             f"got A {tuple(A.shape)}, b {tuple(b.shape)}")
    elif A.dim() != 3 or b.shape != A.shape:
        raise ValueError(f"linear_scan: diagonal form needs A and b both [B,T,D] (or A [B,T,D,2,2] "
                         f"with b [B,T,D,2]); got A {tuple(A.shape)}, b {tuple(b.shape)}")
    state_shape = (b.shape[0],) + tuple(b.shape[2:])
    if h0 is not None and tuple(h0.shape) != state_shape:
        raise ValueError(f"linear_scan: h0 must have shape {state_shape}; got {tuple(h0.shape)}")
    if reset is not None and tuple(reset.shape) != tuple(b.shape[:2]):
        raise ValueError(f"linear_scan: reset must be [B,T] = {tuple(b.shape[:2])}; got {tuple(reset.shape)}")


def linear_scan(A, b, h0=None, reset=None, reverse=False, return_summary=False, *, chunk_size=DEFAULT_CHUNK_SIZE,
                backend="auto"):
    """Solve h_t = A_t h_{t-1} + b_t for all t (time is dim 1).

    A: [B,T,D] (diagonal) or [B,T,D,2,2] (2x2 blocks); b: [B,T,D] or [B,T,D,2].
    h0: state before the first step ([B,D] or [B,D,2]); None means zero.
    reset: bool [B,T]; reset[b,t] means A_t := 0, so nothing from before step t flows into h_t.
    reverse: run from t=T-1 down to 0, h_t = A_t h_{t+1} + b_t; h0 is then the state after the
        end (h_T). reset keeps the same meaning on A_t (it cuts the link h_{t+1} -> h_t); a caller
        whose documents start at t (forward sense) and who scans an adjoint
        lambda_t = g_t + J_{t+1}^T lambda_{t+1} must pass reset shifted left by one
        (reset_rev[:, t] = reset[:, t+1]).
    return_summary: also return (P, h_end): the total transition of the piece in the scan's order
        (A_{T-1}...A_0 forward, A_0...A_{T-1} reverse; resets included) and the end state from a
        zero start (ignores h0), so the true end state is P h0 + h_end.

    backend: "auto" (Triton for CUDA tensors, this reference otherwise), "torch" or "triton"; see
        use_triton. The Triton kernel records no autograd graph, so a call that needs one (grad
        enabled and an input requiring grad) runs here; with backend="triton" it is an error.

    Low-precision inputs are computed and returned in fp32; fp64 stays fp64.
    Returns h [B,T,D] or [B,T,D,2]; with return_summary, (h, (P, h_end)).
    """
    if use_triton(backend, b, "linear_scan"):
        needs_graph = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (A, b, h0))
        on_gpu = b.is_cuda or selfcheck.forced_on_cpu()
        if not needs_graph and (not on_gpu or _self_checked(A, b, h0, reset, reverse, return_summary,
                                                            strict=backend == "triton")):
            from kernels.scan_triton import linear_scan_triton
            return linear_scan_triton(A, b, h0, reset, reverse, return_summary)
        if backend == "triton":
            raise ValueError("linear_scan: backend='triton' is forward-only; inputs require grad "
                             "(use backend='auto' or 'torch', or call under torch.no_grad())")
    block = A.dim() == b.dim() + 1
    _check_shapes(A, b, h0, reset, block)
    if chunk_size < 2:
        raise ValueError(f"linear_scan: chunk_size must be >= 2; got {chunk_size}")
    dtype = _compute_dtype(A, b, h0)
    A, b = A.to(dtype), b.to(dtype)
    h0 = None if h0 is None else h0.to(dtype)
    if reset is not None:
        mask = reset.to(torch.bool).reshape(reset.shape + (1,) * (A.dim() - 2))
        A = A.masked_fill(mask, 0.0)
    if reverse:
        A, b = A.flip(1), b.flip(1)
    if block:  # to the component-major layout: [B,T,D,2,2] -> [2,2,B,T,D], [B,T,D,2] -> [2,B,T,D]
        A, b = A.permute(3, 4, 0, 1, 2), b.permute(3, 0, 1, 2)
        h0 = None if h0 is None else h0.permute(2, 0, 1)
    h, P, e = _chunk_scan(A.contiguous(), b.contiguous(), h0, block, chunk_size)
    if block:
        h, P, e = h.permute(1, 2, 3, 0), P.permute(2, 3, 0, 1), e.permute(1, 2, 0)
    if reverse:
        h = h.flip(1)
    h, P, e = h.contiguous(), P.contiguous(), e.contiguous()
    return (h, (P, e)) if return_summary else h


def _self_checked(A, b, h0, reset, reverse, return_summary, strict):
    """Whether the Triton scan passed its startup self-check (kernels/selfcheck.py) for this shape
    class: a slice of one batch row, up to 256 channels, 2+ time blocks and a ragged tail,
    compared with the torch form (exact math, so a tight tolerance)."""
    block = A.dim() == b.dim() + 1
    shape_class = ("2x2" if block else "diagonal", f"A={A.dtype}", f"b={b.dtype}", f"reverse={reverse}",
                   f"h0={h0 is not None}", f"reset={reset is not None}", f"summary={return_summary}")

    def check():
        from kernels.scan_triton import linear_scan_triton

        gen = selfcheck.slice_generator(b.device)
        T, D = 2 * 32 + 3, min(b.shape[2], 256)
        a_shape = (1, T, D, 2, 2) if block else (1, T, D)
        b_shape = (1, T, D, 2) if block else (1, T, D)
        A_s = (0.9 * (2 * torch.rand(a_shape, generator=gen, device=b.device) - 1)).to(A.dtype)
        if block:
            A_s = A_s / 2  # keep the 2x2 products contractive
        b_s = torch.randn(b_shape, generator=gen, device=b.device).to(b.dtype)
        h0_s = None if h0 is None else torch.randn(b_shape[:1] + b_shape[2:], generator=gen,
                                                     device=b.device).to(h0.dtype)
        reset_s = None
        if reset is not None:
            reset_s = torch.zeros(1, T, dtype=torch.bool, device=b.device)
            reset_s[0, 40] = True
        with torch.no_grad():
            got = linear_scan_triton(A_s, b_s, h0_s, reset_s, reverse, True)
            want = linear_scan(A_s, b_s, h0_s, reset_s, reverse, True, backend="torch")
        return max(selfcheck.relative_error(x, y) for x, y in
                   ((got[0], want[0]), (got[1][0], want[1][0]), (got[1][1], want[1][1])))

    return selfcheck.kernel_allowed("linear_scan", shape_class, check, 1e-4, strict)


def linear_scan_sequential(A, b, h0=None, reset=None, reverse=False, return_summary=False):
    """The obviously correct per-token loop, with linear_scan's signature. Test reference only."""
    block = A.dim() == b.dim() + 1
    _check_shapes(A, b, h0, reset, block)
    dtype = _compute_dtype(A, b, h0)
    A, b = A.to(dtype), b.to(dtype)
    B, T = b.shape[:2]
    state_shape = (B,) + tuple(b.shape[2:])
    eye = (torch.eye(2, dtype=dtype, device=b.device).expand(*state_shape[:-1], 2, 2) if block
           else torch.ones(state_shape, dtype=dtype, device=b.device))
    h = torch.zeros(state_shape, dtype=dtype, device=b.device) if h0 is None else h0.to(dtype)
    e = torch.zeros(state_shape, dtype=dtype, device=b.device)
    P = eye
    out = [None] * T
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        A_t = A[:, t]
        if reset is not None:
            keep = (~reset[:, t].to(torch.bool)).to(dtype).reshape((B,) + (1,) * (A_t.dim() - 1))
            A_t = A_t * keep
        if block:
            h = torch.einsum("bdij,bdj->bdi", A_t, h) + b[:, t]
            e = torch.einsum("bdij,bdj->bdi", A_t, e) + b[:, t]
            P = torch.einsum("bdij,bdjk->bdik", A_t, P)
        else:
            h = A_t * h + b[:, t]
            e = A_t * e + b[:, t]
            P = A_t * P
        out[t] = h
    h_all = torch.stack(out, dim=1)
    return (h_all, (P, e)) if return_summary else h_all
