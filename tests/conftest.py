"""Test-wide settings: Triton kernels run on CPU through the interpreter (set before triton loads)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cli_data(tmp_path_factory):
    """A tiny prepared corpus (vocab 512) for the tests that run launch commands (trainer_cli.py)."""
    from trainer_cli import prepare

    return prepare(tmp_path_factory.mktemp("data") / "corpus")


@pytest.fixture(scope="session")
def hybrid_data(tmp_path_factory):
    """A larger prepared corpus (vocab 512, 400 kB of text) for the runs of trainer_cli.HYBRID_TINY."""
    from trainer_cli import prepare

    return prepare(tmp_path_factory.mktemp("hybrid_data") / "corpus", max_bytes=400_000)


@pytest.fixture(scope="session")
def cli_trained(cli_data, tmp_path_factory):
    """A run of 2 steps of trainer_cli.TINY with a checkpoint at each; tests work on copies of it."""
    from trainer_cli import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(run_dir, "train.max_steps=2", "train.save_every=1", data=cli_data)
    return run_dir
