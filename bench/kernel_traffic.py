"""Global-memory bytes, dot FLOPs, programs and sequential steps of our Triton kernels, counted
under Triton's CPU interpreter at the 1B configs' per-layer shapes, against the minimum and
against flash-linear-attention's chunk_gated_delta_product.

    python -m bench.kernel_traffic                 # ~4 min on 2 cores; writes bench/results/kernel_traffic.md
    python -m bench.kernel_traffic --quick         # ~1 min: fewer heads, channels and tokens, same per-unit results
    python -m bench.kernel_traffic --ops deltaproduct --no-fla --no-write

What runs. The real dispatch functions, forced to Triton, on CPU tensors under
TRITON_INTERPRET=1 (set here before triton loads): kernels.deltaproduct.deltaproduct,
kernels.pararnn.paragru / paralstm (the fused Newton kernels; num_iters, tol, max_iters from the
config) and kernels.scan.linear_scan, forward and backward (the scan is forward-only), inside
kernels.triton_interpreter.count_traffic() and emulate_dot_precision("gpu"). Inputs are as the
layers pass them on a GPU: bf16 activations (q, k, v, u), fp32 β and g. fla runs in fp16 (same
bytes as bf16; the interpreter computes bf16 arithmetic on raw bits, see bench/fla_interpreter.py
for that and for how fla is set up as on an H200). Each run's output and gradients are checked
against the torch reference, so the counted run is a correct one. Whatever kernels/ holds when
this runs is what is measured.

Counted. Per call, from the interpreter: bytes read + written by every global load/store of
unmasked elements (what programs ask of memory, before L2), dot FLOPs by kind, programs, and
sequential steps (loop iterations of the longest program, summed over launches; see
kernels/triton_interpreter.py). Also the same bytes counted once per distinct address per launch:
what reaches HBM if L2 keeps everything a launch touched. The truth lies between the two: in the
state walks every dv block of a head reads the head's K and Wk chunk by chunk, in step with its
siblings (~2 MB per chunk step for all heads at the 1B shapes, against 50 MB of L2 on H100/H200),
so those re-reads are L2 hits; a re-read far apart in time is not. Separately, the bytes the torch
ops between the kernels move (cumsums, casts, pads, zero-fills: every non-view op reads its inputs
and writes its outputs).

Normalisation. Per token per layer (DeltaProduct) or per element = channel × token (ParaRNN,
scan). DeltaProduct is measured at --heads heads and scaled to the config's: every program
belongs to one (batch, head) and reads no other head's data, so bytes, FLOPs and programs are
linear in heads (the launch rule, which picks the state walks' dv block from the grid and the
SM count, is shown the layer's micro-batch x heads: bench.kernel_traffic.run_deltaproduct_ours). Likewise ParaRNN and the scan are measured at --channels channels (default 64;
the layer has 2048): their programs own blocks of channels and read no others, so bytes per
element do not depend on the channel count, and programs scale with it. (The interpreter runs
each program in Python: a full layer would take tens of minutes.) Counts per call are affine in T (per-chunk work, plus per-sequence work such
as states); two or more T give the line, and the table reports the value at the config's
seq_len (4096) from it; the measured per-T values are in the notes.

Minimum traffic, bytes per token per layer; s = activation bytes (bf16: 2), f = 4 (fp32 β, g):
  DeltaProduct, per head (the table multiplies by the layer's num_heads):
    fwd  = s·(dk + n_h·dk + n_h·dv) + f·(n_h + 1) + s·dv       q, k, v, β, g read once; o written once
    bwd  = s·(dk + n_h·dk + n_h·dv) + f·(n_h + 1) + s·dv        the same inputs and dO read once,
         + s·(dk + n_h·dk + n_h·dv) + f·(n_h + 1)               dq, dk, dv, dβ, dg written once
  ParaGRU, per element:   fwd = 3s + s   (u read, h written);   bwd = 3s + s + s + 3s (u, h, dh read; du written)
  ParaLSTM, per element:  fwd = 3s + 2s  (h written and c saved: c cannot be recovered from h
                          without a solve);                     bwd = 3s + 2s + s + 3s (u, c, h, dh; du)
  linear scan, fp32, per element: diagonal 3f (A, b read; h written); 2x2 blocks 8f (4f + 2f + 2f)
(recurrent weights, states of [B, H, dk, dv] per sequence and residuals are O(1/T) and left out).

Roofline. H200 SXM: 4.8 TB/s HBM; dense peaks bf16/fp16 989 TFLOP/s, TF32 494, IEEE fp32 on CUDA
cores 67. Time per layer for one micro-batch (config micro_batch_size × seq_len tokens) is at
least max(bytes / 4.8 TB/s, Σ_kind dot FLOPs / peak(kind)): a lower bound, since elementwise work
(exp, the ParaRNN cells) and latency are not counted.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, here or by kernels/
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from kernels.deltaproduct import deltaproduct  # noqa: E402
from kernels.pararnn import paragru, paralstm  # noqa: E402
from kernels.scan import linear_scan  # noqa: E402
from kernels.triton_interpreter import count_traffic, emulate_dot_precision  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "kernel_traffic.md"
HBM = 4.8e12
PEAK = {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "tf32x3": 494e12 / 3, "bf16x3": 989e12 / 3,
        "bf16x6": 989e12 / 6, "fp32": 67e12, "fp64": 67e12, "fp8": 1979e12, "int8": 1979e12}
S, F32 = 2, 4  # bytes of a bf16 activation, of fp32


# ---------------------------------------------------------------------------------------------
# Measuring one phase (a forward or a backward).


class TorchOpBytes(TorchDispatchMode):
    """Bytes moved by the torch ops outside Triton launches: a non-view op reads its tensor inputs
    and writes its outputs (an argument it mutates counts as written, not read); views and
    empty allocations move nothing. Broadcast inputs count at their full size (an upper bound)."""

    FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "detach", "alias",
            "lift_fresh", "_local_scalar_dense"}

    def __init__(self, counter):
        super().__init__()
        self.counter, self.bytes = counter, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.counter.in_launch or func.overloadpacket.__name__ in self.FREE:
            return out
        schema = func._schema
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return out  # a view
        moved = 0
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            moved += _nbytes(value)
        for r, value in zip(schema.returns, out if isinstance(out, (tuple, list)) else (out,)):
            if r.alias_info is None:  # a mutated argument returned as itself was counted once
                moved += _nbytes(value)
        self.bytes += moved
        return out


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return 0


@dataclasses.dataclass
class Phase:
    """What one forward or backward call moved and computed."""

    kernels: dict  # name -> KernelTraffic
    kernel_bytes: int
    torch_bytes: int
    unique_bytes: int  # kernels' bytes at distinct addresses per launch (an ideal L2)
    flops: dict  # kind -> dot FLOPs
    programs: int
    steps: int
    seconds: float


def measure(fn):
    """Run fn() counted; return (its result, Phase)."""
    with count_traffic() as counter, emulate_dot_precision("gpu"), TorchOpBytes(counter) as ops:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    total = counter.total()
    return out, Phase(dict(counter.kernels), total.bytes, ops.bytes, total.unique_bytes, dict(total.dot_flops_by_kind),
                      total.programs, total.steps, seconds)


def rel_err(x, ref) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# The cases. Each returns (forward Phase, backward Phase or None, accuracy note).


def deltaproduct_inputs(T, H, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    dk = dv = c["head_dim"]
    nh = c["num_householder"]
    q = F.normalize(torch.randn(1, T, H, dk, generator=g), dim=-1)
    k = F.normalize(torch.randn(1, T, nh, H, dk, generator=g), dim=-1)
    v = torch.randn(1, T, nh, H, dv, generator=g)
    beta = 2 * torch.sigmoid(torch.randn(1, T, nh, H, generator=g))  # β ∈ [0, 2]
    gate = -F.softplus(torch.randn(1, T, H, generator=g) - 2.0)
    do = torch.randn(1, T, H, dv, generator=g)
    return q, k, v, beta, gate, do


def deltaproduct_reference(q, k, v, beta, gate, do, chunk):
    leaves = [x.double().requires_grad_(True) for x in (q, k, v, beta, gate)]
    o, _ = deltaproduct(*leaves, chunk_size=chunk, backend="torch")
    return o.detach(), torch.autograd.grad(o, leaves, do.double())


def run_deltaproduct_ours(T, H, c, layer_bh):
    """One sequence of H heads; the launch rule sees the layer's grid (layer_bh = micro-batch x
    heads) on an H200's 132 SMs: its SM count is scaled by the measured share of that grid."""
    from kernels.deltaproduct_triton import _Launch

    q, k, v, beta, gate, do = deltaproduct_inputs(T, H, c)
    bf = [x.bfloat16() for x in (q, k, v)]
    leaves = [x.requires_grad_(True) for x in (*bf, beta.clone(), gate.clone())]
    saved, _Launch.SM_COUNT = _Launch.SM_COUNT, 132 * H / layer_bh
    try:
        o, fwd = measure(lambda: deltaproduct(*leaves, chunk_size=c["chunk_size"], backend="triton")[0])
        grads, bwd = measure(lambda: torch.autograd.grad(o, leaves, do.bfloat16()))
    finally:
        _Launch.SM_COUNT = saved
    o_ref, g_ref = deltaproduct_reference(*(x.detach() for x in leaves), do.bfloat16(), c["chunk_size"])
    note = (f"max error / max |ref| vs the fp64 torch reference on the same inputs: o {rel_err(o, o_ref):.1e}, "
            f"dq {rel_err(grads[0], g_ref[0]):.1e}, dk {rel_err(grads[1], g_ref[1]):.1e}, "
            f"dv {rel_err(grads[2], g_ref[2]):.1e}, dβ {rel_err(grads[3], g_ref[3]):.1e}, dg {rel_err(grads[4], g_ref[4]):.1e}")
    return fwd, bwd, note


