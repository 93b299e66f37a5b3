"""The sequence mixers a block can use, each beside the dataclass of its config section.

Each maps x [B, T, d_model] (and optional doc_start [B, T] bool) to [B, T, d_model] and is built
as Mixer(cfg, c, layer_idx) with cfg the ModelConfig and c its section (model.<section>). Which
names exist, and what each brings (section, FLOPs, memory, parallel plans), is
pretrain/registry.py. The recurrences themselves live in kernels/ (torch reference on CPU,
Triton on CUDA); these modules own the projections around them.

One seam per mixer: `self.sequence_op`, the op over the sequence (the recurrence, attention's
core, a short conv's sum). It is an attribute, not a method, so that parallel plans
(pretrain/parallelize.py) swap it for one that crosses sequence-parallel ranks, and a user can
swap in another kernel, without touching this file.

For decoding, each mixer also has
    prefill(x, doc_start=None) -> (y, state)   forward, plus the state after the last token
    step(x, state, doc_start=None) -> (y, state)   one token, x [B, d_model], from that state
    empty_state(batch_size) -> state           the state before any token
where the state is the small object defined beside the mixer: ParaGRU h, ParaLSTM (c, h),
DeltaProduct S and its short convs' windows, attention's KV cache. A recurrent step costs the
same whatever came before; attention's grows with its cache. The state after a prompt is that
of its last document (decoding continues it); doc_start [B] in step starts a new one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.deltaproduct import deltaproduct, deltaproduct_step
from kernels.pararnn import ParaGRUCell, ParaLSTMCell, paragru, paralstm

try:  # optional, GPU only
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except Exception:  # ImportError, or a CUDA/ABI mismatch inside flash-attn
    flash_attn_func = flash_attn_varlen_func = None


def fp32_at_least(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 for reductions and transcendentals; fp64 (the tests' dtype) stays fp64."""
    return x if x.dtype == torch.float64 else x.float()


def rms_norm(x, weight, eps: float):
    xf = fp32_at_least(x)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.to(xf.dtype)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def document_ids(doc_start: torch.Tensor) -> torch.Tensor:
    """[B, T] int: which packed document each position belongs to (0, 1, ... per row)."""
    return torch.cumsum(doc_start.to(torch.int32), dim=1)


def in_last_document(doc_start: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: whether each position lies in its row's last document (the one decoding continues)."""
    doc = document_ids(doc_start)
    return doc == doc[:, -1:]


def restart(state: torch.Tensor, doc_start: torch.Tensor | None) -> torch.Tensor:
    """state [B, ...] zeroed in the rows where a document starts at this token (doc_start [B])."""
    if doc_start is None:
        return state
    return state.masked_fill(doc_start.view((-1,) + (1,) * (state.dim() - 1)), 0.0)


def state_dtype(module: nn.Module) -> torch.dtype:
    """Recurrent states are fp32 (fp64 in an fp64 model, as the kernels compute them)."""
    return torch.float64 if next(module.parameters()).dtype == torch.float64 else torch.float32


def short_conv(x, weight, doc_start=None):
    """silu(causal depthwise conv1d) of x [B, T, C] with weight [C, K], restarting at document
    starts: K shifted multiply-adds (ShortConv's docstring)."""
    T, K = x.shape[1], weight.shape[1]
    y = x * weight[:, K - 1]
    doc = document_ids(doc_start) if doc_start is not None else None
    for s in range(1, min(K, T + 1)):
        shifted = F.pad(x, (0, 0, s, 0))[:, :T]
        if doc is not None:
            same = F.pad(doc, (s, 0), value=-1)[:, :T] == doc
            shifted = shifted * same.unsqueeze(-1).to(x.dtype)
        y = y + shifted * weight[:, K - 1 - s]
    return F.silu(y)


class ShortConv(nn.Module):
    """Causal depthwise conv1d over time followed by SiLU, restarting at document starts.

    y_t = silu(sum_{s<K} w_{K-1-s} * x_{t-s}), where x_{t-s} counts only if it lies in t's
    document. Written as K shifted multiply-adds so a sequence-parallel halo can feed it.
    """

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.sequence_op = short_conv  # the seam: sequence parallelism prepends a halo
        self.reset_mixer_parameters()

    def reset_mixer_parameters(self):
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x, doc_start=None):
        return self.sequence_op(x, self.weight, doc_start)

    def window(self, x, doc_start=None):
        """The state step() continues from after x [B, T, C]: its last K-1 inputs [B, K-1, C],
        zero before the sequence and before the last document's start."""
        T, K = x.shape[1], self.kernel_size
        lo = max(T - (K - 1), 0)
        w = F.pad(x[:, lo:], (0, 0, K - 1 - (T - lo), 0))
        if doc_start is not None:
            same = F.pad(in_last_document(doc_start)[:, lo:], (K - 1 - (T - lo), 0), value=False)
            w = w * same.unsqueeze(-1).to(x.dtype)
        return w

    def step(self, x, window, doc_start=None):
        """One token x [B, C] -> (y [B, C], the window moved on by x): forward's sum at its end."""
        K = self.kernel_size
        window = restart(window, doc_start)
        y = x * self.weight[:, K - 1]
        for s in range(1, K):  # window[:, K-1-s] is x_{t-s}, in forward's order of terms
            y = y + window[:, K - 1 - s] * self.weight[:, K - 1 - s]
        return F.silu(y), torch.cat([window[:, 1:], x.unsqueeze(1)], dim=1)


