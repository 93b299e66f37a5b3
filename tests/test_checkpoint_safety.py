"""Nothing lost, nothing executed, nothing hangs (issue 12): a checkpoint whose pickle would run
code, --out directories we did not write, a fresh run in a run dir holding another run, a damaged
checkpoint on export and on resume, two trainers on one run dir, and Slurm's process-group signal
with loader workers. tests/README.md lists each case and what the user gets."""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt_lib
from pretrain import deepspeed_io, reshard

from trainer_cli import ENV, REPO, TINY, logged_steps, one_line_error, run, steps, train, tree


@pytest.fixture
def data_dir(cli_data):
    return cli_data


@pytest.fixture
def trained(cli_trained):
    return cli_trained


@pytest.fixture
def run_copy(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def rewrite_with_manifest(ckpt: Path, name: str, payload) -> None:
    """Replace ckpt/name by torch.save(payload) and make the manifest's size and sha256 match, as
    someone who can write the checkpoint directory could."""
    torch.save(payload, ckpt / name)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = (ckpt / name).stat().st_size
    manifest["sha256"][name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


class RunsCode:
    """Unpickling this calls os.system (what a malicious checkpoint file would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------- 1: code in a pickle


@pytest.mark.slow
@pytest.mark.parametrize("command, name", [
    ("train", "mp_rank_00_model_states.pt"),
    ("train", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("export", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("convert_checkpoint", "mp_rank_00_model_states.pt"),
])
def test_a_checkpoint_file_whose_pickle_would_run_code_is_refused(run_copy, data_dir, tmp_path, command, name):
    ckpt = run_copy / "checkpoints" / "step_00000002"
    marker = tmp_path / "code-ran"
    state = torch.load(ckpt / name, weights_only=False)
    state["payload"] = RunsCode(marker)
    rewrite_with_manifest(ckpt, name, state)
    ckpt_lib.verify_checksums(ckpt)  # the checksums match: only the loader can refuse it
    if command == "train":
        proc = train(run_copy, "train.max_steps=3", data=data_dir, check=False)
    else:
        proc = run(["-m", f"launch.{command}", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")], check=False)
    line = one_line_error(proc, command)
    assert f"refusing to load {ckpt / name}" in line and "posix.system" in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_every_deepspeed_read_of_a_checkpoint_goes_through_the_weights_only_loader(tmp_path):
    """DeepSpeed's engine reads its files through engine.checkpoint_engine.load, zero_to_fp32 through
    torch.load: both are routed to load_checkpoint_file."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils import zero_to_fp32

    marker = tmp_path / "code-ran"
    torch.save({"payload": RunsCode(marker)}, tmp_path / "evil.pt")
    engine = TorchCheckpointEngine()
    holder = type("Engine", (), {"checkpoint_engine": engine})()
    deepspeed_io.load_weights_only(holder)
    with pytest.raises(deepspeed_io.UnsafeCheckpointError, match="posix.system"):
        holder.checkpoint_engine.load(str(tmp_path / "evil.pt"), map_location=lambda storage, loc: storage)
    with deepspeed_io.zero_to_fp32_weights_only():
        with pytest.raises(deepspeed_io.UnsafeCheckpointError, match="posix.system"):
            zero_to_fp32.parse_model_states([str(tmp_path / "evil.pt")])
    assert zero_to_fp32.torch is torch  # restored
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_every_zero_stage_loads_weights_only_exports_and_resumes(data_dir, tmp_path, stage):
    """The allow-list is what DeepSpeed's files hold at each ZeRO stage (1: the `trained` run);
    export (ZeRO-3: through zero_to_fp32) and resume (through the engine's checkpoint engine)
    read them with weights_only."""
    run_dir = tmp_path / "run"
    train(run_dir, "train.max_steps=1", f"parallel.zero_stage={stage}", data=data_dir)
    ckpt = ckpt_lib.find_latest(run_dir)
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in deepspeed_io._deepspeed_pickled_classes()}
    for f in sorted(ckpt.glob("*.pt")):
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) <= allowed, f
        assert isinstance(deepspeed_io.load_checkpoint_file(f), dict)
    run(["-m", "launch.export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "export")])
    out = train(run_dir, "train.max_steps=2", f"parallel.zero_stage={stage}", data=data_dir).stdout
    assert "at step 1" in out


# ----------------------------------------------------------------------------- 2: --out


@pytest.mark.parametrize("command", ["export", "convert_checkpoint"])
def test_out_dir_holding_user_files_is_refused_and_left_alone(trained, tmp_path, command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    proc = run(["-m", f"launch.{command}", "--checkpoint", str(trained), "--out", str(out)], check=False)
    line = one_line_error(proc, command)
    assert f"--out {out}" in line and "notes.txt" in line
    assert (out / "notes.txt").read_text() == "my notes"
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp dir left beside it


@pytest.mark.parametrize("command", ["export", "convert_checkpoint"])
def test_out_dir_that_is_the_run_dir_is_refused(run_copy, command):
    before = tree(run_copy)
    proc = run(["-m", f"launch.{command}", "--checkpoint", str(run_copy), "--out", str(run_copy)], check=False)
    one_line_error(proc, command)
    assert tree(run_copy) == before


@pytest.mark.parametrize("command", ["export", "convert_checkpoint"])
def test_a_previous_output_of_ours_is_replaced_and_a_partial_named_user_dir_kept(trained, tmp_path, command):
    out = tmp_path / "out"
    (tmp_path / "out.partial").mkdir()  # a user's directory that happens to have our old temp name
    (tmp_path / "out.partial" / "keep.txt").write_text("mine")
    run(["-m", f"launch.{command}", "--checkpoint", str(trained / "checkpoints" / "step_00000001"), "--out", str(out)])
    first = tree(out)
    run(["-m", f"launch.{command}", "--checkpoint", str(trained), "--out", str(out)])  # step 2 over step 1
    assert tree(out) != first
    assert (tmp_path / "out.partial" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial"]
    # an empty directory is fine too
    (tmp_path / "empty").mkdir()
    run(["-m", f"launch.{command}", "--checkpoint", str(trained), "--out", str(tmp_path / "empty")])
    assert tree(tmp_path / "empty").keys() == tree(out).keys()


# ----------------------------------------------------------------------------- 3: one run per run dir


@pytest.mark.slow
def test_resume_none_in_a_run_dir_with_checkpoints_is_refused_and_changes_nothing(run_copy, data_dir):
    before = tree(run_copy)
    proc = train(run_copy, "train.resume=none", "train.max_steps=1", data=data_dir, check=False)
    line = one_line_error(proc, "train")
    assert "train.resume=none" in line and "step_00000002" in line
    assert "train.run_dir" in line and "train.overwrite=true" in line
    assert tree(run_copy) == before


@pytest.mark.slow
def test_overwrite_moves_the_old_run_aside_and_the_new_run_is_what_resumes(run_copy, data_dir):
    old = tree(run_copy)
    out = train(run_copy, "train.resume=none", "train.overwrite=true", "train.max_steps=3", "train.stop_at=1",
                "train.save_every=1", "train.keep_last=1", data=data_dir).stdout
    assert "starting at step 0" in out
    aside = [p for p in run_copy.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and f"moved the earlier run's checkpoints to {aside[0]}" in out
    assert tree(aside[0])["metrics.jsonl"] == old["metrics.jsonl"]
    for name, sha in old.items():  # every checkpoint file of the old run, unchanged
        if name.startswith("checkpoints/step_"):
            assert tree(aside[0])[name] == sha, name
    # keep_last=1 kept the checkpoint just written; `latest` names it; auto-resume continues this run
    assert steps(run_copy) == [1]
    assert (run_copy / "checkpoints" / "latest").read_text() == "step_00000001"
    out = train(run_copy, "train.max_steps=3", "train.save_every=1", "train.keep_last=1", data=data_dir).stdout
    assert "at step 1" in out
    assert steps(run_copy) == [3] and logged_steps(run_copy) == [1, 2, 3]


@pytest.mark.slow
def test_resuming_an_older_checkpoint_while_newer_ones_exist(run_copy, data_dir):
    older = run_copy / "checkpoints" / "step_00000001"
    before = tree(run_copy)
    proc = train(run_copy, f"train.resume={older}", "train.max_steps=3", data=data_dir, check=False)
    line = one_line_error(proc, "train")
    assert "step_00000002" in line and "train.overwrite=true" in line
    assert tree(run_copy) == before
    out = train(run_copy, f"train.resume={older}", "train.overwrite=true", "train.max_steps=3", "train.save_every=1",
                data=data_dir).stdout
    assert "at step 1" in out
    aside = next(p for p in run_copy.iterdir() if p.name.startswith("replaced-"))
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert steps(run_copy) == [1, 2, 3] and logged_steps(run_copy) == [1, 2, 3]


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """Pruning counts only checkpoints up to the step just saved: those of a later step belong to
    another run (or were skipped as damaged) and are not this run's to delete."""
    root = tmp_path / "checkpoints"
    for step in (1, 2, 7, 8):
        (root / ckpt_lib.tag_for_step(step)).mkdir(parents=True)
        (root / ckpt_lib.tag_for_step(step) / "manifest.json").write_text("{}")
    ckpt_lib._prune(root, keep_last=2, keep_every=0, current_step=2)
    assert steps(tmp_path) == [1, 2, 7, 8]
    ckpt_lib._prune(root, keep_last=1, keep_every=0, current_step=2)
    assert steps(tmp_path) == [2, 7, 8]


def fake_checkpoint(run_dir: Path, step: int, lineage: str | None) -> Path:
    ckpt = run_dir / "checkpoints" / ckpt_lib.tag_for_step(step)
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text(json.dumps({"files": {}}))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, **({"lineage": lineage} if lineage else {})}))
    return ckpt


def test_auto_resume_takes_the_newest_checkpoint_of_the_run_latest_names(tmp_path):
    a1, a2 = fake_checkpoint(tmp_path / "a", 1, "A"), fake_checkpoint(tmp_path / "a", 2, "A")
    (tmp_path / "a" / "checkpoints" / "latest").write_text(a1.name)  # a crash between rename and pointer
    assert ckpt_lib.find_latest(tmp_path / "a") == a2
    # a run dir left by an older version: a new run's step 1 named, another run's step 2 beside it
    b1, _ = fake_checkpoint(tmp_path / "b", 1, "B"), fake_checkpoint(tmp_path / "b", 2, "A")
    (tmp_path / "b" / "checkpoints" / "latest").write_text(b1.name)
    assert ckpt_lib.find_latest(tmp_path / "b") == b1
    c1, _ = fake_checkpoint(tmp_path / "c", 1, None), fake_checkpoint(tmp_path / "c", 2, None)
    (tmp_path / "c" / "checkpoints" / "latest").write_text(c1.name)
    assert ckpt_lib.find_latest(tmp_path / "c") == c1  # no lineages recorded: the pointer decides


# ----------------------------------------------------------------------------- 5: damaged checkpoints


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("command", ["export", "convert_checkpoint"])
def test_a_flipped_byte_is_refused_before_export_or_conversion(run_copy, tmp_path, command):
    ckpt = run_copy / "checkpoints" / "step_00000002"
    flip_a_byte(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    proc = run(["-m", f"launch.{command}", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")], check=False)
    line = one_line_error(proc, command)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt does not match the sha256 in its manifest" in line
    assert not (tmp_path / "out").exists()


def test_a_run_dir_export_skips_a_damaged_newest_checkpoint_with_a_report(run_copy, tmp_path):
    flip_a_byte(run_copy / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt")
    proc = run(["-m", "launch.export", "--checkpoint", str(run_copy), "--out", str(tmp_path / "out")])
    assert "skipping checkpoint" in proc.stderr and "step_00000002" in proc.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["step"] == 1


@pytest.mark.slow
def test_auto_resume_falls_back_past_a_damaged_newest_checkpoint(run_copy, data_dir):
    damaged = run_copy / "checkpoints" / "step_00000002"
    flip_a_byte(damaged / "mp_rank_00_model_states.pt")
    out = train(run_copy, "train.max_steps=3", "train.save_every=1", data=data_dir).stdout
    assert f"skipping checkpoint {damaged}: mp_rank_00_model_states.pt does not match the sha256" in out
    assert f"resuming from {run_copy / 'checkpoints' / 'step_00000001'} at step 1" in out
    assert steps(run_copy) == [1, 2, 3] and logged_steps(run_copy) == [1, 2, 3]
    ckpt_lib.verify_checksums(damaged)  # replaced by this run's own step 2


def test_a_converted_checkpoint_records_checksums(trained, tmp_path):
    out = tmp_path / "converted"
    run(["-m", "launch.convert_checkpoint", "--checkpoint", str(trained), "--out", str(out)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["sha256"]) == set(manifest["files"])
    flip_a_byte(out / reshard.FULL_STATE)
    proc = run(["-m", "launch.export", "--checkpoint", str(out), "--out", str(tmp_path / "e")], check=False)
    assert f"{reshard.FULL_STATE} does not match the sha256" in one_line_error(proc, "export")


# ----------------------------------------------------------------------------- 7: one trainer per run dir


HOLD_LOCK = ("import sys, time; from pretrain.run_dir import RunDirLock; "
             "lock = RunDirLock(sys.argv[1]); lock.acquire(); print('locked', flush=True); time.sleep(600)")


@pytest.mark.slow
def test_a_second_trainer_is_refused_while_the_first_lives_and_runs_once_it_is_killed(run_copy, data_dir):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_copy)], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(run_copy)
        proc = train(run_copy, "train.max_steps=3", data=data_dir, check=False)
        line = one_line_error(proc, "train")
        assert f"{run_copy} is in use by another trainer" in line
        assert f"pid {holder.pid}" in line and socket.gethostname() in line and "started" in line
        assert tree(run_copy) == before
    finally:
        holder.kill()  # SIGKILL: the kernel drops its flock; the lock file stays, stale
        holder.wait()
    assert (run_copy / "trainer.lock").is_file()
    out = train(run_copy, "train.max_steps=3", data=data_dir).stdout
    assert "at step 2" in out and steps(run_copy)[-1] == 3


def test_the_lock_is_exclusive_and_released(tmp_path):
    from pretrain.config import ConfigError
    from pretrain.run_dir import RunDirLock

    first = RunDirLock(tmp_path / "new-run")
    first.acquire()
    with pytest.raises(ConfigError, match=f"is in use by another trainer \\(host {socket.gethostname()}, "
                                          f"pid {os.getpid()}, started "):
        RunDirLock(tmp_path / "new-run").acquire()
    first.release()
    assert not (tmp_path / "new-run").exists()  # it made the directory, and nothing else was written
    second = RunDirLock(tmp_path / "new-run")
    second.acquire()
    (tmp_path / "new-run" / "config.yaml").write_text("x")
    second.release()
    assert (tmp_path / "new-run" / "config.yaml").is_file()


# ----------------------------------------------------------------------------- 4: preemption with workers


@pytest.mark.slow
def test_a_process_group_sigterm_with_loader_workers_saves_and_exits_75(data_dir, tmp_path):
    """Slurm's `scancel --signal=TERM JOB.0` signals every process of the step, the loader workers
    too: they must ignore it and leave the save to the trainer."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "launch.train", *TINY, f"data.path={data_dir}",
                             f"train.run_dir={run_dir}", "train.max_steps=100000", "train.save_every=100000",
                             "data.num_workers=2"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a Slurm step's
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, out[-3000:]
    assert "preempted: checkpoint saved" in out
    saved = ckpt_lib.find_latest(run_dir)
    assert ckpt_lib.read_trainer_state(saved)["step"] == logged_steps(run_dir)[-1] >= 3


def test_an_output_directory_is_readable_by_the_group_like_any_directory_we_make(tmp_path):
    """Exports and converted checkpoints are staged in a mkdtemp directory (mode 0700); the
    renamed result must carry the umask's usual mode instead (0755 under umask 022)."""
    from pretrain.output_dir import write_replacing

    old = os.umask(0o022)
    try:
        with write_replacing(tmp_path / "export", lambda p: False, "an export") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "export" / "model.safetensors").stat().st_mode & 0o777 == 0o644
