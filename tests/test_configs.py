"""Every shipped config parses, builds on the meta device, and has the parameter count its comment states."""
import re
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.model import LanguageModel

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_expected_configs_ship():
    names = {p.stem for p in CONFIGS}
    assert {"smoke", "pararnn-gru-1b", "pararnn-lstm-1b", "deltaproduct-1b", "hybrid-1b",
            "pararnn-gru-7b", "pararnn-lstm-7b", "deltaproduct-7b"} <= names


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem != "smoke"], ids=lambda p: p.stem)
def test_parameter_count_matches_the_comment(path):
    stated = re.search(r"^# parameters: ([0-9.]+)B$", path.read_text(), re.M)
    assert stated, f"{path.name} must state '# parameters: X.XXXB'"
    cfg = load_config(path)
    with torch.device("meta"):
        model = LanguageModel(cfg.model)
    actual = model.num_params() / 1e9
    assert actual == pytest.approx(float(stated.group(1)), rel=0.03), (path.name, actual)
