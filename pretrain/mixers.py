"""The sequence mixers a block can use: paragru, paralstm, deltaproduct, attention.

Each maps x [B, T, d_model] (and optional doc_start [B, T] bool) to [B, T, d_model]. The
recurrences themselves live in kernels/ (torch reference on CPU, Triton on CUDA); these modules
own the projections around them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.deltaproduct import deltaproduct
from kernels.pararnn import paragru, paralstm

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


class ShortConv(nn.Module):
    """Causal depthwise conv1d over time followed by SiLU, restarting at document starts.

    y_t = silu(sum_{s<K} w_{K-1-s} * x_{t-s}), where x_{t-s} counts only if it lies in t's
    document. Written as K shifted multiply-adds so a sequence-parallel halo can feed it.
    """

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.reset_mixer_parameters()

    def reset_mixer_parameters(self):
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x, doc_start=None):
        T = x.shape[1]
        K = self.kernel_size
        y = x * self.weight[:, K - 1]
        doc = document_ids(doc_start) if doc_start is not None else None
        for s in range(1, min(K, T + 1)):
            shifted = F.pad(x, (0, 0, s, 0))[:, :T]
            if doc is not None:
                same = F.pad(doc, (s, 0), value=-1)[:, :T] == doc
                shifted = shifted * same.unsqueeze(-1).to(x.dtype)
            y = y + shifted * self.weight[:, K - 1 - s]
        return F.silu(y)


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


class ParaRNNMixer(nn.Module):
    """u = B x + b (one GEMM for all t), h = ParaRNN cell solved by Newton over t, y = W_o h."""

    cell = ""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.rnn_cfg = getattr(cfg, self.cell)
        hidden = int(self.rnn_cfg.expand * cfg.d_model)
        self.hidden = hidden
        self.in_proj = HeadwiseLinear(cfg.d_model, hidden, self.rnn_cfg.num_heads, num_gates=3)
        self.recurrent = nn.Parameter(torch.empty(3, hidden))  # diagonal recurrent weights a_*
        self.out_proj = nn.Linear(hidden, cfg.d_model, bias=False)
        self.last_residual = None
        self.solver_extra = {}  # e.g. a sequence-parallel linear_solve and boundary (parallel/)
        self.kernel_backend = "auto"  # auto | torch | triton (train.kernel_backend)
        self.reset_mixer_parameters()

    def reset_mixer_parameters(self):
        # Small diagonal recurrences keep the Jacobians contractive at init, so Newton converges.
        nn.init.uniform_(self.recurrent, -0.5, 0.5)

    def solver_kwargs(self):
        c = self.rnn_cfg
        backend = None if self.kernel_backend == "auto" else self.kernel_backend
        return dict(num_iters=c.num_iters, tol=c.tol, max_iters=c.max_iters, backend=backend, **self.solver_extra)


class ParaGRUMixer(ParaRNNMixer):
    cell = "paragru"

    def forward(self, x, doc_start=None):
        u = self.in_proj(x)  # [B, T, 3, D] in gate order (z, r, h)
        h, _, residual = paragru(u, self.recurrent, reset=doc_start, **self.solver_kwargs())
        self.last_residual = residual
        return self.out_proj(h)


class ParaLSTMMixer(ParaRNNMixer):
    cell = "paralstm"

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.peephole = nn.Parameter(torch.empty(2, self.hidden))  # p_f, p_o
        nn.init.uniform_(self.peephole, -0.1, 0.1)

    def forward(self, x, doc_start=None):
        u = self.in_proj(x)  # [B, T, 3, D] in gate order (f, c, o)
        h, _, residual = paralstm(u, self.recurrent, self.peephole, reset=doc_start, **self.solver_kwargs())
        self.last_residual = residual
        return self.out_proj(h)


class DeltaProductMixer(nn.Module):
    """Gated DeltaProduct: n_h Householder updates of a dk x dv state per head and token."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        c = cfg.deltaproduct
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
        self.recurrence = deltaproduct  # swapped for a sequence-parallel one by parallel plans
        self.kernel_backend = "auto"  # auto | torch | triton (train.kernel_backend)
        self.reset_mixer_parameters()

    def reset_mixer_parameters(self):
        if self.c.use_forget_gate:
            # As in Mamba2 / Gated DeltaNet: decay rates A in [1, 16], dt in [1e-3, 1e-1].
            self.A_log.data.uniform_(1.0, 16.0).log_()
            dt = torch.exp(torch.empty(self.H).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias.data.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(self, x, doc_start=None):
        B, T, _ = x.shape
        dk, dv, nh = self.dk, self.dv, self.nh
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        H = q.shape[-1] // dk  # the heads held here (all of them unless tensor-parallel)
        if self.c.use_short_conv:
            q, k, v = self.q_conv(q, doc_start), self.k_conv(k, doc_start), self.v_conv(v, doc_start)
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
        o, _ = self.recurrence(q, k, v, beta, g, reset=doc_start, chunk_size=self.c.chunk_size,
                               backend=self.kernel_backend)
        o = self.o_norm(o) * F.silu(self.g_proj(x).view(B, T, H, dv))
        return self.out_proj(o.reshape(B, T, H * dv))


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding on x [B, T, H, hd] (rotate-half convention)."""
    T, hd = x.shape[1], x.shape[-1]
    xf = fp32_at_least(x)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=xf.dtype) / hd))
    angles = torch.outer(torch.arange(T, device=x.device, dtype=xf.dtype), inv_freq)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class AttentionMixer(nn.Module):
    """Causal multi-head attention with RoPE; flash-attn on CUDA when installed, else SDPA."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.c = cfg.attention
        self.H = self.c.num_heads
        self.hd = cfg.d_model // self.H
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, doc_start=None):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, -1, self.hd).unbind(2)
        o = self.attend(q, k, v, doc_start if self.c.doc_mask else None)
        return self.out_proj(o.reshape(B, T, -1))

    def attend(self, q, k, v, doc_start=None):
        """Rotary embedding + causal attention on q, k, v [B, T, h, hd] (positions 0..T-1)."""
        T = q.shape[1]
        q, k = rotary(q, self.c.rope_theta), rotary(k, self.c.rope_theta)
        if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
            return self._flash(q, k, v, doc_start)
        mask = None
        if doc_start is not None:
            doc = document_ids(doc_start)
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            mask = (causal & (doc[:, :, None] == doc[:, None, :])).unsqueeze(1)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask, is_causal=mask is None).transpose(1, 2)

    @staticmethod
    def _flash(q, k, v, doc_start):
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


MIXER_CLASSES = {
    "paragru": ParaGRUMixer,
    "paralstm": ParaLSTMMixer,
    "deltaproduct": DeltaProductMixer,
    "attention": AttentionMixer,
}