def run_deltaproduct_fla(T, H, c, fla_fn):
    from bench.fla_interpreter import call_fla, fla_environment

    q, k, v, beta, gate, do = deltaproduct_inputs(T, H, c)
    leaves = [x.half().requires_grad_(True) for x in (q, k, v, beta)] + [gate.clone().requires_grad_(True)]
    with fla_environment(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o, fwd = measure(lambda: call_fla(fla_fn, *leaves))
        grads, bwd = measure(lambda: torch.autograd.grad(o, leaves, do.half()))
    o_ref, g_ref = deltaproduct_reference(*(x.detach() for x in leaves), do.half(), c["chunk_size"])
    note = (f"max error / max |ref| vs the fp64 torch reference on the same fp16 inputs: o {rel_err(o, o_ref):.1e}, "
            f"dq {rel_err(grads[0], g_ref[0]):.1e}, dk {rel_err(grads[1], g_ref[1]):.1e}, "
            f"dv {rel_err(grads[2], g_ref[2]):.1e}, dβ {rel_err(grads[3], g_ref[3]):.1e}, dg {rel_err(grads[4], g_ref[4]):.1e}")
    return fwd, bwd, note


def run_pararnn(cell, T, D, c):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, T, 3, D, generator=g).bfloat16()
    a = torch.empty(3, D).uniform_(-0.5, 0.5, generator=g)
    p = torch.empty(2, D).uniform_(-0.1, 0.1, generator=g)
    dh = torch.randn(1, T, D, generator=g).bfloat16()
    solve = dict(num_iters=c["num_iters"], tol=c["tol"], max_iters=c["max_iters"])
    params = (a,) if cell == "paragru" else (a, p)
    fn = paragru if cell == "paragru" else paralstm

    def run(backend, u_, params_):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a residual above tol is reported below, not warned
            return fn(u_, *params_, backend=backend, **solve)

    leaves = [u.clone().requires_grad_(True)] + [x.clone().requires_grad_(True) for x in params]
    (h, _, residual), fwd = measure(lambda: run("triton", leaves[0], leaves[1:]))
    grads, bwd = measure(lambda: torch.autograd.grad(h, leaves, dh))
    ref_leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    h_ref, _, _ = run("torch", ref_leaves[0], ref_leaves[1:])
    g_ref = torch.autograd.grad(h_ref, ref_leaves, dh)
    note = (f"Newton residual {float(residual):.1e} (tol {c['tol']}); max error / max |ref| vs the torch "
            f"solver: h {rel_err(h, h_ref):.1e}, du {rel_err(grads[0], g_ref[0]):.1e}, da {rel_err(grads[1], g_ref[1]):.1e}")
    return fwd, bwd, note


