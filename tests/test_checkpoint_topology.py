"""Resume after kill -9 (bitwise), across a dp change (dp=2 -> 1 -> 2) and a tp change (tp=2 ->
tp=1 through launch.convert_checkpoint), and the export of a tp=2 checkpoint. CPU, fp32, gloo."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.loader import TokenLoader
from data.regroup import resume_loader
from pretrain import checkpoint as ckpt_lib
from trainer_cli import ENV, HYBRID_TINY, losses, run

REPO = Path(__file__).resolve().parents[1]
TINY = HYBRID_TINY
# Another dp size or tp degree changes the order of float reductions (all-reduce over ranks,
# a sum split over vocab shards); measured |rel diff| <= 1e-7 after 3 steps, asserted at 1e-5.
REL_TOL = 1e-5


def train(*overrides, nproc=1, timeout=600):
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    return run([*launcher, "-m", "launch.train", *TINY, *overrides], timeout=timeout)


@pytest.fixture(scope="module")
def data_dir(hybrid_data):
    return hybrid_data


# ----------------------------------------------------------------------------- the data rule


@pytest.mark.parametrize("old, new", [
    ((2, 2, 1), (1, 4, 1)),   # dp=2 -> 1, the micro-batch doubled
    ((2, 2, 1), (1, 2, 2)),   # dp=2 -> 1, accumulation instead
    ((2, 2, 1), (4, 1, 1)),   # dp=2 -> 4
    ((1, 4, 1), (2, 2, 1)),   # dp=1 -> 2
    ((2, 2, 2), (4, 2, 1)),   # dp=2 x accum 2 -> dp=4
])
def test_a_dp_change_continues_the_same_global_batches(data_dir, old, new):
    """(dp, micro_batch_size, grad_accum): every step's global batch after the change holds exactly
    the rows the old layout would have produced (token for token)."""
    (odp, ombs, oacc), (ndp, nmbs, nacc) = old, new
    olds = [TokenLoader(data_dir, 48, ombs, dp_rank=r, dp_size=odp, seed=7) for r in range(odp)]
    for loader in olds:
        loader.seek(5)  # mid-run: some batches already consumed
    state = olds[0].state_dict()
    news = [resume_loader(TokenLoader(data_dir, 48, nmbs, dp_rank=r, dp_size=ndp, seed=7), state, nacc)
            for r in range(ndp)]
    for _ in range(3):
        expected = torch.cat([next(loader)["input_ids"] for loader in olds for _ in range(oacc)])
        got = torch.cat([next(loader)["input_ids"] for loader in news for _ in range(nacc)])
        assert torch.equal(got, expected)
    assert news[0].state_dict()["position"] == olds[0].state_dict()["position"] == 5 + 3 * oacc
    assert news[0].state_dict()["dp_size"] == odp  # the layout stays the original one


def test_a_global_batch_that_does_not_fit_the_layout_is_refused(data_dir):
    state = TokenLoader(data_dir, 48, 2, dp_rank=0, dp_size=2, seed=7).state_dict()
    with pytest.raises(ValueError, match=r"global batch of dp=1 x grad_accum=1 x micro_batch_size=3 = 3 rows "
                                         r"must be a multiple of 4"):
        resume_loader(TokenLoader(data_dir, 48, 3, seed=7), state, 1)


def test_data_layout_dp_gives_one_process_the_global_batches_of_a_dp2_run(data_dir):
    """data.layout_dp=2 on one process (grad_accum 2): each step's micro-batches are the dp=2 run's
    rank 0 batch, then rank 1's (tests/test_slurm.py compares the losses of such a run with a
    two-node job's); a layout the global batch cannot fill is one line naming the key."""
    from pretrain.config import ConfigError
    from pretrain.train import lay_out_for

    ranks = [TokenLoader(data_dir, 48, 2, dp_rank=r, dp_size=2, seed=7) for r in range(2)]
    one = lay_out_for(TokenLoader(data_dir, 48, 2, seed=7), 2, grad_accum=2)
    for _ in range(3):
        for rank in ranks:
            assert torch.equal(next(one)["input_ids"], next(rank)["input_ids"])
    assert one.state_dict()["position"] == 3 and one.state_dict()["dp_size"] == 2  # saved in that layout
    with pytest.raises(ConfigError, match=r"^data.layout_dp=3: .*must be a multiple of 6"):
        lay_out_for(TokenLoader(data_dir, 48, 2, seed=7), 3, grad_accum=2)