class HeadwiseLinear(nn.Module):
    """Block-diagonal linear map over heads: head h's outputs see only head h's inputs.

    x [..., H * d_in] -> [..., G, H * d_out]: G gates, each laid out head-major so that a
    contiguous slice of channels is a contiguous set of heads (what tensor parallelism shards).
    """

    def __init__(self, d_in: int, d_out: int, num_heads: int, num_gates: int):
        super().__init__()
        self.num_heads, self.num_gates = num_heads, num_gates
        self.weight = nn.Parameter(torch.empty(num_heads, d_in // num_heads, num_gates, d_out // num_heads))
        self.bias = nn.Parameter(torch.zeros(num_gates, d_out))
        self.reset_mixer_parameters()

    def reset_mixer_parameters(self):
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.weight.shape[1]))
        nn.init.zeros_(self.bias)

    def forward(self, x):
        xh = x.unflatten(-1, (self.num_heads, -1))
        u = torch.einsum("...hi,higj->...ghj", xh, self.weight)
        return u.flatten(-2) + self.bias


@dataclass
class ParaRNNConfig:
    expand: float = 1.0           # hidden channels = expand * d_model
    num_heads: int = 4            # the input projection B is block-diagonal over heads
    num_iters: int = 3            # Newton iterations (the paper converges in 3-4)
    tol: Optional[float] = 1e-3   # residual above which more iterations run, then a warning
    max_iters: int = 6            # cap on iterations when the residual is above tol
    # Newton trust region: every step is clamped elementwise to [-damping, damping]. 2.0 is the
    # width of the box the states live in (|h|, |c| <= 1), so it never cuts a step that stays
    # inside it, and it stops the huge steps that make strongly nonlinear cells diverge; null: off.
    damping: Optional[float] = 2.0


@dataclass
class ParaGRUState:
    h: torch.Tensor  # [B, D] fp32 (fp64 in an fp64 model)


@dataclass
class ParaLSTMState:
    c: torch.Tensor  # [B, D] fp32 (fp64 in an fp64 model)
    h: torch.Tensor  # [B, D]


