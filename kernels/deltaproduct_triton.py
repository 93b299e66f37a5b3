"""Gated DeltaProduct in Triton: chunkwise WY/UT forward and backward, state in/out, resets.

Same math, shapes and conventions as kernels/deltaproduct.py (read its docstrings first): the n_h
Householder sub-steps of each token are interleaved into L = T·n_h sub-steps, cut into chunks of
C sub-steps (C ∈ {16, 32, 64}); the gate and the reset of a token act at its first sub-step, its
query is read at its last. The kernels (kernels/deltaproduct_triton_fwd.py, _bwd.py give the
equations) follow flash-linear-attention's chunk_gated_delta_rule / chunk_gated_delta_product:

  forward   wy_fwd (A, the blocked inverse Tm = (I+A)^{-1}, U, Wk)  ->  state_fwd (the chunk
            walk: each chunk's start state S_c and W = U - Wk S_c)  ->  output_fwd (O at the
            query rows only: ⌈C/n_h⌉ rows per chunk, not C)
  backward  dv_local -> state_bwd (the reverse walk: dS per chunk, dW, d initial state)
            -> dq (dq; dk's output and state parts, dWk, dγ parts; fp32 inputs: the state parts
            in dkw) -> wy_bwd (through the saved Tm: dk, dv, dβ, dγ)

The forward saves Tm, Wk, W and the chunk start states for the backward, which recomputes
nothing: per sub-step and head C + dk + dv numbers, and dk·dv per chunk, in the storage dtype, on
top of the inputs (bf16 at dk = dv = 128, C = 64: 1.1 KB per sub-step and head).

Storage and dot precision (the GPU's numerics are tested under an emulation of tensor-core
operand rounding, tests/test_deltaproduct_triton.py):
  - 16-bit inputs: Tm, U, Wk, W, the chunk states, dW, dWk, dS per chunk in the inputs' dtype;
    the state walks carry S and dS in fp32 and round them to 16 bits only as a dot operand, as
    flash-linear-attention does. Every dot has 16-bit operands (exact products, fp32
    accumulation), but the inverse's merges (fp32 in TF32; Tm is rounded to 16 bits after).
    Partial gradients (dk's parts, dγ) stay fp32. Normwise error at head_dim 128: 3-7e-3, about
    what the inputs' own bf16 rounding does (~3e-3).
  - fp32 inputs: fp32 storage and every dot with input_precision "tf32x3" (three TF32
    tensor-core passes: ~2e-7 normwise at head_dim 128). Plain TF32 (10 mantissa bits) costs
    1-2e-3 on o and every gradient, wherever it is used (the recurrent state walk alone or the
    chunk-local dots alone), too much for fp32 inputs. tf32x3 triples the operand registers, so
    fp32 inputs run chunks of at most 32 sub-steps (FP32_MAX_CHUNK): same result up to rounding.

Launch rules (no autotuning that runs kernels): chunk-parallel kernels run one program per
(chunk, batch·head) (dq: per dk block too) with the dk/dv blocks of _Launch.HALF_BLOCKS /
FP32_BLOCKS, 4 warps; the two state walks run one program per (batch·head, dv block), the state
in 64-row pieces, the dv block the widest the registers hold (state_dv_block: 64 at dk <= 128,
32 at dk = 256, fp32 inputs 16), narrowed only where fewer than a quarter of the SMs (132 on
H100/H200, the device's count on CUDA) would have a program: 1B (B=2, H=16) and 7B (B=1, H=32)
launch 64 programs of 64 columns, as flash-linear-attention does at these shapes, each loading
a chunk's K and Wk once per step. Every kernel compiles for sm_80 and sm_90 without register
spills at head_dim 16..256 for 16-bit inputs and 16..128 for fp32 inputs (checked with
kernels.offline_compile; bench/gpu_compile.py at the shipped configs); above 128 the fp32
state walks spill 16-64 B per thread (tf32x3 operands; no shipped config runs them).
"""

import os

import torch
import triton

from kernels.deltaproduct_triton_bwd import (dkw_kernel, dq_kernel, dv_local_kernel,
                                             state_bwd_kernel, wy_bwd_kernel)
from kernels.deltaproduct_triton_fwd import (output_fwd_kernel, set_interpreter_bf16_upcast,
                                             state_fwd_kernel, wy_fwd_kernel)

__all__ = ["deltaproduct_triton", "CHUNK_SIZES", "MAX_DK"]

