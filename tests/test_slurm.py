"""Real Slurm jobs of slurm/pretrain.sbatch, training a tiny model on CPU.

Two nodes (run wherever network namespaces can be made): slurm/netns_cluster.sh makes two nodes
on this machine -- network + UTS namespaces node1 and node2 joined by a veth pair named rpnet0 on
both sides, a slurmd in each, slurmctld on node1, a munged of its own -- and `sbatch --nodes=2`
of the real script trains with dp=2 across the nodes x tp=2 inside each (NPROC_PER_NODE=2, gloo
over rpnet0 through GLOO_SOCKET_IFNAME). One job shows, in order:
  1. preemption: `scancel --signal=USR1 --batch` -> every rank saves, the script requeues the job,
     the requeued two-node job resumes at the saved step;
  2. a node lost mid-run (node2's link down, then every process in it killed, slurmd included):
     the job step ends in bounded time, with no trainer left behind (Slurm declares the node DOWN
     after SlurmdTimeout and requeues the job, which asked for --requeue); node2 comes back and
     the job resumes from the last checkpoint;
  3. node2's trainers killed (kill -9; the node stays up): the job fails at once, and submitting
     it again resumes from the last checkpoint and finishes;
  4. the losses of all of it equal a single-process run's on the same global batches
     (data.layout_dp=2 with grad_accum=2), step for step, to REL_TOL.
One node (only the fallback where the two-node cluster cannot start): slurm/local_cluster.sh,
the same preempt / requeue / resume / finish. Each skips with its reason where Slurm is missing or
its cluster cannot start (e.g. not root).
"""
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
from trainer_cli import HYBRID_TINY

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 600
TINY_MODEL = [*HYBRID_TINY, "train.device=cpu"]
TINY = [*TINY_MODEL, f"train.max_steps={MAX_STEPS}", "train.save_every=200"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "GONE")

pytestmark = pytest.mark.skipif(shutil.which("sbatch") is None,
                                reason="Slurm is not installed (sbatch not found); "
                                       "apt-get install -y slurm-wlm munge to run this test")


def sh(*cmd, timeout=60, check=True, env=None):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    return proc


def job_field(job_id: str, field: str, slurm=(), env=None) -> str:
    out = sh(*slurm, "scontrol", "show", "job", job_id, check=False, env=env).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else "GONE"


def job_state(job_id: str, slurm=(), env=None) -> str:
    return job_field(job_id, "JobState", slurm, env)


def wait_for(what, predicate, timeout_s, poll_s=0.5):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def logged_steps(run_dir: Path) -> list[int]:
    return [record["step"] for record in metrics(run_dir)]


@pytest.fixture(scope="module")
def data(hybrid_data):
    return hybrid_data


# ----------------------------------------------------------------------------- two nodes

TWO_NODE_STEPS = 100
SAVE_EVERY = 20
IFNAME = "rpnet0"  # the veth's name inside both nodes (slurm/netns_cluster.sh)
# dp=2 x tp=2 against one process reading the same global batches: the all-reduce over dp and the
# vocab-parallel sums add in another order, and the difference grows over the steps (chaotic
# training); measured max |rel diff| 2e-5 over 100 steps (5e-6 by step 24), asserted at 2e-4.
REL_TOL = 2e-4
# From node2's power loss to the job step's end: SlurmdTimeout=10 s until node2 is DOWN, then the
# step's processes on node1 (blocked in a collective with the lost ranks) are killed (KillWait=10 s).
# Measured 26 s (47 s with the default KillWait=30).
NODE_LOSS_BOUND_S = 90


