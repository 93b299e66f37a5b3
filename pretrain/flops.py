"""Training FLOPs per token, counted from the math of each layer (forward and backward apart).

What is counted (model FLOPs, the numerator of MFU; recomputation is never counted):
  - every matmul: 2 FLOPs per multiply-accumulate; its backward is 2x its forward (the
    gradients of both operands). Projections, the LM head, SwiGLU, attention's QK^T and AV
    (causal: query t sees t+1 keys), and the chunkwise DeltaProduct's GEMMs.
  - ParaRNN's Newton solver, whose work is element-wise: 1 FLOP per element-wise arithmetic
    op (sigmoid and tanh count 1; their derivative sigma' = s(1-s), tanh' = 1-t^2 count 3 with
    the multiply by the incoming gradient), per channel and token:
        forward  = f(0, u)                                        initial guess
                 + num_iters x (gates + f + residual + Jacobian + scan + update)
                 + gates + f + residual                           the final, reported residual
        backward = gates + Jacobian (at the solution) + reverse scan + one VJP of f
    The gates (sigmoids/tanh) are evaluated once per iteration and shared by f and the Jacobian,
    as the fused kernels do. The scan counts the sequential recurrence's work, d_t = J_t d_{t-1}
    - r_t: 2 per channel (diagonal) or 8 (2x2 block); the torch reference's doubling scan does
    more, the algorithm does not need it. Reductions for the convergence check are not counted.
  - DeltaProduct: the chunkwise WY/UT algorithm as the Triton kernels run it (module docstring of
    kernels/deltaproduct_triton.py), per chunk of C sub-steps (n_h sub-steps per token) and head:
        K K^T (C x C x dk), (I+A)^{-1} by forward substitution (C(C^2-1)/6 MACs),
        U = T diag(b) V, Wk = T diag(b s0d) K, W = U - Wk S0, S_end = s0d S0 + Kd^T W,
        outputs at the C/n_h query rows only: Q K^T, (Q K^T . D) W, Q S0.
    `deltaproduct_chunk_macs(..., form="torch_chunkwise")` counts instead what
    kernels.deltaproduct.deltaproduct_chunkwise computes (outputs at every sub-step, the dk x dk
    chunk transition M, S <- M S + E); tests check both against counted FLOPs of torch ops.
  - the short convs: 2 per tap and channel.
Not counted: embedding lookup, norms, activations, gates, rotary, softmax and the loss (each
< 1% of the total at 1B scale).
"""
from __future__ import annotations

import math

# Element-wise op counts per channel and token, as in the cells' equations (kernels/pararnn.py):
# tests/test_flops.py counts the ops the torch cells dispatch and checks these numbers.
PARARNN_CELL_OPS = {
    #            gates: the pre-activations and their sigmoid/tanh; step: f given the gates;
    #            jacobian: df/dh given the gates; vjp: (df/du, df/da, df/dp)^T lambda given the gates
    #            state: numbers per channel (h, or (c, h)); scan: d_t = J_t d_{t-1} - r_t
    "paragru": dict(gates=10, step=4, jacobian=18, vjp=28, state=1, scan=2),
    "paralstm": dict(gates=17, step=2, jacobian=31, vjp=38, state=2, scan=8),
}


def linear_flops(d_in: int, d_out: int) -> float:
    """Forward FLOPs per token of x W with W [d_in, d_out]."""
    return 2.0 * d_in * d_out


def attention_score_flops(seq_len: int, d_model: int, causal: bool = True) -> float:
    """Forward FLOPs per token of Q K^T and A V over all heads (2 matmuls of d_model per key)."""
    keys = (seq_len + 1) / 2 if causal else seq_len  # mean keys per query
    return 2 * 2.0 * d_model * keys


def pararnn_solver_flops(cell: str, hidden: int, num_iters: int) -> tuple[float, float]:
    """(forward, backward) FLOPs per token of the Newton solve over `hidden` channels."""
    c = PARARNN_CELL_OPS[cell]
    f = c["gates"] + c["step"]
    residual = c["state"]                     # r = h - f(h_prev)
    update = c["state"]                       # h <- h + d
    iteration = f + residual + c["jacobian"] + c["scan"] + update
    forward = f + num_iters * iteration + (f + residual)
    backward = c["gates"] + c["jacobian"] + c["scan"] + c["vjp"]
    return forward * hidden, backward * hidden


def deltaproduct_chunk_macs(C: int, dk: int, dv: int, n_h: int, form: str = "algorithm") -> dict:
    """Multiply-accumulates of one chunk of C sub-steps for one head, by term.

    form="algorithm": the Triton kernels' algorithm (outputs at the C/n_h query rows, W-form
    state passing). form="torch_chunkwise": deltaproduct_chunkwise's ops (outputs at all C rows,
    the dk x dk transition M and S <- M S + E); its triangular inverse goes through
    solve_triangular, which torch's FlopCounterMode does not count, so it is reported apart.
    """
    if form not in ("algorithm", "torch_chunkwise"):
        raise ValueError(f"form must be 'algorithm' or 'torch_chunkwise', got {form!r}")
    gram = C * C * dk                           # K K^T
    inverse = C * (C * C - 1) / 6               # (I + A)^{-1}, forward substitution
    wy = C * C * (dv + dk)                      # U = T (b V), Wk = T (b s0d K)
    if form == "algorithm":
        R = C / n_h                             # query rows: each token's last sub-step
        state = C * dk * dv + dk * C * dv       # W = U - Wk S0, S_end = s0d S0 + Kd^T W
        outputs = R * C * dk + R * C * dv + R * dk * dv  # Q K^T, (Q K^T . D) W, Q S0
    else:
        R = C
        state = dk * C * dk + dk * C * dv + dk * dk * dv  # M = s0d I - Kd^T Wk, E = Kd^T U, M S + E
        outputs = R * C * dk + R * C * dv + R * C * dk + R * dk * dv  # QK^T, .U, .Wk, Q_eff S
    return dict(gram=gram, inverse=inverse, wy=wy, state=state, outputs=outputs)


