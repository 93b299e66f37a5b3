"""parallel/sequence_parallel.py: every sequence-parallel block equals the single-process result.

One spawn of 4 gloo processes runs every check twice: on sp groups of 2 (dp=2 x sp=2) and on
one sp group of 4. Each rank computes the single-process reference on the whole sequence itself
(same seeds), runs its piece, and reports max |difference| of forward values and of gradients:
input gradients against its slice of the reference, replicated weights' gradients summed over
the sp group against the reference. Everything fp64; tolerance 1e-10 absolute (values are O(1)).
Resets are placed on and next to piece boundaries.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels.deltaproduct import deltaproduct
from kernels.pararnn import paragru, paralstm
from kernels.scan import linear_scan
from parallel.mappings import group_rank, group_size
from parallel.sequence_parallel import (conv_with_halo, make_sp_linear_solve, sequence_piece,
                                        sp_conv_halo, sp_deltaproduct, sp_pararnn_kwargs,
                                        ulysses_attention)
from parallel.spawn import run_gloo
from parallel.topology import ParallelDims

TOL = 1e-10
WORLD = 4
T = 16  # pieces of 8 (sp=2) or 4 (sp=4)


def boundary_resets(B, T, n, seed):
    """Resets at a piece's first position, right after one, and at a random position."""
    g = torch.Generator().manual_seed(seed)
    reset = torch.rand(B, T, generator=g) < 0.1
    piece = T // n
    reset[0, piece] = True  # a document starts exactly at the second piece
    if B > 1:
        reset[1, piece + 1] = True  # ... one step after the seam
        reset[1, piece - 1] = True  # ... and one step before it
    return reset


def err(a, b):
    return (a.detach() - b.detach()).abs().max().item()


def summed(t, group):
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    return t


def check_linear_solve(group, out, tag):
    n, r = group_size(group), group_rank(group)
    solve = make_sp_linear_solve(group)
    g = torch.Generator().manual_seed(1)
    B, D = 2, 3
    reset = boundary_resets(B, T, n, 2)
    for form in ("diag", "block"):
        shape = (B, T, D) if form == "diag" else (B, T, D, 2, 2)
        A = torch.rand(shape, generator=g, dtype=torch.float64) * 1.6 - 0.8
        b = torch.randn(shape[:-1] if form == "block" else shape, generator=g, dtype=torch.float64)
        h0 = torch.randn((B, D) + ((2,) if form == "block" else ()), generator=g, dtype=torch.float64)
        for reverse in (False, True):
            for rs in (None, reset):
                for init in (None, h0):
                    ref, (P, e) = linear_scan(A, b, init, rs, reverse, return_summary=True)
                    # h0 is read on the first piece in scan order only: others pass None.
                    first = (n - 1) if reverse else 0
                    h, (P_sp, e_sp) = solve(sequence_piece(A, group), sequence_piece(b, group),
                                            init if r == first else None,
                                            None if rs is None else sequence_piece(rs, group),
                                            reverse, return_summary=True)
                    name = (f"{tag}/linear_solve/{form}/{'rev' if reverse else 'fwd'}"
                            f"/{'reset' if rs is not None else 'noreset'}/{'h0' if init is not None else 'zero'}")
                    out[name] = max(err(h, sequence_piece(ref, group)), err(P_sp, P), err(e_sp, e))