def run_scan(form, T, D):
    g = torch.Generator().manual_seed(0)
    if form == "diag":
        A = torch.empty(1, T, D).uniform_(0.9, 1.0, generator=g)
        b = torch.randn(1, T, D, generator=g)
    else:
        A = torch.empty(1, T, D, 2, 2).uniform_(-0.7, 0.7, generator=g)
        b = torch.randn(1, T, D, 2, generator=g)
    with torch.no_grad():
        h, fwd = measure(lambda: linear_scan(A, b, backend="triton"))
        ref = linear_scan(A, b, backend="torch")
    return fwd, None, f"max error / max |ref| vs the torch scan: {rel_err(h, ref):.1e}"


# ---------------------------------------------------------------------------------------------
# Minimum traffic and normalisation.


def deltaproduct_minimum(c):
    """(fwd, bwd) bytes per token of the whole layer (every head): read q, k, v (bf16), beta and g
    (fp32) once, write o once; backward reads them and dO again and writes their gradients."""
    H, dk = c["num_heads"], c["head_dim"]
    dv = int(dk * c.get("expand_v", 1.0))
    nh = c["num_householder"]
    inputs = H * (S * (dk + nh * dk + nh * dv) + F32 * (nh + 1))
    fwd = inputs + H * S * dv
    return fwd, fwd + inputs  # fwd; bwd = inputs + dO read, gradients written


