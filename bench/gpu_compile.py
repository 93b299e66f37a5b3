"""Offline GPU check: compile every Triton kernel for sm_80 and sm_90 at the shipped configs' shapes.

    python -m bench.gpu_compile [--configs configs/a.yaml ...] [--targets sm_90 sm_80]
                                [--dtypes bf16 fp32] [--out bench/results/gpu_compile.md]

No GPU is needed. For each config, each recurrent mixer it uses (paragru, paralstm, deltaproduct)
is driven forward and backward through the real dispatch code (kernels.pararnn.paragru/paralstm,
kernels.deltaproduct.deltaproduct, kernels.scan.linear_scan for the sequence-parallel path) with
`backend="triton"` on CPU tensors of one layer's shapes on one rank (micro-batch x seq_len / sp,
heads and channels / tp, document resets on as in training), inside
kernels.offline_compile.compile_only(target): every launch is compiled by Triton for the target and
its shared memory, registers and spills recorded, nothing is run. Activations are bf16 (as in
training with bf16 on GPU) or fp32; beta, g and the ParaRNN state are fp32, as the mixers pass them.

A launch fails the check when its shared memory exceeds the target's per-block limit, when its
registers x threads exceed the register file, or when it spills more than SPILL_BUDGET bytes per
thread for its activation dtype (SPILL_BUDGET). Exit code 1 and the offending rows when any fails. The table is
printed and written to --out (default: nothing written).

Must run without TRITON_INTERPRET=1 (tests/test_gpu_compile.py runs it in a subprocess).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

# Register spills allowed, bytes per thread, by activation dtype: none. Every kernel at every shipped
# config compiles without spilling for sm_80 and sm_90, bf16 (what training runs on a GPU) and fp32
# (the exact-math path: tf32x3 dots) alike; a spill is a regression the compile test must catch.
SPILL_BUDGET = {"bf16": 0, "fp32": 0}
DEFAULT_CONFIGS = sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass
class Row:
    config: str
    mixer: str
    shape: str
    dtype: str
    target: str
    kernel: str
    programs: int
    num_warps: int
    num_stages: int
    shared: int
    registers: int
    spills: int
    problems: list


def layer_shapes(cfg):
    """{mixer: dict of one layer's per-rank sizes} for the mixers of a config that run a Triton
    kernel family (their registry entry's `kernel`), with "kernel" naming it."""
    from pretrain.registry import MIXERS

    m, tp, sp = cfg.model, cfg.parallel.tp, cfg.parallel.sp
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len // sp
    mixers = [m.mixers] if isinstance(m.mixers, str) else list(m.mixers)
    out = {}
    for name in dict.fromkeys(mixers):
        spec = MIXERS[name]
        c = spec.section_of(m)
        if spec.kernel == "pararnn":
            out[name] = dict(kernel=spec.module.cell, B=B, T=T, D=int(c.expand * m.d_model) // tp, tol=c.tol,
                             num_iters=c.num_iters, max_iters=c.max_iters)
        elif spec.kernel == "deltaproduct":
            out[name] = dict(kernel="deltaproduct", B=B, T=T, H=c.num_heads // tp, dk=c.head_dim,
                             dv=int(c.head_dim * c.expand_v), nh=c.num_householder, C=c.chunk_size)
    return out


def _resets(B, T):
    """Document starts as the loader makes them: position 0 and a few inside the sequence."""
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = True
    reset[:, T // 3] = True
    return reset


def _any(*shape, dtype=torch.float32, grad=False):
    """An input of one layer's size. Zeros: inside compile_only nothing runs, so the values never
    matter, and drawing random numbers at 7B shapes took half of the check's time on a CPU."""
    return torch.zeros(*shape, dtype=dtype, requires_grad=grad)


def drive(mixer: str, s: dict, dtype: torch.dtype):
    """Forward + backward of one layer's recurrence through the dispatch code (compile_only)."""
    from kernels.deltaproduct import deltaproduct
    from kernels.pararnn import paragru, paralstm
    from kernels.scan import linear_scan

    B, T = s["B"], s["T"]
    reset = _resets(B, T)
    if s["kernel"] == "deltaproduct":
        H, dk, dv, nh = s["H"], s["dk"], s["dv"], s["nh"]
        q = _any(B, T, H, dk, dtype=dtype, grad=True)
        k = _any(B, T, nh, H, dk, dtype=dtype, grad=True)
        v = _any(B, T, nh, H, dv, dtype=dtype, grad=True)
        beta = _any(B, T, nh, H, grad=True)
        g = -_any(B, T, H, grad=True)
        o, final = deltaproduct(q, k, v, beta, g, reset=reset, chunk_size=s["C"], backend="triton")
        (o.float().sum() + final.sum()).backward()
        # The sequence-parallel path passes an initial state from earlier ranks.
        s0 = _any(B, H, dk, dv, grad=True)
        o, final = deltaproduct(q, k, v, beta, g, initial_state=s0, reset=reset, chunk_size=s["C"],
                                backend="triton")
        (o.float().sum() + final.sum()).backward()
        return
    D = s["D"]
    u = _any(B, T, 3, D, dtype=dtype, grad=True)
    a = _any(3, D, grad=True)
    solver = dict(num_iters=s["num_iters"], tol=s["tol"], max_iters=s["max_iters"], backend="triton")
    if s["kernel"] == "paragru":
        h, _, _ = paragru(u, a, reset=reset, **solver)
        A, b = _any(B, T, D), _any(B, T, D)
    else:
        p = _any(2, D, grad=True)
        h, _, _ = paralstm(u, a, p, reset=reset, **solver)
        A, b = _any(B, T, D, 2, 2), _any(B, T, D, 2)
    h.float().sum().backward()
    # The reference Newton solver's scans (forward-only kernels, run without autograd: Newton
    # iterations and the adjoint), used under sequence parallelism, with their summaries.
    with torch.no_grad():
        linear_scan(A, b, reset=reset, return_summary=True, backend="triton")
        linear_scan(A, b, reset=reset, reverse=True, backend="triton")


def run(configs, targets, dtypes, log=print):
    from kernels.offline_compile import TARGETS, compile_only
    from pretrain.config import load_config

    rows = []
    for path in configs:
        cfg = load_config(path)
        for mixer, s in layer_shapes(cfg).items():
            shape = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("kernel", "tol", "num_iters", "max_iters"))
            for tname in targets:
                for dname in dtypes:
                    t0 = time.time()
                    with compile_only(tname) as launches:
                        drive(mixer, s, DTYPES[dname])
                    seen = set()
                    for launch in launches:
                        key = (launch.kernel, launch.programs, launch.shared, launch.registers)
                        if key in seen:
                            continue
                        seen.add(key)
                        rows.append(Row(Path(path).stem, mixer, shape, dname, tname, launch.kernel,
                                        launch.programs, launch.num_warps, launch.num_stages,
                                        launch.shared, launch.registers, launch.spill_bytes,
                                        launch.problems(TARGETS[tname], SPILL_BUDGET[dname])))
                    log(f"compiled {Path(path).stem} {mixer} {dname} {tname}: {len(launches)} launches "
                        f"in {time.time() - t0:.1f} s")
    return rows


def table(rows) -> str:
    head = ("| config | mixer | dtype | target | kernel | programs | warps | stages | shared B | regs "
            "| spill B | ok |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r.config} | {r.mixer} | {r.dtype} | {r.target} | {r.kernel} | {r.programs:,} | {r.num_warps} "
        f"| {r.num_stages} | {r.shared:,} | {r.registers} | {r.spills} | "
        f"{'yes' if not r.problems else 'NO: ' + '; '.join(r.problems)} |\n" for r in rows)
    return head + body


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--targets", nargs="+", default=["sm_90", "sm_80"], choices=["sm_90", "sm_80"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--out", default=None, help="write the table here as markdown")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench.gpu_compile: unset TRITON_INTERPRET (kernels must be compiled, not interpreted)",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    t0 = time.time()
    rows = run(args.configs, args.targets, args.dtypes, log=lambda m: print(m, flush=True))
    text = table(rows)
    print(text)
    bad = [r for r in rows if r.problems]
    summary = (f"{len(rows)} distinct launches, {len(bad)} failing, "
               f"{time.time() - t0:.0f} s; spill budget (B/thread) {SPILL_BUDGET}")
    print(summary)
    if args.out:
        import triton

        shapes = sorted({(r.config, r.mixer, r.shape) for r in rows})
        Path(args.out).write_text(
            "# Offline GPU compile check\n\n"
            f"- command: `python -m bench.gpu_compile {' '.join(argv or sys.argv[1:])}`\n"
            f"- date: {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC; triton {triton.__version__} "
            f"(its bundled ptxas), torch {torch.__version__}, {platform.machine()}; no GPU\n"
            "- limits: shared memory per block sm_80 166,912 B, sm_90 232,448 B; 65,536 registers; "
            f"spills <= {SPILL_BUDGET} B/thread by dtype\n"
            "- shapes (one layer, one rank: micro-batch B, T = seq_len / sp, heads and channels / tp):\n"
            + "".join(f"  - {c} {m}: {s}\n" for c, m, s in shapes)
            + "\n" + text + "\n" + summary + "\n")
    if bad:
        print("FAILED:", file=sys.stderr)
        for r in bad:
            print(f"  {r.kernel} ({r.config} {r.mixer} {r.dtype} {r.target}: {r.shape}): "
                  f"{'; '.join(r.problems)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