def check_pararnn(group, out, tag):
    n, r = group_size(group), group_rank(group)
    kw = sp_pararnn_kwargs(group)
    g = torch.Generator().manual_seed(3)
    B, D = 2, 4
    reset = boundary_resets(B, T, n, 4)
    u = torch.randn(B, T, 3, D, generator=g, dtype=torch.float64)
    a = torch.empty(3, D, dtype=torch.float64).uniform_(-1.2, 1.2, generator=g)
    p = torch.empty(2, D, dtype=torch.float64).uniform_(-0.8, 0.8, generator=g)
    h0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, D, 2, generator=g, dtype=torch.float64)
    w = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w_fin = torch.randn(B, D, generator=g, dtype=torch.float64)
    w_fin2 = torch.randn(B, D, 2, generator=g, dtype=torch.float64)
    for cell in ("paragru", "paralstm"):
        for opts in (dict(num_iters=2), dict(num_iters=3, tol=1e-9, max_iters=30)):
            for use_init in (False, True):
                leaves = [u, a] + ([p] if cell == "paralstm" else [])
                init = (h0 if cell == "paragru" else s0) if use_init else None
                wf = w_fin if cell == "paragru" else w_fin2
                # Single process on the whole sequence.
                ref_leaves = [x.clone().requires_grad_(True) for x in leaves]
                ref_init = init.clone().requires_grad_(True) if init is not None else None
                fn = paragru if cell == "paragru" else paralstm
                h, fin, res = fn(*ref_leaves, ref_init, reset=reset, **opts)
                ((h * w).sum() + (fin * wf).sum()).backward()
                # Sequence parallel: this rank's piece; weights replicated, h0 on rank 0 only.
                sp_u = sequence_piece(u, group).clone().requires_grad_(True)
                sp_w = [x.clone().requires_grad_(True) for x in leaves[1:]]
                sp_init = init.clone().requires_grad_(True) if (init is not None and r == 0) else None
                h_sp, fin_sp, res_sp = fn(sp_u, *sp_w, sp_init, reset=sequence_piece(reset, group),
                                          **opts, **kw)
                loss = (h_sp * sequence_piece(w, group)).sum()
                if r == n - 1:
                    loss = loss + (fin_sp * wf).sum()
                loss.backward()
                name = f"{tag}/{cell}/{'tol' if 'tol' in opts else 'iters'}/{'h0' if use_init else 'zero'}"
                out[name + "/h"] = err(h_sp, sequence_piece(h, group))
                out[name + "/residual"] = abs(res_sp.item() - res.item())
                if r == n - 1:
                    out[name + "/final_state"] = err(fin_sp, fin)
                out[name + "/grad_u"] = err(sp_u.grad, sequence_piece(ref_leaves[0].grad, group))
                for i, (x_sp, x_ref) in enumerate(zip(sp_w, ref_leaves[1:])):
                    out[name + f"/grad_weight{i}"] = err(summed(x_sp.grad, group), x_ref.grad)
                if init is not None and r == 0:
                    out[name + "/grad_h0"] = err(sp_init.grad, ref_init.grad)