MINIMUM_PER_ELEMENT = {  # (fwd, bwd) bytes per channel per token
    "paragru": (3 * S + S, 3 * S + S + S + 3 * S),
    "paralstm": (3 * S + 2 * S, 3 * S + 2 * S + S + 3 * S),
    "scan-diag": (3 * F32, None),
    "scan-2x2": (8 * F32, None),
}


@dataclasses.dataclass
class Case:
    op: str
    impl: str
    unit: str  # "token" (per token per layer) or "element" (per channel per token)
    units_per_T: float  # units per token of the full layer (1 token, or its channels)
    scale: float  # measured call -> the config's full layer (config heads or channels / measured)
    minimum: tuple  # (fwd, bwd) bytes per unit of the full layer
    per_token: int  # units per token of the full layer (1, or channels)
    phases: dict = dataclasses.field(default_factory=dict)  # T -> (fwd, bwd)
    notes: dict = dataclasses.field(default_factory=dict)  # T -> accuracy note
    skipped: str = ""


def fit_at(Ts, values, T):
    """Value at T of the line through (Ts, values) (least squares), and the largest residual."""
    if len(Ts) == 1:
        return values[0] * T / Ts[0], None
    slope, intercept = np.polyfit(np.array(Ts, float), np.array(values, float), 1)
    residual = max(abs(slope * t + intercept - v) / max(abs(v), 1) for t, v in zip(Ts, values))
    return slope * T + intercept, residual


def combine(fwd: Phase, bwd: Phase | None, with_bwd: bool):
    phases = [fwd] + ([bwd] if with_bwd and bwd is not None else [])
    flops = {}
    for p in phases:
        for kind, n in p.flops.items():
            flops[kind] = flops.get(kind, 0) + n
    return dict(kernel=sum(p.kernel_bytes for p in phases), torch=sum(p.torch_bytes for p in phases),
                unique=sum(p.unique_bytes for p in phases), flops=flops, programs=sum(p.programs for p in phases), steps=sum(p.steps for p in phases),
                seconds=sum(p.seconds for p in phases))


