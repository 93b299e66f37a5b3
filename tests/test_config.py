"""Config parsing, command-line overrides, and the one-line errors a user can cause."""
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_smoke_config_loads_with_typed_values():
    cfg = load_config(REPO / "configs/smoke.yaml")
    assert cfg.model.layer_mixers() == ["paragru", "deltaproduct", "attention", "paragru"]
    assert cfg.model.deltaproduct.num_householder == 2
    assert cfg.train.lr == pytest.approx(3e-3) and isinstance(cfg.train.lr, float)
    assert cfg.model.paragru.tol == pytest.approx(1e-3)


def test_overrides_parse_by_field_type():
    cfg = load_config(REPO / "configs/smoke.yaml", [
        "train.max_steps=17", "train.warmup_steps=2", "train.lr=1e-4", "model.tie_embeddings=false",
        "model.mixers=[attention,paralstm]", "model.n_layers=2", "train.run_dir=/tmp/x",
        "model.paragru.tol=null", "logging.wandb.mode=disabled"])
    assert cfg.train.max_steps == 17
    assert cfg.train.lr == 1e-4
    assert cfg.model.tie_embeddings is False
    assert cfg.model.mixers == ["attention", "paralstm"]
    assert cfg.train.run_dir == "/tmp/x"
    assert cfg.model.paragru.tol is None
    assert cfg.logging.wandb.mode == "disabled"


def test_single_mixer_applies_to_every_layer():
    cfg = load_config(None, ["model.mixers=deltaproduct", "model.n_layers=3"])
    assert cfg.model.layer_mixers() == ["deltaproduct"] * 3


@pytest.mark.parametrize("text, expected", [
    ("model:\n  d_modle: 3\n", "unknown config key 'model.d_modle'; valid keys here: vocab_size, d_model"),
    ("trian:\n  lr: 1\n", "unknown config key 'trian'; valid keys here: model, data, train"),
    ("train:\n  max_steps: ten\n", "train.max_steps: got 'ten', expected int"),
    ("train:\n  lr: fast\n", "train.lr: got 'fast', expected float"),
    ("model:\n  tie_embeddings: 3\n", "model.tie_embeddings: got 3, expected bool"),
    ("model:\n  mixers: [paragru, mamba, attention, paragru]\n",
     "model.mixers[1]: got 'mamba', expected one of 'paragru', 'paralstm', 'deltaproduct', 'attention'"),
    ("model:\n  mixers: [paragru, attention]\n", "model.mixers has 2 entries but model.n_layers=4"),
    ("model: [1, 2\n", "malformed YAML at line"),
    ("- a\n- b\n", "the top level must be a mapping"),
])
def test_yaml_errors_name_the_key_and_the_valid_choices(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    msg = str(info.value)
    assert expected in msg
    assert "\n" not in msg


@pytest.mark.parametrize("override, expected", [
    ("train.max_stepz=3", "unknown config key 'train.max_stepz'; valid keys under train: run_dir"),
    ("train.max_steps=3.5", "train.max_steps: got '3.5', expected int"),
    ("model.mixers=[gru]", "model.mixers[0]: got 'gru', expected one of 'paragru'"),
    ("train.schedule=linear", "train.schedule: got 'linear', expected one of 'cosine', 'wsd', 'constant'"),
    ("model=3", "'model' is a section"),
    ("train.lr.x=3", "'train.lr' is a value, not a section"),
    ("train.lr", "must look like section.key=value"),
    ("parallel.zero_stage=5", "parallel.zero_stage must be one of 0, 1, 2, 3"),
    ("model.attention.num_heads=5", "model.attention.num_heads=5 must divide d_model"),
])
def test_override_errors(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/smoke.yaml", [override])
    assert expected in str(info.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_cli_prints_one_line_and_exits_2_on_malformed_yaml(tmp_path):
    bad = write(tmp_path, "train:\n  lr: [1, 2\n")
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--config", str(bad)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: error:") and "malformed YAML" in lines[0]
