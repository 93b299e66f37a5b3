"""Gated DeltaProduct Triton kernels (run on CPU by TRITON_INTERPRET=1, see conftest.py) against
the per-token reference, forward and every gradient; and the layer in bf16 against fp32.

Tolerance for the kernels: fp32 kernels against the fp64 reference on the same (fp32) inputs,
|err| <= 1e-4 + 1e-4 |ref| (observed <= 1.1e-6 (1 + |ref|)). Sizes are small (B=2, H=2,
dk=dv=16, chunk 16 sub-steps) because the interpreter is slow.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernels.deltaproduct import deltaproduct, deltaproduct_chunkwise, deltaproduct_naive  # noqa: E402
from kernels.deltaproduct_triton import deltaproduct_triton  # noqa: E402

B, H, DK, DV, C = 2, 2, 16, 16, 16
FP32_TOL = dict(atol=1e-4, rtol=1e-4)


def make_inputs(T, n_h, *, gate=True, init=True, reset_tokens=None, seed=0, decay_scale=1.0):
    """fp32 inputs as the layer makes them: unit q/k, β = 2σ(x) ∈ [0, 2], g ≤ 0."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

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
    return dict(q=q, k=k, v=v, beta=beta, g=g, initial_state=s0, reset=reset)


def cast(inputs, dtype):
    return {n: (x.to(dtype) if x is not None and x.is_floating_point() else x)
            for n, x in inputs.items()}


def outputs_and_grads(fn, inputs, **kwargs):
    """o, final state and the gradients of every float input under fixed random cotangents."""
    leaves = {n: x.detach().clone().requires_grad_(True)
              for n, x in inputs.items() if x is not None and x.is_floating_point()}
    o, S = fn(**{**inputs, **leaves}, **kwargs)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    dS = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.dtype)
    grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), list(leaves.values()))
    return o.detach(), S.detach(), dict(zip(leaves, grads))