class ParaRNNMixer(nn.Module):
    """u = B x + b (one GEMM for all t), h = ParaRNN cell solved by Newton over t, y = W_o h.

    Decoding runs the cell once per token, h' = f(h, u): the equation Newton solves for all t.
    """

    cell = ""
    solver = None  # the kernels/ op that solves the cell over the sequence
    # Parameters that are not weight matrices: the diagonal recurrent weights (and ParaLSTM's
    # peepholes) act per channel like gains; weight decay would pull the recurrence toward zero.
    no_weight_decay = ("recurrent", "peephole")

    def __init__(self, cfg, c: ParaRNNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.rnn_cfg = c
        hidden = int(self.rnn_cfg.expand * cfg.d_model)
        self.hidden = hidden
        self.in_proj = HeadwiseLinear(cfg.d_model, hidden, self.rnn_cfg.num_heads, num_gates=3)
        self.recurrent = nn.Parameter(torch.empty(3, hidden))  # diagonal recurrent weights a_*
        self.out_proj = nn.Linear(hidden, cfg.d_model, bias=False)
        self.last_residual = None
        self.sequence_op = self.solver  # the seam: paragru / paralstm, or one across sp ranks
        self.kernel_backend = "auto"  # auto | torch | triton (train.kernel_backend)
        self.reset_mixer_parameters()

    def reset_mixer_parameters(self):
        # Small diagonal recurrences keep the Jacobians contractive at init, so Newton converges.
        nn.init.uniform_(self.recurrent, -0.5, 0.5)

    def solver_kwargs(self):
        c = self.rnn_cfg
        return dict(num_iters=c.num_iters, tol=c.tol, max_iters=c.max_iters, damping=c.damping, backend=self.kernel_backend)


class ParaGRUMixer(ParaRNNMixer):
    cell = "paragru"
    solver = staticmethod(paragru)

    def forward(self, x, doc_start=None):
        u = self.in_proj(x)  # [B, T, 3, D] in gate order (z, r, h)
        h, _, residual = self.sequence_op(u, self.recurrent, reset=doc_start, **self.solver_kwargs())
        self.last_residual = residual
        return self.out_proj(h)

    def prefill(self, x, doc_start=None):
        u = self.in_proj(x)
        h, last, residual = self.sequence_op(u, self.recurrent, reset=doc_start, **self.solver_kwargs())
        self.last_residual = residual
        return self.out_proj(h), ParaGRUState(last.clone())

    def step(self, x, state, doc_start=None):
        u = self.in_proj(x)  # [B, 3, D]
        h = restart(state.h, doc_start)
        h = ParaGRUCell.step(h, u.to(h.dtype), (self.recurrent.to(h.dtype),))
        return self.out_proj(h.to(x.dtype)), ParaGRUState(h)

    def empty_state(self, batch_size):
        return ParaGRUState(self.recurrent.new_zeros(batch_size, self.recurrent.shape[1], dtype=state_dtype(self)))


class ParaLSTMMixer(ParaRNNMixer):
    cell = "paralstm"
    solver = staticmethod(paralstm)

    def __init__(self, cfg, c: ParaRNNConfig, layer_idx: int):
        super().__init__(cfg, c, layer_idx)
        self.peephole = nn.Parameter(torch.empty(2, self.hidden))  # p_f, p_o
        nn.init.uniform_(self.peephole, -0.1, 0.1)

    def forward(self, x, doc_start=None):
        u = self.in_proj(x)  # [B, T, 3, D] in gate order (f, c, o)
        h, _, residual = self.sequence_op(u, self.recurrent, self.peephole, reset=doc_start, **self.solver_kwargs())
        self.last_residual = residual
        return self.out_proj(h)

    def prefill(self, x, doc_start=None):
        u = self.in_proj(x)
        h, last, residual = self.sequence_op(u, self.recurrent, self.peephole, reset=doc_start, **self.solver_kwargs())
        self.last_residual = residual
        return self.out_proj(h), ParaLSTMState(last[..., 0].clone(), last[..., 1].clone())

    def step(self, x, state, doc_start=None):
        u = self.in_proj(x)  # [B, 3, D]
        dtype = state.h.dtype
        ch = restart(torch.stack((state.c, state.h), dim=-1), doc_start)  # the cell's [B, D, 2] = (c, h)
        ch = ParaLSTMCell.step(ch, u.to(dtype), (self.recurrent.to(dtype), self.peephole.to(dtype)))
        return self.out_proj(ch[..., 1].to(x.dtype)), ParaLSTMState(ch[..., 0], ch[..., 1])

    def empty_state(self, batch_size):
        zeros = self.recurrent.new_zeros(batch_size, self.recurrent.shape[1], dtype=state_dtype(self))
        return ParaLSTMState(zeros, zeros.clone())


@dataclass
class DeltaProductConfig:
    num_heads: int = 4            # heads per layer (split over tensor-parallel ranks)
    head_dim: int = 64            # dk: key/query size per head (the Triton kernels take 16-256)
    expand_v: float = 1.0         # dv = expand_v * head_dim
    num_householder: int = 2      # n_h Householder factors per token
    allow_neg_eigval: bool = True  # beta = 2*sigmoid (state tracking) instead of sigmoid
    use_forget_gate: bool = True  # the gate g = -exp(A_log) * softplus(a(x) + dt_bias) decays the state
    use_short_conv: bool = True   # causal depthwise conv (SiLU) on q, k, v
    conv_size: int = 4            # the short conv's kernel size
    chunk_size: int = 64          # sub-steps per chunk of the chunkwise form (Triton: 16, 32 or 64)


@dataclass
class DeltaProductState:
    S: torch.Tensor  # [B, H, dk, dv] fp32 (fp64 in an fp64 model)
    conv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # q, k, v conv windows [B, K-1, C]


class DeltaProductMixer(nn.Module):
    """Gated DeltaProduct: n_h Householder updates of a dk x dv state per head and token.

    Training and prefill run the chunkwise form over the sequence; decoding steps one token:
    the gate's decay, n_h Householder updates of S and the readout (kernels.deltaproduct_step).
    """

    # The forget gate's per-head decay rate and time-step bias (as Mamba / fla exclude them).
    no_weight_decay = ("A_log", "dt_bias")

    def __init__(self, cfg, c: DeltaProductConfig, layer_idx: int):
        super().__init__()
        self.c = c
        self.H, self.dk, self.nh = c.num_heads, c.head_dim, c.num_householder
        self.dv = int(c.head_dim * c.expand_v)
        H, dk, dv, nh, d = self.H, self.dk, self.dv, self.nh, cfg.d_model
        self.q_proj = nn.Linear(d, H * dk, bias=False)
        self.k_proj = nn.Linear(d, nh * H * dk, bias=False)
        self.v_proj = nn.Linear(d, nh * H * dv, bias=False)
        self.b_proj = nn.Linear(d, nh * H, bias=False)
        if c.use_forget_gate:
            self.a_proj = nn.Linear(d, H, bias=False)
            self.A_log = nn.Parameter(torch.empty(H))
            self.dt_bias = nn.Parameter(torch.empty(H))
        if c.use_short_conv:
            self.q_conv = ShortConv(H * dk, c.conv_size)
            self.k_conv = ShortConv(nh * H * dk, c.conv_size)
            self.v_conv = ShortConv(nh * H * dv, c.conv_size)
        self.g_proj = nn.Linear(d, H * dv, bias=False)  # output gate of the gated RMSNorm
        self.o_norm = RMSNorm(dv, cfg.norm_eps)
        self.out_proj = nn.Linear(H * dv, d, bias=False)
        self.sequence_op = deltaproduct  # the seam: the chunkwise recurrence, or one across sp ranks
        self.kernel_backend = "auto"  # auto | torch | triton (train.kernel_backend)
        self.reset_mixer_parameters()

    def reset_mixer_parameters(self):
        if self.c.use_forget_gate:
            # As in Mamba2 / Gated DeltaNet: decay rates A in [1, 16], dt in [1e-3, 1e-1].
            self.A_log.data.uniform_(1.0, 16.0).log_()
            dt = torch.exp(torch.empty(self.H).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias.data.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(self, x, doc_start=None):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.c.use_short_conv:
            q, k, v = self.q_conv(q, doc_start), self.k_conv(k, doc_start), self.v_conv(v, doc_start)
        else:  # fla's layer: SiLU on the projections when there is no conv to apply it
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        o, _ = self.sequence_op(*self._recurrence_inputs(x, q, k, v), reset=doc_start,
                               chunk_size=self.c.chunk_size, backend=self.kernel_backend)
        return self._output(x, o)

    def prefill(self, x, doc_start=None):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        windows = None
        if self.c.use_short_conv:
            windows = (self.q_conv.window(q, doc_start), self.k_conv.window(k, doc_start),
                       self.v_conv.window(v, doc_start))
            q, k, v = self.q_conv(q, doc_start), self.k_conv(k, doc_start), self.v_conv(v, doc_start)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        o, S = self.sequence_op(*self._recurrence_inputs(x, q, k, v), reset=doc_start,
                               chunk_size=self.c.chunk_size, backend=self.kernel_backend)
        return self._output(x, o), DeltaProductState(S, windows)

    def step(self, x, state, doc_start=None):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # one token: [B, channels]
        windows = None
        if self.c.use_short_conv:
            (q, wq), (k, wk), (v, wv) = (conv.step(t, w, doc_start) for conv, t, w in
                                         zip((self.q_conv, self.k_conv, self.v_conv), (q, k, v), state.conv))
            windows = (wq, wk, wv)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        x, q, k, v = x.unsqueeze(1), q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)  # as T = 1
        q, k, v, beta, g = self._recurrence_inputs(x, q, k, v)
        o, S = deltaproduct_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], None if g is None else g[:, 0],
                                 restart(state.S, doc_start))
        return self._output(x, o.unsqueeze(1))[:, 0], DeltaProductState(S, windows)

    def empty_state(self, batch_size):
        p = self.q_proj.weight
        S = p.new_zeros(batch_size, self.H, self.dk, self.dv, dtype=state_dtype(self))
        windows = None
        if self.c.use_short_conv:
            windows = tuple(p.new_zeros(batch_size, conv.kernel_size - 1, conv.weight.shape[0])
                            for conv in (self.q_conv, self.k_conv, self.v_conv))
        return DeltaProductState(S, windows)

    def _recurrence_inputs(self, x, q, k, v):
        """(q, k, v, beta, g) in the kernel's layout from the (convolved) projections [B, T, .]."""
        B, T, _ = x.shape
        dk, dv, nh = self.dk, self.dv, self.nh
        H = q.shape[-1] // dk  # the heads held here (all of them unless tensor-parallel)
        q = F.normalize(fp32_at_least(q.view(B, T, H, dk)), dim=-1).to(x.dtype)
        k = F.normalize(fp32_at_least(k.view(B, T, nh, H, dk)), dim=-1).to(x.dtype)
        v = v.view(B, T, nh, H, dv)
        beta = torch.sigmoid(fp32_at_least(self.b_proj(x))).view(B, T, nh, H)
        if self.c.allow_neg_eigval:
            beta = 2.0 * beta  # eigenvalues of I - beta k k^T in [-1, 1]
        g = None
        if self.c.use_forget_gate:
            a = fp32_at_least(self.a_proj(x))
            g = -torch.exp(self.A_log.to(a.dtype)) * F.softplus(a + self.dt_bias.to(a.dtype))
        return q, k, v, beta, g

    def _output(self, x, o):
        """Gated RMSNorm of the recurrence's output o [B, T, H, dv], then the output projection."""
        B, T, H, dv = o.shape
        o = self.o_norm(o) * F.silu(self.g_proj(x).view(B, T, H, dv))
        return self.out_proj(o.reshape(B, T, H * dv))


