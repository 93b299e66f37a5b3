"""What a user reads while a run goes: plain log lines for Slurm logs, the final `done:` line
agreeing with metrics.jsonl, the metrics' wall-clock/memory/data-wait fields, and the loss plot."""
import json
import re

from trainer_cli import train


def test_a_run_without_a_terminal_prints_plain_lines_and_done_agrees_with_the_metrics(cli_data, tmp_path):
    run_dir = tmp_path / "run"
    out = train(run_dir, "train.max_steps=4", "logging.log_every=2", "logging.progress=true", data=cli_data).stdout
    assert "\r" not in out  # no progress-bar redraws in a log file
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 1/4", "step 2/4", "step 4/4"]
    assert all(re.search(r"\| loss \d+\.\d{3} \| [\d,]+ tok/s \|.*\| lr [\d.e+-]+ \| ETA \d+:\d\d:\d\d$", ln)
               for ln in lines), lines
    records = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    for key in ("time", "elapsed_s", "data_wait_s", "max_rss_mb"):
        assert isinstance(last[key], (int, float)) and last[key] >= 0, key
    assert last["max_rss_mb"] > 50 and records[0]["time"] <= last["time"]
    done = next(line for line in out.splitlines() if line.startswith("done:"))
    first, final = re.search(r"loss (\d+\.\d+) -> (\d+\.\d+)", done).groups()
    assert float(first) == round(records[0]["loss"], 4) and float(final) == round(last["loss"], 4)
    assert f"loss {last['loss']:.3f}" in lines[-1]


def test_the_loss_plot_shows_val_loss_and_integer_step_ticks(tmp_path):
    from pretrain.metrics import nice_ticks, plot_loss_svg

    records = [{"step": s, "loss": 7 - s / 50} for s in range(1, 241)]
    records += [{"step": s, "val_loss": 6.5 - s / 60} for s in (60, 120, 180, 240)]
    svg = plot_loss_svg(records, tmp_path / "loss.svg").read_text()
    assert svg.count("<path") == 2 and "val_loss" in svg and svg.count("<circle") == 4
    x_labels = re.findall(r'text-anchor="middle" font-size="11">([^<]+)<', svg)
    assert x_labels == ["50", "100", "150", "200"]
    assert nice_ticks(1, 3, integer=True) == [1, 2, 3] and nice_ticks(2.9, 6.95) == [3, 4, 5, 6]
