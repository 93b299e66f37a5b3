"""python -m launch.eval: held-out loss, perplexity, bits per token and bits per byte of an export
or a checkpoint, on a prepared split or raw text (pretrain/evaluate.py)."""
import json
import math

import numpy as np
import pytest
import torch

from trainer_cli import one_line_error, run


@pytest.fixture(scope="module")
def exported(cli_trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "export"
    run(["-m", "launch.export", "--checkpoint", str(cli_trained), "--out", str(out)])
    return out


def test_eval_of_a_split_equals_the_models_own_loss_on_the_same_windows(exported, cli_data):
    from data.tokenizer import Tokenizer
    from pretrain.evaluate import evaluate, split_tokens
    from pretrain.export import load_exported

    result = evaluate(exported, data=str(cli_data), split="train", seq_len=16, batch_size=3, max_tokens=700,
                      device="cpu")
    model, _ = load_exported(exported)
    tok = Tokenizer(exported / "tokenizer.model")
    stream = np.concatenate([[tok.eos_id], split_tokens(cli_data, "train", tok)[:700]])
    # independently: the model's own mean loss per window, weighted by its tokens
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(stream) - 1, 16):
            w = torch.from_numpy(stream[s:s + 17]).long()[None]
            doc_start = torch.cat([torch.ones(1, 1, dtype=torch.bool), w[:, :-2] == tok.eos_id], 1)
            loss = model(w[:, :-1], labels=w[:, 1:], doc_start=doc_start).item()
            total += loss * (w.shape[1] - 1)
            count += w.shape[1] - 1
    assert result["tokens"] == count == len(stream) - 1
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["bits_per_token"] == pytest.approx(result["loss"] / math.log(2))
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * count / math.log(2) / result["bytes"])


def test_eval_on_text_files_counts_the_files_bytes_and_a_checkpoint_equals_its_export(
        exported, cli_trained, tmp_path):
    from pretrain.evaluate import evaluate

    docs = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n", "x = [i * i for i in range(9)]\n"]
    files = []
    for i, d in enumerate(docs):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(d)
    from_export = evaluate(exported, text=[str(f) for f in files], seq_len=8, device="cpu")
    assert from_export["bytes"] == sum(len(d.encode()) for d in docs) + len(docs)
    assert json.loads(json.dumps(from_export)) == from_export  # plain numbers (--json), no numpy scalars
    from_ckpt = evaluate(cli_trained, text=[str(f) for f in files], seq_len=8, device="cpu")
    assert from_ckpt["loss"] == pytest.approx(from_export["loss"], rel=1e-6)
    assert from_ckpt["tokens"] == from_export["tokens"]


def test_launch_eval_prints_one_line_writes_json_and_refuses_bad_input(exported, cli_data, tmp_path):
    out = run(["-m", "launch.eval", "--model", str(exported), "--data", str(cli_data), "--split", "train",
               "--seq-len", "16", "--max-tokens", "300", "--json", str(tmp_path / "r.json")])
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("eval: ") and "perplexity" in line and "bits/byte" in line
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["split"] == "train" and result["tokens"] == 300
    # this small corpus has no validation document: the error says so, with the numbers
    line = one_line_error(run(["-m", "launch.eval", "--model", str(exported), "--data", str(cli_data)],
                              check=False), "eval")
    assert "documents at --val-fraction 0.01 put none in it" in line
    one_line_error(run(["-m", "launch.eval", "--model", str(exported)], check=False), "eval")
    one_line_error(run(["-m", "launch.eval", "--model", str(tmp_path / "nope"), "--data", str(cli_data)],
                       check=False), "eval")
    one_line_error(run(["-m", "launch.eval", "--model", str(exported), "--data", str(cli_data), "--seq-len", "0"],
                       check=False), "eval")
