"""Checkpoint robustness: a crash mid-save, a truncated shard, pruning, preemption by SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt_lib
from pretrain import deepspeed_io, reshard
from pretrain.config import load_config
from pretrain.model import LanguageModel
from pretrain.train import deepspeed_config, init_distributed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine():
    import deepspeed

    init_distributed(torch.device("cpu"))
    cfg = load_config(None, ["model.vocab_size=64", "model.d_model=16", "model.n_layers=1",
                             "model.mixers=[attention]", "model.attention.num_heads=2"])
    model = LanguageModel(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, torch.float32))
    return eng


def save(engine, run_dir, step, keep_last=5):
    return ckpt_lib.save_checkpoint(engine, run_dir, step, {"step": step}, {"rng": ckpt_lib.rng_state()}, keep_last)


def test_a_crash_mid_save_leaves_the_previous_checkpoint_and_pointer(engine, tmp_path, monkeypatch):
    save(engine, tmp_path, 1)
    real_replace = os.replace

    def crash_on_rename(src, dst):
        if Path(src).parent.name == ckpt_lib.TMP:
            raise OSError("simulated crash while publishing the checkpoint")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_lib.os, "replace", crash_on_rename)
    with pytest.raises(OSError, match="simulated crash"):
        save(engine, tmp_path, 2)
    monkeypatch.setattr(ckpt_lib.os, "replace", real_replace)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_00000001"
    assert ckpt_lib.find_latest(tmp_path) == root / "step_00000001"
    assert not (root / "step_00000002").exists()
    # The next save clears the half-written leftover and succeeds.
    assert save(engine, tmp_path, 2) == root / "step_00000002"
    assert not (root / ckpt_lib.TMP / "step_00000002").exists()
    assert ckpt_lib.find_latest(tmp_path) == root / "step_00000002"


def test_a_truncated_shard_is_detected_and_the_previous_checkpoint_used(engine, tmp_path):
    save(engine, tmp_path, 1)
    newest = save(engine, tmp_path, 2)
    shard = newest / "mp_rank_00_model_states.pt"
    size = shard.stat().st_size
    with shard.open("r+b") as f:
        f.truncate(size // 2)
    reports = []
    assert ckpt_lib.find_latest(tmp_path, report=reports.append) == tmp_path / "checkpoints" / "step_00000001"
    assert reports == [f"skipping checkpoint {newest}: mp_rank_00_model_states.pt has {size // 2} bytes, "
                       f"the manifest says {size}"]


def test_keep_last_prunes_old_checkpoints(engine, tmp_path):
    for step in (1, 2, 3, 4):
        save(engine, tmp_path, step, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]


def test_keep_every_keeps_multiples_beside_the_last_k(engine, tmp_path):
    for step in range(1, 8):
        ckpt_lib.save_checkpoint(engine, tmp_path, step, {"step": step}, {"rng": ckpt_lib.rng_state()},
                                 keep_last=2, keep_every=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == \
        ["step_00000003", "step_00000006", "step_00000007"]


def test_deepspeed_files_load_with_weights_only(engine, tmp_path):
    ckpt = save(engine, tmp_path, 1)
    for f in sorted(ckpt.glob("*.pt")):
        assert isinstance(deepspeed_io.load_checkpoint_file(f), dict), f


def test_merge_shards_inverts_the_tensor_parallel_cut():
    full = torch.arange(24 * 5, dtype=torch.float32).reshape(24, 5)
    # heads interleaved: dim 0 viewed as (2, 3, 4), axis 1 (the 3) cut over 3 ranks
    assert torch.equal(reshard.cut_shard(full, [0, [2, 3, 4], 1], 1, 3), full.reshape(2, 3, 4, 5)[:, 1].reshape(8, 5))
    for spec, n in (([0, None, 0], 2), ([0, [2, 3, 4], 1], 3), ([1, None, 0], 5)):
        shards = [reshard.cut_shard(full, spec, r, n) for r in range(n)]
        assert torch.equal(reshard.merge_shards(shards, spec), full), spec


def test_rng_state_round_trips():
    state = ckpt_lib.rng_state()
    a = (torch.rand(3), __import__("numpy").random.rand(2).tolist(), __import__("random").random())
    ckpt_lib.set_rng_state(state)
    b = (torch.rand(3), __import__("numpy").random.rand(2).tolist(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_with_the_requeue_code(cli_data, tmp_path):
    data = cli_data  # the session's corpus, prepared with the same arguments this test used
    env = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "launch.train", "model.vocab_size=512", "model.d_model=32",
                             "model.mixers=[attention]", "model.n_layers=1", "model.attention.num_heads=2",
                             "data.seq_len=32", "train.micro_batch_size=2", "train.max_steps=100000",
                             "train.save_every=100000", "logging.log_every=1", "logging.progress=false",
                             f"data.path={data}", f"train.run_dir={run_dir}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 75, out[-2000:]
    ckpt = ckpt_lib.find_latest(run_dir)
    assert ckpt is not None
    state = json.loads((ckpt / "trainer_state.json").read_text())
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert state["step"] == last_logged >= 3
    assert "preempted: checkpoint saved" in out


def test_manifest_checksums_catch_a_flipped_byte(engine, tmp_path):
    from pretrain.config import ConfigError

    ckpt = save(engine, tmp_path, 1)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert set(manifest["sha256"]) == set(manifest["files"])
    ckpt_lib.verify_checksums(ckpt)  # intact: no error
    shard = ckpt / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    assert ckpt_lib.is_complete(ckpt)
    with pytest.raises(ConfigError, match="mp_rank_00_model_states.pt does not match the sha256 in its manifest"):
        ckpt_lib.verify_checksums(ckpt)


# ----------------------------------------------------------------------------- asynchronous save


def async_save(engine, run_dir, step, state=None):
    state = state if state is not None else {"step": step}
    return ckpt_lib.Checkpointer(engine, run_dir, lambda s: (state, {"rng": ckpt_lib.rng_state()}), keep_last=5,
                                 async_save=True)


def test_async_save_writes_what_a_sync_save_writes_from_the_state_at_save_time(engine, tmp_path, monkeypatch):
    sync = save(engine, tmp_path / "sync", 1)
    # Hold the writer thread until the weights have changed: the checkpoint must hold the old ones.
    import threading

    release, real = threading.Event(), ckpt_lib.save_hashing

    def held(obj, path):
        release.wait(30)
        return real(obj, path)

    monkeypatch.setattr(ckpt_lib, "save_hashing", held)
    checkpointer = async_save(engine, tmp_path / "async", 1)
    final = checkpointer.save(1)
    assert not final.exists() and ckpt_lib.find_latest(tmp_path / "async") is None  # nothing in place yet
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    release.set()
    checkpointer.wait()
    with torch.no_grad():
        for p in engine.module.parameters():
            p.sub_(1.0)
    assert ckpt_lib.find_latest(tmp_path / "async") == final == checkpointer.last_saved
    ckpt_lib.verify_checksums(final)  # the sha256 taken while writing match the files
    assert sorted(p.name for p in final.iterdir()) == sorted(p.name for p in sync.iterdir())
    saved = deepspeed_io.load_checkpoint_file(final / "mp_rank_00_model_states.pt")["module"]
    for k, v in before.items():
        assert torch.equal(saved[k], v), k
    for name in ("mp_rank_00_model_states.pt", "trainer_state.json"):
        a, b = (deepspeed_io.load_checkpoint_file(d / name) if name.endswith(".pt") else
                json.loads((d / name).read_text()) for d in (sync, final))
        if isinstance(a, dict) and "module" in a:
            assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])
        else:
            assert a == b
    assert not (tmp_path / "async" / "checkpoints" / ckpt_lib.TMP / "step_00000001").exists()
    assert not [p for p in final.rglob("*") if p.name.startswith(".")]  # the ranks' markers are gone


def test_an_error_in_the_background_writer_is_raised_by_wait_and_nothing_is_published(engine, tmp_path, monkeypatch):
    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_lib, "save_hashing", full_disk)
    checkpointer = async_save(engine, tmp_path, 1)
    checkpointer.save(1)
    with pytest.raises(RuntimeError, match="asynchronous checkpoint save failed: .*No space left"):
        checkpointer.wait()
    assert ckpt_lib.find_latest(tmp_path) is None and not (tmp_path / "checkpoints" / "latest").exists()


KILLED_MID_WRITE = """
import sys, time
from pathlib import Path
import torch, deepspeed
from pretrain import checkpoint as ckpt_lib
from pretrain.config import load_config
from pretrain.model import LanguageModel
from pretrain.train import deepspeed_config, init_distributed
init_distributed(torch.device("cpu"))
cfg = load_config(None, ["model.vocab_size=64", "model.d_model=16", "model.n_layers=1",
                         "model.mixers=[attention]", "model.attention.num_heads=2"])
