"""Bad input and divergence (issue 12, items 6, 8, 9, 10): each out-of-range value is one line
naming the key; a diverging run stops with one line and saves nothing after its first non-finite
step; no DeepSpeed op is JIT-built (a stale extension lock cannot hang a run); a bad data.path fails
before DeepSpeed starts; a changed lr on resume applies; a refused resume changes nothing; SIGTERM
during start-up is a preemption; under torchrun the error is printed once. tests/README.md lists
each case and what the user gets."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from trainer_cli import ENV, REPO, TINY, one_line_error, steps, train

# ----------------------------------------------------------------------------- config values (item 9)


@pytest.mark.parametrize("override, expected", [
    ("train.lr=0", "train.lr must be a finite number > 0, got 0.0"),
    ("train.lr=-1e-3", "train.lr must be a finite number > 0"),
    ("train.lr=nan", "train.lr must be a finite number > 0, got nan"),
    ("train.lr=inf", "train.lr must be a finite number > 0"),
    ("train.beta1=1", "train.beta1 must be in [0, 1), got 1.0"),
    ("train.beta2=-0.1", "train.beta2 must be in [0, 1)"),
    ("model.paragru.num_heads=0", "model.paragru.num_heads must be > 0, got 0"),
    ("model.attention.num_heads=0", "model.attention.num_heads must be > 0"),
    ("model.deltaproduct.num_heads=0", "model.deltaproduct.num_heads must be > 0"),
    ("model.deltaproduct.chunk_size=0", "model.deltaproduct.chunk_size must be > 0"),
    ("model.deltaproduct.head_dim=0", "model.deltaproduct.head_dim must be > 0"),
    ("model.deltaproduct.conv_size=0", "model.deltaproduct.conv_size must be > 0"),
    ("model.paragru.expand=0", "model.paragru.expand must be > 0"),
    ("model.paralstm.max_iters=1", "model.paralstm.max_iters must be >= model.paralstm.num_iters=3"),
    ("model.mlp_multiple=0", "model.mlp_multiple must be > 0"),
    ("train.save_every=0", "train.save_every must be > 0"),
    ("train.warmup_steps=300", "train.warmup_steps must be in [0, train.max_steps=240], got 300"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio must be in [0, 1]"),
    ("train.decay_fraction=1.5", "train.decay_fraction must be in [0, 1]"),
    ("train.weight_decay=-0.1", "train.weight_decay must be a finite number >= 0"),
    ("train.grad_clip=-1", "train.grad_clip must be a finite number >= 0 (0: no clipping)"),
    ("train.keep_last=-1", "train.keep_last must be >= 0"),
    ("train.max_consecutive_nonfinite=0", "train.max_consecutive_nonfinite must be > 0"),
    ("data.layout_dp=-1", "data.layout_dp must be >= 0 (0: this run's dp size), got -1"),
    ("model.paragru.expand=0.001", "model.paragru.num_heads=4 must divide d_model=192 and the hidden size 0"),
])
def test_an_out_of_range_value_is_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/smoke.yaml", [override])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_every_shipped_config_and_the_defaults_are_in_range():
    load_config(None)
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"# only a comment\n\n", "is empty"),
    (b"train:\n  run_dir: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 21)"),
])
def test_an_empty_or_non_utf8_yaml_is_one_line(tmp_path, content, expected):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(path)


# ----------------------------------------------------------------------------- checkpoint metadata (item 9)


def test_a_malformed_manifest_or_trainer_state_is_damage_not_a_traceback(tmp_path):
    from pretrain import checkpoint as ckpt_lib

    ckpt = tmp_path / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"step": 1, "tok')  # torn
    size = (ckpt / "trainer_state.json").stat().st_size
    for manifest, why in [({}, "no 'files'"), ({"files": ["trainer_state.json"]}, "malformed"),
                          ({"files": {"trainer_state.json": size}, "sha256": ["x"]}, "malformed"), ([], "no 'files'")]:
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
        assert why in ckpt_lib.damage(ckpt)
        assert ckpt_lib.find_latest(tmp_path) is None
    (ckpt / "manifest.json").write_text(json.dumps({"files": {"trainer_state.json": size}}))
    assert ckpt_lib.damage(ckpt) is None  # sizes agree; the content is what is wrong
    with pytest.raises(ConfigError, match="trainer_state.json is unreadable"):
        ckpt_lib.read_trainer_state(ckpt)


def test_a_torn_or_garbage_metrics_line_is_skipped_by_the_reader_and_dropped_on_resume(tmp_path, capsys):
    from pretrain.config import WandbConfig
    from pretrain.metrics import MetricsLogger, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\nnot json\n[1, 2]\n{"step": "two"}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo')
    unreadable = []
    assert [r["step"] for r in read_metrics(path, unreadable)] == [1, 2]
    assert len(unreadable) == 4
    MetricsLogger(tmp_path, {}, WandbConfig(mode="disabled"), enabled=True, resume_step=1)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]
    assert "dropped 4 line(s) that are not JSON records" in capsys.readouterr().out


def test_report_on_a_metrics_file_with_garbage_is_not_a_traceback(tmp_path, capsys):
    from launch.errors import run_cli
    from launch.report import main as report

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": "x", "tokens": 1, "tokens_per_s": 1}\n\x00\x01\n'
                                           '{"step": 2, "loss": 5.0, "tokens": 64, "tokens_per_s": 100.0}\n'
                                           '{"step": 3, "loss": 4.0, "tokens": 128, "tokens_per_s": 120.0}\n{"st')
    assert run_cli(lambda: report(["--run-dir", str(run_dir)]), "report") == 0
    out, err = capsys.readouterr()
    assert "5.0000 (step 2) -> 4.0000 (step 3)" in out
    assert err.startswith("report: skipped them: 2 line(s)") and len(err.splitlines()) == 1
    (run_dir / "metrics.jsonl").write_text("garbage\n")
    assert run_cli(lambda: report(["--run-dir", str(run_dir)]), "report") == 2
    err = capsys.readouterr().err
    assert err.startswith("report: error: ") and "has no logged steps (1 line(s)" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("make, args, expected", [
    (lambda d: (d / "junk.model").write_text("junk"), ["--tokenizer", "{d}/junk.model"],
     "is not a sentencepiece model (INTERNAL: could not parse ModelProto"),
    (lambda d: (d / "empty.txt").write_text(""), ["--input", "{d}/empty.txt"], "every document is empty"),
])
def test_prepare_data_turns_sentencepiece_errors_into_one_line(tmp_path, capsys, make, args, expected):
    from launch.prepare_data import cli

    make(tmp_path)
    assert cli(["--out", str(tmp_path / "out"), "--no-progress", *[a.format(d=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare_data: error: ") and expected in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- torchrun: once (item 10)


@pytest.mark.parametrize("rank, world, exc, printed", [
    ("0", "2", ConfigError("bad"), "x: error: bad"),
    ("1", "2", ConfigError("bad"), None),               # rank 0 says it
    ("1", "2", FileNotFoundError("gone"), "x: error (rank 1): gone"),  # may be this rank's own
    ("0", "1", ConfigError("bad"), "x: error: bad"),
])
def test_under_torchrun_a_shared_user_error_is_printed_by_rank_0_only(monkeypatch, capsys, rank, world, exc,
                                                                       printed):
    from launch.errors import run_cli
    from pretrain.deepspeed_io import UnsafeCheckpointError

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)

    def fail():
        raise exc

    assert run_cli(fail, "x") == 2
    assert capsys.readouterr().err.strip() == (printed or "")
    if rank == "1":  # a checkpoint file only this rank loads: its own error, printed
        def unsafe():
            raise UnsafeCheckpointError("refusing to load f")
        assert run_cli(unsafe, "x") == 2
        assert capsys.readouterr().err.strip() == "x: error (rank 1): refusing to load f"


@pytest.mark.slow
def test_torchrun_with_a_bad_data_path_prints_the_error_once_before_deepspeed_starts(tmp_path):
    ext = tmp_path / "torch_extensions"
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "-m",
                           "launch.train", *TINY, f"data.path={tmp_path / 'nowhere'}",
                           f"train.run_dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**ENV, "TORCH_EXTENSIONS_DIR": str(ext)})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("does not exist; create it with: python -m launch.prepare_data") == 1, out
    assert "train: error: data.path: data directory" in out
    assert "model:" not in out and not ext.exists() and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- divergence (item 6), extension lock (item 8)


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_line_and_saves_nothing_after_a_nonfinite_step(cli_data, tmp_path):
    """lr=1e4: after the first steps every gradient is inf and DeepSpeed skips the update ("OVERFLOW!").
    Also: TORCH_EXTENSIONS_DIR holds the `lock` an interrupted build of DeepSpeed's CPU op leaves
    (torch's FileBaton waits while it exists); the run neither waits on it nor builds anything."""
    ext = tmp_path / "torch_extensions"
    build_dir = ext / "deepspeed_shm_comm"  # torch.utils.cpp_extension's build dir under $TORCH_EXTENSIONS_DIR
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()
    run_dir = tmp_path / "run"
    proc = train(run_dir, "train.lr=1e4", "train.max_steps=40", "train.save_every=1", "train.keep_last=0",
                 "train.max_consecutive_nonfinite=3", data=cli_data, check=False, timeout=120,
                 env={"TORCH_EXTENSIONS_DIR": str(ext)})  # before the fix: waits on the lock until killed
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    nonfinite = [r["step"] for prev, r in zip([{"skipped": 0}, *records], records) if r["skipped"] > prev["skipped"]]
    stop = records[-1]["step"]
    assert stop < 40 and nonfinite[-3:] == [stop - 2, stop - 1, stop]
    # Every finite step was saved (save_every=1, keep_last=0), no step at or after a skipped one.
    assert steps(run_dir) == [s for s in range(1, stop + 1) if s not in nonfinite]
    last_good = run_dir / "checkpoints" / f"step_{steps(run_dir)[-1]:08d}"
    assert errors[0] == (f"train: error: the run diverged: 3 optimizer steps in a row (steps {stop - 2}-{stop}) had a "
                         f"non-finite loss or gradient (train.max_consecutive_nonfinite=3); nothing was saved after "
                         f"them; the last good checkpoint is {last_good}: resume from it (train.resume=auto) with a "
                         f"lower train.lr")
    assert sorted(p.name for p in build_dir.iterdir()) == ["lock"]


@pytest.fixture
def in_process_training():
    """train() in this process installs the preemption handler and (init_distributed) sets RANK,
    MASTER_PORT, ...: put the handlers back and drop the variables, which later subprocesses would
    inherit. The process group itself stays, as after test_checkpoint.py's engine fixture."""
    from pretrain import preemption

    saved = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: os.environ.get(k) for k in keys}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    preemption._received.clear()
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.parametrize("stage", [0, 1])
def test_a_nan_loss_skips_the_whole_step_leaves_the_weights_and_is_not_saved(cli_data, tmp_path, monkeypatch,
                                                                              in_process_training, stage):
    """Steps 3 and 4 get a NaN loss (before: a traceback in DeepSpeed's step, every stage). ZeRO-1's
    optimizer wrapper skips them; ZeRO-0 in fp32 has none, and the trainer zeroes the update."""
    import torch

    from pretrain import model as model_lib
    from pretrain.train import train as run_training

    forward, seen = model_lib.LanguageModel.forward, []

    def nan_at_steps_3_and_4(self, *args, **kwargs):
        seen.append(torch.cat([p.detach().flatten() for p in self.parameters()]).clone())
        loss = forward(self, *args, **kwargs)
        return loss * float("nan") if len(seen) in (3, 4) else loss

    monkeypatch.setattr(model_lib.LanguageModel, "forward", nan_at_steps_3_and_4)
    cfg = load_config(None, [*TINY, f"data.path={cli_data}", f"train.run_dir={tmp_path / 'run'}", "train.max_steps=6",
                             "train.save_every=1", "train.keep_last=0", f"parallel.zero_stage={stage}"])
    summary = run_training(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0, 0, 1, 2, 2, 2] and summary["skipped_steps"] == 2
    assert [math.isnan(r["loss"]) for r in records] == [False, False, True, True, False, False]
    assert torch.equal(seen[2], seen[4]) and not torch.equal(seen[1], seen[2])  # steps 3, 4 left the weights
    assert steps(tmp_path / "run") == [1, 2, 5, 6]