def check_deltaproduct(group, out, tag):
    n, r = group_size(group), group_rank(group)
    g = torch.Generator().manual_seed(5)
    B, nh, H, dk, dv = 2, 2, 2, 4, 3
    reset = boundary_resets(B, T, n, 6)
    q = F.normalize(torch.randn(B, T, H, dk, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, T, nh, H, dk, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, nh, H, dv, generator=g, dtype=torch.float64)
    beta = 2 * torch.rand(B, T, nh, H, generator=g, dtype=torch.float64)
    gate = -torch.rand(B, T, H, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, dk, dv, generator=g, dtype=torch.float64)
    w = torch.randn(B, T, H, dv, generator=g, dtype=torch.float64)
    w_fin = torch.randn(B, H, dk, dv, generator=g, dtype=torch.float64)
    for use_gate in (False, True):
        for use_init in (False, True):
            inputs = [q, k, v, beta] + ([gate] if use_gate else [])
            ref_in = [x.clone().requires_grad_(True) for x in inputs]
            ref_s0 = s0.clone().requires_grad_(True) if use_init else None
            o, fin = deltaproduct(*ref_in[:4], ref_in[4] if use_gate else None, initial_state=ref_s0,
                                  reset=reset, chunk_size=4)
            ((o * w).sum() + (fin * w_fin).sum()).backward()
            sp_in = [sequence_piece(x, group).clone().requires_grad_(True) for x in inputs]
            sp_s0 = s0.clone().requires_grad_(True) if (use_init and r == 0) else None
            o_sp, fin_sp = sp_deltaproduct(*sp_in[:4], sp_in[4] if use_gate else None,
                                           reset=sequence_piece(reset, group), group=group,
                                           initial_state=sp_s0, chunk_size=4)
            loss = (o_sp * sequence_piece(w, group)).sum()
            if r == n - 1:
                loss = loss + (fin_sp * w_fin).sum()
            loss.backward()
            name = f"{tag}/deltaproduct/{'gate' if use_gate else 'nogate'}/{'s0' if use_init else 'zero'}"
            out[name + "/o"] = err(o_sp, sequence_piece(o, group))
            if r == n - 1:
                out[name + "/final_state"] = err(fin_sp, fin)
            for label, x_sp, x_ref in zip(("q", "k", "v", "beta", "g"), sp_in, ref_in):
                out[name + f"/grad_{label}"] = err(x_sp.grad, sequence_piece(x_ref.grad, group))
            if sp_s0 is not None:
                out[name + "/grad_s0"] = err(sp_s0.grad, ref_s0.grad)


def check_short_conv(group, out, tag):
    from pretrain.mixers import ShortConv

    n = group_size(group)
    torch.manual_seed(7)
    B, C, K = 2, 3, 4
    conv = ShortConv(C, K).double()
    x = torch.randn(B, T, C, dtype=torch.float64)
    w = torch.randn(B, T, C, dtype=torch.float64)
    ds = boundary_resets(B, T, n, 8)
    ds[0, T // n - 2] = True  # a document starting inside the halo of the next piece
    for use_ds in (False, True):
        doc = ds if use_ds else None
        conv.zero_grad()
        x_ref = x.clone().requires_grad_(True)
        y = conv(x_ref, doc)
        (y * w).sum().backward()
        grad_w_ref = conv.weight.grad.clone()
        conv.zero_grad()
        sp_conv = conv_with_halo(conv.sequence_op, K - 1, group)  # what the sp plan installs (plans.conv_over_sp)
        x_sp = sequence_piece(x, group).clone().requires_grad_(True)
        y_sp = sp_conv(x_sp, conv.weight, None if doc is None else sequence_piece(doc, group))
        (y_sp * sequence_piece(w, group)).sum().backward()
        name = f"{tag}/short_conv/{'docs' if use_ds else 'nodocs'}"
        out[name + "/y"] = err(y_sp, sequence_piece(y, group))
        out[name + "/grad_x"] = err(x_sp.grad, sequence_piece(x_ref.grad, group))
        out[name + "/grad_weight"] = err(summed(conv.weight.grad, group), grad_w_ref)
    try:  # a piece shorter than the halo is a clear error
        sp_conv_halo(x[:, :2], None, 3, group)
        out[f"{tag}/short_conv/too_short_error"] = 1.0
    except ValueError as e:
        out[f"{tag}/short_conv/too_short_error"] = 0.0 if "shorter than the conv halo" in str(e) else 1.0


def attend(q, k, v, doc_start):
    """The single-device attention core (rotary on absolute positions + causal SDPA per document)."""
    from pretrain.mixers import document_ids, rotary

    q, k = rotary(q, 10000.0), rotary(k, 10000.0)
    Tq = q.shape[1]
    mask = torch.ones(Tq, Tq, dtype=torch.bool).tril()
    if doc_start is not None:
        doc = document_ids(doc_start)
        mask = mask & (doc[:, :, None] == doc[:, None, :])
        mask = mask.unsqueeze(1)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


def check_ulysses(group, out, tag):
    n = group_size(group)
    g = torch.Generator().manual_seed(9)
    B, H, hd = 2, 4, 4
    qkv = [torch.randn(B, T, H, hd, generator=g, dtype=torch.float64) for _ in range(3)]
    w = torch.randn(B, T, H, hd, generator=g, dtype=torch.float64)
    ds = boundary_resets(B, T, n, 10)
    for use_ds in (False, True):
        doc = ds if use_ds else None
        ref = [x.clone().requires_grad_(True) for x in qkv]
        o = attend(*ref, doc)
        (o * w).sum().backward()
        sp = [sequence_piece(x, group).clone().requires_grad_(True) for x in qkv]
        o_sp = ulysses_attention(attend, *sp, None if doc is None else sequence_piece(doc, group), group)
        (o_sp * sequence_piece(w, group)).sum().backward()
        name = f"{tag}/ulysses/{'docs' if use_ds else 'nodocs'}"
        out[name + "/o"] = err(o_sp, sequence_piece(o, group))
        for label, x_sp, x_ref in zip("qkv", sp, ref):
            out[name + f"/grad_{label}"] = err(x_sp.grad, sequence_piece(x_ref.grad, group))


def run_checks(rank, world_size):
    torch.set_default_dtype(torch.float64)
    sp2 = ParallelDims(dp=2, sp=2, tp=1, world_size=world_size).build_groups()
    sp4 = ParallelDims(dp=1, sp=4, tp=1, world_size=world_size).build_groups()
    out = {}
    for tag, dims in (("sp2", sp2), ("sp4", sp4)):
        for check in (check_linear_solve, check_pararnn, check_deltaproduct, check_short_conv, check_ulysses):
            check(dims.sp_group, out, tag)
    return out


@pytest.fixture(scope="module")
def results():
    return run_gloo(run_checks, WORLD)


CHECK_KINDS = ["linear_solve/diag", "linear_solve/block", "paragru", "paralstm", "deltaproduct",
               "short_conv", "ulysses"]


@pytest.mark.parametrize("kind", CHECK_KINDS)
@pytest.mark.parametrize("tag", ["sp2", "sp4"])
def test_sequence_parallel_equals_single_process(results, tag, kind):
    prefix = f"{tag}/{kind}"
    errors = {name: e for rank_out in results for name, e in rank_out.items() if name.startswith(prefix)}
    assert errors, f"no checks ran for {prefix}"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst}: max |sp - single| = {errors[worst]:.3e} > {TOL}"