def rotary(x: torch.Tensor, theta: float, start: int = 0) -> torch.Tensor:
    """Rotary position embedding on x [B, T, H, hd] at positions start..start+T-1 (rotate-half)."""
    T, hd = x.shape[1], x.shape[-1]
    xf = fp32_at_least(x)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=xf.dtype) / hd))
    angles = torch.outer(torch.arange(start, start + T, device=x.device, dtype=xf.dtype), inv_freq)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@dataclass
class AttentionConfig:
    num_heads: int = 4            # heads per layer (split over tensor-parallel ranks)
    rope_theta: float = 10000.0   # rotary embedding base
    doc_mask: bool = True         # tokens attend only within their own document


@dataclass
class KVCache:
    k: torch.Tensor  # [B, T, H, hd]: keys after rotary, at positions 0..T-1
    v: torch.Tensor  # [B, T, H, hd]
    visible: torch.Tensor | None  # [B, T] bool: what the next token may attend (its document); None: all


class AttentionMixer(nn.Module):
    """Causal multi-head attention with RoPE; flash-attn on CUDA when installed, else SDPA.

    Decoding appends the token's key and value to the cache and attends over it (SDPA).
    """

    def __init__(self, cfg, c: AttentionConfig, layer_idx: int):
        super().__init__()
        self.c = c
        self.H = self.c.num_heads
        self.hd = cfg.d_model // self.H
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # the seam: causal attention over the whole sequence, or Ulysses across sp ranks
        self.sequence_op = partial(causal_attention, rope_theta=c.rope_theta)

    def forward(self, x, doc_start=None):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, -1, self.hd).unbind(2)
        o = self.sequence_op(q, k, v, doc_start if self.c.doc_mask else None)
        return self.out_proj(o.reshape(B, T, -1))

    def prefill(self, x, doc_start=None):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, -1, self.hd).unbind(2)
        doc_start = doc_start if self.c.doc_mask else None
        o = self.sequence_op(q, k, v, doc_start)
        visible = None if doc_start is None else in_last_document(doc_start)
        cache = KVCache(rotary(k, self.c.rope_theta), v.contiguous(), visible)
        return self.out_proj(o.reshape(B, T, -1)), cache

    def step(self, x, cache, doc_start=None):
        B, pos = x.shape[0], cache.k.shape[1]  # pos: this token's position
        q, k, v = self.qkv_proj(x).view(B, 1, 3, -1, self.hd).unbind(2)
        q, k = rotary(q, self.c.rope_theta, start=pos), rotary(k, self.c.rope_theta, start=pos)
        keys, values = torch.cat([cache.k, k], dim=1), torch.cat([cache.v, v], dim=1)
        visible = cache.visible
        if doc_start is not None and self.c.doc_mask:
            old = visible if visible is not None else torch.ones(B, pos, dtype=torch.bool, device=x.device)
            visible = old & ~doc_start[:, None]
        if visible is not None:
            visible = torch.cat([visible, visible.new_ones(B, 1)], dim=1)
        mask = None if visible is None else visible[:, None, None, :]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                           attn_mask=mask)
        return self.out_proj(o.reshape(B, -1)), KVCache(keys, values, visible)

    def empty_state(self, batch_size):
        p = self.qkv_proj.weight
        empty = p.new_zeros(batch_size, 0, self.H, self.hd)
        return KVCache(empty, empty.clone(), None)


