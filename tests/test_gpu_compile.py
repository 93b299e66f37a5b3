"""Offline GPU check: every Triton kernel compiles for sm_90 (H100/H200) and sm_80 (A100) at every
shipped config's shapes, bf16 and fp32, within shared memory and without register spills.

Runs `python -m bench.gpu_compile` (read its docstring) in two subprocesses, one per target, in
parallel, without TRITON_INTERPRET (kernels are compiled by Triton and its bundled ptxas, not
interpreted; no GPU is needed or used). The tables are printed into the test log. A kernel that
does not fit fails the test with the kernel, shape and numbers.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def _compile_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a GPU run uses by default
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_every_kernel_fits_sm90_and_sm80_at_every_shipped_config(tmp_path, capsys):
    procs = {}
    for target in ("sm_90", "sm_80"):
        out = tmp_path / f"{target}.md"
        procs[target] = (out, subprocess.Popen(
            [sys.executable, "-m", "bench.gpu_compile", "--targets", target, "--out", str(out)],
            cwd=ROOT, env=_compile_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    failures = []
    for target, (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=1500)
        with capsys.disabled():
            print(f"\n--- offline compile, {target} ---")
            print(out.read_text() if out.exists() else log)
        if proc.returncode != 0:
            failures.append(f"{target} (rc {proc.returncode}):\n{log[-4000:]}")
    assert not failures, "\n".join(failures)


def test_the_check_catches_a_kernel_that_does_not_fit():
    """The limits are real: a launch over the shared-memory limit or spilling is reported."""
    from kernels.offline_compile import TARGETS, KernelLaunch

    launch = KernelLaunch(kernel="k", target="sm_90", programs=1, num_warps=4, num_stages=2,
                          shared=232_449, registers=255, spill_bytes=8, constexprs={})
    problems = launch.problems(TARGETS["sm_90"])
    assert len(problems) == 2 and "232,449" in problems[0] and "spills" in problems[1]
    fits = KernelLaunch(kernel="k", target="sm_80", programs=1, num_warps=8, num_stages=2,
                        shared=166_912, registers=128, spill_bytes=0, constexprs={})
    assert fits.problems(TARGETS["sm_80"]) == []
    too_many_regs = KernelLaunch(kernel="k", target="sm_80", programs=1, num_warps=16, num_stages=2,
                                 shared=0, registers=255, spill_bytes=0, constexprs={})
    assert "registers" in too_many_regs.problems(TARGETS["sm_80"])[0]


def test_compile_only_reports_a_real_kernel_over_the_limit(tmp_path):
    """End to end through Triton: a kernel whose [256,256] bf16 dot operands need 256 KiB of
    shared memory cannot launch on sm_80 (163 KiB); compile_only must say so (clean process).
    16 warps: the same 256 KiB of shared memory, but the fp32 accumulator spread over 512 threads
    instead of 128 (ptxas took 55 s on the spills of 4 warps, 3 s here)."""
    code = r'''
import torch, triton, triton.language as tl
from kernels.offline_compile import compile_only, TARGETS

@triton.jit
def big(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(a_ptr + i[:, None] * N + i[None, :])
    b = tl.load(b_ptr + i[:, None] * N + i[None, :])
    tl.store(c_ptr + i[:, None] * N + i[None, :], tl.dot(a, b))

a = torch.zeros(256, 256, dtype=torch.bfloat16)
with compile_only("sm_80") as launches:
    big[(3,)](a, a, a.float(), N=256, num_warps=16)
l = launches[0]
print(l.kernel, l.programs, l.shared, l.registers, l.spill_bytes)
print("PROBLEMS", l.problems(TARGETS["sm_80"]))
'''
    script = tmp_path / "big_kernel.py"  # @triton.jit needs its source in a file
    script.write_text(code)
    env = _compile_env()
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    kernel, programs, shared, regs, spills = out.stdout.splitlines()[0].split()
    assert kernel == "big" and int(programs) == 3
    assert int(shared) > 166_912, out.stdout
    assert "shared memory" in out.stdout.splitlines()[1]
