"""Sequence parallelism: each rank of an sp group holds a contiguous piece of every sequence.

Recurrences cross pieces through summaries (kernels/scan.py, kernels/deltaproduct.py): every
rank summarises its piece from a zero start, the summaries are all-gathered, and each rank folds
those of the earlier ranks (the later ones, for a reverse scan) into its initial state:

    h_in(r) = (P_{r-1}, e_{r-1}) o ... o (P_0, e_0) applied to h0,   (P2,e2) o (P1,e1) = (P2 P1, P2 e1 + e2)

One all-gather of a [B, D]-sized summary per scan, whatever the piece length.

- make_sp_linear_solve: a linear_scan replacement for ParaRNN's Newton iterations and adjoint.
- SequenceBoundary / sp_pararnn_kwargs: what ParaRNN needs on top (kernels/pararnn.py
  `boundary`): the previous piece's last state, the next piece's first Jacobian, a global max.
- sp_deltaproduct: DeltaProduct over pieces, differentiable by autograd.
- sp_conv_halo / conv_with_halo: the kernel-1 positions a causal conv needs from the
  previous piece.
- seq_to_head / head_to_seq / ulysses_attention: DeepSpeed-Ulysses all-to-all around an
  attention core.

Resets (document starts, reset[b, t] = True) need no special care: a reset inside a piece zeroes
that piece's transition summary, so nothing from earlier pieces flows past it.
`group=None` is a group of one process: every function reduces to the single-device call.
"""
from __future__ import annotations

import torch

from kernels.deltaproduct import apply_deltaproduct_summary, deltaproduct, deltaproduct_summary
from kernels.scan import apply_summary, compose_scan_summaries, linear_scan
from parallel.mappings import (all_gather_list, all_to_all, from_prev_rank, group_rank, group_size,
                               neighbour_value)

# ---------------------------------------------------------------------------------------------
# Linear scans across ranks (ParaRNN's Newton step and adjoint).


def _gather_summaries(tensors, group):
    """All-gather several tensors in one collective: returns, per rank, the list of its tensors."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    out = []
    for buf in all_gather_list(flat, group):
        parts, i = [], 0
        for t in tensors:
            parts.append(buf[i:i + t.numel()].view_as(t))
            i += t.numel()
        out.append(parts)
    return out


def make_sp_linear_solve(group, scan=linear_scan):
    """A function with linear_scan's signature that solves the scan over the whole sp group.

    Each rank passes its piece (A, b, reset: [B, T/sp, ...]) and gets its piece of the global
    trajectory. h0 is the state before the whole sequence in scan order and is read on the first
    piece only (rank 0 forward, the last rank for reverse=True); other ranks may pass None, but
    h0 being None must agree over ranks. With return_summary, the summary is the whole
    sequence's. Not differentiable through the collective: ParaRNN calls it inside its own
    autograd.Function. Cost: two local scans (the summary from zero, then the trajectory from
    the folded initial state) and one all-gather of [B, D] (diagonal) or [B, D, 2, 2] tensors.
    """
    n = group_size(group)

    def sp_linear_solve(A, b, h0=None, reset=None, reverse=False, return_summary=False, **kwargs):
        if n == 1:
            return scan(A, b, h0, reset, reverse, return_summary, **kwargs)
        r = group_rank(group)
        order = list(range(n - 1, -1, -1)) if reverse else list(range(n))  # ranks in scan order
        first = order[0] == r
        _, (P, e) = scan(A, b, None, reset, reverse, return_summary=True, **kwargs)
        # The first piece folds h0 into its end state, so no one else needs h0.
        end = apply_summary((P, e), h0) if first and h0 is not None else e
        mine = [P, end, e] if return_summary else [P, end]
        gathered = _gather_summaries([t.contiguous() for t in mine], group)
        h_in = h0 if first else None
        for j in order[:order.index(r)]:
            P_j, end_j = gathered[j][0], gathered[j][1]
            h_in = end_j if h_in is None else apply_summary((P_j, end_j), h_in)
        h = scan(A, b, h_in, reset, reverse, **kwargs)
        if not return_summary:
            return h
        total = None
        for j in order:
            s = (gathered[j][0], gathered[j][2])
            total = s if total is None else compose_scan_summaries(total, s)
        return h, total

    return sp_linear_solve


class SequenceBoundary:
    """kernels/pararnn.py's `boundary` over an sp group: neighbour exchanges and a global max."""

    def __init__(self, group):
        self.group = group
        self.n, self.rank = group_size(group), group_rank(group)

    def from_prev(self, x):
        y = neighbour_value(x, self.group, -1)
        return None if self.rank == 0 else y

    def from_next(self, x):
        y = neighbour_value(x, self.group, 1)
        return None if self.rank == self.n - 1 else y

    def max(self, x):
        if self.n == 1:
            return x
        x = x.detach().clone()
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return x


