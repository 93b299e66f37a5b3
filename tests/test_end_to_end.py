"""End to end on CPU, fp32: train, stop, resume in a new process, export, reload; bad input."""
import json
from pathlib import Path

import pytest
import torch

from trainer_cli import HYBRID_TINY, losses, run

REPO = Path(__file__).resolve().parents[1]
N_STEPS = 6
TINY = [*HYBRID_TINY, "train.grad_accum=2", f"train.max_steps={N_STEPS}", "train.save_every=100"]


@pytest.fixture(scope="module")
def data_dir(hybrid_data):
    return hybrid_data


@pytest.fixture(scope="module")
def resumed_run(data_dir, tmp_path_factory):
    """An uninterrupted run and a run stopped at N/2 then resumed in a new process."""
    root = tmp_path_factory.mktemp("runs")
    full, split = root / "full", root / "split"
    common = ["-m", "launch.train", *TINY, f"data.path={data_dir}"]
    run([*common, f"train.run_dir={full}"])
    first = run([*common, f"train.run_dir={split}", f"train.stop_at={N_STEPS // 2}"])
    second = run([*common, f"train.run_dir={split}"])
    return full, split, first, second


@pytest.mark.slow
def test_resume_in_a_new_process_reproduces_the_losses_bitwise(resumed_run):
    full, split, first, second = resumed_run
    assert f"resuming from {split}/checkpoints/step_{N_STEPS // 2:08d} at step {N_STEPS // 2}" in second.stdout
    a, b = losses(full), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, N_STEPS + 1))
    for step in range(N_STEPS // 2 + 1, N_STEPS + 1):
        assert a[step] == b[step], (step, a[step], b[step])  # bitwise: fp32 on CPU, same data and RNG
    assert a[N_STEPS] < a[1]
    assert (split / "checkpoints" / "latest").read_text().strip() == f"step_{N_STEPS:08d}"
    assert (split / "loss.svg").read_text().startswith("<svg")


@pytest.mark.slow
def test_export_round_trip_reproduces_the_trained_models_logits(resumed_run, tmp_path):
    import deepspeed  # noqa: F401  (the engine that wrote the checkpoint reads it back)

    from pretrain.checkpoint import find_latest
    from pretrain.config import config_from_dict
    from pretrain.export import consolidated_state_dict, load_exported
    from pretrain.model import LanguageModel

    _, split, _, _ = resumed_run
    out = tmp_path / "export"
    run(["-m", "launch.export", "--checkpoint", str(split), "--out", str(out)])
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "tokenizer.model"}

    ckpt = find_latest(split)
    cfg = config_from_dict(json.loads((ckpt / "trainer_state.json").read_text())["config"])
    trained = LanguageModel(cfg.model)
    # The trained weights as DeepSpeed saved them (module state), independent of the export path.
    module_state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    trained.load_state_dict(module_state)
    trained.eval()
    exported, meta = load_exported(out)
    assert meta["step"] == N_STEPS
    ids = torch.randint(0, cfg.model.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(ids), trained(ids))
    full_state = consolidated_state_dict(ckpt)
    assert torch.equal(full_state["embed.weight"], module_state["embed.weight"].float())

    sample = run(["-m", "launch.generate", "--export", str(out), "--max-new-tokens", "8"])
    assert sample.stdout.strip()


def one_line_error(proc, name):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{name}: error:")
    return lines[0]


def test_missing_data_dir_is_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(["-m", "launch.train", *TINY, f"data.path={tmp_path / 'nope'}", f"train.run_dir={run_dir}"],
               check=False)
    line = one_line_error(proc, "train")
    assert "nope" in line and "prepare_data" in line
    assert not run_dir.exists()


@pytest.mark.slow
def test_vocab_smaller_than_tokenizer_is_one_line_and_writes_nothing(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(["-m", "launch.train", *TINY, "model.vocab_size=100", f"data.path={data_dir}",
                f"train.run_dir={run_dir}"], check=False)
    line = one_line_error(proc, "train")
    assert "model.vocab_size=100 is smaller than the tokenizer's vocabulary (512)" in line
    assert not run_dir.exists()


def test_malformed_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 64\n   n_layers: 2\n")
    proc = run(["-m", "launch.train", "--config", str(bad)], check=False)
    assert "malformed YAML at line 3" in one_line_error(proc, "train")


@pytest.mark.slow
def test_resume_with_another_model_shape_is_a_clear_error(resumed_run, data_dir):
    _, split, _, _ = resumed_run
    proc = run(["-m", "launch.train", *TINY, "model.d_model=64", f"data.path={data_dir}",
                f"train.run_dir={split}", f"train.max_steps={N_STEPS + 2}"], check=False)
    line = one_line_error(proc, "train")
    assert "model.d_model: checkpoint 48 vs config 64" in line


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path):
    proc = run(["-m", "launch.export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "e")], check=False)
    assert "is not a complete checkpoint" in one_line_error(proc, "export")
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_torchrun_tp2_sp2_matches_the_single_process_losses(data_dir, tmp_path):
    """The README's multi-process command on CPU: 4 ranks, tp=2 x sp=2, ZeRO-1."""
    common = [*TINY, "model.attention.num_heads=4", "train.max_steps=2", f"data.path={data_dir}"]
    run(["-m", "launch.train", *common, f"train.run_dir={tmp_path / 'one'}"])
    run(["-m", "torch.distributed.run", "--nproc-per-node", "4", "-m", "launch.train", *common,
         f"train.run_dir={tmp_path / 'four'}", "parallel.tp=2", "parallel.sp=2"], timeout=600)
    one, four = losses(tmp_path / "one"), losses(tmp_path / "four")
    assert sorted(one) == sorted(four) == [1, 2]
    for step in one:  # fp32: the same math with other reduction orders
        assert four[step] == pytest.approx(one[step], rel=1e-5), step


@pytest.mark.slow
def test_unconverged_newton_is_warned_with_layer_and_step(data_dir, tmp_path):
    proc = run(["-m", "launch.train", *TINY, "model.mixers=[paragru,attention,paragru]", "train.max_steps=2",
                "model.paragru.num_iters=1", "model.paragru.max_iters=1", "model.paragru.tol=1e-12",
                f"data.path={data_dir}", f"train.run_dir={tmp_path / 'run'}"])
    assert "warning: step 1: Newton residual above tol in layer0.paragru (" in proc.stdout
    assert "layer2.paragru" in proc.stdout
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["newton_unconverged"] == 4  # two layers at each of two steps
    assert last["newton_residual_max"] > 1e-12