model = LanguageModel(cfg.model)
eng, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                               config=deepspeed_config(cfg, torch.float32))
run_dir = Path(sys.argv[1])
checkpointer = ckpt_lib.Checkpointer(eng, run_dir, lambda s: ({"step": s}, {"rng": ckpt_lib.rng_state()}),
                                     async_save=True)
checkpointer.save(1)
checkpointer.wait()
real, written = ckpt_lib.save_hashing, []
def slow(obj, path):  # the second file of step 2: half of it, then the process is killed
    if written:
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
            f.flush()
        (run_dir / "half_written").write_text(str(path))
        time.sleep(600)
    written.append(path)
    return real(obj, path)
ckpt_lib.save_hashing = slow
checkpointer.save(2)
time.sleep(600)
"""


def test_kill_9_during_an_async_write_leaves_the_previous_checkpoint_and_the_next_save_works(engine, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_PORT=str(29700 + os.getpid() % 200))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "half_written").exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "the child never reached the write of step 2"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_00000001"
    assert ckpt_lib.find_latest(tmp_path) == root / "step_00000001"
    ckpt_lib.verify_checksums(root / "step_00000001")
    assert not (root / "step_00000002").exists() and (root / ckpt_lib.TMP / "step_00000002").exists()
    # A resumed run saving step 2 again clears the torn leftover and publishes a whole checkpoint.
    checkpointer = async_save(engine, tmp_path, 2)
    checkpointer.save(2)
    checkpointer.wait()
    assert ckpt_lib.find_latest(tmp_path) == root / "step_00000002"
    ckpt_lib.verify_checksums(root / "step_00000002")