def sp_pararnn_kwargs(group) -> dict:
    """Keyword arguments that make paragru/paralstm solve over the whole sp group:
    paragru(u_piece, a, reset=reset_piece, **sp_pararnn_kwargs(group))."""
    if group_size(group) == 1:
        return {}
    return dict(linear_solve=make_sp_linear_solve(group), boundary=SequenceBoundary(group))


# ---------------------------------------------------------------------------------------------
# DeltaProduct across ranks.


def sp_deltaproduct(q, k, v, beta, g=None, reset=None, group=None, scale=None, initial_state=None,
                    chunk_size=64, backend="auto"):
    """kernels.deltaproduct.deltaproduct on this rank's piece of the sequence.

    Shapes as deltaproduct's with T = this piece. initial_state is the state before the whole
    sequence, read on rank 0 only. Each rank computes its piece's summary (M, S_ext) from zero
    (rank 0 folds initial_state in), all-gathers them, folds the earlier ranks' into its initial
    state and runs its piece from there. Differentiable by autograd: the gather's backward
    reduce-scatters the summaries' gradients to their owners. Returns (o piece, this piece's
    final state); the last rank's final state is the sequence's.
    """
    n = group_size(group)
    if n == 1:
        return deltaproduct(q, k, v, beta, g, scale=scale, initial_state=initial_state, reset=reset,
                            chunk_size=chunk_size, backend=backend)
    M, E = deltaproduct_summary(k, v, beta, g, reset=reset, chunk_size=chunk_size)
    first_with_init = group_rank(group) == 0 and initial_state is not None
    if first_with_init:  # later ranks see the sequence's initial state through rank 0's end state
        E = apply_deltaproduct_summary((M, E), initial_state)
    state = _FoldEarlierSummaries.apply(M, E, group)  # zeros on rank 0, in the graph on every rank
    if first_with_init:
        state = state + initial_state.to(state.dtype)
    return deltaproduct(q, k, v, beta, g, scale=scale, initial_state=state, reset=reset,
                        chunk_size=chunk_size, backend=backend)


class _FoldEarlierSummaries(torch.autograd.Function):
    """S_in(r) = fold of ranks 0..r-1's summaries, S_{j+1} = M_j S_j + E_j from S_0 = 0.

    Forward: one all-gather of [M | E]; backward: the fold's adjoint
    (dE_j = dS_{j+1}, dM_j = dS_{j+1} S_jᵀ, dS_j = M_jᵀ dS_{j+1}) for j < r, then a
    reduce-scatter so each rank receives the gradient of its own summary from all later ranks.
    An explicit function rather than autograd through a gather: rank 0 folds nothing, yet its
    backward must still join the collective, so its (zero) output stays in the graph.
    """

    @staticmethod
    def forward(ctx, M, E, group):
        dk = M.shape[-1]
        r = group_rank(group)
        every = all_gather_list(torch.cat([M, E], dim=-1), group)
        states = [torch.zeros_like(E)]
        for j in range(r):
            states.append(every[j][..., :dk] @ states[-1] + every[j][..., dk:])
        ctx.group, ctx.dk = group, dk
        earlier = (torch.stack(every[:r]), torch.stack(states[:-1])) if r else (M.new_empty(0), E.new_empty(0))
        ctx.save_for_backward(*earlier)
        return states[-1]

    @staticmethod
    def backward(ctx, dS):
        every, states = ctx.saved_tensors
        group, dk = ctx.group, ctx.dk
        n, r = group_size(group), group_rank(group)
        grads = dS.new_zeros((n,) + dS.shape[:-1] + (dk + dS.shape[-1],))
        for j in range(r - 1, -1, -1):
            M_j = every[j][..., :dk]
            grads[j, ..., :dk] = dS @ states[j].transpose(-1, -2)
            grads[j, ..., dk:] = dS
            dS = M_j.transpose(-1, -2) @ dS
        torch.distributed.all_reduce(grads, group=group)
        mine = grads[r]
        return mine[..., :dk], mine[..., dk:], None


