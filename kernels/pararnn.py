"""ParaRNN (Danieli et al., arXiv 2510.21450): nonlinear RNNs solved in parallel over time by Newton.

The whole sequence h_t = f(h_{t-1}, u_t) is one system F(h) = 0 with F_t = h_t - f(h_{t-1}, u_t).
Newton from h^0_t = f(0, u_t): evaluate r_t = F_t(h) and J_t = df/dh_{t-1} at the current guess
(parallel over t), solve the linear recurrence d_t = J_t d_{t-1} - r_t (a linear scan, d_{-1} = 0),
and set h <- h + d. After k iterations at least the first k+1 steps are exact, and near the
solution convergence is quadratic, so a few iterations suffice.

Backward needs no Newton (implicit function theorem): with g = dL/dh, the adjoint
    lambda_t = g_t + J_{t+1}^T lambda_{t+1}
is one reverse linear scan with the transposed Jacobians at the solution, and one vectorised VJP
of f at the solution, (df/du_t)^T lambda_t etc., gives the gradients of u, the weights and h0.

Cells are channel-local (diagonal recurrent weights), so Jacobians are diagonal (GRU, state [.., D])
or 2x2 blocks per channel (LSTM, state [.., D, 2] = (c, h)). This is the torch reference; state and
accumulation are fp32 (fp64 when the input is fp64).

Sequence parallelism (a piece of the sequence per process) needs two things besides a linear
solve that crosses pieces: the residual at the piece's first position uses the previous piece's
last state, and the adjoint at its last position uses the next piece's first Jacobian. Both come
through `boundary`, an object with three plain methods (parallel/sequence_parallel.py provides
one; nothing here knows about processes):
    from_prev(x)  x [B,1,...] of the previous piece, or None on the first piece
    from_next(x)  x [B,1,...] of the next piece, or None on the last piece
    max(x)        the maximum of a 0-dim tensor over all pieces (the residual, so all pieces
                  agree on when tol is met)
"""

from __future__ import annotations

import warnings

import torch

from kernels import selfcheck
from kernels.backend import use_triton
from kernels.scan import linear_scan

# ---------------------------------------------------------------------------------------------
# Cells. step() and jacobian() take h_prev [B,T,*state] (or any leading dims) and u [B,T,3,D].


class ParaGRUCell:
    """z = σ(a_z⊙h + u_z), r = σ(a_r⊙h + u_r), ĥ = tanh(a_h⊙(h⊙r) + u_h), h' = z⊙ĥ + (1-z)⊙h.

    u [..., 3, D] in order (z, r, h); params = (a,), a [3, D] in order (a_z, a_r, a_h).
    State [..., D]; Jacobian diagonal [..., D].
    """

    block = False  # diagonal Jacobian
    state_suffix = ()  # state shape = [..., D]

    @staticmethod
    def step(h, u, params):
        (a,) = params
        z = torch.sigmoid(a[0] * h + u[..., 0, :])
        r = torch.sigmoid(a[1] * h + u[..., 1, :])
        h_hat = torch.tanh(a[2] * (h * r) + u[..., 2, :])
        return z * h_hat + (1 - z) * h

    @staticmethod
    def jacobian(h, u, params):
        (a,) = params
        z = torch.sigmoid(a[0] * h + u[..., 0, :])
        r = torch.sigmoid(a[1] * h + u[..., 1, :])
        h_hat = torch.tanh(a[2] * (h * r) + u[..., 2, :])
        dz = z * (1 - z) * a[0]
        dr = r * (1 - r) * a[1]
        dh_hat = (1 - h_hat * h_hat) * a[2] * (r + h * dr)  # d/dh of tanh(a_h h r(h) + u_h)
        # h' = z ĥ + (1-z) h  =>  dh'/dh = dz (ĥ - h) + z dĥ + (1 - z)
        return dz * (h_hat - h) + z * dh_hat + (1 - z)


