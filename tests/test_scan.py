"""kernels/scan.py: the chunked linear scan against the per-token loop, and scan summaries."""

import pytest
import torch

from kernels.scan import apply_summary, compose_scan_summaries, linear_scan, linear_scan_sequential

B, D = 2, 3


def make_problem(form, T, dtype=torch.float64, seed=0, reset_rate=0.05):
    """Random A, b, h0, reset. |A| (or the blocks' gain) is in [0.9, 1] so state persists for
    tens of steps: a wrong carry across chunks or a wrong summary shows, and T=1000 stays finite."""
    g = torch.Generator().manual_seed(seed)
    gain = torch.empty(B, T, D, dtype=torch.float64).uniform_(0.9, 1.0, generator=g)
    if form == "diag":
        sign = torch.where(torch.rand(B, T, D, generator=g) < 0.2, -1.0, 1.0).double()
        A = sign * gain
        b = torch.randn(B, T, D, dtype=torch.float64, generator=g)
    else:
        # gain * rotation, plus a small non-normal perturbation so A is not a scaled orthogonal.
        theta = torch.empty(B, T, D, dtype=torch.float64).uniform_(-3.0, 3.0, generator=g)
        cos, sin = torch.cos(theta), torch.sin(theta)
        A = gain[..., None, None] * torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)
        A = A + torch.empty(B, T, D, 2, 2, dtype=torch.float64).uniform_(-0.05, 0.05, generator=g)
        b = torch.randn(B, T, D, 2, dtype=torch.float64, generator=g)
    h0 = torch.randn(b[:, 0].shape, dtype=torch.float64, generator=g)
    reset = torch.rand(B, T, generator=g) < reset_rate
    return A.to(dtype), b.to(dtype), h0.to(dtype), reset


@pytest.mark.parametrize("form", ["diag", "block"])
@pytest.mark.parametrize("T", [1, 7, 64, 1000])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
def test_matches_sequential_fp64(form, T, reverse, with_h0, with_reset):
    A, b, h0, reset = make_problem(form, T)
    h0 = h0 if with_h0 else None
    reset = reset if with_reset else None
    h, (P, e) = linear_scan(A, b, h0, reset, reverse=reverse, return_summary=True)
    h_ref, (P_ref, e_ref) = linear_scan_sequential(A, b, h0, reset, reverse=reverse, return_summary=True)
    assert h.dtype == torch.float64 and h.shape == b.shape
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(P, P_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e, e_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["diag", "block"])
@pytest.mark.parametrize("T", [33, 1000])
@pytest.mark.parametrize("chunk_size", [2, 4, 16, 64])
def test_chunk_sizes_that_do_not_divide_T(form, T, chunk_size):
    # T=1000 with chunk 2 recurses ten levels deep; 33 = 2*16 + 1 leaves a one-step last chunk.
    A, b, h0, reset = make_problem(form, T, seed=1)
    h = linear_scan(A, b, h0, reset, chunk_size=chunk_size)
    torch.testing.assert_close(h, linear_scan_sequential(A, b, h0, reset), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["diag", "block"])
@pytest.mark.parametrize("T", [1, 7, 64, 1000])
@pytest.mark.parametrize("reverse", [False, True])
def test_fp32_matches_fp64_reference(form, T, reverse):
    A, b, h0, reset = make_problem(form, T, dtype=torch.float32, seed=2)
    h = linear_scan(A, b, h0, reset, reverse=reverse)
    assert h.dtype == torch.float32
    # Reference: the same fp32 numbers, solved in fp64. Relative tolerance 1e-5 of the scale.
    h_ref = linear_scan_sequential(A.double(), b.double(), h0.double(), reset, reverse=reverse)
    err = (h.double() - h_ref).abs().max() / h_ref.abs().max()
    assert err < 1e-5, f"relative error {err:.2e}"


@pytest.mark.parametrize("form", ["diag", "block"])
def test_bf16_input_gives_fp32_output(form):
    A, b, h0, reset = make_problem(form, 100, dtype=torch.bfloat16, seed=3)
    h, (P, e) = linear_scan(A, b, h0, reset, return_summary=True)
    assert h.dtype == P.dtype == e.dtype == torch.float32
    # fp32 math on the bf16 values: equal to the fp32 scan of the upcast inputs.
    h_ref = linear_scan(A.float(), b.float(), h0.float(), reset)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["diag", "block"])
@pytest.mark.parametrize("reverse", [False, True])
def test_summary_gives_end_state_from_any_h0(form, reverse):
    A, b, h0, _ = make_problem(form, 77, seed=4)
    # One reset, in batch row 0 only: row 1 keeps P != 0, so P h0 really is tested.
    reset = torch.zeros(B, 77, dtype=torch.bool)
    reset[0, 40] = True
    _, summary = linear_scan(A, b, reset=reset, reverse=reverse, return_summary=True)
    h_ref = linear_scan_sequential(A, b, h0, reset, reverse=reverse)
    end_ref = h_ref[:, 0] if reverse else h_ref[:, -1]
    torch.testing.assert_close(apply_summary(summary, h0), end_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["diag", "block"])
@pytest.mark.parametrize("reverse", [False, True])
def test_summaries_of_three_pieces_compose_to_the_whole(form, reverse):
    A, b, _, _ = make_problem(form, 100, seed=5)
    # One reset, in the first piece of row 0 (P1 = 0 there, e1 != 0); row 1 has none. Random
    # resets would zero every P and make the composition trivially right.
    reset = torch.zeros(B, 100, dtype=torch.bool)
    reset[0, 10] = True
    cuts = [(0, 30), (30, 75), (75, 100)]
    pieces = [linear_scan(A[:, i:j], b[:, i:j], reset=reset[:, i:j], reverse=reverse, return_summary=True)[1]
              for i, j in cuts]
    if reverse:  # a reverse scan meets the pieces last first
        pieces = pieces[::-1]
    s1, s2, s3 = pieces
    _, (P, e) = linear_scan(A, b, reset=reset, reverse=reverse, return_summary=True)
    for P_c, e_c in (compose_scan_summaries(compose_scan_summaries(s1, s2), s3),
                     compose_scan_summaries(s1, compose_scan_summaries(s2, s3))):
        torch.testing.assert_close(P_c, P, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(e_c, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["diag", "block"])
@pytest.mark.parametrize("reverse", [False, True])
def test_reset_cuts_the_incoming_state(form, reverse):
    # reset[t] means A_t := 0 in both directions, so h_t = b_t exactly there.
    A, b, h0, _ = make_problem(form, 40, seed=6)
    reset = torch.zeros(B, 40, dtype=torch.bool)
    reset[0, 0] = reset[0, 17] = reset[1, 39] = True
    h = linear_scan(A, b, h0, reset, reverse=reverse)
    torch.testing.assert_close(h[reset], b[reset], rtol=0, atol=0)
    # And everything else still flows: without resets the same positions differ from b.
    h_free = linear_scan(A, b, h0, reverse=reverse)
    assert (h_free[reset] - b[reset]).abs().max() > 1e-3


def test_bad_shapes_raise_one_clear_error():
    A, b, h0, reset = make_problem("diag", 5)
    with pytest.raises(ValueError, match="h0 must have shape"):
        linear_scan(A, b, h0[:, :1])
    with pytest.raises(ValueError, match="reset must be"):
        linear_scan(A, b, reset=reset[:, :3])
    with pytest.raises(ValueError, match="diagonal form needs"):
        linear_scan(A, b[:, :4])
