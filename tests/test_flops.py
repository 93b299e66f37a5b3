"""pretrain/flops.py against FLOPs counted while the reference torch ops run.

Matmul terms are checked with torch.utils.flop_counter.FlopCounterMode (2 FLOPs per MAC), exactly
for the forward and within 1% for forward+backward where the formula's "backward = 2 x forward"
meets operands that need no gradient. The Newton solver's element-wise constants are checked by
counting the arithmetic ops the torch cells dispatch (1 per element; sigmoid/tanh derivatives 3).
FlopCounterMode does not count torch's CPU scaled_dot_product_attention nor solve_triangular, so
attention scores are checked on an explicit matmul reference and the triangular inverse is left
out of the DeltaProduct comparisons (its count, C(C^2-1)/6 MACs, is the textbook one).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from kernels.deltaproduct import _to_chunks, deltaproduct_chunkwise, deltaproduct_naive
from kernels.pararnn import ParaGRUCell, ParaLSTMCell
from pretrain.flops import (PARARNN_CELL_OPS, attention_score_flops, deltaproduct_chunk_macs,
                            deltaproduct_recurrence_flops, mixer_flops, model_flops_per_token,
                            pararnn_solver_flops)
from pretrain.registry import build_mixer
from pretrain.model import LanguageModel, SwiGLU


def counted_flops(fn, backward=False):
    """FlopCounterMode's total for fn() (and, with backward, a backward of its sum)."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
        if backward:
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    return counter.get_total_flops()


def tiny_cfg(**kw):
    base = dict(vocab_size=96, d_model=32, n_layers=4, mixers=["paragru", "paralstm", "deltaproduct", "attention"],
                paragru=dict(expand=1.5, num_heads=4, num_iters=3, tol=None),
                paralstm=dict(expand=1.0, num_heads=2, num_iters=2, tol=None),
                deltaproduct=dict(num_heads=2, head_dim=16, num_householder=2, chunk_size=8),
                attention=dict(num_heads=4))
    base.update(kw)
    from pretrain.config import model_config_from_dict
    return model_config_from_dict(base)


B, T = 2, 24


def test_swiglu_counts_exactly():
    cfg = tiny_cfg()
    mlp = SwiGLU(cfg.d_model, 96)
    x = torch.randn(B, T, cfg.d_model, requires_grad=True)
    fwd = 3 * 2 * cfg.d_model * 96 * B * T
    assert counted_flops(lambda: mlp(x)) == fwd
    assert counted_flops(lambda: mlp(x), backward=True) == 3 * fwd


@pytest.mark.parametrize("mixer", ["paragru", "paralstm", "attention"])
def test_projection_mixers_count_exactly(mixer):
    """ParaRNN's solver has no matmuls and CPU SDPA is uncounted: the count is the projections."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    layer = build_mixer(cfg, mixer, 0)
    x = torch.randn(B, T, cfg.d_model, requires_grad=True)
    proj_fwd, proj_bwd = mixer_flops(cfg, mixer, T)["proj"]
    assert counted_flops(lambda: layer(x)) == pytest.approx(proj_fwd * B * T, rel=1e-12)
    assert counted_flops(lambda: layer(x), backward=True) == pytest.approx((proj_fwd + proj_bwd) * B * T, rel=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_scores_count_the_causal_half(causal):
    """Explicit reference: every query's scores against the keys it may see, then A V."""
    H, hd = 4, 8
    q, k, v = (torch.randn(1, H, T, hd) for _ in range(3))

    def reference():
        outs = []
        for t in range(T):
            n = t + 1 if causal else T
            a = torch.softmax(q[:, :, t:t + 1] @ k[:, :, :n].transpose(-1, -2) / math.sqrt(hd), -1)
            outs.append(a @ v[:, :, :n])
        return torch.cat(outs, 2)

    assert counted_flops(reference) == pytest.approx(attention_score_flops(T, H * hd, causal) * T, rel=1e-12)