class ParaLSTMCell:
    """Coupled input/forget gate with peepholes; state per channel (c, h) at index (0, 1):

    f = σ(a_f⊙h + u_f + p_f⊙c), c̃ = tanh(a_c⊙h + u_c), c' = f⊙c + (1-f)⊙c̃,
    o = σ(a_o⊙h + u_o + p_o⊙c'), h' = o⊙tanh(c').

    u [..., 3, D] in order (f, c, o); params = (a, p), a [3, D] (a_f, a_c, a_o), p [2, D] (p_f, p_o).
    State [..., D, 2]; Jacobian 2x2 per channel [..., D, 2, 2], J[..., i, j] = d state'_i / d state_j.
    """

    block = True
    state_suffix = (2,)

    @staticmethod
    def _gates(state, u, params):
        a, p = params
        c, h = state[..., 0], state[..., 1]
        f = torch.sigmoid(a[0] * h + u[..., 0, :] + p[0] * c)
        c_tilde = torch.tanh(a[1] * h + u[..., 1, :])
        c_new = f * c + (1 - f) * c_tilde
        o = torch.sigmoid(a[2] * h + u[..., 2, :] + p[1] * c_new)
        return c, h, f, c_tilde, c_new, o

    @staticmethod
    def step(state, u, params):
        _, _, _, _, c_new, o = ParaLSTMCell._gates(state, u, params)
        return torch.stack((c_new, o * torch.tanh(c_new)), dim=-1)

    @staticmethod
    def jacobian(state, u, params):
        a, p = params
        c, h, f, c_tilde, c_new, o = ParaLSTMCell._gates(state, u, params)
        df = f * (1 - f)
        # c' = f c + (1-f) c̃  =>  dc' = df·(c - c̃) + f dc + (1-f) dc̃, with dc̃/dc = 0
        dcn_dc = f + df * p[0] * (c - c_tilde)
        dcn_dh = df * a[0] * (c - c_tilde) + (1 - f) * (1 - c_tilde * c_tilde) * a[1]
        # h' = o tanh(c'), o = σ(a_o h + u_o + p_o c')
        do = o * (1 - o)
        tc = torch.tanh(c_new)
        dhn_dcn = o * (1 - tc * tc)  # through tanh(c') directly
        dhn_dc = (do * p[1] * tc + dhn_dcn) * dcn_dc
        dhn_dh = do * (a[2] + p[1] * dcn_dh) * tc + dhn_dcn * dcn_dh
        row_c = torch.stack((dcn_dc, dcn_dh), dim=-1)
        row_h = torch.stack((dhn_dc, dhn_dh), dim=-1)
        return torch.stack((row_c, row_h), dim=-2)


# ---------------------------------------------------------------------------------------------
# The solver.


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _reset_mask(reset, state):
    """reset [B,T] -> broadcastable against a state trajectory [B,T,D,*suffix]."""
    return reset.reshape(reset.shape + (1,) * (state.dim() - 2))


def _shift(h, h0, reset):
    """h_prev_t = h_{t-1}, with h0 (or 0) at t=0 and 0 where a document starts (reset)."""
    first = h0.unsqueeze(1) if h0 is not None else h.new_zeros((h.shape[0], 1) + h.shape[2:])
    h_prev = torch.cat((first, h[:, :-1]), dim=1)
    if reset is not None:
        h_prev = h_prev.masked_fill(_reset_mask(reset, h_prev), 0.0)
    return h_prev


def _transpose(J, block):
    return J.transpose(-1, -2) if block else J


def _state_before(h, h0, boundary):
    """The state before the piece's first step: the previous piece's last state under sequence
    parallelism, else h0 (None = zero)."""
    if boundary is None:
        return h0
    prev = boundary.from_prev(h[:, -1:])
    return h0 if prev is None else prev[:, 0]


