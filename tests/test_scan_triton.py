"""kernels/scan_triton.py under TRITON_INTERPRET=1 (set in conftest) against the torch references.

BLOCK_T=16 with T in {1, 7, 37}: one partial chunk, and two full chunks plus a partial one, so the
carry across chunks and the masking past T are both exercised. D=12 with BLOCK_D=8: the second
channel block is partial. fp32 kernels are compared with the per-token loop in fp64 on the same
fp32 numbers: max error <= 1e-5 relative to the largest |h| (as in tests/test_scan.py).
"""

import pytest
import torch

import kernels.scan_triton
from kernels.scan import linear_scan, linear_scan_sequential
from kernels.scan_triton import linear_scan_triton

B, D = 2, 12
BLOCKS = dict(block_t=16, block_d=8)
RTOL = 1e-5


def make_problem(form, T, dtype=torch.float32, seed=0):
    """|A| (or the blocks' gain) in [0.9, 1], so state persists across chunks; some resets,
    always one at t=3 of row 0 when T > 3 so every T >= 7 case cuts a chunk in the middle."""
    g = torch.Generator().manual_seed(seed)
    gain = torch.empty(B, T, D, dtype=torch.float64).uniform_(0.9, 1.0, generator=g)
    if form == "diag":
        sign = torch.where(torch.rand(B, T, D, generator=g) < 0.2, -1.0, 1.0).double()
        A = sign * gain
        b = torch.randn(B, T, D, dtype=torch.float64, generator=g)
    else:
        theta = torch.empty(B, T, D, dtype=torch.float64).uniform_(-3.0, 3.0, generator=g)
        cos, sin = torch.cos(theta), torch.sin(theta)
        A = gain[..., None, None] * torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)
        A = A + torch.empty(B, T, D, 2, 2, dtype=torch.float64).uniform_(-0.05, 0.05, generator=g)
        b = torch.randn(B, T, D, 2, dtype=torch.float64, generator=g)
    h0 = torch.randn(b[:, 0].shape, dtype=torch.float64, generator=g)
    reset = torch.rand(B, T, generator=g) < 0.05
    if T > 3:
        reset[0, 3] = True
    return A.to(dtype), b.to(dtype), h0.to(dtype), reset


def assert_close_rel(x, ref, rtol=RTOL, what="h"):
    scale = ref.abs().max().clamp_min(1.0)
    err = (x.double() - ref.double()).abs().max() / scale
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("form", ["diag", "block"])
@pytest.mark.parametrize("T", [1, 7, 37])
@pytest.mark.parametrize("reverse", [False, True])
def test_kernel_matches_sequential_with_h0_reset_and_summary(form, T, reverse):
    A, b, h0, reset = make_problem(form, T, seed=T)
    h, (P, e) = linear_scan_triton(A, b, h0, reset, reverse, return_summary=True, **BLOCKS)
    h_ref, (P_ref, e_ref) = linear_scan_sequential(A.double(), b.double(), h0.double(), reset, reverse,
                                                   return_summary=True)
    assert h.dtype == P.dtype == e.dtype == torch.float32 and h.shape == b.shape
    assert_close_rel(h, h_ref)
    assert_close_rel(P, P_ref, what="P")
    assert_close_rel(e, e_ref, what="h_end")


@pytest.mark.parametrize("form", ["diag", "block"])
@pytest.mark.parametrize("reverse", [False, True])
def test_kernel_without_h0_or_reset(form, reverse):
    A, b, _, _ = make_problem(form, 37, seed=1)
    h = linear_scan_triton(A, b, reverse=reverse, **BLOCKS)
    assert_close_rel(h, linear_scan_sequential(A.double(), b.double(), reverse=reverse))


@pytest.mark.parametrize("form", ["diag", "block"])
def test_fp64_stays_fp64(form):
    A, b, h0, reset = make_problem(form, 37, dtype=torch.float64, seed=2)
    h = linear_scan_triton(A, b, h0, reset, **BLOCKS)
    assert h.dtype == torch.float64
    torch.testing.assert_close(h, linear_scan_sequential(A, b, h0, reset), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["diag", "block"])
def test_bf16_inputs_accumulate_in_fp32(form):
    A, b, h0, reset = make_problem(form, 37, seed=3)
    A16, b16 = A.bfloat16(), b.bfloat16()
    h = linear_scan_triton(A16, b16, h0, reset, **BLOCKS)
    assert h.dtype == torch.float32
    # Converted on load: the same fp32 math as on the upcast values, bit for bit.
    h_ref = linear_scan_triton(A16.float(), b16.float(), h0, reset, **BLOCKS)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)


def test_dispatch_forced_triton_and_default_cpu(monkeypatch):
    A, b, h0, reset = make_problem("block", 37, seed=4)
    # backend="triton" runs the kernel on CPU tensors (interpreter), with its default blocks.
    h = linear_scan(A, b, h0, reset, reverse=True, backend="triton")
    assert_close_rel(h, linear_scan_sequential(A.double(), b.double(), h0.double(), reset, reverse=True))
    # A call that needs an autograd graph cannot be forced onto the forward-only kernel.
    with pytest.raises(ValueError, match="forward-only"):
        linear_scan(A.requires_grad_(True), b, backend="triton")
    # Default on CPU tensors: the torch reference, never the kernel.
    monkeypatch.setattr(kernels.scan_triton, "linear_scan_triton", None)
    h_cpu = linear_scan(A.detach(), b, h0, reset, reverse=True)
    assert_close_rel(h_cpu, linear_scan_sequential(A.double(), b.double(), h0.double(), reset, reverse=True))
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch'"):
        linear_scan(A.detach(), b, backend="cuda")
