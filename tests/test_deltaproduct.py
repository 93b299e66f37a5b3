"""Gated DeltaProduct: chunkwise form and summaries against the per-token reference."""

import pytest
import torch
import torch.nn.functional as F

from kernels.deltaproduct import (
    apply_deltaproduct_summary,
    compose_deltaproduct_summaries,
    deltaproduct,
    deltaproduct_chunkwise,
    deltaproduct_naive,
    deltaproduct_summary,
)

B, H, DK, DV = 2, 2, 8, 16
FP64_TOL = dict(atol=1e-10, rtol=1e-10)


def make_inputs(T, n_h, *, gate=True, init=True, reset_tokens=None, seed=0,
                dtype=torch.float64, decay_scale=1.0):
    """Random inputs as the layer would produce them: unit keys, β = 2σ(x) ∈ [0,2], g ≤ 0.

    reset_tokens: a list (one entry per batch row) of token indices where a document starts.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = F.normalize(randn(B, T, H, DK), dim=-1)
    k = F.normalize(randn(B, T, n_h, H, DK), dim=-1)
    v = randn(B, T, n_h, H, DV)
    beta = 2 * torch.sigmoid(2 * randn(B, T, n_h, H))
    g = -decay_scale * F.softplus(randn(B, T, H) - 1.0) if gate else None
    s0 = randn(B, H, DK, DV) if init else None
    reset = None
    if reset_tokens is not None:
        reset = torch.zeros(B, T, dtype=torch.bool)
        for b, tokens in enumerate(reset_tokens):
            reset[b, list(tokens)] = True
    return cast_inputs(dict(q=q, k=k, v=v, beta=beta, g=g, initial_state=s0, reset=reset), dtype)


def cast_inputs(inputs, dtype):
    """The floating-point inputs cast to dtype; reset and None left as they are."""
    return {n: (x.to(dtype) if x is not None and x.is_floating_point() else x)
            for n, x in inputs.items()}


def outputs_and_grads(fn, inputs, seed=1, **kwargs):
    """Run fn, backprop fixed random cotangents of (o, final_state); return o, S, {name: grad}."""
    leaves = {n: x.detach().clone().requires_grad_(True)
              for n, x in inputs.items() if x is not None and x.is_floating_point()}
    args = {**inputs, **leaves}
    o, S = fn(**args, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    dS = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.dtype)
    grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), list(leaves.values()))
    return o.detach(), S.detach(), dict(zip(leaves, grads))


def assert_matches_naive(inputs, tol=FP64_TOL, **kwargs):
    o_ref, S_ref, g_ref = outputs_and_grads(deltaproduct_naive, inputs)
    o, S, grads = outputs_and_grads(deltaproduct_chunkwise, inputs, **kwargs)
    torch.testing.assert_close(o, o_ref, **tol)
    torch.testing.assert_close(S, S_ref, **tol)
    assert set(grads) == set(g_ref)
    for name in g_ref:
        torch.testing.assert_close(grads[name], g_ref[name], **tol, msg=lambda m: f"d{name}: {m}")


# ---------------------------------------------------------------------------------------------
# The reference itself


def test_naive_matches_explicit_transition_matrices():
    """S_t = e^{g_t} Π_j (I - β k kᵀ) ... built from explicit dk×dk matrices, one head."""
    x = make_inputs(T=5, n_h=3)
    o, S = deltaproduct_naive(**x)
    b, h = 1, 1
    S_ref = x["initial_state"][b, h].clone()
    eye = torch.eye(DK, dtype=torch.float64)
    for t in range(5):
        S_ref = x["g"][b, t, h].exp() * S_ref
        for j in range(3):
            kk, vv, bb = x["k"][b, t, j, h], x["v"][b, t, j, h], x["beta"][b, t, j, h]
            S_ref = (eye - bb * torch.outer(kk, kk)) @ S_ref + bb * torch.outer(kk, vv)
        torch.testing.assert_close(o[b, t, h], DK**-0.5 * S_ref.T @ x["q"][b, t, h], **FP64_TOL)
    torch.testing.assert_close(S[b, h], S_ref, **FP64_TOL)


def test_naive_reset_is_a_fresh_start():
    """A reset at token t: outputs from t on and the final state equal a zero-state run on [t:]."""
    T, t0 = 9, 4
    x = make_inputs(T, n_h=2, reset_tokens=[[t0], [t0]])
    o, S = deltaproduct_naive(**x)
    tail = {n: x[n][:, t0:] for n in ("q", "k", "v", "beta", "g")}
    o_tail, S_tail = deltaproduct_naive(**tail)
    torch.testing.assert_close(o[:, t0:], o_tail, **FP64_TOL)
    torch.testing.assert_close(S, S_tail, **FP64_TOL)


# ---------------------------------------------------------------------------------------------
# Chunkwise == naive, fp64, forward and every gradient


def boundary_token(n_h, chunk_size):
    """A token whose first sub-step is exactly the first sub-step of the second chunk."""
    assert chunk_size % n_h == 0
    return chunk_size // n_h


@pytest.mark.parametrize("n_h", [1, 2, 3])
@pytest.mark.parametrize("gate", [True, False])
def test_chunkwise_matches_naive_small_chunks(n_h, gate):
    # chunk 8 sub-steps; T·n_h ∈ {13, 26, 39}: several chunks and a ragged tail.
    x = make_inputs(T=13, n_h=n_h, gate=gate, init=True)
    assert_matches_naive(x, chunk_size=8)


@pytest.mark.parametrize("n_h", [1, 2, 3])
def test_chunkwise_matches_naive_with_resets(n_h):
    # chunk 6 (divisible by 1, 2, 3): row 0 resets at t=0, mid-chunk and at a chunk boundary;
    # row 1 at the boundary of the third chunk only.
    C = 6
    mid = 1 if n_h == 3 else 3 // n_h + 1  # first sub-step not a multiple of C
    assert (mid * n_h) % C != 0
    resets = [[0, mid, boundary_token(n_h, C) * 2], [boundary_token(n_h, C) * 3]]
    for gate in (True, False):
        x = make_inputs(T=4 * C // n_h + 1, n_h=n_h, gate=gate, init=True, reset_tokens=resets)
        assert_matches_naive(x, chunk_size=C)


@pytest.mark.parametrize("n_h", [1, 2])
def test_chunkwise_matches_naive_default_chunk(n_h):
    # Default chunk 64: T·n_h = 70 -> one full chunk plus a ragged tail; a reset exactly at the
    # start of the second chunk and one mid-chunk.
    T = 70 // n_h
    x = make_inputs(T=T, n_h=n_h, init=True, reset_tokens=[[boundary_token(n_h, 64)], [5]])
    assert_matches_naive(x)


@pytest.mark.parametrize("n_h", [1, 2])
def test_chunkwise_matches_naive_single_token(n_h):
    assert_matches_naive(make_inputs(T=1, n_h=n_h, init=True), chunk_size=8)
    assert_matches_naive(make_inputs(T=1, n_h=n_h, init=False, reset_tokens=[[0], []]))


def test_chunkwise_matches_naive_without_initial_state_or_gate():
    assert_matches_naive(make_inputs(T=11, n_h=2, gate=False, init=False), chunk_size=16)


def test_chunkwise_strong_decay_has_no_overflow():
    # g down to about -60 per token: e^{γ} underflows inside a chunk; decays are exp of
    # differences γ_i - γ_s ≤ 0 only, so nothing overflows and gradients stay finite.
    x = make_inputs(T=20, n_h=2, init=True, decay_scale=30.0)
    o, S, grads = outputs_and_grads(deltaproduct_chunkwise, x, chunk_size=16)
    assert torch.isfinite(o).all() and all(torch.isfinite(gr).all() for gr in grads.values())
    assert_matches_naive(x, chunk_size=16)


def test_dispatcher_is_chunkwise():
    x = make_inputs(T=10, n_h=2, reset_tokens=[[3], []])
    o, S = deltaproduct(**x, chunk_size=8)
    o_ref, S_ref = deltaproduct_chunkwise(**x, chunk_size=8)
    torch.testing.assert_close(o, o_ref, atol=0, rtol=0)
    torch.testing.assert_close(S, S_ref, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Chaining and summaries (what sequence parallelism relies on)


@pytest.mark.parametrize("resets", [None, [[0, 7], [5]]])
def test_chaining_two_halves_equals_whole(resets):
    T, n_h = 14, 2
    x = make_inputs(T, n_h, init=True, reset_tokens=resets)
    o, S = deltaproduct_chunkwise(**x, chunk_size=8)

    def piece(lo, hi, s0):
        p = {n: (val[:, lo:hi] if val is not None else None) for n, val in x.items()
             if n != "initial_state"}
        return deltaproduct_chunkwise(**p, initial_state=s0, chunk_size=8)

    o1, S1 = piece(0, T // 2, x["initial_state"])
    o2, S2 = piece(T // 2, T, S1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, **FP64_TOL)
    torch.testing.assert_close(S2, S, **FP64_TOL)


def summary_inputs(x, lo=None, hi=None):
    sl = slice(lo, hi)
    return {n: (x[n][:, sl] if x[n] is not None else None) for n in ("k", "v", "beta", "g", "reset")}


@pytest.mark.parametrize("resets", [None, [[4], [0, 9]]])
@pytest.mark.parametrize("n_h", [1, 3])
def test_summary_applied_to_s0_is_the_final_state(n_h, resets):
    x = make_inputs(T=12, n_h=n_h, init=True, reset_tokens=resets)
    _, S_ref = deltaproduct_naive(**x)
    summary = deltaproduct_summary(**summary_inputs(x), chunk_size=8)
    torch.testing.assert_close(apply_deltaproduct_summary(summary, x["initial_state"]), S_ref,
                               **FP64_TOL)
    # And from a zero start S_ext alone is the end state.
    _, S_zero = deltaproduct_naive(**{**x, "initial_state": None})
    torch.testing.assert_close(summary[1], S_zero, **FP64_TOL)


def test_summary_transition_is_the_product_of_token_transitions():
    x = make_inputs(T=6, n_h=2, reset_tokens=[[], [3]])
    M, _ = deltaproduct_summary(**summary_inputs(x), chunk_size=4)
    eye = torch.eye(DK, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            M_ref = eye.clone()
            for t in range(6):
                if x["reset"][b, t]:
                    M_ref = torch.zeros_like(M_ref)
                M_ref = x["g"][b, t, h].exp() * M_ref
                for j in range(2):
                    kk, bb = x["k"][b, t, j, h], x["beta"][b, t, j, h]
                    M_ref = (eye - bb * torch.outer(kk, kk)) @ M_ref
            torch.testing.assert_close(M[b, h], M_ref, **FP64_TOL)
    assert M[1].abs().max() == 0  # a reset inside the piece forgets everything before it


@pytest.mark.parametrize("resets", [None, [[0, 5, 10], [8]]])
def test_composed_summaries_of_three_pieces_equal_the_whole(resets):
    x = make_inputs(T=15, n_h=2, reset_tokens=resets)
    whole = deltaproduct_summary(**summary_inputs(x), chunk_size=8)
    a, b, c = (deltaproduct_summary(**summary_inputs(x, lo, hi), chunk_size=8)
               for lo, hi in ((0, 5), (5, 11), (11, 15)))
    left = compose_deltaproduct_summaries(compose_deltaproduct_summaries(a, b), c)
    right = compose_deltaproduct_summaries(a, compose_deltaproduct_summaries(b, c))
    for composed in (left, right):
        torch.testing.assert_close(composed[0], whole[0], **FP64_TOL)
        torch.testing.assert_close(composed[1], whole[1], **FP64_TOL)


def test_summary_is_fp32_for_fp32_inputs():
    x = make_inputs(T=5, n_h=2, dtype=torch.bfloat16)
    M, E = deltaproduct_summary(**summary_inputs(x))
    assert M.dtype == torch.float32 and E.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Lower precision


def test_fp32_chunkwise_matches_fp64_naive():
    # fp32 chunkwise (default chunk 64, 2 chunks) vs fp64 reference: |err| ≤ 1e-4 on O(1) values.
    x64 = make_inputs(T=40, n_h=3, init=True, reset_tokens=[[17], []])
    x32 = cast_inputs(x64, torch.float32)
    o_ref, S_ref, g_ref = outputs_and_grads(deltaproduct_naive, x64)
    o, S, grads = outputs_and_grads(deltaproduct_chunkwise, x32)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o.double(), o_ref, **tol)
    torch.testing.assert_close(S.double(), S_ref, **tol)
    for name in g_ref:
        torch.testing.assert_close(grads[name].double(), g_ref[name], **tol)


def test_bf16_inputs_run_and_match_fp32():
    x32 = make_inputs(T=40, n_h=2, init=True, dtype=torch.float32, reset_tokens=[[9], []])
    x16 = cast_inputs(x32, torch.bfloat16)
    o16, S16 = deltaproduct_chunkwise(**x16)
    assert o16.dtype == torch.bfloat16 and S16.dtype == torch.float32
    # Against fp32 on the same (bf16-rounded) inputs only o's final rounding differs:
    # bf16 has 8 mantissa bits, so |err| ≤ 2^-8 |o| (+ fp32 noise).
    o32r, S32r = deltaproduct_chunkwise(**cast_inputs(x16, torch.float32))
    torch.testing.assert_close(o16.float(), o32r, atol=1e-5, rtol=2**-8)
    torch.testing.assert_close(S16, S32r, atol=1e-5, rtol=1e-5)
    # Against fp32 on the original inputs: input rounding propagates, |err| ≤ 0.05 on O(1) values.
    o32, S32 = deltaproduct_chunkwise(**x32)
    torch.testing.assert_close(o16.float(), o32, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(S16, S32, atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------------------------------
# User errors


def test_bad_shapes_are_one_line_errors():
    x = make_inputs(T=4, n_h=2)
    with pytest.raises(ValueError, match=r"beta must be \[B,T,n_h,H\]"):
        deltaproduct_chunkwise(**{**x, "beta": x["beta"][:, :, 0]})
    with pytest.raises(ValueError, match=r"initial_state must be \[B,H,dk,dv\]"):
        deltaproduct_chunkwise(**{**x, "initial_state": x["initial_state"][:, :, :, :3]})
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        deltaproduct_chunkwise(**x, chunk_size=0)