class _NewtonSolve(torch.autograd.Function):
    """states = solution of h_t = cell.step(h_{t-1}, u_t, params); also returns the final residual.

    All tensors given here are already in the compute dtype; reset is bool [B,T] or None.
    """

    @staticmethod
    def forward(ctx, cell, opts, u, h0, reset, *params):
        num_iters, tol, max_iters, damping, linear_solve, boundary = opts
        # h^0_t = f(0, u_t), except that t=0 sees h0 (unless it is a reset). Under sequence
        # parallelism a later piece's first step also starts from 0, as it would in one piece.
        zeros = u.new_zeros(u.shape[:2] + u.shape[3:] + cell.state_suffix)
        h = cell.step(_shift(zeros, h0, reset), u, params)
        budget = num_iters if tol is None else max_iters
        iters = 0
        while True:
            start = _state_before(h, h0, boundary)
            h_prev = _shift(h, start, reset)
            r = h - cell.step(h_prev, u, params)  # r_t = F_t(h)
            residual = r.abs().max()
            if boundary is not None:
                residual = boundary.max(residual)
            if iters >= budget or (tol is not None and residual.item() <= tol):
                break
            J = cell.jacobian(h_prev, u, params)
            d = linear_solve(J, -r, reset=reset)  # d_t = J_t d_{t-1} - r_t, d_{-1} = 0
            if damping is not None:
                d = d.clamp(-damping, damping)  # trust region: a huge step means f is far from linear
            h = h + d
            iters += 1
        ctx.cell, ctx.linear_solve, ctx.boundary = cell, linear_solve, boundary
        ctx.has_start = start is not None
        ctx.start_is_h0 = start is h0 and h0 is not None
        ctx.save_for_backward(h, u, start if start is not None else h.new_empty(0),
                              reset if reset is not None else h.new_empty(0, dtype=torch.bool), *params)
        ctx.mark_non_differentiable(residual)
        return h, residual

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h, _grad_residual):
        h, u, start, reset, *params = ctx.saved_tensors
        start = start if ctx.has_start else None
        reset = reset if reset.numel() else None
        cell = ctx.cell
        h_prev = _shift(h, start, reset)
        J = cell.jacobian(h_prev, u, params)
        # lambda_t = g_t + J_{t+1}^T lambda_{t+1}: a reverse scan with A_t = J_{t+1}^T, which is
        # cut where a document starts at t+1, and absent after the last step -- unless a next
        # piece follows, whose first Jacobian (zeroed where its document starts) links them.
        J_last = torch.zeros_like(J[:, :1])
        link_last = False
        if ctx.boundary is not None:
            J_first = J[:, :1] if reset is None else J[:, :1].masked_fill(_reset_mask(reset[:, :1], J), 0.0)
            J_next = ctx.boundary.from_next(J_first)
            if J_next is not None:
                J_last, link_last = J_next, True
        A = torch.cat((_transpose(J[:, 1:], cell.block), _transpose(J_last, cell.block)), dim=1)
        rev_reset = None
        if reset is not None:
            last = torch.full_like(reset[:, :1], not link_last)
            rev_reset = torch.cat((reset[:, 1:], last), dim=1)
        lam = ctx.linear_solve(A, grad_h.to(h.dtype), reset=rev_reset, reverse=True)
        # One VJP of f at the solution: dL/du_t = (df/du_t)^T lambda_t, likewise for the
        # weights (summed over B,T by autograd) and h0 (through h_prev at t=0 only). A previous
        # piece's state is a constant here: its gradient reached that piece through the scan.
        with torch.enable_grad():
            u_ = u.detach().requires_grad_(True)
            params_ = [p.detach().requires_grad_(True) for p in params]
            h0_ = start.detach().requires_grad_(True) if ctx.start_is_h0 else start
            out = cell.step(_shift(h.detach(), h0_, reset), u_, params_)
            inputs = [u_] + params_ + ([h0_] if ctx.start_is_h0 else [])
            grads = torch.autograd.grad(out, inputs, grad_outputs=lam, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
        grad_u, grad_params = grads[0], grads[1:1 + len(params)]
        grad_h0 = grads[-1] if ctx.start_is_h0 else None
        return (None, None, grad_u, grad_h0, None, *grad_params)


def _newton(cell, u, params, h0, reset, num_iters, tol, max_iters, damping, linear_solve, boundary, name,
            backend="auto"):
    if u.dim() != 4 or u.shape[2] != 3:
        raise ValueError(f"{name}: u must be [B,T,3,D] pre-activations; got {tuple(u.shape)}")
    B, T, _, D = u.shape
    state_shape = (B, D) + cell.state_suffix
    if h0 is not None and tuple(h0.shape) != state_shape:
        raise ValueError(f"{name}: initial state must be {state_shape}; got {tuple(h0.shape)}")
    if reset is not None and tuple(reset.shape) != (B, T):
        raise ValueError(f"{name}: reset must be bool [B,T] = {(B, T)}; got {tuple(reset.shape)}")
    if num_iters < 0:
        raise ValueError(f"{name}: num_iters must be >= 0; got {num_iters}")
    if damping is not None and not damping > 0:
        raise ValueError(f"{name}: damping must be None or a step bound > 0; got {damping}")
    if max_iters is None:
        max_iters = 2 * num_iters
    if tol is not None and max_iters < num_iters:
        raise ValueError(f"{name}: max_iters ({max_iters}) must be >= num_iters ({num_iters})")
    dtype = _compute_dtype(u)
    h0 = None if h0 is None else h0.to(dtype)
    reset = None if reset is None else reset.to(torch.bool)
    params = [p.to(dtype) for p in params]
    # The fused kernels hold their own scan and see one whole sequence: a swapped-in
    # linear_solve or a sequence-parallel boundary keeps this reference solver.
    fusable = linear_solve is linear_scan and boundary is None
    fused = use_triton(backend, u, name) and (fusable or backend == "triton")
    if fused and not fusable:
        raise ValueError(f"{name}: backend='triton' runs the fused kernels, which take neither a "
                         f"custom linear_solve nor a boundary; pass backend='auto' or 'torch'")
    if fused and (u.is_cuda or selfcheck.forced_on_cpu()):
        fused = _self_checked(cell, name, u, params, h0, reset, damping, strict=backend == "triton")
    if fused:
        from kernels.pararnn_triton import FusedNewtonSolve
        opts = (num_iters, tol, max_iters, damping, None, None)  # block sizes by shape
        states, residual = FusedNewtonSolve.apply(name, opts, u, h0, reset, *params)
    else:
        opts = (num_iters, tol, max_iters, damping, linear_solve, boundary)
        states, residual = _NewtonSolve.apply(cell, opts, u.to(dtype), h0, reset, *params)
    # The warning reads the residual, a host sync: on CPU only. On a GPU the caller reads it when it
    # chooses (the trainer once per logging step, for all layers together: pretrain/train.py).
    if tol is not None and residual.device.type == "cpu" and residual.item() > tol:
        warnings.warn(f"{name}: Newton residual {residual.item():.3e} > tol={tol:.3e} after "
                      f"max_iters={max_iters} iterations", RuntimeWarning, stacklevel=3)
    return states, residual


def _self_checked(cell, name, u, params, h0, reset, damping, strict):
    """Whether the fused Triton Newton kernels passed their startup self-check
    (kernels/selfcheck.py) for this shape class: a slice of one batch row, up to 64 channels,
    2+ time chunks and a ragged tail, solved to convergence by the kernels and by the torch
    reference; the solutions and every gradient must agree."""
    shape_class = (f"u={u.dtype}", f"h0={h0 is not None}", f"reset={reset is not None}",
                   f"damping={damping is not None}")
    dtype = _compute_dtype(u)

    def check():
        from kernels.pararnn_triton import FusedNewtonSolve

        gen = selfcheck.slice_generator(u.device)
        T, D = 2 * 32 + 3, min(u.shape[3], 64)
        dev = u.device
        u_s = torch.randn(1, T, 3, D, generator=gen, device=dev).to(u.dtype).requires_grad_(True)
        params_s = [(torch.rand(p.shape[0], D, generator=gen, device=dev) - 0.5).to(dtype).requires_grad_(True)
                    for p in params]
        h0_s = None
        if h0 is not None:
            h0_s = (0.5 * torch.randn((1, D) + cell.state_suffix, generator=gen, device=dev)).to(dtype)
            h0_s.requires_grad_(True)
        reset_s = None
        if reset is not None:
            reset_s = torch.zeros(1, T, dtype=torch.bool, device=dev)
            reset_s[0, 40] = True
        # Both solved to convergence (the two schedules' iterates differ, their fixed point not).
        tol = 1e-10 if dtype == torch.float64 else 1e-6
        leaves = [x for x in [u_s, *params_s, h0_s] if x is not None]
        g = torch.randn((1, T, D) + cell.state_suffix, generator=gen, device=dev).to(dtype)
        results = []
        for solve in ("fused", "reference"):
            if solve == "fused":
                opts = (1, tol, 64, damping, None, None)
                states, _ = FusedNewtonSolve.apply(name, opts, u_s, h0_s, reset_s, *params_s)
            else:
                opts = (1, tol, 64, damping, linear_scan, None)
                states, _ = _NewtonSolve.apply(cell, opts, u_s.to(dtype), h0_s, reset_s, *params_s)
            grads = torch.autograd.grad((states * g).sum(), leaves)
            results.append([states, *grads])
        return max(selfcheck.relative_error(a, b) for a, b in zip(*results))

    return selfcheck.kernel_allowed(name, shape_class, check, 1e-3, strict)


def paragru(u, a, h0=None, reset=None, num_iters=3, tol=None, max_iters=None, damping=None,
            linear_solve=linear_scan, boundary=None, *, backend="auto"):
    """ParaGRU over a whole sequence by Newton.

    u: pre-activations [B,T,3,D] (z, r, h); a: recurrent diagonal weights [3,D]; h0: [B,D] or None;
    reset: bool [B,T], reset[b,t] = a document starts at t (its previous state is 0).
    num_iters: Newton iterations when tol is None. With tol: stop as soon as max|r| <= tol, run
    past num_iters up to max_iters (default 2*num_iters) if needed, and warn if still above tol.
    damping: None, or a float c > 0 clamping every Newton step elementwise to [-c, c].
    linear_solve: a function with linear_scan's signature (swap in a sequence-parallel one).
    boundary: None, or (sequence parallelism) the piece-boundary exchange described in the module
        docstring; u, reset and the returned h are then this piece's, h0 is used on the first
        piece only (pass None elsewhere), the final state is this piece's last, the residual the
        maximum over all pieces.
    backend: None (CUDA tensors, default linear_solve, no boundary: the fused Triton kernels of
        kernels.pararnn_triton; otherwise this reference), "torch" or "triton" (forced; on CPU
        tensors it needs TRITON_INTERPRET=1). The fused path solves chunk after chunk of time,
        each by Newton from the previous chunk's converged state (num_iters / tol / max_iters
        apply per chunk and block of channels): the same solution, other iterates, and the same
        rule on the reported residual. The RuntimeWarning is raised for CPU tensors only (it reads
        the residual, a host sync); on a GPU the caller reads the returned residual.

    Returns (h [B,T,D] in u's dtype, final_state [B,D] fp32 (fp64 for fp64 u),
             residual: 0-dim detached max_t |h_t - f(h_{t-1}, u_t)| at the returned solution).
    """
    states, residual = _newton(ParaGRUCell, u, (a,), h0, reset, num_iters, tol, max_iters, damping,
                               linear_solve, boundary, "paragru", backend)
    return states.to(u.dtype), states[:, -1], residual


def paralstm(u, a, p, state0=None, reset=None, num_iters=3, tol=None, max_iters=None, damping=None,
             linear_solve=linear_scan, boundary=None, *, backend="auto"):
    """ParaLSTM over a whole sequence by Newton.

    u: pre-activations [B,T,3,D] (f, c, o); a: [3,D] (a_f, a_c, a_o); p: peepholes [2,D] (p_f, p_o);
    state0: [B,D,2] with (c, h) in the last dim, or None. Other arguments as in paragru.

    Returns (h [B,T,D] in u's dtype, final_state [B,D,2] = (c, h) fp32 (fp64 for fp64 u), residual).
    """
    states, residual = _newton(ParaLSTMCell, u, (a, p), state0, reset, num_iters, tol, max_iters,
                               damping, linear_solve, boundary, "paralstm", backend)
    return states[..., 1].to(u.dtype), states[:, -1], residual


# ---------------------------------------------------------------------------------------------
# Per-token loops: the obviously correct references for tests. Same returns, minus the residual.


def _sequential(cell, u, params, h0, reset):
    dtype = _compute_dtype(u)
    u = u.to(dtype)
    params = [p.to(dtype) for p in params]
    B, T, _, D = u.shape
    h = u.new_zeros((B, D) + cell.state_suffix) if h0 is None else h0.to(dtype)
    out = []
    for t in range(T):
        if reset is not None:
            keep = (~reset[:, t].to(torch.bool)).to(dtype).reshape((B,) + (1,) * (h.dim() - 1))
            h = h * keep
        h = cell.step(h, u[:, t], params)
        out.append(h)
    return torch.stack(out, dim=1)


def paragru_sequential(u, a, h0=None, reset=None):
    """Per-token ParaGRU loop. Returns (h [B,T,D] in u's dtype, final_state [B,D] fp32)."""
    states = _sequential(ParaGRUCell, u, (a,), h0, reset)
    return states.to(u.dtype), states[:, -1]


def paralstm_sequential(u, a, p, state0=None, reset=None):
    """Per-token ParaLSTM loop. Returns (h [B,T,D] in u's dtype, final_state [B,D,2] fp32)."""
    states = _sequential(ParaLSTMCell, u, (a, p), state0, reset)
    return states[..., 1].to(u.dtype), states[:, -1]
