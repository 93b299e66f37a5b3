"""ParaRNN benchmark: parallel Newton solve vs the sequential loop, and linear-scan bandwidth.

    python -m bench.pararnn            # CUDA: the issue's sizes; CPU: a smaller default
    python -m bench.pararnn --quick    # a smoke-sized run (CPU: well under two minutes)
    python -m bench.pararnn --batch 8 --dim 1024 --seq 512 2048 8192 16384

On the current device (CUDA if available: the fused Triton kernels and the Triton scan; else the
torch reference), for ParaGRU and ParaLSTM with weights as the mixers initialise them
(a, p ~ U(-0.5, 0.5), u ~ N(0, 1), fp32, 3 Newton iterations, no tol): wall time of the parallel
solve and of the per-token loop (paragru_sequential / paralstm_sequential), forward and
forward+backward, and the speedup. For the scan, achieved bytes/s (A and b read, h written once)
against the device's copy bandwidth (a large tensor copy, read + write). Results go to
bench/results/pararnn.md, in a section per device kind that replaces the previous one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kernels.pararnn import paragru, paragru_sequential, paralstm, paralstm_sequential
from kernels.scan import linear_scan

RESULTS = Path(__file__).parent / "results" / "pararnn.md"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps, warmup):
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_inputs(cell, B, T, D, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.randn(B, T, 3, D, generator=g).to(device)
    a = torch.empty(3, D).uniform_(-0.5, 0.5, generator=g).to(device)
    p = torch.empty(2, D).uniform_(-0.5, 0.5, generator=g).to(device)
    return u, a, p


def solvers(cell):
    if cell == "paragru":
        return (lambda u, a, p: paragru(u, a)[0]), (lambda u, a, p: paragru_sequential(u, a)[0])
    return (lambda u, a, p: paralstm(u, a, p)[0]), (lambda u, a, p: paralstm_sequential(u, a, p)[0])


def bench_cell(cell, B, T, D, device, reps, warmup, skip_sequential_above):
    u, a, p = make_inputs(cell, B, T, D, device)
    parallel, sequential = solvers(cell)
    residual = (paragru(u, a) if cell == "paragru" else paralstm(u, a, p))[2].item()

    def fwd(solve):
        with torch.no_grad():
            solve(u, a, p)

    def fwd_bwd(solve):
        leaves = [x.detach().requires_grad_(True) for x in (u, a, p)]
        solve(*leaves).sum().backward()

    row = dict(cell=cell, T=T, residual=residual)
    row["par_fwd"] = timed(lambda: fwd(parallel), device, reps, warmup)
    row["par_fb"] = timed(lambda: fwd_bwd(parallel), device, reps, warmup)
    if T <= skip_sequential_above:
        # The loop has nothing to compile: one run each is a stable number at these lengths.
        row["seq_fwd"] = timed(lambda: fwd(sequential), device, 1, 0)
        row["seq_fb"] = timed(lambda: fwd_bwd(sequential), device, 1, 0)
    return row


def copy_bandwidth(device, nbytes):
    x = torch.empty(nbytes // 4, device=device)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), device, reps=5, warmup=1)
    return 2 * nbytes / t


def bench_scan(form, B, T, D, device, reps, warmup):
    g = torch.Generator(device="cpu").manual_seed(1)
    if form == "diag":
        A = torch.rand(B, T, D, generator=g).to(device)
        b = torch.randn(B, T, D, generator=g).to(device)
        floats = 3  # A, b read; h written
    else:
        A = (0.5 * torch.randn(B, T, D, 2, 2, generator=g)).to(device)
        b = torch.randn(B, T, D, 2, generator=g).to(device)
        floats = 8
    t = timed(lambda: linear_scan(A, b), device, reps, warmup)
    return t, floats * 4 * B * T * D / t


def machine(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, host {platform.node() or 'unknown'}"
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{model}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, "
            f"load average (1/5/15 min) at the end {load}: other work on a shared CPU inflates times")


def fmt_s(x):
    return "—" if x is None else (f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s")


def fmt_x(num, den):
    return "—" if num is None or den is None else f"{num / den:.1f}x"


def render(args, device, rows, scans, bandwidth):
    kind = "cuda" if device.type == "cuda" else "cpu"
    backend = "fused Triton kernels" if device.type == "cuda" else "torch reference"
    lines = [
        f"## {kind}",
        "",
        f"- command: `python -m bench.pararnn {' '.join(sys.argv[1:])}`".rstrip(),
        f"- machine: {machine(device)}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; torch {torch.__version__}",
        f"- parallel solve: {backend}, 3 Newton iterations, fp32; B={args.batch}, D={args.dim}; "
        f"median of {args.reps} (parallel), 1 run (sequential)",
        "",
        "| cell | T | parallel fwd | sequential fwd | speedup | parallel fwd+bwd | sequential fwd+bwd | speedup | residual |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s_f, s_fb = r.get("seq_fwd"), r.get("seq_fb")
        lines.append(f"| {r['cell']} | {r['T']} | {fmt_s(r['par_fwd'])} | {fmt_s(s_f)} | "
                     f"{fmt_x(s_f, r['par_fwd'])} | {fmt_s(r['par_fb'])} | {fmt_s(s_fb)} | "
                     f"{fmt_x(s_fb, r['par_fb'])} | {r['residual']:.1e} |")
    lines += ["", f"Linear scan (`linear_scan`, fp32, forward, B={args.batch}, D={args.dim}); device copy "
              f"bandwidth (read + write of a {args.copy_mib} MiB tensor): {bandwidth / 1e9:.1f} GB/s.", "",
              "| form | T | time | achieved | of copy bandwidth |", "|---|---|---|---|---|"]
    for form, T, t, bps in scans:
        lines.append(f"| {form} | {T} | {fmt_s(t)} | {bps / 1e9:.2f} GB/s | {100 * bps / bandwidth:.0f}% |")
    return "\n".join(lines) + "\n"


def write_section(section, kind):
    """Replace this device kind's section of the results file, keeping the others."""
    header = ("# ParaRNN benchmark\n\nWritten by `python -m bench.pararnn` (see its docstring for what "
              "is measured). One section per device kind; a run replaces its own section.\n\n")
    sections = {}
    if RESULTS.exists():
        text = RESULTS.read_text()
        for chunk in text.split("\n## ")[1:]:
            name = chunk.split("\n", 1)[0].strip()
            sections[name] = "## " + chunk.rstrip("\n") + "\n"
    sections[kind] = section
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(header + "\n".join(sections[k] for k in sorted(sections)))


