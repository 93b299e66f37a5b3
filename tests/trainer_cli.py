"""Running the launch commands in a subprocess on a tiny model, as a user would (shared by
test_checkpoint_safety.py and test_bad_input.py; the corpus and the trained run are conftest.py's
session fixtures)."""
import atexit
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The venv's bin stays on PATH: its ninja (not /usr/bin's older one) and its entry points (torchrun).
ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
       "PYTHONPATH": str(REPO), **{k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR",) if k in os.environ}}
TINY = ["model.d_model=32", "model.mixers=[attention]", "model.n_layers=1", "model.attention.num_heads=2",
        "model.vocab_size=512", "data.seq_len=32", "train.micro_batch_size=2", "train.warmup_steps=1",
        "logging.log_every=1", "logging.progress=false", "logging.wandb.mode=disabled"]


# Three layers, one of each mixer (test_end_to_end, test_checkpoint_topology, test_slurm).
HYBRID_TINY = ["model.d_model=48", "model.mixers=[paragru,deltaproduct,attention]", "model.n_layers=3",
               "model.paragru.num_heads=2", "model.deltaproduct.num_heads=2", "model.deltaproduct.head_dim=16",
               "model.attention.num_heads=2", "model.vocab_size=512", "data.seq_len=48", "train.micro_batch_size=2",
               "train.warmup_steps=2", "logging.log_every=1", "logging.progress=false", "logging.wandb.mode=disabled"]


# Warm starts. Every launch command imports torch before anything else, and launch.train also
# torch._dynamo (AdamW) and torch._inductor (DeepSpeed): 1-4 s of a 2-6 s command on two cores,
# paid ~100 times by the suite. run() hands `python -m MODULE ARGS` to an interpreter started
# while the previous command ran, with the command's environment, working directory, stdin and
# stdout/stderr pipes, which has done those imports and waits for its one command. It is still a
# fresh process per command (its own pid, hash seed, random state and interpreter exit); only
# those imports come before the module starts. Not deepspeed: it prints at import, which a warm
# start would move ahead of the command's own output. Commands with an env of their own start
# cold, as does everything with TESTS_WARM_START=0.
WARM_IMPORTS = {"launch.train": ("torch", "torch._dynamo", "torch._inductor.compile_fx")}
WARM_MAIN = """
import importlib, json, os, runpy, sys
request = int(sys.argv[1])
for name in sys.argv[2:]:
    importlib.import_module(name)
with os.fdopen(request, "rb") as f:
    request = f.read()
if not request:  # not needed after all: the test session ended
    sys.exit(0)
module, args = json.loads(request)
sys.argv[1:] = args  # runpy sets argv[0] to the module's file, as python -m does
sys.path[0] = os.getcwd()  # python -m puts the working directory first
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
_warm: dict[tuple, tuple[subprocess.Popen, int]] = {}  # imports -> (interpreter, fd of its request pipe)
_warm_lock = threading.Lock()


def _spawn_warm(imports: tuple) -> tuple[subprocess.Popen, int]:
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", WARM_MAIN, str(read), *imports], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=(read,))
    os.close(read)
    return proc, write


def _start_warm(args) -> subprocess.Popen | None:
    """`python -m MODULE ARGS` in a warm interpreter (and the next one started), or None."""
    if os.environ.get("TESTS_WARM_START", "1") == "0" or len(args) < 2 or args[0] != "-m":
        return None
    imports = WARM_IMPORTS.get(args[1], ("torch",))
    with _warm_lock:
        proc, request = _warm.pop(imports, None) or _spawn_warm(imports)
        _warm[imports] = _spawn_warm(imports)  # imports on the other core while this command runs
    try:
        os.write(request, json.dumps([args[1], [str(a) for a in args[2:]]]).encode())
    except BrokenPipeError:  # it died starting up: say why, as a cold start would
        proc.wait()
    finally:
        os.close(request)
    proc.args = [sys.executable, *args]
    return proc


@atexit.register
def _stop_warm():
    for proc, request in _warm.values():
        os.close(request)
        proc.kill()
        proc.communicate()
    _warm.clear()


def run(args, check=True, timeout=300, env=None):
    proc = None if env else _start_warm(args)
    if proc is None:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**ENV, **(env or {})})
    else:  # what subprocess.run does with a started process
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train(run_dir, *overrides, data, check=True, env=None, timeout=300):
    return run(["-m", "launch.train", *TINY, f"data.path={data}", f"train.run_dir={run_dir}", *overrides],
               check=check, env=env, timeout=timeout)


def prepare(out: Path, max_bytes: int = 200_000) -> Path:
    run(["-m", "launch.prepare_data", "--out", str(out), "--vocab-size", "512", "--max-bytes", str(max_bytes),
         "--shard-tokens", "16384", "--no-progress"])
    return out


def losses(run_dir) -> dict[int, float]:
    """step -> logged training loss (val_loss records and others are skipped)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def one_line_error(proc, name):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{name}: error:"), lines[0]
    return lines[0]


def tree(path: Path) -> dict:
    """Every file under path with its sha256 (to show that nothing changed), but the run dir's
    lock file: each trainer that takes the lock writes itself in as the holder."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "trainer.lock"}


def steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