def summarise(case: Case, seq_len: int, tokens_per_batch: int):
    """Rows (dicts) for the main table: fwd and fwd+bwd at seq_len."""
    Ts = sorted(case.phases)
    rows = []
    for phase in ("fwd", "fwd+bwd"):
        with_bwd = phase == "fwd+bwd"
        if with_bwd and case.phases[Ts[0]][1] is None:
            continue
        per_T = [combine(*case.phases[T], with_bwd) for T in Ts]

        def per_unit(key, sub=None):
            vals = [(r[key] if sub is None else r[key].get(sub, 0)) * case.scale for r in per_T]
            at, res = fit_at(Ts, vals, seq_len)
            return at / (seq_len * case.units_per_T), res

        kernel, res_k = per_unit("kernel")
        torch_b, _ = per_unit("torch")
        unique, _ = per_unit("unique")
        kinds = sorted({k for r in per_T for k in r["flops"]})
        flops = {k: per_unit("flops", k)[0] for k in kinds}
        programs, _ = fit_at(Ts, [r["programs"] * case.scale for r in per_T], seq_len)
        steps, _ = fit_at(Ts, [r["steps"] for r in per_T], seq_len)
        minimum = case.minimum[0] + (case.minimum[1] if with_bwd else 0)
        total = kernel + torch_b
        layer_tokens = tokens_per_batch * case.per_token  # units in one micro-batch of one layer
        mem_s = total * layer_tokens / HBM
        dot_s = sum(n * layer_tokens / PEAK[k] for k, n in flops.items())
        rows.append(dict(op=case.op, impl=case.impl, phase=phase, unit=case.unit, kernel=kernel, torch=torch_b,
                         total=total, unique=unique, unique_total=unique + torch_b, minimum=minimum, flops=flops, programs=programs, steps=steps,
                         mem_us=mem_s * 1e6, dot_us=dot_s * 1e6, fit_residual=res_k,
                         measured={T: (r["kernel"] + r["torch"]) * case.scale / (T * case.units_per_T)
                                   for T, r in zip(Ts, per_T)}))
    return rows


# ---------------------------------------------------------------------------------------------
# Output.


def fmt_bytes(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_flops(flops: dict):
    total = sum(flops.values())
    if not total:
        return "0"
    kinds = ", ".join(f"{k} {n / total:.0%}" for k, n in sorted(flops.items(), key=lambda kv: -kv[1]))
    return f"{total / 1e6:,.2f} M ({kinds})" if total >= 1e6 else f"{total:,.0f} ({kinds})"


def main_table(rows):
    head = ("| op | impl | phase | unit | kernel B/unit | kernel B/unit, distinct per launch | torch-op B/unit | "
            "total B/unit | minimum | total/min | dot FLOP/unit | programs/call | seq. steps/call | "
            "H200 bound µs/layer (mem, dot) |\n"
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|")
    lines = [head]
    for r in rows:
        bound = max(r["mem_us"], r["dot_us"])
        lines.append(
            f"| {r['op']} | {r['impl']} | {r['phase']} | {r['unit']} | {fmt_bytes(r['kernel'])} | "
            f"{fmt_bytes(r['unique'])} | {fmt_bytes(r['torch'])} | {fmt_bytes(r['total'])} | {fmt_bytes(r['minimum'])} | "
            f"{r['total'] / r['minimum']:.1f}x | {fmt_flops(r['flops'])} | {r['programs']:,.0f} | {r['steps']:,.0f} | "
            f"**{bound:,.1f}** ({r['mem_us']:,.1f}, {r['dot_us']:,.1f}) |")
    return "\n".join(lines)


def kernel_table(case: Case):
    """Per kernel at the largest T measured, forward then backward, per unit of the full layer."""
    T = max(case.phases)
    lines = [f"| {case.op} {case.impl}, T={T} | phase | launches | programs | B/unit read | B/unit written | "
             f"B/unit read, distinct per launch | dot FLOP/unit | steps | max loads/program |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    units = T * case.units_per_T
    for phase, ph in zip(("fwd", "bwd"), case.phases[T]):
        if ph is None:
            continue
        for name, k in ph.kernels.items():
            lines.append(f"| {name} | {phase} | {k.launches} | {k.programs * case.scale:,.0f} | "
                         f"{fmt_bytes(k.bytes_read * case.scale / units)} | {fmt_bytes(k.bytes_written * case.scale / units)} | "
                         f"{fmt_bytes(k.unique_bytes_read * case.scale / units)} | "
                         f"{fmt_flops({kk: v * case.scale / units for kk, v in k.dot_flops_by_kind.items()})} | "
                         f"{k.steps} | {k.max_loads_per_program} |")
        lines.append(f"| (torch ops) | {phase} | | | {fmt_bytes(ph.torch_bytes * case.scale / units)} (read+written) | | | | | |")
    return "\n".join(lines)


def goals(rows):
    get = {(r["op"], r["impl"], r["phase"]): r for r in rows}
    out = []
    for phase in ("fwd", "fwd+bwd"):
        ours, fla = get.get(("deltaproduct", "ours", phase)), get.get(("deltaproduct", "fla", phase))
        if ours and fla:
            for key, what in (("total", "kernels + torch ops"), ("kernel", "kernels only"),
                              ("unique_total", "kernels at distinct addresses per launch + torch ops"),
                              ("unique", "kernels at distinct addresses per launch")):
                met = "met" if ours[key] <= fla[key] else "NOT met"
                out.append(f"- DeltaProduct bytes/token ≤ fla's ({phase}, {what}): **{met}** — ours "
                           f"{fmt_bytes(ours[key])} vs fla {fmt_bytes(fla[key])} B/token ({ours[key] / fla[key]:.2f}x)")
        elif ours:
            out.append(f"- DeltaProduct bytes/token ≤ fla's ({phase}): not measured (fla did not run)")
    gru = get.get(("paragru", "ours", "fwd"))
    if gru:
        met = "met" if gru["total"] <= 20 else "NOT met"
        out.append(f"- ParaGRU ≤ 20 B/element per solve (forward, kernels + torch ops): **{met}** — "
                   f"{fmt_bytes(gru['total'])} B/element ({fmt_bytes(gru['kernel'])} in the kernel)")
    return "\n".join(out)


def kernels_version():
    """The commit measured, and kernels/ files that differ from it (others may be mid-change)."""
    import subprocess

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.rstrip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "kernels").splitlines()]
    return commit + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import triton

    return f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__}, triton {triton.__version__} (interpreter), python {platform.python_version()}"


