"""kernels/selfcheck.py: the startup self-check of the Triton kernels, forced through the
interpreter on CPU (force_on_cpu), with faults injected into the kernel: a wrong forward, a wrong
gradient, an exception. backend='auto' must fall back to the torch reference with one loud line;
backend='triton' must raise; a correct kernel must pass and be used."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import kernels.deltaproduct_triton as dpt  # noqa: E402
from kernels import selfcheck  # noqa: E402
from kernels.deltaproduct import deltaproduct, deltaproduct_chunkwise  # noqa: E402

B, T, NH, H, DK, DV, C = 1, 11, 2, 1, 16, 16, 16


@pytest.fixture(autouse=True)
def fresh_verdicts():
    selfcheck.reset()
    yield
    selfcheck.reset()


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        q=F.normalize(torch.randn(B, T, H, DK, generator=gen), dim=-1),
        k=F.normalize(torch.randn(B, T, NH, H, DK, generator=gen), dim=-1),
        v=torch.randn(B, T, NH, H, DV, generator=gen),
        beta=2 * torch.rand(B, T, NH, H, generator=gen),
        g=-F.softplus(torch.randn(B, T, H, generator=gen)),
    )


class Counting:
    """Wraps the Triton entry point, counting calls, optionally corrupting it."""

    def __init__(self, real, fault=None):
        self.real, self.calls, self.fault = real, 0, fault

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fault == "raise":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        o, final = self.real(*args, **kwargs)
        if self.fault == "forward":
            o = o + 0.5
        if self.fault == "gradient":
            o = _ScaleGrad.apply(o)
        return o, final


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return 1.5 * grad


@pytest.fixture
def patch_kernel(monkeypatch):
    def install(fault=None):
        wrapper = Counting(dpt.deltaproduct_triton, fault)
        monkeypatch.setattr(dpt, "deltaproduct_triton", wrapper)
        return wrapper
    return install


def test_a_correct_kernel_passes_once_and_is_used(patch_kernel):
    kernel = patch_kernel()
    x = inputs()
    with selfcheck.force_on_cpu():
        o, final = deltaproduct(**x, chunk_size=C, backend="auto")
        assert kernel.calls == 2  # the self-check slice, then the call itself
        deltaproduct(**inputs(1), chunk_size=C, backend="auto")
        assert kernel.calls == 3  # the verdict is cached per shape class
    (verdict,) = selfcheck.report()
    assert verdict.ok and verdict.op == "deltaproduct", verdict
    ref_o, ref_final = deltaproduct_chunkwise(**x, chunk_size=C)
    torch.testing.assert_close(o, ref_o, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fault", ["forward", "gradient", "raise"])
def test_a_faulty_kernel_falls_back_to_torch_with_one_loud_line(patch_kernel, fault, capfd):
    kernel = patch_kernel(fault)
    x = inputs()
    rng = torch.get_rng_state()
    with selfcheck.force_on_cpu():
        o, final = deltaproduct(**x, chunk_size=C, backend="auto")
        o2, _ = deltaproduct(**inputs(1), chunk_size=C, backend="auto")
    assert torch.equal(torch.get_rng_state(), rng), "the self-check must not consume the global RNG"
    assert kernel.calls == 1, "only the self-check may run the failed kernel"
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "SELF-CHECK FAILED" in line]
    assert len(lines) == 1 and "Triton deltaproduct" in lines[0] and "dk=16" in lines[0], err
    ref_o, ref_final = deltaproduct_chunkwise(**x, chunk_size=C)
    assert torch.equal(o, ref_o) and torch.equal(final, ref_final)
    (verdict,) = selfcheck.report()
    assert not verdict.ok


def test_strict_backend_raises_naming_the_kernel(patch_kernel):
    patch_kernel("forward")
    with selfcheck.force_on_cpu(), pytest.raises(RuntimeError, match="Triton deltaproduct .*self-check"):
        deltaproduct(**inputs(), chunk_size=C, backend="triton")


def test_shape_classes_are_checked_separately(patch_kernel):
    kernel = patch_kernel()
    with selfcheck.force_on_cpu():
        deltaproduct(**inputs(), chunk_size=C, backend="auto")
        x = inputs()
        x["g"] = None
        deltaproduct(**x, chunk_size=C, backend="auto")
    assert kernel.calls == 4 and len(selfcheck.report()) == 2


def test_the_slice_launches_the_state_walks_as_the_call_does(patch_kernel, monkeypatch):
    """The state walks' dv block depends on the batch (state_dv_block); the slice, of one batch
    row, must run the kernels the call runs: bf16, B=2 on 6 SMs gives 32 columns, B=1 alone 16."""
    monkeypatch.setattr(dpt._Launch, "SM_COUNT", 6)
    kernel = patch_kernel()
    seen = []
    real = kernel.real
    kernel.real = lambda *a, **kw: (seen.append(kw.get("state_block")), real(*a, **kw))[1]
    gen = torch.Generator().manual_seed(0)
    x = dict(q=F.normalize(torch.randn(2, T, H, DK, generator=gen), dim=-1),
             k=F.normalize(torch.randn(2, T, NH, H, DK, generator=gen), dim=-1),
             v=torch.randn(2, T, NH, H, 32, generator=gen), beta=2 * torch.rand(2, T, NH, H, generator=gen))
    x.update({n: x[n].bfloat16() for n in ("q", "k", "v")})
    assert dpt.state_block_of(x["q"][:1], x["k"][:1], x["v"][:1]) == 16
    with selfcheck.force_on_cpu():
        deltaproduct(**x, chunk_size=C, backend="auto")
    (verdict,) = selfcheck.report()
    assert verdict.ok and "state_block=32" in verdict.shape_class, verdict
    assert seen == [32, None]  # the slice forced to the call's block; the call by the rule (32)


def test_without_force_cpu_tensors_never_run_the_check(patch_kernel):
    kernel = patch_kernel("forward")
    o, _ = deltaproduct(**inputs(), chunk_size=C, backend="auto")
    assert kernel.calls == 0 and selfcheck.report() == []


def test_linear_scan_self_check_passes_and_catches_a_fault(monkeypatch, capfd):
    import kernels.scan_triton as st
    from kernels.scan import linear_scan

    gen = torch.Generator().manual_seed(0)
    A, b = 0.9 * torch.rand(2, 37, 8, generator=gen), torch.randn(2, 37, 8, generator=gen)
    want = linear_scan(A, b, backend="torch")
    with selfcheck.force_on_cpu():
        got = linear_scan(A, b)  # backend="auto": the kernel, after its self-check
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [v.ok for v in selfcheck.report()] == [True]

    real = st.linear_scan_triton
    calls = []

    def faulty(*args):
        calls.append(1)
        h, (P, e) = real(*args[:5], True)
        return (h, (P, e + 1.0)) if args[5] else h  # a wrong summary only

    monkeypatch.setattr(st, "linear_scan_triton", faulty)
    selfcheck.reset()
    with selfcheck.force_on_cpu():
        got, (P, e) = linear_scan(A, b, return_summary=True)
        with pytest.raises(RuntimeError, match="Triton linear_scan"):
            linear_scan(A, b, return_summary=True, backend="triton")
    assert len(calls) == 1
    want, (P_ref, e_ref) = linear_scan(A, b, return_summary=True, backend="torch")
    assert torch.equal(e, e_ref) and torch.equal(got, want)
    assert "SELF-CHECK FAILED: Triton linear_scan" in capfd.readouterr().err


@pytest.mark.parametrize("cell", ["paragru", "paralstm"])
def test_pararnn_self_check_passes_and_catches_a_fault(cell, monkeypatch, capfd):
    import kernels.pararnn_triton as prt
    from kernels.pararnn import paragru, paralstm

    gen = torch.Generator().manual_seed(0)
    u = torch.randn(2, 21, 3, 6, generator=gen)
    params = [torch.rand(3, 6, generator=gen) - 0.5]
    if cell == "paralstm":
        params.append(0.1 * torch.randn(2, 6, generator=gen))
    solve = paragru if cell == "paragru" else paralstm
    kwargs = dict(tol=1e-6, max_iters=30)
    want, _, _ = solve(u, *params, backend="torch", **kwargs)
    with selfcheck.force_on_cpu():
        got, _, _ = solve(u, *params, **kwargs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # (the reference solver inside the check runs the Triton scan too, checked on its own)
    assert [v.ok for v in selfcheck.report() if v.op == cell] == [True]

    real = prt.FusedNewtonSolve.apply
    calls = []

    def faulty(*args):
        calls.append(1)
        states, residual = real(*args)
        return states * 1.01, residual  # 1% off: a plausible-looking wrong answer

    monkeypatch.setattr(prt.FusedNewtonSolve, "apply", faulty)
    selfcheck.reset()
    with selfcheck.force_on_cpu():
        got, _, _ = solve(u, *params, **kwargs)
        with pytest.raises(RuntimeError, match=f"Triton {cell}"):
            solve(u, *params, backend="triton", **kwargs)
    assert len(calls) == 1
    # the reference solver (whose scans are the forced Triton scan here: same math, other order)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert f"SELF-CHECK FAILED: Triton {cell}" in capfd.readouterr().err


def test_the_trainer_reports_fallbacks(patch_kernel, capfd):
    from pretrain.train import kernel_fallbacks

    patch_kernel("raise")
    with selfcheck.force_on_cpu():
        deltaproduct(**inputs(), chunk_size=C, backend="auto")
    (line,) = kernel_fallbacks()
    assert line.startswith("deltaproduct (H=1, dk=16") and "illegal memory access" in line
