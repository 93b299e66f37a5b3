"""Every command block of README.md, run as written, in order, on a fresh copy of the repository.

The copy holds the files git tracks (plus untracked, non-ignored ones: what a clone of this
working tree would hold) and reuses this test run's virtual environment (VENV=, which
launch/setup_env.sh honours: nothing is installed). The user's inputs the README names
(corpus/, more.jsonl.gz, code/, notes.txt, more_docs/) are made here from the Python standard
library's source. Sizes are made small only by what the README documents: config overrides
appended to each training command (`section.key=value`, later ones win) and smoke.sh's
SMOKE_MAX_BYTES / SMOKE_MIN_DROP. Skipped, with the reason in the report: `bash launch/test.sh`
(this suite itself), GPU-only commands, and `sbatch` (a real Slurm cluster runs it in
tests/test_slurm.py).
"""
import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = ["train.max_steps=2", "train.warmup_steps=1", "train.save_every=2", "train.micro_batch_size=2",
         "data.seq_len=32", "model.d_model=64", "logging.log_every=1", "logging.wandb.mode=disabled"]
SKIP = {"bash launch/test.sh": "the test suite itself",
        "--nproc-per-node 8": "needs 8 GPUs",
        "sbatch ": "needs a Slurm cluster: tests/test_slurm.py submits slurm/pretrain.sbatch to a real one",
        "launch.harness": "downloads lm-eval's task datasets (no network here) and needs the [harness] extra; "
                          "tests/test_lm_eval.py runs the adapter on local-file tasks"}


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(line)
    return commands


def _user_inputs(root: Path) -> None:
    lib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in lib.glob("*.py") if 2000 < p.stat().st_size < 20000)[:40]
    (root / "corpus").mkdir()
    for p in sources[:20]:
        shutil.copy(p, root / "corpus" / (p.stem + ".txt"))
    with gzip.open(root / "more.jsonl.gz", "wt") as f:
        for p in sources[20:30]:
            f.write(json.dumps({"text": p.read_text()}) + "\n")
    (root / "code").mkdir()
    for p in sources[30:]:
        shutil.copy(p, root / "code" / (p.stem + ".txt"))
    (root / "notes.txt").write_text("Recurrent models keep a state of fixed size.\n")
    (root / "more_docs").mkdir()
    (root / "more_docs" / "a.txt").write_text("def f(x):\n    return x + 1\n")


def _adapt(command: str) -> str:
    """Append the documented small-size overrides to training commands."""
    if "-m launch.train" in command:
        return command + " " + " ".join(SMALL)
    if command.startswith("bash launch/smoke.sh"):
        return "SMOKE_MAX_BYTES=1000000 SMOKE_MIN_DROP=0 " + command + " " + " ".join(SMALL[:2])
    return command


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme") / "repo"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout ({listed.stderr.strip()}): cannot tell what a clone holds")
    for rel in filter(None, listed.stdout.split("\0")):
        src = REPO / rel
        if src.is_file() and not src.is_symlink():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    _user_inputs(root)
    return root


def _venv_is_current(root: Path) -> bool:
    """Whether launch/setup_env.sh would only activate this venv (its stamp matches), not pip
    install the copy into it (which would point the shared editable install at a temp dir)."""
    import hashlib

    stamp = Path(sys.prefix) / ".recurrent-pretrain-installed"
    want = hashlib.sha256((root / "pyproject.toml").read_bytes() + (root / "launch" / "setup_env.sh").read_bytes())
    return stamp.is_file() and stamp.read_text().strip() == want.hexdigest()


def test_every_readme_command_runs_as_written(clone, capsys):
    if not _venv_is_current(clone):
        pytest.skip("the venv's install predates pyproject.toml / setup_env.sh: run `bash launch/test.sh` "
                    "(it brings the venv up to date first), not pytest alone")
    commands = readme_commands((clone / "README.md").read_text())
    assert any("launch.prepare_data" in c for c in commands) and any("launch.eval" in c for c in commands)
    # smoke.sh makes runs/smoke, which the export / generate / eval blocks use: run it first
    commands.sort(key=lambda c: not c.startswith("bash launch/smoke.sh"))
    env = {**os.environ, "VENV": sys.prefix, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    skipped, ran = [], []
    for command in commands:
        why = next((reason for key, reason in SKIP.items() if key in command), None)
        if why:
            skipped.append(f"{command.split()[0]} ...: {why}")
            continue
        proc = subprocess.run(_adapt(command), shell=True, cwd=clone, env=env, capture_output=True, text=True,
                              timeout=600, executable="/bin/bash")
        assert proc.returncode == 0, (f"README command failed (rc {proc.returncode}):\n  {command}\n"
                                      f"{proc.stdout[-2500:]}\n{proc.stderr[-2500:]}")
        ran.append(shlex.split(command)[:3])
    with capsys.disabled():
        print(f"\nREADME: ran {len(ran)} commands; skipped " + "; ".join(skipped))
    assert len(ran) >= 12
    assert (clone / "runs" / "smoke" / "eval.json").is_file()
    assert (clone / "runs" / "mycorpus-full" / "manifest.json").is_file()  # tp2 x sp2 converted to one rank
    assert (clone / "runs" / "mix" / "checkpoints").is_dir() and (clone / "data" / "code" / "manifest.json").is_file()
