"""Gated DeltaProduct recurrence: per-token reference, chunkwise WY/UT form, and scan summaries.

Per batch and head the state is ``S ∈ R^{dk×dv}``. For every token t::

    S <- exp(g_t) S
    for j = 1..n_h:  S <- (I - β_{t,j} k_{t,j} k_{t,j}ᵀ) S + β_{t,j} k_{t,j} v_{t,j}ᵀ
    o_t = scale · Sᵀ q_t

``reset[b, t] = True`` starts a new document at token t: the state is zeroed before token t's
update. Keys are expected L2-normalised by the caller, β ∈ [0, 2], g ≤ 0 (a log-decay; None
means no forget gate).

Shapes are batch-first, as in flash-linear-attention::

    q [B,T,H,dk]   k [B,T,n_h,H,dk]   v [B,T,n_h,H,dv]   beta [B,T,n_h,H]   g [B,T,H] | None
    initial_state [B,H,dk,dv] | None  reset [B,T] bool | None

Every function returns ``(o [B,T,H,dv] in q's dtype, final_state [B,H,dk,dv])``. The state and
all internal math are fp32, or fp64 when the inputs are fp64 (the tests use fp64 to compare the
two implementations to 1e-10).

Sequence parallelism needs, for a piece of the sequence, the summary ``(M, S_ext)``: the piece's
dk×dk transition and its end state from a zero start, so that ``final(S0) = M S0 + S_ext``.
Summaries compose associatively: ``(M2, E2) ∘ (M1, E1) = (M2 M1, M2 E1 + E2)``.
"""

import torch

from kernels import selfcheck
from kernels.backend import use_triton

__all__ = [
    "deltaproduct",
    "deltaproduct_naive",
    "deltaproduct_step",
    "deltaproduct_chunkwise",
    "deltaproduct_summary",
    "compose_deltaproduct_summaries",
    "apply_deltaproduct_summary",
]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_shapes(q, k, v, beta, g, initial_state, reset):
    """Raise a one-line ValueError for inconsistent shapes; return (B, T, n_h, H, dk, dv)."""
    if k.dim() != 5:
        raise ValueError(f"k must be [B,T,n_h,H,dk], got shape {tuple(k.shape)}")
    B, T, n_h, H, dk = k.shape
    if v.dim() != 5 or tuple(v.shape[:4]) != (B, T, n_h, H):
        raise ValueError(f"v must be [B,T,n_h,H,dv] = [{B},{T},{n_h},{H},dv], got {tuple(v.shape)}")
    dv = v.shape[-1]
    if q is not None and tuple(q.shape) != (B, T, H, dk):
        raise ValueError(f"q must be [B,T,H,dk] = {(B, T, H, dk)}, got {tuple(q.shape)}")
    if tuple(beta.shape) != (B, T, n_h, H):
        raise ValueError(f"beta must be [B,T,n_h,H] = {(B, T, n_h, H)}, got {tuple(beta.shape)}")
    if g is not None and tuple(g.shape) != (B, T, H):
        raise ValueError(f"g must be [B,T,H] = {(B, T, H)} or None, got {tuple(g.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, dk, dv):
        raise ValueError(
            f"initial_state must be [B,H,dk,dv] = {(B, H, dk, dv)} or None, "
            f"got {tuple(initial_state.shape)}"
        )
    if reset is not None:
        if tuple(reset.shape) != (B, T):
            raise ValueError(f"reset must be [B,T] = {(B, T)} or None, got {tuple(reset.shape)}")
        if reset.dtype != torch.bool:
            raise ValueError(f"reset must be a bool tensor, got dtype {reset.dtype}")
    return B, T, n_h, H, dk, dv


def _check_chunk_size(chunk_size):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def deltaproduct_naive(q, k, v, beta, g=None, scale=None, initial_state=None, reset=None):
    """The obviously correct per-token, per-sub-step loop. Test reference only (O(T) Python steps)."""
    B, T, n_h, H, dk, dv = _check_shapes(q, k, v, beta, g, initial_state, reset)
    dt = _compute_dtype(q)
    scale = dk**-0.5 if scale is None else scale
    q, k, v, beta = q.to(dt), k.to(dt), v.to(dt), beta.to(dt)
    if initial_state is None:
        S = q.new_zeros(B, H, dk, dv)
    else:
        S = initial_state.to(dt)
    outputs = []
    for t in range(T):
        if reset is not None:
            S = torch.where(reset[:, t, None, None, None], torch.zeros_like(S), S)
        if g is not None:
            S = S * g[:, t].to(dt).exp()[..., None, None]
        for j in range(n_h):
            kj, vj, bj = k[:, t, j], v[:, t, j], beta[:, t, j]  # [B,H,dk], [B,H,dv], [B,H]
            Sk = torch.einsum("bhkv,bhk->bhv", S, kj)
            S = S + bj[..., None, None] * kj[..., :, None] * (vj - Sk)[..., None, :]
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outputs, dim=1) if T > 0 else q.new_zeros(B, 0, H, dv)
    return o.to(q.dtype), S