# ----------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_reproduces_the_losses_bitwise(data_dir, tmp_path):
    steps = ["train.max_steps=10", "train.save_every=2", f"data.path={data_dir}"]
    train(*steps, f"train.run_dir={tmp_path / 'full'}")
    victim = tmp_path / "killed"
    kill_after = random.Random().randint(3, 7)
    print(f"killing after step {kill_after}")
    # The victim saves asynchronously (the reference synchronously): a kill may land mid-write.
    proc = subprocess.Popen([sys.executable, "-m", "launch.train", *TINY, *steps, f"train.run_dir={victim}",
                             "train.async_save=true"],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (victim / "metrics.jsonl").exists() and max(losses(victim), default=0) >= kill_after:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    saved = ckpt_lib.find_latest(victim)
    assert saved is not None
    resumed_at = ckpt_lib.read_trainer_state(saved)["step"]
    assert 2 <= resumed_at <= 10
    out = train(*steps, f"train.run_dir={victim}", "train.async_save=true").stdout
    assert f"at step {resumed_at}" in out
    a, b = losses(tmp_path / "full"), losses(victim)
    assert sorted(b) == list(range(1, 11))
    for step in range(resumed_at + 1, 11):
        assert a[step] == b[step], (step, a[step], b[step])  # bitwise: CPU fp32, same data and RNG


# ----------------------------------------------------------------------------- dp change


@pytest.mark.slow
def test_dp2_to_dp1_to_dp2_gives_the_losses_of_an_uninterrupted_dp2_run(data_dir, tmp_path):
    common = ["train.max_steps=9", "train.save_every=3", f"data.path={data_dir}"]
    train(*common, f"train.run_dir={tmp_path / 'ref'}", nproc=2)
    run_dir = f"train.run_dir={tmp_path / 'moved'}"
    # the dp=2 legs save asynchronously: both ranks' background writers, rank 0 publishing
    train(*common, run_dir, "train.stop_at=3", "train.async_save=true", nproc=2)
    out = train(*common, run_dir, "train.stop_at=6", "train.micro_batch_size=4").stdout  # dp=1
    assert "resuming from" in out and "at step 3" in out
    train(*common, run_dir, "train.async_save=true", nproc=2)
    ref, moved = losses(tmp_path / "ref"), losses(tmp_path / "moved")
    assert sorted(moved) == sorted(ref) == list(range(1, 10))
    for step in range(1, 10):
        assert moved[step] == pytest.approx(ref[step], rel=REL_TOL), step
    state = ckpt_lib.read_trainer_state(tmp_path / "moved" / "checkpoints" / "step_00000006")
    assert state["topology"] == {"dp": 1, "sp": 1, "tp": 1}


# ----------------------------------------------------------------------------- tp=2


def _tp2_logits(rank, world, ckpt, ids):
    """Logits of the trained tp=2 model: each rank's module shard as DeepSpeed saved it."""
    import torch.distributed as dist

    from parallel.topology import ParallelDims
    from pretrain.config import config_from_dict
    from pretrain.model import LanguageModel
    from pretrain.parallelize import apply_tensor_parallel

    cfg = config_from_dict(ckpt_lib.read_trainer_state(ckpt)["config"])
    dims = ParallelDims(1, 1, 2, world).build_groups()
    model = apply_tensor_parallel(LanguageModel(cfg.model), dims)
    model.load_state_dict(torch.load(Path(ckpt) / f"mp_rank_{rank:02d}_model_states.pt", weights_only=True)["module"])
    with torch.no_grad():
        local = model.eval()(ids)  # [B, T, vocab / 2]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=-1)


@pytest.mark.slow
def test_tp2_export_and_conversion_to_tp1(data_dir, tmp_path):
    from parallel.spawn import run_gloo
    from pretrain.export import consolidated_state_dict, load_exported

    common = ["train.max_steps=6", "train.save_every=3", f"data.path={data_dir}", "parallel.tp=2"]
    tp2 = tmp_path / "tp2"
    train(*common, f"train.run_dir={tp2}", "train.stop_at=3", nproc=2)
    ckpt = ckpt_lib.find_latest(tp2)
    run(["-m", "launch.export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")])
    exported, meta = load_exported(tmp_path / "export")
    assert meta["step"] == 3
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    reference = run_gloo(_tp2_logits, 2, str(ckpt), ids)[0]
    with torch.no_grad():
        logits = exported(ids)
    assert logits.shape == reference.shape == (2, 40, 512)
    assert (logits - reference).abs().max().item() <= 1e-5
    # fp32 training: the exported (master) weights equal the module shards bit for bit
    shard0 = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    full = consolidated_state_dict(ckpt)
    assert torch.equal(full["embed.weight"][:256], shard0["embed.weight"])

    # tp=2 -> tp=1: convert, resume at tp=1, compare with continuing at tp=2.
    converted = tmp_path / "converted"
    run(["-m", "launch.convert_checkpoint", "--checkpoint", str(tp2), "--out", str(converted)])
    assert ckpt_lib.is_complete(converted)
    train(*common, f"train.run_dir={tp2}", nproc=2)
    train(*[c for c in common if c != "parallel.tp=2"], f"train.run_dir={tmp_path / 'tp1'}",
          f"train.resume={converted}")
    ref, moved = losses(tp2), losses(tmp_path / "tp1")
    assert sorted(moved) == [4, 5, 6]
    for step in moved:
        assert moved[step] == pytest.approx(ref[step], rel=REL_TOL), step