CHUNK_SIZES = (16, 32, 64)  # the blocked inverse merges 1, 2 or 4 blocks of 16
MAX_DK = 256
# fp32 state elements one state-walk program holds (4 warps: 64 registers a thread), see
# state_dv_block.
STATE_ELEMS = 8192


def _pow2(n):
    return max(16, triton.next_power_of_2(n))


def _sm_count(device) -> int:
    """Streaming multiprocessors of the device the kernels run on; 132 (H100/H200) off-GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def state_dv_block(BH, dk, dv, half, sms):
    """BV, the dv block of one state-walk program (programs: BH · ⌈dv/BV⌉).

    Each step of a walk loads its chunk's K and Wk (and Q in the backward), C×dk each, whatever
    the program's dv block: a head split into dv/BV blocks reads them dv/BV times (at BV = 16 and
    dk = dv = 128 that was 8x, 55% of the forward's bytes per token). So the block is the widest
    the registers hold without spilling on sm_80/sm_90 (kernels.offline_compile): a state of at
    most STATE_ELEMS fp32 per program (2 pieces of 64×64 at dk ≤ 128: BV = 64; 4 of 64×32 at
    dk = 256: BV = 32), 16 for fp32 inputs (tf32x3 triples the dot operands). That leaves SMs
    idle when B·H is small (1B/7B, B·H = 32: 64 programs on 132 SMs, as flash-linear-attention's
    64-wide blocks): narrower blocks would each still load the step's whole K and Wk, only
    splitting its dots. Only when fewer than a quarter of the SMs would have a program (B·H·dv/BV <
    SMs/4) is the block halved (down to 16), spreading a short walk's dots over idle SMs."""
    bv = min(_pow2(dv), 16 if not half else max(16, STATE_ELEMS // (64 * triton.cdiv(dk, 64))))
    bv = 1 << (bv.bit_length() - 1)  # a power of two
    while bv > 16 and 4 * BH * triton.cdiv(dv, bv) < sms:
        bv //= 2
    return bv


def state_block_of(q, k, v):
    """The state walks' dv block a call with these q, k, v launches (the self-check runs its
    slice, of one batch row, with the block of the call it vouches for)."""
    B, _, _, H, dk = k.shape
    sms = _sm_count(q.device) if _Launch.SM_COUNT is None else _Launch.SM_COUNT
    return state_dv_block(B * H, dk, v.shape[-1], q.dtype in (torch.bfloat16, torch.float16), sms)


class _Launch:
    """Sizes, block shapes, dtypes and launch parameters of one call."""

    # The device's SM count for the state walks' launch rule (None: the device's own, 132
    # off-GPU); bench/kernel_traffic.py sets it to measure a slice of a layer's heads at the
    # layer's launch.
    SM_COUNT = None

    # Dot input precision for fp32 inputs (16-bit operands ignore it); tests override it to show
    # what plain TF32 would cost.
    FP32_PRECISION = "tf32x3"  # the chunk-parallel kernels' dots
    FP32_STATE_PRECISION = "tf32x3"  # the state walks' dots (S and dS couple across chunks)
    # fp32 inputs run chunks of at most this many sub-steps: tf32x3 holds each fp32 operand in
    # three parts, and C×C = 64×64 tiles then spill on sm_80 and sm_90 (the result is the same
    # up to rounding; tests raise it to 64 to check the configs' chunk exactly).
    FP32_MAX_CHUNK = 32

    # (BK, BV, num_warps, num_stages) per kernel: the dk / dv block of its loops (the state walks'
    # BK is the state's row block, their BV comes from state_dv_block), chosen with
    # kernels.offline_compile so that every kernel compiles for sm_80 and sm_90 at head_dim
    # 48..256 with no register spill. 4 warps throughout: tiles are 64 rows (the chunk) and
    # Triton puts every warp of a dot chain on the rows, so 8 warps would only replicate them.
    HALF_BLOCKS = dict(wy_fwd=(64, 64, 4, 2), output_fwd=(64, 128, 4, 2), dv_local=(64, 64, 4, 2),
                       dq=(32, 32, 4, 2), dkw=(32, 32, 4, 2), wy_bwd=(16, 32, 4, 2))
    FP32_BLOCKS = dict(wy_fwd=(32, 32, 4, 2), output_fwd=(32, 32, 4, 2), dv_local=(64, 64, 4, 2),
                       dq=(16, 32, 4, 2), dkw=(16, 32, 4, 2), wy_bwd=(16, 16, 4, 2))

    def __init__(self, k, v, C, device, state_block=None):
        self.B, self.T, self.n_h, self.H, self.dk = k.shape
        self.dv = v.shape[-1]
        self.C = C
        self.L = self.T * self.n_h
        self.NC = -(-self.L // C)
        self.Lp = self.NC * C
        self.BH = self.B * self.H
        # Query rows per chunk: the tokens whose last sub-step falls in it, at most ⌈C / n_h⌉.
        self.R = _pow2(-(-C // self.n_h))
        self.half = half = k.dtype in (torch.bfloat16, torch.float16)
        BKF, BVF = _pow2(self.dk), _pow2(self.dv)

        # State walks: one program per (batch·head, dv block), the state in fp32 registers as
        # NS = ⌈dk/64⌉ pieces of 64 rows × BV columns (state_dv_block gives BV).
        sk = min(BKF, 64)
        sms = _sm_count(device) if self.SM_COUNT is None else self.SM_COUNT
        bv = state_block or state_dv_block(self.BH, self.dk, self.dv, half, sms)
        self.BVS = bv
        self.NVS = triton.cdiv(self.dv, bv)
        # 16-bit forward: 2 stages, the next chunk's K, Wk and U loaded during this chunk's dots;
        # the backward's spills on sm_80 at dk = dv = 128 (and fp32's tf32x3 operands fill the
        # registers): 1 stage.
        self.blocks = dict(state_fwd=(sk, bv, 4, 2 if half else 1), state_bwd=(sk, bv, 4, 1))
        for name, (kb, vb, w, st) in (self.HALF_BLOCKS if half else self.FP32_BLOCKS).items():
            self.blocks[name] = (min(kb, BKF), min(vb, BVF), w, st)
        # dq_kernel and dkw_kernel each write one γ-gradient part per dk block: one block size.
        assert self.blocks["dq"][0] == self.blocks["dkw"][0]
        self.NK = triton.cdiv(self.dk, self.blocks["dq"][0])

        # 16-bit inputs: Tm, U, Wk, W, the chunk states and their gradients in the inputs' dtype,
        # 16-bit dot operands; the inverse's merges in TF32, rounded to 16 bits afterwards.
        # fp32 inputs: fp32 everywhere, tf32x3.
        self.store_dtype = k.dtype if half else torch.float32
        self.inv_prec = "tf32" if half else self.FP32_PRECISION
        self.common = dict(H=self.H, DK=self.dk, DV=self.dv, C=C, PREC=self.FP32_PRECISION)
        self.state_common = dict(self.common, PREC=self.FP32_STATE_PRECISION)

    def launch(self, name):
        kb, vb, w, st = self.blocks[name]
        return dict(BK=kb, BV=vb, num_warps=w, num_stages=st)


def _gate_and_segments(g, reset, B, T, n_h, H, C, device):
    """γ [B·H, Lp] fp32 (chunk-local cumsum of the sub-step gates) and seg [B, Lp] int32."""
    L = T * n_h
    NC = -(-L // C)
    Lp = NC * C
    if g is None:
        gamma = torch.zeros(B * H, Lp, dtype=torch.float32, device=device)
    else:
        g_sub = torch.zeros(B, T, n_h, H, dtype=torch.float32, device=device)
        g_sub[:, :, 0] = g.float()
        g_sub = torch.nn.functional.pad(g_sub.reshape(B, L, H), (0, 0, 0, Lp - L))
        gamma = g_sub.view(B, NC, C, H).cumsum(2).permute(0, 3, 1, 2).reshape(B * H, Lp)
        gamma = gamma.contiguous()
    if reset is None:
        seg = torch.zeros(B, Lp, dtype=torch.int32, device=device)
    else:
        r_sub = torch.zeros(B, T, n_h, dtype=torch.int32, device=device)
        r_sub[:, :, 0] = reset.to(torch.int32)
        r_sub = torch.nn.functional.pad(r_sub.reshape(B, L), (0, Lp - L))
        seg = r_sub.view(B, NC, C).cumsum(2, dtype=torch.int32).reshape(B, Lp).contiguous()
    return gamma, seg


def _forward(q, k, v, beta, gamma, seg, initial_state, scale, lc):
    dev = k.device
    BH, Lp, NC, C = lc.BH, lc.Lp, lc.NC, lc.C
    sd = dict(dtype=lc.store_dtype, device=dev)
    Tm = torch.empty(BH, Lp, C, **sd)
    # the inverse's diagonal 16×16 blocks pass through this
    scratch = torch.empty(BH, Lp, 16, dtype=torch.float32, device=dev)
    U = torch.empty(BH, Lp, lc.dv, **sd)
    Wk = torch.empty(BH, Lp, lc.dk, **sd)
    wy_fwd_kernel[(NC, BH)](k, v, beta, gamma, seg, scratch, Tm, U, Wk, lc.L, Lp,
                            TM_PREC=lc.FP32_PRECISION, INV_PREC=lc.inv_prec,
                            **lc.launch("wy_fwd"), **lc.common)
    S_start = torch.empty(BH, NC, lc.dk, lc.dv, dtype=lc.store_dtype, device=dev)
    W = torch.empty(BH, Lp, lc.dv, **sd)
    final = torch.empty(lc.B, lc.H, lc.dk, lc.dv, dtype=torch.float32, device=dev)
    has_init = initial_state is not None
    state_fwd_kernel[(BH, lc.NVS)](
        k, U, Wk, gamma, seg, initial_state if has_init else final, S_start, W, final,
        lc.L, Lp, NC, HAS_INIT=has_init, **lc.launch("state_fwd"), **lc.state_common)
    o = torch.empty(lc.B, lc.T, lc.H, lc.dv, dtype=q.dtype, device=dev)
    output_fwd_kernel[(NC, BH, triton.cdiv(lc.dv, lc.blocks["output_fwd"][1]))](
        q, k, gamma, seg, S_start, W, o, scale, lc.T, lc.L, Lp, NC, NH=lc.n_h, R=lc.R,
        **lc.launch("output_fwd"), **lc.common)
    return o, final, Tm, Wk, W, S_start


def _backward(q, k, v, beta, gamma, seg, Tm, Wk, W, S_start, do, dfinal, scale, lc):
    dev = k.device
    BH, Lp, NC = lc.BH, lc.Lp, lc.NC
    f32 = dict(dtype=torch.float32, device=dev)
    sd = dict(dtype=lc.store_dtype, device=dev)
    dWl = torch.empty(BH, Lp, lc.dv, **sd)
    dv_local_kernel[(NC, BH)](q, k, gamma, seg, do, dWl, scale, lc.T, lc.L, Lp, NH=lc.n_h, R=lc.R,
                              **lc.launch("dv_local"), **lc.common)
    dS_end = torch.empty(BH, NC, lc.dk, lc.dv, dtype=lc.store_dtype, device=dev)
    dW = torch.empty(BH, Lp, lc.dv, **sd)
    ds0 = torch.empty(lc.B, lc.H, lc.dk, lc.dv, **f32)
    has_dfinal = dfinal is not None
    state_bwd_kernel[(BH, lc.NVS)](
        q, k, Wk, gamma, seg, do, dWl, dfinal if has_dfinal else ds0, dS_end, dW, ds0, scale,
        lc.T, lc.L, Lp, NC, NH=lc.n_h, R=lc.R, HAS_DFINAL=has_dfinal, **lc.launch("state_bwd"),
        **lc.state_common)
    dq = torch.empty(lc.B, lc.T, lc.H, lc.dk, dtype=q.dtype, device=dev)  # every row is a query
    dKo = torch.empty(BH, Lp, lc.dk, **f32)
    dWk = torch.empty(BH, Lp, lc.dk, **sd)
    split = not lc.half  # fp32: the state part in its own kernel (registers)
    dgp = torch.empty(2 if split else 1, lc.NK, BH, Lp, **f32)
    dq_kernel[(lc.NK, NC, BH)](
        q, k, gamma, seg, do, S_start, W, dS_end, dW, dq, dKo, dWk, dgp[0], scale, lc.T, lc.L, Lp,
        NC, BH * Lp, NH=lc.n_h, R=lc.R, STATE=not split, **lc.launch("dq"), **lc.common)
    dKs = torch.empty(BH, Lp, lc.dk, **f32) if split else dKo
    if split:
        dkw_kernel[(lc.NK, NC, BH)](
            k, gamma, seg, S_start, dS_end, W, dW, dKs, dWk, dgp[1], lc.L, Lp, NC, BH * Lp,
            **lc.launch("dkw"), **lc.common)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    dgamma = torch.empty(BH, Lp, **f32)
    wy_bwd_kernel[(NC, BH)](
        k, v, beta, gamma, seg, Tm, dW, dWk, dKo, dKs, dgp, dk, dv, dbeta, dgamma, lc.L, Lp, BH * Lp,
        NGP=dgp.shape[0] * lc.NK, SPLIT=split, TM_PREC=lc.FP32_PRECISION, **lc.launch("wy_bwd"),
        **lc.common)
    return dq, dk, dv, dbeta, dgamma, ds0


class DeltaProductTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, reset, scale, chunk_size, state_block):
        dtypes = (q.dtype, k.dtype, v.dtype)
        q = q.contiguous()
        k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
        beta = beta.contiguous()
        s0 = initial_state.contiguous() if initial_state is not None else None
        if q.dtype == torch.float32:
            chunk_size = min(chunk_size, _Launch.FP32_MAX_CHUNK)
        if os.environ.get("TRITON_INTERPRET") == "1":
            set_interpreter_bf16_upcast()
        lc = _Launch(k, v, chunk_size, q.device, state_block)
        gamma, seg = _gate_and_segments(g, reset, lc.B, lc.T, lc.n_h, lc.H, chunk_size, k.device)
        o, final, Tm, Wk, W, S_start = _forward(q, k, v, beta, gamma, seg, s0, scale, lc)
        ctx.save_for_backward(q, k, v, beta, gamma, seg, Tm, Wk, W, S_start)
        ctx.meta = (scale, chunk_size, dtypes, g is not None, g.dtype if g is not None else None,
                    initial_state.dtype if initial_state is not None else None, lc.BVS)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, beta, gamma, seg, Tm, Wk, W, S_start = ctx.saved_tensors
        scale, C, dtypes, has_g, g_dtype, s0_dtype, state_block = ctx.meta
        lc = _Launch(k, v, C, q.device, state_block)
        if os.environ.get("TRITON_INTERPRET") == "1":
            set_interpreter_bf16_upcast()
        if do is None:
            do = torch.zeros(lc.B, lc.T, lc.H, lc.dv, dtype=q.dtype, device=q.device)
        do = do.to(q.dtype).contiguous()
        dfinal = dfinal.float().contiguous() if dfinal is not None else None
        dq, dk, dv, dbeta, dgamma, ds0 = _backward(q, k, v, beta, gamma, seg, Tm, Wk, W, S_start,
                                                   do, dfinal, scale, lc)
        dg = None
        if has_g:
            # γ = chunk-local cumsum of the sub-step gates -> dg_sub = chunk-local reverse cumsum,
            # read at each token's first sub-step (where its gate acts).
            B, H, T, n_h, NC = lc.B, lc.H, lc.T, lc.n_h, lc.NC
            dg_sub = dgamma.view(B, H, NC, C).flip(-1).cumsum(-1).flip(-1).reshape(B, H, lc.Lp)
            dg = dg_sub[:, :, :lc.L].reshape(B, H, T, n_h)[..., 0].transpose(1, 2).to(g_dtype)
        ds0 = ds0.to(s0_dtype) if s0_dtype is not None else None
        return (dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2]), dbeta, dg, ds0, None, None,
                None, None)


def deltaproduct_triton(q, k, v, beta, g=None, scale=None, initial_state=None, reset=None,
                        chunk_size=64, state_block=None):
    """Gated DeltaProduct through the Triton kernels; same contract as deltaproduct_chunkwise.

    Shapes are checked by the caller (kernels.deltaproduct.deltaproduct). state_block: the state
    walks' dv block (None: the launch rule, state_dv_block). Returns (o [B,T,H,dv] in q's dtype,
    final_state [B,H,dk,dv] fp32).
    """
    dk, dv = k.shape[-1], v.shape[-1]
    # The state walks hold the state in at most four blocks of 64 rows: dk <= 256.
    if chunk_size not in CHUNK_SIZES or not 16 <= dk <= MAX_DK or dv < 16:
        raise ValueError(
            f"the Triton DeltaProduct needs chunk_size in {CHUNK_SIZES}, 16 <= dk <= {MAX_DK} and "
            f"dv >= 16; got chunk_size={chunk_size}, dk={dk}, dv={dv}")
    scale = dk**-0.5 if scale is None else float(scale)
    return DeltaProductTritonFunction.apply(q, k, v, beta, g, initial_state, reset, scale,
                                            chunk_size, state_block)