def deltaproduct_step(q, k, v, beta, g, state, scale=None):
    """One token of the recurrence (decoding): the body of deltaproduct_naive's loop.

    q [B,H,dk], k [B,n_h,H,dk], v [B,n_h,H,dv], beta [B,n_h,H], g [B,H] | None, state [B,H,dk,dv].
    Returns (o [B,H,dv] in q's dtype, the new state in the state's dtype, fp32 or fp64).
    O(n_h·dk·dv) per head, whatever the number of tokens before.
    """
    dt = state.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S = state
    if g is not None:
        S = S * g.to(dt).exp()[..., None, None]
    for j in range(k.shape[1]):
        kj, vj, bj = k[:, j].to(dt), v[:, j].to(dt), beta[:, j].to(dt)  # [B,H,dk], [B,H,dv], [B,H]
        Sk = torch.einsum("bhkv,bhk->bhv", S, kj)
        S = S + bj[..., None, None] * kj[..., :, None] * (vj - Sk)[..., None, :]
    o = scale * torch.einsum("bhkv,bhk->bhv", S, q.to(dt))
    return o.to(q.dtype), S


def _to_chunks(x, chunk_size):
    """[B, L, H, *rest] (L sub-steps) -> [B, H, NC, C, *rest], zero-padding the tail."""
    B, L, H = x.shape[:3]
    n_chunks = -(-L // chunk_size)
    pad = n_chunks * chunk_size - L
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], dim=1)
    x = x.reshape(B, n_chunks, chunk_size, *x.shape[2:])
    return x.movedim(3, 1)