class TwoNodes:
    def __init__(self, path: Path):
        self.path, self.ns1 = path, (path / "ns1").read_text().strip()
        self.env = {**os.environ, "SLURM_CONF": str(path / "slurm.conf"), "NPROC_PER_NODE": "2",
                    "GLOO_SOCKET_IFNAME": IFNAME, "OMP_NUM_THREADS": "1"}
        self.slurm = ("ip", "netns", "exec", self.ns1)  # Slurm commands run on node1

    def cmd(self, *cmd, timeout=60, check=True):
        return sh(*self.slurm, *cmd, timeout=timeout, check=check, env=self.env)

    def state(self, job: str) -> str:
        return job_state(job, self.slurm, self.env)

    def field(self, job: str, field: str) -> str:
        return job_field(job, field, self.slurm, self.env)

    def trainers_on_node1(self) -> list[str]:
        pids = sh("ip", "netns", "pids", self.ns1, check=False).stdout.split()
        cmdlines = []
        for pid in pids:
            try:
                cmdlines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                pass  # gone meanwhile
        return [c for c in cmdlines if "launch.train" in c or "torch.distributed.run" in c]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A running two-node cluster, or the reason (a str) why none could be started."""
    if os.geteuid() != 0:
        yield "the two-node cluster needs root (network namespaces, slurmd)"
        return
    missing = [cmd for cmd in ("ip", "unshare", "nsenter") if shutil.which(cmd) is None]
    if missing:
        yield f"the two-node cluster needs {', '.join(missing)} (iproute2, util-linux), not found"
        return
    path = tmp_path_factory.mktemp("netns-cluster")
    try:
        proc = sh("bash", "slurm/netns_cluster.sh", "start", str(path), timeout=120, check=False)
        if proc.returncode != 0:
            yield f"could not start the two-node cluster: {(proc.stderr or proc.stdout).strip()[-400:]}"
        else:
            yield TwoNodes(path)
    finally:  # every daemon and job process, the namespaces and their hosts files
        sh("bash", "slurm/netns_cluster.sh", "stop", str(path), timeout=120, check=False)


@pytest.mark.slow
def test_two_nodes_preempted_requeued_node_lost_resumed_and_equal_to_one_process(two_nodes, data, tmp_path):
    if isinstance(two_nodes, str):
        pytest.skip(two_nodes)
    c = two_nodes
    started = time.time()
    common = ["--config", "configs/smoke.yaml", f"data.path={data}", *TINY_MODEL, "train.kernel_backend=torch",
              f"train.max_steps={TWO_NODE_STEPS}", f"train.save_every={SAVE_EVERY}"]
    # The single-process reference, meanwhile: the global batches of dp=2 x micro_batch_size=2. At
    # the lowest priority: it takes the CPU the job leaves idle (start-ups, the wait for Slurm to
    # notice the lost node) instead of slowing the job's 4 ranks on 2 cores.
    reference_dir = tmp_path / "reference"
    reference = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "launch.train", *common,
                                  "train.grad_accum=2", "data.layout_dp=2", f"train.run_dir={reference_dir}"],
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    name = f"pytest-2nodes-{os.getpid()}"
    run_dir, jobs = REPO / "runs" / name, []  # jobs: (job id, its log)

    def submit() -> str:
        job = c.cmd("sbatch", "--parsable", "--nodes=2", f"--job-name={name}", "slurm/pretrain.sbatch",
                    *common[1:], "parallel.tp=2").stdout.strip().split(";")[0]
        jobs.append((job, REPO / "runs" / f"slurm-{name}-{job}.out"))
        return job

    def log_text() -> str:
        log = jobs[-1][1]
        return log.read_text() if log.exists() else "(no log yet)"

    def running(job: str, min_steps: int):
        def check():
            state = c.state(job)
            if state in ENDED:
                raise AssertionError(f"job {job} ended {state} ({c.field(job, 'Reason')}): {log_text()[-3000:]}")
            return state == "RUNNING" and len(logged_steps(run_dir)) >= min_steps
        return check

    def resumed_at(step: int) -> str:
        return f"resuming from {run_dir.relative_to(REPO)}/checkpoints/step_{step:08d} at step {step}"

    try:
        job = submit()
        wait_for("the two-node job to log 10 steps", running(job, 10), 180)
        assert "on 2 node(s) x 2 process(es), rendezvous node1:" in log_text()
        assert f"nodes node[1-2]; interfaces NCCL_SOCKET_IFNAME=(auto) GLOO_SOCKET_IFNAME={IFNAME}" in log_text()
        assert "world 4 = dp 2 x sp 1 x tp 2" in log_text()

        # 1. Preemption: every rank saves, the script requeues, the requeued job resumes there.
        c.cmd("scancel", "--signal=USR1", "--batch", job)
        wait_for("the script to requeue the job", lambda: "requeueing job" in log_text(), 120)
        preempted = ckpt_lib.find_latest(run_dir)
        saved = ckpt_lib.read_trainer_state(preempted)["step"]
        assert 10 <= saved < TWO_NODE_STEPS
        assert sorted(p.name for p in preempted.glob("rank_*.pt")) == [f"rank_{r:05d}.pt" for r in range(4)]
        assert sorted(p.name for p in preempted.glob("mp_rank_*_model_states.pt")) == \
            ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]  # both tp ranks' weights
        assert len(list(preempted.glob("zero_pp_rank_*_optim_states.pt"))) == 4  # every rank's ZeRO shard
        assert ckpt_lib.damage(preempted) is None
        assert f"preempted: checkpoint saved at step {saved}" in log_text()
        wait_for("the requeued job to resume", lambda: resumed_at(saved) in log_text(), 120)
        after_preemption = time.time() - started

        # 2. node2 loses power after the next periodic checkpoint: the job step must end, not hang.
        lost_after = (saved // SAVE_EVERY + 1) * SAVE_EVERY
        wait_for(f"the checkpoint of step {lost_after} and a few steps past it",
                 running(job, lost_after + 5), 120, poll_s=0.1)
        assert ckpt_lib.find_latest(run_dir).name == f"step_{lost_after:08d}"
        restarts = int(c.field(job, "Restarts"))
        lost_at = time.time()
        sh("bash", "slurm/netns_cluster.sh", "node-down", str(c.path), "2")
        wait_for("the job step to end after node2's loss", lambda: c.state(job) in ("PENDING", *ENDED),
                 NODE_LOSS_BOUND_S, poll_s=0.5)
        loss_ended_s = time.time() - lost_at
        assert not c.trainers_on_node1(), c.trainers_on_node1()  # no rank left blocked on node1
        assert c.state(job) == "PENDING" and int(c.field(job, "Restarts")) == restarts + 1, \
            (c.state(job), c.field(job, "Reason"))  # requeued by Slurm (--requeue), not failed
        assert "DUE TO NODE FAILURE" in log_text()
        # node2 is back; the requeued job resumes from the last checkpoint.
        sh("bash", "slurm/netns_cluster.sh", "node-up", str(c.path), "2")
        wait_for("the requeued job to resume after the node loss", lambda: resumed_at(lost_after) in log_text(), 120)

        # 3. The trainers of node2 crash (kill -9; node2 stays up) after the next checkpoint: the job
        # fails at once (no requeue: a crash may be a bug); submitting it again resumes there.
        crashed_after = lost_after + SAVE_EVERY
        wait_for(f"the checkpoint of step {crashed_after} and a few steps past it",
                 running(job, crashed_after + 5), 120, poll_s=0.1)
        crashed_at = time.time()
        sh("bash", "slurm/netns_cluster.sh", "kill-trainers", str(c.path), "2")
        wait_for("the job to fail after the crash", lambda: c.state(job) in ENDED, NODE_LOSS_BOUND_S, poll_s=0.2)
        crash_ended_s = time.time() - crashed_at
        assert c.state(job) == "FAILED", (c.state(job), log_text()[-3000:])
        assert not c.trainers_on_node1(), c.trainers_on_node1()
        job = submit()
        wait_for("the job to finish", lambda: c.state(job) in ENDED, 180, poll_s=1)
        text = log_text()
        assert c.state(job) == "COMPLETED", text[-3000:]
        assert resumed_at(crashed_after) in text
        final = ckpt_lib.find_latest(run_dir)
        assert ckpt_lib.read_trainer_state(final)["step"] == TWO_NODE_STEPS
        assert logged_steps(run_dir) == list(range(1, TWO_NODE_STEPS + 1))  # redone steps were truncated
        assert not (run_dir / "preempted.json").exists()

        # 4. The same losses as one process on the same global batches.
        os.setpriority(os.PRIO_PROCESS, reference.pid, 0)  # the job is done: what is left of it, at full speed
        out, _ = reference.communicate(timeout=120)
        assert reference.returncode == 0, out[-3000:]
        ours = {r["step"]: r["loss"] for r in metrics(run_dir)}
        theirs = {r["step"]: r["loss"] for r in metrics(reference_dir)}
        assert sorted(theirs) == sorted(ours)
        rel = {s: abs(ours[s] - theirs[s]) / abs(theirs[s]) for s in ours}
        worst = max(rel, key=rel.get)
        print(f"two-node test: {time.time() - started:.0f}s in all; preempted at step {saved} (resumed "
              f"{after_preemption:.0f}s in); node2 lost after step {lost_after}, the step ended {loss_ended_s:.0f}s "
              f"later; node2's trainers crashed after step {crashed_after}, the job failed {crash_ended_s:.1f}s "
              f"later; losses vs one process: max rel diff {rel[worst]:.1e} (step {worst})")
        assert rel[worst] <= REL_TOL, (worst, ours[worst], theirs[worst])
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
        for job, log in jobs:
            if c.state(job) not in ENDED:
                c.cmd("scancel", job, check=False)
            log.unlink(missing_ok=True)
        shutil.rmtree(run_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- one node (fallback)


@pytest.fixture(scope="module")
def cluster(two_nodes):
    # The one-node test runs only where the two-node cluster cannot (CI time: one long Slurm test).
    if not isinstance(two_nodes, str):
        pytest.skip("the two-node test covers preemption and requeue here (the one-node test is its "
                    "fallback where network namespaces cannot be made)")
    print(f"one-node fallback: {two_nodes}")
    was_running = sh("scontrol", "ping", check=False).stdout.count("UP") > 0
    proc = sh("bash", "slurm/local_cluster.sh", timeout=120, check=False)
    if proc.returncode != 0:
        pytest.skip(f"could not start the local Slurm cluster: {(proc.stderr or proc.stdout).strip()[-300:]}")
    yield
    if not was_running:  # leave no daemons behind that this test started
        sh("bash", "slurm/local_cluster.sh", "stop", check=False)


@pytest.mark.slow
def test_sbatch_trains_is_preempted_requeued_and_finishes_from_the_checkpoint(cluster, data):
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