# ----------------------------------------------------------------------------- resume (item 9)


@pytest.fixture
def run_copy(cli_trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(cli_trained, dst)
    return dst


@pytest.mark.slow
def test_a_changed_lr_on_resume_applies_from_the_resumed_step_and_is_announced(run_copy, cli_data):
    """The rule (README, Resume): the config's lr, schedule, betas and weight decay apply from the
    resumed step on. Also: a torn last line in metrics.jsonl does not block the resume."""
    from pretrain.train import lr_multiplier

    with (run_copy / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')
    out = train(run_copy, "train.max_steps=3", "train.lr=1e-3", data=cli_data).stdout
    assert ("resuming with changed settings, applied from step 2 on: train.lr 0.003 -> 0.001, "
            "train.max_steps 2 -> 3") in out
    assert "dropped 1 line(s) that are not JSON records" in out
    records = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    cfg = load_config(None, [*TINY, "train.max_steps=3", "train.lr=1e-3"])
    assert records[-1]["lr"] == pytest.approx(1e-3 * lr_multiplier(3, cfg.train), rel=1e-12)
    assert not math.isclose(records[-1]["lr"], 3e-3 * lr_multiplier(3, cfg.train))


@pytest.mark.slow
def test_a_refused_resume_keeps_config_yaml_and_the_preemption_marker(run_copy, cli_data):
    (run_copy / "preempted.json").write_text('{"step": 2}')
    before = {name: (run_copy / name).read_bytes() for name in ("config.yaml", "preempted.json", "metrics.jsonl")}
    line = one_line_error(train(run_copy, "train.max_steps=3", "parallel.zero_stage=3", data=cli_data, check=False),
                          "train")
    assert ("cannot resume: the checkpoint was written with parallel.zero_stage=1, this run has "
            "parallel.zero_stage=3; resume with parallel.zero_stage=1 (1 and 2 are interchangeable)") in line
    assert {name: (run_copy / name).read_bytes() for name in before} == before
    assert steps(run_copy) == [1, 2]


# ----------------------------------------------------------------------------- SIGTERM during start-up (item 9)


def _catches_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.slow
def test_sigterm_during_start_up_exits_75_with_the_marker_and_writes_nothing_else(run_copy, cli_data):
    proc = subprocess.Popen([sys.executable, "-m", "launch.train", *TINY, f"data.path={cli_data}",
                             f"train.run_dir={run_copy}", "train.max_steps=5"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not _catches_sigterm(proc.pid) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # the handler is in; the imports and set-up take seconds more
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out[-2000:] + err[-3000:]
    assert "preempted during start-up (step 2, checkpoint" in out and "exiting with 75 to be requeued" in out
    assert json.loads((run_copy / "preempted.json").read_text())["step"] == 2
    assert steps(run_copy) == [1, 2] and "done:" not in out