def _dp_inputs(Bq, Tq, H, dk, dv, n_h, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(Bq, Tq, H, dk, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(Bq, Tq, n_h, H, dk, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(Bq, Tq, n_h, H, dv, generator=gen, dtype=dtype)
    beta = 2 * torch.sigmoid(torch.randn(Bq, Tq, n_h, H, generator=gen, dtype=dtype))
    return [x.requires_grad_(True) for x in (q, k, v, beta)]


def deltaproduct_algorithm_reference(q, k, v, beta, C):
    """The Triton kernels' algorithm in torch (no gate, no reset): per chunk U, Wk from
    (I+A)^{-1}; W = U - Wk S; outputs at the query rows only; S <- S + K^T W."""
    Bq, Tq, n_h, H, dk = k.shape
    dv, L = v.shape[-1], Tq * n_h
    kc = _to_chunks(k.reshape(Bq, L, H, dk), C)
    vc = _to_chunks(v.reshape(Bq, L, H, dv), C)
    bc = _to_chunks(beta.reshape(Bq, L, H), C)
    qc = _to_chunks(q, C // n_h)  # [B,H,NC,C/n_h,dk]: token t's query at sub-step t*n_h + n_h-1
    A = (bc[..., :, None] * (kc @ kc.transpose(-1, -2))).tril(-1)
    eye = torch.eye(C, dtype=k.dtype).expand(A.shape).reshape(-1, C, C)
    Tm = torch.linalg.solve_triangular(A.reshape(-1, C, C) + eye, eye, upper=False, unitriangular=True).view(A.shape)
    U, Wk = Tm @ (bc[..., None] * vc), Tm @ (bc[..., None] * kc)
    rows = torch.arange(n_h - 1, C, n_h)
    causal = (rows[:, None] >= torch.arange(C)[None, :]).to(k.dtype)
    S = torch.zeros(Bq, H, dk, dv, dtype=k.dtype)
    outs = []
    for i in range(kc.shape[2]):
        W = U[:, :, i] if i == 0 else U[:, :, i] - Wk[:, :, i] @ S  # the first chunk starts from 0
        Qi = qc[:, :, i]
        o = (Qi @ kc[:, :, i].transpose(-1, -2) * causal) @ W
        outs.append(o if i == 0 else o + Qi @ S)
        S = S + kc[:, :, i].transpose(-1, -2) @ W
    o = torch.stack(outs, 2).flatten(2, 3)[:, :, :Tq] * dk ** -0.5
    return o.transpose(1, 2)


def test_deltaproduct_algorithm_reference_is_deltaproduct():
    q, k, v, beta = _dp_inputs(2, 16, 2, 8, 8, 2)
    o, _ = deltaproduct_naive(q, k, v, beta)
    torch.testing.assert_close(deltaproduct_algorithm_reference(q, k, v, beta, 8), o, rtol=1e-10, atol=1e-10)


def _solve_triangular_backward(Bq, Tq, H, n_h, C):
    """torch's solve_triangular backward forms grad_A = -grad_B X^T: one dense C x C x C matmul
    per chunk and head that FlopCounterMode sees (the triangular solves it does not)."""
    return 2.0 * C ** 3 * math.ceil(Tq * n_h / C) * H * Bq


def _without_inverse(Tq, H, dk, dv, n_h, C, form):
    macs = deltaproduct_chunk_macs(C, dk, dv, n_h, form)
    chunks = math.ceil(Tq * n_h / C)
    return 2.0 * macs["inverse"] * chunks * H / Tq  # per token, to subtract


@pytest.mark.parametrize("n_h,C", [(2, 8), (3, 12), (1, 16)])
def test_deltaproduct_algorithm_count(n_h, C):
    Bq, Tq, H, dk, dv = 2, 48, 2, 16, 8
    q, k, v, beta = _dp_inputs(Bq, Tq, H, dk, dv, n_h)
    formula = deltaproduct_recurrence_flops(Tq, H, dk, dv, n_h, C, "algorithm")
    formula -= _without_inverse(Tq, H, dk, dv, n_h, C, "algorithm")
    fwd = counted_flops(lambda: deltaproduct_algorithm_reference(q, k, v, beta, C))
    # The first chunk starts from S = 0: its W = U - Wk S and Q S are skipped (exact bookkeeping).
    skipped = 2 * H * Bq * (C * dk * dv + (C // n_h) * dk * dv)
    assert fwd == pytest.approx(formula * Bq * Tq - skipped, rel=1e-12)
    both = counted_flops(lambda: deltaproduct_algorithm_reference(q, k, v, beta, C), backward=True)
    # Backward skips the same first-chunk terms, and the last chunk's state update (the final
    # state is not in the loss); the rest is 2x forward plus solve_triangular's backward matmul.
    last_state = 2 * H * Bq * dk * C * dv
    expected = 3 * (formula * Bq * Tq - skipped) - 2 * last_state + _solve_triangular_backward(Bq, Tq, H, n_h, C)
    assert both == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n_h,C", [(2, 8), (2, 64), (3, 12)])
def test_deltaproduct_torch_chunkwise_count(n_h, C):
    Bq, Tq, H, dk, dv = 2, 40, 2, 16, 8
    q, k, v, beta = _dp_inputs(Bq, Tq, H, dk, dv, n_h)
    g = -torch.rand(Bq, Tq, H, dtype=torch.float64)
    formula = deltaproduct_recurrence_flops(Tq, H, dk, dv, n_h, C, "torch_chunkwise")
    formula -= _without_inverse(Tq, H, dk, dv, n_h, C, "torch_chunkwise")
    fwd = counted_flops(lambda: deltaproduct_chunkwise(q, k, v, beta, g, chunk_size=C))
    assert fwd == pytest.approx(formula * Bq * Tq, rel=1e-12)
    both = counted_flops(lambda: deltaproduct_chunkwise(q, k, v, beta, g, chunk_size=C), backward=True)
    expected = 3 * formula * Bq * Tq + _solve_triangular_backward(Bq, Tq, H, n_h, C)
    # the first chunk's zero state and the unused final state skip a few gradients: within 2%
    assert both == pytest.approx(expected, rel=0.02)


def test_deltaproduct_chunk_macs_at_the_1b_shape():
    """C=64, dk=dv=128, n_h=2, by hand: gram 64*64*128, inverse 64*(64^2-1)/6, U/Wk 64*64*256;
    algorithm: state 2*64*128^2, outputs 32*64*128*2 + 32*128^2; torch form: state
    2*64*128^2 + 128^3, outputs 64*64*128*3 + 64*128^2."""
    alg = deltaproduct_chunk_macs(64, 128, 128, 2, "algorithm")
    torch_form = deltaproduct_chunk_macs(64, 128, 128, 2, "torch_chunkwise")
    assert sum(alg.values()) == pytest.approx(524288 + 43680 + 1048576 + 2097152 + 1048576, rel=1e-12)
    assert sum(torch_form.values()) == pytest.approx(524288 + 43680 + 1048576 + 4194304 + 2621440, rel=1e-12)


ARITH = {"add.Tensor", "sub.Tensor", "rsub.Scalar", "mul.Tensor", "div.Tensor", "neg.default",
         "sigmoid.default", "tanh.default", "exp.default"}
DERIV = {"sigmoid_backward.default", "tanh_backward.default"}  # g * s(1-s), g * (1-t^2)


class ElementwiseCounter(TorchDispatchMode):
    """Element-wise arithmetic of dispatched aten ops: 1 per output element, 3 for the
    sigmoid/tanh derivatives, and a sum counts its input's elements."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func).removeprefix("aten.")
        if name in ARITH:
            self.flops += out.numel()
        elif name in DERIV:
            self.flops += 3 * out.numel()
        elif name == "sum.dim_IntList":
            self.flops += args[0].numel()
        return out


@pytest.mark.parametrize("cell,name", [(ParaGRUCell, "paragru"), (ParaLSTMCell, "paralstm")])
def test_pararnn_cell_op_counts(cell, name):
    Bq, Tq, D = 4, 64, 8
    c = PARARNN_CELL_OPS[name]
    n = Bq * Tq * D
    params = [torch.rand(3, D, dtype=torch.float64)] + ([torch.rand(2, D, dtype=torch.float64)] if cell.block else [])
    h = torch.rand(Bq, Tq, D, *cell.state_suffix, dtype=torch.float64)
    u = torch.randn(Bq, Tq, 3, D, dtype=torch.float64)
    for fn, expected in ((cell.step, c["gates"] + c["step"]), (cell.jacobian, c["gates"] + c["jacobian"])):
        with ElementwiseCounter() as counter:
            fn(h, u, params)
        assert counter.flops == expected * n, (fn.__name__, counter.flops / n)
    u_ = u.clone().requires_grad_(True)
    p_ = [p.clone().requires_grad_(True) for p in params]
    out = cell.step(h, u_, p_)
    lam = torch.rand_like(out)
    with ElementwiseCounter() as counter:
        torch.autograd.grad(out, [u_] + p_, lam)
    # the per-weight gradients also add [3, D]-sized pieces: < 1% at B*T = 256
    assert counter.flops / n == pytest.approx(c["vjp"], rel=0.01)


def test_pararnn_solver_composition():
    """forward = f(0,u) + k x iteration + final residual; 1 more iteration adds exactly one."""
    c = PARARNN_CELL_OPS["paragru"]
    f3, b3 = pararnn_solver_flops("paragru", 10, 3)
    f4, b4 = pararnn_solver_flops("paragru", 10, 4)
    assert f4 - f3 == 10 * (c["gates"] + c["step"] + 1 + c["jacobian"] + c["scan"] + 1)
    assert f3 == 10 * (14 + 3 * 36 + 15)
    assert b3 == b4 == 10 * (10 + 18 + 2 + 28)


def test_whole_model_matmuls_count_exactly():
    """Every matmul of a tiny hybrid's training step: the formula (torch_chunkwise form, no
    triangular inverse, no attention scores: both uncounted on CPU) equals FlopCounterMode."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = LanguageModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    counts = model_flops_per_token(cfg, T, deltaproduct_form="torch_chunkwise")
    bd = counts["breakdown"]
    dp = cfg.deltaproduct
    inverse = _without_inverse(T, dp.num_heads, dp.head_dim, dp.head_dim, dp.num_householder, dp.chunk_size,
                               "torch_chunkwise")
    fwd = counts["forward"] - bd["attention.scores"]["forward"] - bd["paragru.newton"]["forward"] \
        - bd["paralstm.newton"]["forward"] - bd["deltaproduct.conv"]["forward"] - inverse
    assert counted_flops(lambda: model(ids, labels=ids)) == pytest.approx(fwd * B * T, rel=1e-12)
    # backward: the embedding's input needs no gradient, so the first layers' projections
    # still compute both operands' gradients (their input is the embedding output).
    assert counted_flops(lambda: model(ids, labels=ids), backward=True) == pytest.approx(3 * fwd * B * T, rel=0.01)


def test_flops_per_token_is_the_formula_total():
    cfg = tiny_cfg()
    model = LanguageModel(cfg)
    assert model.flops_per_token(T) == model_flops_per_token(cfg, T)["total"]
    # sanity against 6N: within 15% at this tiny size (the recurrences and attention add to 6N)
    n = model.num_params(exclude_embedding=True) + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
    assert model.flops_per_token(T) / (6 * n) == pytest.approx(1.0, abs=0.6)