def main(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--seq", type=int, nargs="+", default=None)
    parser.add_argument("--cells", nargs="+", default=["paragru", "paralstm"], choices=["paragru", "paralstm"])
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--skip-sequential-above", type=int, default=None,
                        help="skip the sequential loop for longer T (it is the slow side on a GPU)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--copy-mib", type=int, default=None)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    if args.quick:
        defaults = dict(batch=4, dim=128, seq=[256, 1024], reps=3, copy_mib=64)
    elif cuda:  # the sizes
        defaults = dict(batch=8, dim=1024, seq=[512, 2048, 8192, 16384], reps=5, copy_mib=1024)
    else:  # the B and D would take tens of minutes on a small CPU; the trend shows here
        defaults = dict(batch=8, dim=256, seq=[512, 2048], reps=3, copy_mib=256)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.skip_sequential_above is None:
        args.skip_sequential_above = 1 << 30
    warmup = 1  # CUDA: Triton compiles on the first call; CPU: allocator and caches settle

    rows = []
    for cell in args.cells:
        for T in args.seq:
            row = bench_cell(cell, args.batch, T, args.dim, device, args.reps, warmup, args.skip_sequential_above)
            print(f"{cell} T={T}: parallel fwd {fmt_s(row['par_fwd'])}, fwd+bwd {fmt_s(row['par_fb'])}; "
                  f"sequential fwd {fmt_s(row.get('seq_fwd'))}, fwd+bwd {fmt_s(row.get('seq_fb'))}; "
                  f"residual {row['residual']:.1e}", flush=True)
            rows.append(row)
    bandwidth = copy_bandwidth(device, args.copy_mib << 20)
    scans = []
    for form in ("diag", "block"):
        for T in args.seq:
            t, bps = bench_scan(form, args.batch, T, args.dim, device, max(args.reps, 3), warmup)
            scans.append((form, T, t, bps))
            print(f"scan {form} T={T}: {fmt_s(t)}, {bps / 1e9:.2f} GB/s", flush=True)
    section = render(args, device, rows, scans, bandwidth)
    print()
    print(section)
    if not args.no_write:
        write_section(section, "cuda" if cuda else "cpu")
        print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
