"""Training metrics: a JSONL file, wandb (offline unless asked), MFU, and a loss-curve plot."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s by device name (vendor data sheets, without sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989.5e12,
    "H100": 989.5e12,
    "H800": 989.5e12,
    "GH200": 989.5e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
}


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The device's bf16 peak in FLOP/s, or None when unknown (MFU is then not reported)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BF16_FLOPS.items():
            if key in name:
                return peak
    return None


class MetricsLogger:
    """Rank 0 writes metrics.jsonl in the run dir and, unless disabled, a wandb run (offline by default)."""

    def __init__(self, run_dir: Path, cfg_dict: dict, wandb_cfg, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        if resume_step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run in a reused run dir starts a fresh log
        elif resume_step > 0 and self.path.exists():
            self._truncate_after(resume_step)  # drop lines of steps that the resume will redo
        mode = os.environ.get("WANDB_MODE", wandb_cfg.mode)
        if mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name, mode=mode,
                                    dir=str(run_dir), config=cfg_dict, resume="allow",
                                    id=self._wandb_id(run_dir))

    @staticmethod
    def _wandb_id(run_dir: Path) -> str:
        id_file = Path(run_dir) / "wandb_id.txt"
        if not id_file.exists():
            import uuid

            id_file.write_text(uuid.uuid4().hex[:12])
        return id_file.read_text().strip()

    def _truncate_after(self, step: int) -> None:
        """Keep the records up to `step`; lines that are not records (a line torn by a crash mid-write,
        stray text) are dropped, with a note, rather than blocking the resume."""
        lines = self.path.read_text(errors="replace").splitlines()
        records = [r for r in map(_parse_record, lines) if r is not None]
        dropped = sum(1 for line in lines if line.strip()) - len(records)
        if dropped:
            print(f"{self.path}: dropped {dropped} line(s) that are not JSON records (a crash mid-write leaves "
                  f"a torn last line)", flush=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _parse_record(line: str) -> dict | None:
    """A metrics.jsonl line as a record ({"step": int, ...}), or None if it is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
        return None
    return record


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: str | Path, unreadable: list | None = None) -> list[dict]:
    """The records of a metrics.jsonl; lines that are not records are skipped (and appended to
    `unreadable` when given)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        record = _parse_record(line) if line.strip() else {}
        if record is None and unreadable is not None:
            unreadable.append(line)
        elif record:
            records.append(record)
    return records


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About n round tick values (1, 2 or 5 x 10^k apart) covering [lo, hi]; integers if asked."""
    span = max(hi - lo, 1e-12)
    raw = span / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10)), key=lambda v: abs(v - raw))
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step) * step
    ticks, k = [], 0
    while first + k * step <= hi + 1e-9 * span:
        ticks.append(first + k * step)
        k += 1
    return ticks


def plot_loss_svg(records: list[dict], out: str | Path, title: str = "training loss") -> Path | None:
    """Write the loss curve (and val_loss where logged) as a standalone SVG (no plotting library)."""
    def series(key):
        return [(r["step"], r[key]) for r in records
                if _is_number(r.get(key)) and math.isfinite(r[key]) and _is_number(r.get("step"))]

    points, val = series("loss"), series("val_loss")
    if len(points) < 2:
        return None
    W, H, pad = 640, 360, 48
    xs, ys = [p[0] for p in points + val], [p[1] for p in points + val]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y1 = y0 + 1.0

    def sx(x):
        return pad + (x - x0) / max(x1 - x0, 1) * (W - 2 * pad)

    def sy(y):
        return H - pad - (y - y0) / (y1 - y0) * (H - 2 * pad)

    def line(pts):
        return " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(pts))

    ticks = []
    for y in nice_ticks(y0, y1):
        ticks.append(f'<text x="{pad - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="11">{y:g}</text>'
                     f'<line x1="{pad}" x2="{W - pad}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>')
    for x in nice_ticks(x0, x1, integer=True):
        ticks.append(f'<text x="{sx(x):.1f}" y="{H - pad + 16}" text-anchor="middle" font-size="11">{int(x)}</text>')
    curves = f'<path d="{line(points)}" fill="none" stroke="#1f77b4" stroke-width="1.8"/>'
    legend = '<text x="{0}" y="40" font-size="11" fill="#1f77b4">loss</text>'.format(W - pad - 80)
    if val:
        curves += (f'<path d="{line(val)}" fill="none" stroke="#ff7f0e" stroke-width="1.8"/>'
                   + "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="#ff7f0e"/>' for x, y in val))
        legend += f'<text x="{W - pad - 80}" y="54" font-size="11" fill="#ff7f0e">val_loss</text>'
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">'
           f'<rect width="100%" height="100%" fill="white"/>{"".join(ticks)}{curves}{legend}'
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>'
           f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" font-size="12">step</text></svg>')
    out = Path(out)
    out.write_text(svg)
    return out