def _chunk_terms(k, v, beta, g, reset, chunk_size, dt):
    """Chunk-parallel part of the WY/UT form, for all chunks at once.

    The n_h sub-steps of each token are interleaved into L = T·n_h sub-steps (sub-step
    t·n_h + j is Householder j of token t); the gate and the reset of token t act at its first
    sub-step. Within a chunk, with γ = cumsum(g) and seg = cumsum(reset) (segment id):

        S_i = e^{γ_i}[seg_i=0] S_0 + Σ_{s≤i, seg_s=seg_i} e^{γ_i-γ_s} k_s w_sᵀ,
        (I + A) W = diag(β) V - diag(β e^{γ}[seg=0]) K S_0,
        A_{sr} = β_s e^{γ_s-γ_r} (k_s·k_r)  for r < s, seg_r = seg_s,

    so W = U - Wk S_0 with U = (I+A)^{-1} diag(β) V and Wk = (I+A)^{-1} diag(β e^{γ}[seg=0]) K.
    The chunk end state is S_C = M S_0 + E with
        M = e^{γ_C}[seg_C=0] I - Kdᵀ Wk,  E = Kdᵀ U,  Kd = diag(e^{γ_C-γ}[seg=seg_C]) K.

    Returns a dict of [B,H,NC,C,...] tensors: decay (the C×C intra-chunk decay-and-mask
    matrix D_{is} = e^{γ_i-γ_s}[s≤i][seg_s=seg_i]), s0_decay (e^{γ_i}[seg_i=0]), k, U, Wk,
    and the per-chunk summaries M [B,H,NC,dk,dk], E [B,H,NC,dk,dv].
    """
    B, T, n_h, H, dk = k.shape
    L = T * n_h
    k_c = _to_chunks(k.to(dt).reshape(B, L, H, dk), chunk_size)  # [B,H,NC,C,dk]
    v_c = _to_chunks(v.to(dt).reshape(B, L, H, -1), chunk_size)  # [B,H,NC,C,dv]
    beta_c = _to_chunks(beta.to(dt).reshape(B, L, H), chunk_size)  # [B,H,NC,C]
    if g is None:
        gamma = torch.zeros_like(beta_c)
    else:
        g_sub = torch.cat([g.to(dt)[:, :, None], g.new_zeros(B, T, n_h - 1, H, dtype=dt)], 2)
        gamma = _to_chunks(g_sub.reshape(B, L, H), chunk_size).cumsum(-1)
    if reset is None:
        seg = torch.zeros(B, 1, *beta_c.shape[2:], dtype=torch.long, device=k.device)
    else:
        r_sub = torch.cat([reset[:, :, None], reset.new_zeros(B, T, n_h - 1)], 2)
        seg = _to_chunks(r_sub.reshape(B, L, 1).long(), chunk_size).cumsum(-1)  # [B,1,NC,C]

    C = chunk_size
    idx = torch.arange(C, device=k.device)
    same_seg = seg[..., :, None] == seg[..., None, :]
    incl = (idx[:, None] >= idx[None, :]) & same_seg  # s ≤ i within one segment
    # exp only of masked differences γ_i - γ_s ≤ 0 (s ≤ i): never exp of a positive number.
    diff = gamma[..., :, None] - gamma[..., None, :]
    decay = torch.where(incl, diff, torch.zeros_like(diff)).exp() * incl
    first_seg = seg == 0
    s0_decay = gamma.exp() * first_seg  # e^{γ_i}[seg_i = 0]

    # decay already zeroes pairs across segments; strict drops the diagonal.
    strict = idx[:, None] > idx[None, :]
    A = beta_c[..., :, None] * (k_c @ k_c.transpose(-1, -2)) * decay * strict
    rhs = torch.cat([beta_c[..., None] * v_c, (beta_c * s0_decay)[..., None] * k_c], -1)
    # I + A is unit lower triangular: unitriangular=True reads only A's strict lower part.
    # T = (I + A)^{-1} explicitly, then matmuls. On CPU, solve_triangular with the right-hand
    # side directly is ~100x slower in backward (and on a 5-d batch in forward) than this.
    eye_c = torch.eye(C, dtype=dt, device=k.device).expand(A.shape).reshape(-1, C, C)
    T_inv = torch.linalg.solve_triangular(A.reshape(-1, C, C), eye_c, upper=False, unitriangular=True)
    sol = T_inv.view(A.shape) @ rhs
    U, Wk = sol[..., : v_c.shape[-1]], sol[..., v_c.shape[-1]:]

    # The last row of the decay matrix is e^{γ_C-γ_s}[seg_s = seg_C].
    Kd = decay[..., -1, :, None] * k_c
    eye = torch.eye(dk, dtype=dt, device=k.device)
    M = s0_decay[..., -1, None, None] * eye - Kd.transpose(-1, -2) @ Wk
    E = Kd.transpose(-1, -2) @ U
    return dict(decay=decay, s0_decay=s0_decay, k=k_c, U=U, Wk=Wk, M=M, E=E)


