"""A real Slurm job: slurm/local_cluster.sh starts a one-node cluster, `sbatch slurm/pretrain.sbatch`
trains a tiny model on CPU, `scancel --signal=USR1 --batch` preempts it; the job must save, be
requeued by the script, resume from that checkpoint and finish. Skipped (with the reason) where
Slurm is not installed or the cluster cannot start (e.g. not root)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain import checkpoint as ckpt_lib

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 600
TINY = ["model.d_model=48", "model.mixers=[paragru,deltaproduct,attention]", "model.n_layers=3",
        "model.paragru.num_heads=2", "model.deltaproduct.num_heads=2", "model.deltaproduct.head_dim=16",
        "model.attention.num_heads=2", "model.vocab_size=512", "data.seq_len=48", "train.micro_batch_size=2",
        "train.warmup_steps=2", f"train.max_steps={MAX_STEPS}", "train.save_every=200", "logging.log_every=1",
        "logging.progress=false", "logging.wandb.mode=disabled", "train.device=cpu"]

pytestmark = pytest.mark.skipif(shutil.which("sbatch") is None,
                                reason="Slurm is not installed (sbatch not found); "
                                       "apt-get install -y slurm-wlm munge to run this test")


def sh(*cmd, timeout=60, check=True):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    return proc


def job_state(job_id: str) -> str:
    out = sh("scontrol", "show", "job", job_id, check=False).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else "GONE"


def wait_for(what, predicate, timeout_s, poll_s=0.5):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cluster():
    was_running = sh("scontrol", "ping", check=False).stdout.count("UP") > 0
    proc = sh("bash", "slurm/local_cluster.sh", timeout=120, check=False)
    if proc.returncode != 0:
        pytest.skip(f"could not start the local Slurm cluster: {(proc.stderr or proc.stdout).strip()[-300:]}")
    yield
    if not was_running:  # leave no daemons behind that this test started
        sh("bash", "slurm/local_cluster.sh", "stop", check=False)


@pytest.mark.slow
def test_sbatch_trains_is_preempted_requeued_and_finishes_from_the_checkpoint(cluster, tmp_path):
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "launch.prepare_data", "--out", str(data), "--vocab-size", "512",
                    "--max-bytes", "400000", "--shard-tokens", "16384", "--no-progress"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    name = f"pytest-slurm-{os.getpid()}"
    run_dir, log = REPO / "runs" / name, None
    try:
        out = sh("sbatch", "--parsable", f"--job-name={name}", "slurm/pretrain.sbatch", "configs/smoke.yaml",
                 f"data.path={data}", *TINY).stdout
        job = out.strip().split(";")[0]
        log = REPO / "runs" / f"slurm-{name}-{job}.out"
        def twenty_steps():
            state = job_state(job)
            if state in ("FAILED", "CANCELLED", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY"):
                reason = re.search(r"Reason=(\S+)", sh("scontrol", "show", "job", job, check=False).stdout)
                raise AssertionError(f"job {job} ended {state} ({reason.group(1) if reason else '?'}) before "
                                     f"training: {log.read_text()[-2000:] if log.exists() else 'no log'}")
            return len(logged_steps(run_dir)) >= 20

        wait_for("the job to log 20 steps", twenty_steps, 180)
        sh("scancel", "--signal=USR1", "--batch", job)
        wait_for("the script to requeue the job",
                 lambda: log.exists() and "requeueing job" in log.read_text(), 120)
        preempted = ckpt_lib.find_latest(run_dir)
        assert preempted is not None
        saved_step = ckpt_lib.read_trainer_state(preempted)["step"]
        assert 20 <= saved_step < MAX_STEPS
        wait_for("the requeued job to finish", lambda: job_state(job) in ("COMPLETED", "GONE", "FAILED"), 300, 2)
        text = log.read_text()
        assert job_state(job) in ("COMPLETED", "GONE"), text[-3000:]
        assert "preemption warning; asking the trainers to save" in text
        assert f"preempted: checkpoint saved at step {saved_step}" in text
        assert f"resuming from {run_dir.relative_to(REPO)}/checkpoints/step_{saved_step:08d} at step {saved_step}" in text
        final = ckpt_lib.find_latest(run_dir)
        assert ckpt_lib.read_trainer_state(final)["step"] == MAX_STEPS
        steps = logged_steps(run_dir)
        assert steps == list(range(1, MAX_STEPS + 1))  # redone steps after the save were truncated
        assert not (run_dir / "preempted.json").exists()
    finally:
        if log is not None and job_state(job) not in ("COMPLETED", "GONE", "FAILED", "CANCELLED"):
            sh("scancel", job, check=False)
        shutil.rmtree(run_dir, ignore_errors=True)
        if log is not None:
            log.unlink(missing_ok=True)
