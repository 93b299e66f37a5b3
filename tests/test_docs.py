"""The user-facing documentation the repository must carry: the design doc inside the clone, and
`python -m launch.train --help` listing every config key with its type, default and help."""

import dataclasses
import subprocess
import sys
from pathlib import Path

from pretrain.config import Config

ROOT = Path(__file__).resolve().parent.parent


def _keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(type(value), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_train_help_lists_every_config_key_with_type_and_default():
    out = subprocess.run([sys.executable, "-m", "launch.train", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = {line.split(" (", 1)[0].strip(): line for line in out.stdout.splitlines() if " (" in line}
    keys = list(_keys(Config))
    assert len(keys) > 50
    missing = [k for k in keys if k not in lines]
    assert not missing, f"--help lacks {missing}"
    assert "train.lr (float, default 0.003): peak learning rate" in lines["train.lr"]
    assert "one of 'auto', 'torch', 'triton'" in lines["train.kernel_backend"]
    assert "default null" in lines["logging.wandb.name"]


def test_design_doc_is_in_the_repository_and_nothing_points_outside_it():
    design = ROOT / "docs" / "DESIGN.md"
    assert design.is_file() and "## kernels/" in design.read_text()
    assert "docs/DESIGN.md" in (ROOT / "README.md").read_text()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout: look at the usual places
        tracked = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.md") if ".venv" not in p.parts]
    outside = [p for p in tracked if p.endswith((".md", ".py", ".sh", ".sbatch"))
               and p != "tests/test_docs.py" and "../" + "shared" in (ROOT / p).read_text(errors="replace")]
    assert not outside, f"these files point at ../shared, which a clone does not have: {outside}"