def deltaproduct_chunkwise(
    q, k, v, beta, g=None, scale=None, initial_state=None, reset=None, chunk_size=64
):
    """Chunkwise WY/UT form in torch: chunk-parallel except a Python loop over chunks.

    chunk_size counts sub-steps of the interleaved T·n_h sequence. Differentiable by autograd
    w.r.t. q, k, v, beta, g and initial_state.
    """
    B, T, n_h, H, dk, dv = _check_shapes(q, k, v, beta, g, initial_state, reset)
    _check_chunk_size(chunk_size)
    dt = _compute_dtype(q)
    scale = dk**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, dk, dv, dtype=dt) if initial_state is None else initial_state.to(dt)
    if T == 0:
        return q.new_zeros(B, 0, H, dv), S

    c = _chunk_terms(k, v, beta, g, reset, chunk_size, dt)
    # The query of token t is read at its last sub-step; other sub-steps get a zero query.
    q_sub = torch.cat([q.new_zeros(B, T, n_h - 1, H, dk, dtype=dt), q.to(dt)[:, :, None]], 2)
    q_c = _to_chunks(q_sub.reshape(B, T * n_h, H, dk), chunk_size)  # [B,H,NC,C,dk]

    # O = scale (diag(e^γ[seg=0]) Q S_0 + (Q Kᵀ ⊙ D) W) with W = U - Wk S_0
    #   = scale ((Q Kᵀ ⊙ D) U + Q_eff S_0),  Q_eff = diag(e^γ[seg=0]) Q - (Q Kᵀ ⊙ D) Wk.
    attn = (q_c @ c["k"].transpose(-1, -2)) * c["decay"]
    o_intra = attn @ c["U"]
    q_eff = c["s0_decay"][..., None] * q_c - attn @ c["Wk"]

    # Propagate the state across chunks: S_{c+1} = M_c S_c + E_c (the only sequential part).
    starts = []
    for i in range(c["M"].shape[2]):
        starts.append(S)
        S = c["M"][:, :, i] @ S + c["E"][:, :, i]
    S_start = torch.stack(starts, dim=2)  # [B,H,NC,dk,dv]

    o = scale * (o_intra + q_eff @ S_start)  # [B,H,NC,C,dv]
    o = o.flatten(2, 3)[:, :, : T * n_h].reshape(B, H, T, n_h, dv)[:, :, :, -1]
    return o.transpose(1, 2).to(q.dtype), S


def deltaproduct(q, k, v, beta, g=None, scale=None, initial_state=None, reset=None, chunk_size=64,
                 backend="auto"):
    """Gated DeltaProduct, backend chosen per call.

    backend="auto": the Triton kernels (kernels/deltaproduct_triton.py) when q is a CUDA tensor
    of dtype fp32/bf16/fp16, triton imports, the shapes suit the kernels (chunk_size 16, 32 or
    64, 16 <= dk <= 256, dv >= 16) and the kernels passed their startup self-check for this shape
    class (kernels/selfcheck.py: the first call compares them with this module's chunkwise form on
    a small slice, and a failure falls back to the torch form for the run); otherwise the torch
    chunkwise form (deltaproduct_chunkwise, autograd gradients), which also serves fp64.
    backend="triton" forces the kernels (tests run them on CPU tensors under TRITON_INTERPRET=1);
    on CUDA a failed self-check is then an error. backend="torch" forces the chunkwise form.
    Both return (o, final_state fp32).
    """
    triton_ok = use_triton(backend, q, "deltaproduct")  # kernels/backend.py: the rule of every op
    _check_chunk_size(chunk_size)
    on_gpu = q.is_cuda or selfcheck.forced_on_cpu()
    if backend == "auto":
        triton_ok = (triton_ok and q.dtype != torch.float64 and chunk_size in (16, 32, 64)
                     and 16 <= k.shape[-1] <= 256 and v.shape[-1] >= 16)
    if triton_ok:
        _check_shapes(q, k, v, beta, g, initial_state, reset)
        if on_gpu:
            triton_ok = _self_checked(q, k, v, beta, g, initial_state, reset, scale, chunk_size,
                                       strict=backend == "triton")
    if triton_ok and k.shape[1] > 0:
        from kernels.deltaproduct_triton import deltaproduct_triton

        return deltaproduct_triton(q, k, v, beta, g=g, scale=scale, initial_state=initial_state,
                                   reset=reset, chunk_size=chunk_size)
    return deltaproduct_chunkwise(
        q, k, v, beta, g=g, scale=scale, initial_state=initial_state, reset=reset,
        chunk_size=chunk_size,
    )