def causal_attention(q, k, v, doc_start=None, rope_theta: float = 10000.0):
    """Rotary embedding + causal attention on q, k, v [B, T, h, hd] (positions 0..T-1), within
    documents when doc_start [B, T] is given: flash-attn on CUDA when installed, else SDPA."""
    T = q.shape[1]
    q, k = rotary(q, rope_theta), rotary(k, rope_theta)
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return _flash_attention(q, k, v, doc_start)
    mask = None
    if doc_start is not None:
        doc = document_ids(doc_start)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = (causal & (doc[:, :, None] == doc[:, None, :])).unsqueeze(1)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask, is_causal=mask is None).transpose(1, 2)


def _flash_attention(q, k, v, doc_start):
    if doc_start is None:
        return flash_attn_func(q, k, v, causal=True)
    B, T, H, hd = q.shape
    starts = doc_start.clone()
    starts[:, 0] = True  # every row starts a segment
    offsets = torch.nonzero(starts.flatten()).flatten()
    cu = torch.cat([offsets, offsets.new_tensor([B * T])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    o = flash_attn_varlen_func(q.reshape(B * T, H, hd), k.reshape(B * T, H, hd), v.reshape(B * T, H, hd),
                               cu, cu, max_len, max_len, causal=True)
    return o.view(B, T, H, hd)