# ---------------------------------------------------------------------------------------------


OPS = ("deltaproduct", "paragru", "paralstm", "scan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 heads, 32 channels, T in {128, 256}")
    p.add_argument("--seq-lens", type=int, nargs="+", help="T values to measure (default 256 512; quick 128 256)")
    p.add_argument("--heads", type=int, help="DeltaProduct heads to measure (default 4; quick 2)")
    p.add_argument("--channels", type=int, help="ParaRNN / scan channels to measure (default 64; quick 32)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("bench.kernel_traffic: needs TRITON_INTERPRET=1 (unset it or set it to 1; it is set by default)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    cfg = {name: yaml.safe_load((ROOT / "configs" / f"{name}-1b.yaml").read_text())
           for name in ("deltaproduct", "pararnn-gru", "pararnn-lstm")}
    dp = cfg["deltaproduct"]["model"]["deltaproduct"]
    seq_len = cfg["deltaproduct"]["data"]["seq_len"]
    tokens_per_batch = cfg["deltaproduct"]["train"]["micro_batch_size"] * seq_len
    layer_bh = cfg["deltaproduct"]["train"]["micro_batch_size"] * dp["num_heads"]  # the layer's B·H
    Ts = args.seq_lens or ([128, 256] if args.quick else [256, 512])
    H = args.heads or (2 if args.quick else 4)
    gru_c, lstm_c = cfg["pararnn-gru"]["model"]["paragru"], cfg["pararnn-lstm"]["model"]["paralstm"]
    D_layer = int(cfg["pararnn-gru"]["model"]["d_model"] * gru_c["expand"])
    D = args.channels or (32 if args.quick else 64)

    dp_min = deltaproduct_minimum(dp)
    scale_h = dp["num_heads"] / H
    cases = []
    if "deltaproduct" in args.ops:
        cases.append(Case("deltaproduct", "ours", "token", 1, scale_h, dp_min, 1))
        if not args.no_fla:
            from bench.fla_interpreter import load_chunk_gated_delta_product

            fla_fn, why = load_chunk_gated_delta_product()
            cases.append(Case("deltaproduct", "fla", "token", 1, scale_h, dp_min, 1, skipped=why or ""))
    for op in ("paragru", "paralstm"):
        if op in args.ops:
            cases.append(Case(op, "ours", "element", D_layer, D_layer / D, MINIMUM_PER_ELEMENT[op], D_layer))
    if "scan" in args.ops:
        for form in ("scan-diag", "scan-2x2"):
            cases.append(Case(form, "ours", "element", D_layer, D_layer / D, MINIMUM_PER_ELEMENT[form], D_layer))

    started = time.perf_counter()
    for case in cases:
        if case.skipped:
            print(f"{case.op} {case.impl}: skipped: {case.skipped}", flush=True)
            continue
        for T in Ts:
            if case.op == "deltaproduct":
                fwd, bwd, note = (run_deltaproduct_ours(T, H, dp, layer_bh) if case.impl == "ours"
                                  else run_deltaproduct_fla(T, H, dp, fla_fn))
            elif case.op in ("paragru", "paralstm"):
                fwd, bwd, note = run_pararnn(case.op, T, D, gru_c if case.op == "paragru" else lstm_c)
            else:
                fwd, bwd, note = run_scan(case.op.split("-")[1], T, D)
            case.phases[T], case.notes[T] = (fwd, bwd), note
            took = fwd.seconds + (bwd.seconds if bwd else 0)
            print(f"{case.op} {case.impl} T={T}: {took:.0f} s interpreted; {note}", flush=True)

    rows = [r for case in cases if case.phases for r in summarise(case, seq_len, tokens_per_batch)]
    table = main_table(rows)
    print(table)
    goal_lines = goals(rows)
    print(goal_lines)
    if args.no_write:
        return
    cmd = "python -m bench.kernel_traffic " + " ".join(sys.argv[1:] if argv is None else argv)
    setting = (f"DeltaProduct: measured at {H} of {dp['num_heads']} heads (scaled), head_dim {dp['head_dim']}, "
               f"n_h={dp['num_householder']}, chunk {dp['chunk_size']}, gate on, β ∈ [0, 2], B=1; "
               f"ParaGRU/ParaLSTM: {D} channels (layer: {D_layer}), num_iters={gru_c['num_iters']}, tol={gru_c['tol']}, "
               f"max_iters={gru_c['max_iters']}, u ~ N(0,1) bf16, a ~ U(-0.5, 0.5); scan: fp32, {D} channels; "
               f"T measured: {', '.join(map(str, Ts))}; reported at T={seq_len} from the fit; H200 bound per micro-batch of "
               f"{tokens_per_batch:,} tokens")
    notes = []
    for case in cases:
        if case.skipped:
            notes.append(f"- {case.op} {case.impl}: not run: {case.skipped}")
            continue
        for T in sorted(case.notes):
            notes.append(f"- {case.op} {case.impl}, T={T}: {case.notes[T]}")
    for r in rows:
        measured = ", ".join(f"T={T}: {fmt_bytes(v)}" for T, v in r["measured"].items())
        res = "" if r["fit_residual"] is None else f" (fit residual {r['fit_residual']:.1e})"
        notes.append(f"- {r['op']} {r['impl']} {r['phase']}: total B/{r['unit']} measured {measured}{res}")
    text = (f"# Kernel traffic under the Triton interpreter\n\nWritten by `python -m bench.kernel_traffic` "
            f"(see its docstring for what is counted, the minimum formulas and the roofline). A run replaces this file.\n\n"
            f"- command: `{cmd.strip()}`\n- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
            f"- kernels: commit {kernels_version()}\n- machine: {machine()}; run took {time.perf_counter() - started:.0f} s\n- setting: {setting}\n\n"
            f"Units: `token` = per token per layer; `element` = per channel per token. Bytes are what the programs "
            f"load and store (unmasked elements, before caches) plus the torch ops between kernels; the distinct-address "
            f"column counts each address once per launch (what reaches HBM if L2 keeps what a launch touched: "
            f"a lower bound, the loads column an upper one). programs/call "
            f"and seq. steps/call are for one sequence of {seq_len} tokens (B=1).\n\n{table}\n\n## Goals\n\n{goal_lines}\n\n"
            f"## Per kernel\n\n" + "\n\n".join(kernel_table(c) for c in cases if c.phases) +
            "\n\n## Notes\n\n" + "\n".join(notes) + "\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