def deltaproduct_recurrence_flops(seq_len: int, num_heads: int, dk: int, dv: int, n_h: int,
                                  chunk_size: int, form: str = "algorithm") -> float:
    """Forward FLOPs per token of the chunkwise recurrence (all heads), the tail chunk padded."""
    chunks = math.ceil(seq_len * n_h / chunk_size)
    macs = sum(deltaproduct_chunk_macs(chunk_size, dk, dv, n_h, form).values())
    return 2.0 * macs * chunks * num_heads / seq_len


def _swiglu_hidden(cfg) -> int:
    return cfg.mlp_multiple * math.ceil(cfg.mlp_ratio * cfg.d_model / cfg.mlp_multiple)


def pararnn_mixer_flops(cfg, c, seq_len: int, num_iters: int | None = None, form: str = "algorithm", *,
                        cell: str) -> dict[str, tuple[float, float]]:
    """A ParaRNN mixer (cell "paragru" or "paralstm", section c): projections and the Newton solve."""
    d = cfg.d_model
    hidden = int(c.expand * d)
    # in_proj is block-diagonal over heads: 3 gates x (d/H -> hidden/H) per head.
    proj = linear_flops(d, 3 * hidden) / c.num_heads + linear_flops(hidden, d)
    iters = c.num_iters if num_iters is None else num_iters
    return {"proj": (proj, 2 * proj), "newton": pararnn_solver_flops(cell, hidden, iters)}


def deltaproduct_mixer_flops(cfg, c, seq_len: int, num_iters: int | None = None,
                             form: str = "algorithm") -> dict[str, tuple[float, float]]:
    """A DeltaProduct mixer (section c): projections, short convs and the chunkwise recurrence."""
    d = cfg.d_model
    H, dk, nh = c.num_heads, c.head_dim, c.num_householder
    dv = int(dk * c.expand_v)
    widths = [H * dk, nh * H * dk, nh * H * dv, nh * H, H * dv]  # q, k, v, beta, output gate
    if c.use_forget_gate:
        widths.append(H)
    proj = sum(linear_flops(d, w) for w in widths) + linear_flops(H * dv, d)
    out = {"proj": (proj, 2 * proj)}
    if c.use_short_conv:
        conv = 2.0 * c.conv_size * (H * dk + nh * H * dk + nh * H * dv)
        out["conv"] = (conv, 2 * conv)
    rec = deltaproduct_recurrence_flops(seq_len, H, dk, dv, nh, c.chunk_size, form)
    out["chunk"] = (rec, 2 * rec)
    return out


def attention_mixer_flops(cfg, c, seq_len: int, num_iters: int | None = None,
                          form: str = "algorithm") -> dict[str, tuple[float, float]]:
    """Causal attention: the projections and QK^T, AV."""
    d = cfg.d_model
    proj = linear_flops(d, 3 * d) + linear_flops(d, d)
    scores = attention_score_flops(seq_len, d, causal=True)
    return {"proj": (proj, 2 * proj), "scores": (scores, 2 * scores)}


def mixer_flops(cfg, mixer: str, seq_len: int, num_iters: int | None = None,
                deltaproduct_form: str = "algorithm") -> dict[str, tuple[float, float]]:
    """{term: (forward, backward)} FLOPs per token of one layer's mixer (its MixerSpec's formula).

    deltaproduct_form: which chunkwise form a DeltaProduct-family mixer counts (see
    deltaproduct_chunk_macs)."""
    from pretrain.registry import mixer_spec  # the registry imports this module for its formulas

    spec = mixer_spec(mixer)
    return spec.flops(cfg, spec.section_of(cfg), seq_len, num_iters, deltaproduct_form)


def model_flops_per_token(cfg, seq_len: int, num_iters: int | None = None,
                          deltaproduct_form: str = "algorithm") -> dict:
    """Training FLOPs per token of the whole model (forward + backward), with a breakdown.

    cfg: a ModelConfig. num_iters: Newton iterations (None: each ParaRNN config's num_iters).
    Returns {"forward", "backward", "total", "breakdown": {term: {"forward", "backward"}}},
    terms named "mlp", "head", "<mixer>.<term>", each summed over layers.
    """
    breakdown: dict[str, list[float]] = {}

    def add(name, fwd_bwd, times=1):
        acc = breakdown.setdefault(name, [0.0, 0.0])
        acc[0] += fwd_bwd[0] * times
        acc[1] += fwd_bwd[1] * times

    mlp = 3 * linear_flops(cfg.d_model, _swiglu_hidden(cfg))
    add("mlp", (mlp, 2 * mlp), cfg.n_layers)
    head = linear_flops(cfg.d_model, cfg.vocab_size)
    add("head", (head, 2 * head))
    for mixer in cfg.layer_mixers():
        for term, fb in mixer_flops(cfg, mixer, seq_len, num_iters, deltaproduct_form).items():
            add(f"{mixer}.{term}", fb)
    forward = sum(v[0] for v in breakdown.values())
    backward = sum(v[1] for v in breakdown.values())
    return {"forward": forward, "backward": backward, "total": forward + backward,
            "breakdown": {k: {"forward": v[0], "backward": v[1]} for k, v in breakdown.items()}}