# Self-check tolerances (max error relative to the largest reference value, over the output, the
# final state and every gradient): what the kernels' operand rounding allows with margin; a
# broken kernel is off by O(1).
SELFCHECK_TOL = {torch.float32: 1e-2, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def _self_checked(q, k, v, beta, g, initial_state, reset, scale, chunk_size, strict):
    """Whether the Triton kernels passed (now or earlier in the process) the self-check for the
    shape class of this call: a slice of one batch row, every head, 2+ chunks and a ragged tail,
    its state walks launched with the call's dv block (which depends on the batch)."""
    from kernels.deltaproduct_triton import state_block_of

    n_h, H, dk, dv = k.shape[2], k.shape[3], k.shape[4], v.shape[-1]
    state_block = state_block_of(q, k, v)
    shape_class = (f"H={H}", f"dk={dk}", f"dv={dv}", f"n_h={n_h}", f"chunk={chunk_size}",
                   f"qkv={q.dtype}", f"beta={beta.dtype}", f"gate={None if g is None else g.dtype}",
                   f"initial_state={initial_state is not None}", f"reset={reset is not None}",
                   f"state_block={state_block}")

    def check():
        from kernels.deltaproduct_triton import deltaproduct_triton

        gen = selfcheck.slice_generator(q.device)
        t_slice = 2 * (chunk_size // n_h) + 3
        dev = q.device

        def randn(*shape, dtype=torch.float32):
            return torch.randn(*shape, generator=gen, device=dev).to(dtype)

        inputs = dict(
            q=torch.nn.functional.normalize(randn(1, t_slice, H, dk), dim=-1).to(q.dtype),
            k=torch.nn.functional.normalize(randn(1, t_slice, n_h, H, dk), dim=-1).to(k.dtype),
            v=randn(1, t_slice, n_h, H, dv, dtype=v.dtype),
            beta=(2 * torch.rand(1, t_slice, n_h, H, generator=gen, device=dev)).to(beta.dtype),
            g=None if g is None else (-torch.nn.functional.softplus(randn(1, t_slice, H))).to(g.dtype),
            initial_state=None if initial_state is None else randn(1, H, dk, dv, dtype=initial_state.dtype),
        )
        reset_slice = None
        if reset is not None:
            reset_slice = torch.zeros(1, t_slice, dtype=torch.bool, device=dev)
            reset_slice[0, chunk_size // n_h + 1] = True
        leaves = {name: x.requires_grad_(True) for name, x in inputs.items() if x is not None}
        d_o = randn(1, t_slice, H, dv)
        d_final = randn(1, H, dk, dv)
        results = []
        for fn, extra in ((deltaproduct_triton, dict(state_block=state_block)), (deltaproduct_chunkwise, {})):
            o, final = fn(**inputs, scale=scale, reset=reset_slice, chunk_size=chunk_size, **extra)
            loss = (o.float() * d_o).sum() + (final.float() * d_final).sum()
            grads = torch.autograd.grad(loss, list(leaves.values()))
            results.append([o, final, *grads])
        return max(selfcheck.relative_error(a, b) for a, b in zip(*results))

    return selfcheck.kernel_allowed("deltaproduct", shape_class, check, SELFCHECK_TOL.get(q.dtype, 1e-2), strict)


def deltaproduct_summary(k, v, beta, g=None, reset=None, chunk_size=64):
    """Summary (M [B,H,dk,dk], S_ext [B,H,dk,dv]) of a piece, fp32 (fp64 for fp64 inputs).

    M is the product of the per-token transitions e^{g_t} Π_j (I - β k kᵀ) in time order (later
    on the left), zeroed by any reset in the piece; S_ext is the end state from a zero start; so
    the end state from S0 is M S0 + S_ext. Computed with the same chunk-parallel WY terms as
    deltaproduct_chunkwise (M_c = e^{γ_C} I - Kdᵀ Wk per chunk), then the chunk summaries are
    composed in a loop over chunks: one code path for the training scan and the summaries.
    """
    B, T, n_h, H, dk, dv = _check_shapes(None, k, v, beta, g, None, reset)
    _check_chunk_size(chunk_size)
    dt = _compute_dtype(k)
    M = torch.eye(dk, dtype=dt, device=k.device).expand(B, H, dk, dk)
    E = k.new_zeros(B, H, dk, dv, dtype=dt)
    if T == 0:
        return M.clone(), E
    c = _chunk_terms(k, v, beta, g, reset, chunk_size, dt)
    for i in range(c["M"].shape[2]):
        M, E = compose_deltaproduct_summaries((M, E), (c["M"][:, :, i], c["E"][:, :, i]))
    return M, E


def compose_deltaproduct_summaries(first, second):
    """(M2, E2) ∘ (M1, E1) = (M2 M1, M2 E1 + E2): first piece, then second."""
    M1, E1 = first
    M2, E2 = second
    return M2 @ M1, M2 @ E1 + E2


def apply_deltaproduct_summary(summary, S0):
    """End state of the summarised piece started from S0: M S0 + S_ext."""
    M, E = summary
    return M @ S0.to(M.dtype) + E