def assert_triton_matches_naive(inputs, chunk_size=C, tol=FP32_TOL):
    o_ref, S_ref, g_ref = outputs_and_grads(deltaproduct_naive, cast(inputs, torch.float64))
    o, S, grads = outputs_and_grads(deltaproduct, inputs, chunk_size=chunk_size, backend="triton")
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, **tol)
    torch.testing.assert_close(S.double(), S_ref, **tol)
    assert set(grads) == set(g_ref)
    for name in g_ref:
        assert grads[name].dtype == inputs[name].dtype
        torch.testing.assert_close(grads[name].double(), g_ref[name], **tol,
                                   msg=lambda m: f"d{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Triton == naive, fp32, forward and every gradient


@pytest.mark.parametrize("n_h", [1, 2, 3])
@pytest.mark.parametrize("gate", [True, False])
def test_triton_matches_naive(n_h, gate):
    # T·n_h ∈ {21, 42, 63} sub-steps: 2-4 chunks of 16 with a ragged tail.
    assert_triton_matches_naive(make_inputs(T=21, n_h=n_h, gate=gate, init=True))


@pytest.mark.parametrize("n_h", [1, 2, 3])
def test_triton_matches_naive_with_resets(n_h):
    # Row 0: resets at t=0, mid-chunk, and at a token whose first sub-step starts a chunk
    # (sub-step 16 for n_h ∈ {1, 2}, 48 for n_h = 3); row 1: one reset mid-sequence.
    boundary = {1: 16, 2: 8, 3: 16}[n_h]
    assert (boundary * n_h) % C == 0
    resets = [[0, 3, boundary], [5]]
    for gate in (True, False):
        assert_triton_matches_naive(
            make_inputs(T=18, n_h=n_h, gate=gate, init=True, reset_tokens=resets, seed=n_h))


@pytest.mark.parametrize("n_h", [1, 2])
def test_triton_matches_naive_single_token(n_h):
    assert_triton_matches_naive(make_inputs(T=1, n_h=n_h, init=True))
    assert_triton_matches_naive(make_inputs(T=1, n_h=n_h, init=False, reset_tokens=[[0], []]))


def test_triton_matches_naive_without_initial_state_or_gate():
    assert_triton_matches_naive(make_inputs(T=11, n_h=2, gate=False, init=False))


def test_triton_matches_naive_beta_at_the_ends_of_its_range():
    # β ∈ {0, 2} exactly: skipped updates and full reflections (eigenvalue -1).
    x = make_inputs(T=12, n_h=2, init=True, seed=4)
    x["beta"] = 2.0 * (torch.rand(x["beta"].shape, generator=torch.Generator().manual_seed(5)) > 0.5)
    assert_triton_matches_naive(x)


def test_triton_matches_naive_default_chunk():
    # The production chunk of 64 sub-steps: T·n_h = 70 = one full chunk and a ragged tail.
    assert_triton_matches_naive(make_inputs(T=35, n_h=2, init=True, reset_tokens=[[32], []]),
                                chunk_size=64)


def test_triton_strong_decay_is_finite_and_matches():
    # g down to about -60 per token: e^{γ} underflows inside a chunk, nothing may overflow.
    x = make_inputs(T=20, n_h=2, init=True, decay_scale=30.0)
    o, S, grads = outputs_and_grads(deltaproduct_triton, x, chunk_size=C)
    assert torch.isfinite(o).all() and all(torch.isfinite(gr).all() for gr in grads.values())
    assert_triton_matches_naive(x)


def test_triton_bf16_inputs_match_fp32_chunkwise():
    """bf16 inputs: o in bf16, state fp32, grads in the inputs' dtypes; math in fp32.

    Against the torch chunkwise form in fp32 on the same bf16-rounded inputs only the final
    roundings to bf16 differ (and TF32 dots on a GPU): |err| <= 2e-2 (1 + |ref|) (observed
    <= 4.5e-3 (1 + |ref|) under the interpreter).
    """
    x = make_inputs(T=21, n_h=2, init=True, reset_tokens=[[7], []])
    x16 = cast(x, torch.bfloat16)
    x16["beta"] = x["beta"].bfloat16().float()  # the layer passes β (and g) in fp32
    x16["g"] = x["g"].bfloat16().float()
    o, S, grads = outputs_and_grads(deltaproduct_triton, x16, chunk_size=C)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    o_ref, S_ref, g_ref = outputs_and_grads(deltaproduct_chunkwise, cast(x16, torch.float32),
                                            chunk_size=C)
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(o.float(), o_ref, **tol)
    torch.testing.assert_close(S, S_ref, **tol)
    for name in g_ref:
        assert grads[name].dtype == x16[name].dtype
        torch.testing.assert_close(grads[name].float(), g_ref[name], **tol,
                                   msg=lambda m: f"d{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Dispatch


def test_dispatch_auto_is_chunkwise_on_cpu_and_triton_when_forced():
    x = make_inputs(T=9, n_h=2, reset_tokens=[[3], []])
    o, S = deltaproduct(**x, chunk_size=C)
    o_ref, S_ref = deltaproduct_chunkwise(**x, chunk_size=C)
    torch.testing.assert_close(o, o_ref, atol=0, rtol=0)
    torch.testing.assert_close(S, S_ref, atol=0, rtol=0)
    o_t, S_t = deltaproduct(**x, chunk_size=C, backend="triton")
    o_k, S_k = deltaproduct_triton(**x, chunk_size=C)
    torch.testing.assert_close(o_t, o_k, atol=0, rtol=0)
    torch.testing.assert_close(S_t, S_k, atol=0, rtol=0)
    # and the two backends agree
    torch.testing.assert_close(o_t, o_ref, **FP32_TOL)


def test_dispatch_errors_are_one_line():
    x = make_inputs(T=4, n_h=2)
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch'"):
        deltaproduct(**x, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size a power of two >= 16"):
        deltaproduct(**x, chunk_size=24, backend="triton")


# ---------------------------------------------------------------------------------------------
# The layer in bf16 against fp32 (torch chunkwise path on CPU)


def test_deltaproduct_layer_bf16_matches_fp32():
    """LanguageModel with one deltaproduct layer: loss and gradients in bf16 vs fp32.

    Tolerance: |loss16 - loss32| <= 2e-3 · loss32 (observed 2e-5); per parameter tensor of the
    mixer the gradient error ||g16 - g32|| <= 0.05 ||g32|| (bf16 keeps 8 mantissa bits, ~4e-3 per
    rounding; observed 1.2-1.7e-2 after the layer's chains of roundings).
    """
    from pretrain.config import load_config
    from pretrain.model import LanguageModel

    cfg = load_config(None, [
        "model.vocab_size=97", "model.d_model=64", "model.n_layers=1", "model.mixers=[deltaproduct]",
        "model.deltaproduct.num_heads=2", "model.deltaproduct.head_dim=16",
        "model.deltaproduct.chunk_size=16"]).model
    torch.manual_seed(0)
    model32 = LanguageModel(cfg)
    model16 = LanguageModel(cfg).to(torch.bfloat16)
    model16.load_state_dict({n: p.bfloat16() for n, p in model32.state_dict().items()})
    ids = torch.randint(0, 97, (2, 41), generator=torch.Generator().manual_seed(1))
    doc_start = torch.zeros(2, 40, dtype=torch.bool)
    doc_start[:, 0] = True
    doc_start[0, 17] = True
    losses = {}
    for name, model in (("32", model32), ("16", model16)):
        losses[name] = model(ids[:, :-1], labels=ids[:, 1:], doc_start=doc_start)
        losses[name].backward()
    assert abs(losses["16"].item() - losses["32"].item()) <= 2e-3 * losses["32"].item()
    p16 = dict(model16.named_parameters())
    checked = 0
    for n, p in model32.named_parameters():
        if ".mixer." not in n:
            continue
        assert p16[n].grad.dtype == torch.bfloat16, n
        g32, g16 = p.grad, p16[n].grad.float()
        err = (g16 - g32).norm() / g32.norm()
        assert err <= 0.05, f"{n}: relative gradient error {err:.3g}"
        checked += 1
    assert checked >= 8