# ---------------------------------------------------------------------------------------------
# Short causal convolutions: a halo of kernel-1 positions from the previous rank.


def sp_conv_halo(x, doc_start, halo: int, group):
    """Prepend the previous rank's last `halo` positions: (x_ext [B, halo+T, C], doc_start_ext).

    Rank 0 gets zeros (what a causal conv pads with) and no document starts. Document identity
    across the seam is what cumsum(doc_start_ext) gives: equal ids iff no start lies between, so
    a conv that masks by document ids over the extended window masks as on one device. The
    halo's gradient flows back to the previous rank.
    """
    if halo == 0 or group_size(group) == 1:
        return x, doc_start
    if x.shape[1] < halo:
        raise ValueError(f"sequence piece of {x.shape[1]} positions is shorter than the conv halo "
                         f"{halo}: use a longer seq_len or a smaller parallel.sp")
    x_ext = torch.cat([from_prev_rank(x[:, -halo:], group), x], dim=1)
    if doc_start is None:
        return x_ext, None
    ds_halo = neighbour_value(doc_start[:, -halo:].to(torch.uint8), group, -1).to(torch.bool)
    return x_ext, torch.cat([ds_halo, doc_start.to(torch.bool)], dim=1)


def conv_with_halo(conv, halo: int, group):
    """A causal conv op conv(x [B,T,C], weight, doc_start) made to see the previous piece: the
    previous rank's last `halo` (kernel_size - 1) positions are prepended (sp_conv_halo) and the
    output on them dropped. The weight stays replicated over sp; pretrain/plans.py installs this
    as a ShortConv's sequence_op."""

    def op(x, weight, doc_start=None):
        x_ext, ds_ext = sp_conv_halo(x, doc_start, halo, group)
        y = conv(x_ext, weight, ds_ext)
        return y[:, y.shape[1] - x.shape[1]:]

    return op


# ---------------------------------------------------------------------------------------------
# Attention: DeepSpeed-Ulysses all-to-all.


def seq_to_head(x, group):
    """[B, T/sp, H, hd] (sequence-sharded) -> [B, T, H/sp, hd] (head-sharded)."""
    return all_to_all(x, group, scatter_dim=2, gather_dim=1)


def head_to_seq(x, group):
    """[B, T, H/sp, hd] (head-sharded) -> [B, T/sp, H, hd] (sequence-sharded)."""
    return all_to_all(x, group, scatter_dim=1, gather_dim=2)


def ulysses_attention(attend, q, k, v, doc_start, group):
    """o [B, T/sp, H, hd] = attend on the whole sequence, heads sharded over sp.

    attend(q, k, v, doc_start) -> o works on [B, T, h, hd] with full-length doc_start [B, T]; it
    sees absolute positions 0..T-1, so rotary embeddings belong inside it. H % sp == 0.
    """
    if group_size(group) == 1:
        return attend(q, k, v, doc_start)
    q, k, v = seq_to_head(q, group), seq_to_head(k, group), seq_to_head(v, group)
    full_doc = None
    if doc_start is not None:
        full_doc = torch.cat(all_gather_list(doc_start.to(torch.uint8), group), dim=1).to(torch.bool)
    return head_to_seq(attend(q, k, v, full_doc), group)


# ---------------------------------------------------------------------------------------------
# Batches and the loss.


def sequence_piece(x, group, dim: int = 1):
    """This rank's contiguous piece of a replicated batch tensor (ids, labels, doc_start)."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by parallel.sp={n}")
    return x.chunk(n, dim=dim)[group_rank(group)]


def sp_token_count(n_local, group) -> torch.Tensor:
    """Tokens of the whole sequences over the sp group: each rank divides its loss sum by this
    (DeepSpeed then sums gradients over sp and averages over dp; see topology.DeepSpeedMPU)."""
    n = torch.as_tensor(n_local, dtype=torch.float64).clone()
    if group_size(group) > 1:
        torch.distributed.all_reduce(n, group=group)
    return n

