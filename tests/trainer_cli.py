"""Running the launch commands in a subprocess on a tiny model, as a user would (shared by
test_checkpoint_safety.py and test_bad_input.py; the corpus and the trained run are conftest.py's
session fixtures)."""
import hashlib
import json
import os
import subprocess
import sys
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


def run(args, check=True, timeout=300, env=None):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})})
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
