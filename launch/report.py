"""python -m launch.report --run-dir DIR [--export DIR]

Summarises a run from its metrics.jsonl: first and last loss, tokens/s, where the checkpoint and
export are; writes the loss curve to <run_dir>/loss.svg.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.errors import run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.report", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--export", default=None)
    parser.add_argument("--min-drop", type=float, default=None,
                        help="fail (exit 1) unless the last loss is at least this fraction below the first")
    args = parser.parse_args(argv)

    from pretrain.checkpoint import find_latest
    from pretrain.metrics import plot_loss_svg, read_metrics

    run_dir = Path(args.run_dir)
    unreadable = []
    # Only the training records this report reads (step, loss, tokens, tokens_per_s: numbers).
    records = [r for r in read_metrics(run_dir / "metrics.jsonl", unreadable)
               if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                      for k in ("loss", "tokens", "tokens_per_s"))]
    garbage = (f"{len(unreadable)} line(s) of {run_dir}/metrics.jsonl are not JSON records, the first: "
               f"{unreadable[0][:60]!r}") if unreadable else ""
    if not records:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl has no logged steps" + (f" ({garbage})" if garbage else "")
                                + f"; is {run_dir} a run directory?")
    if garbage:
        print(f"report: skipped them: {garbage}", file=sys.stderr)
    first, last = records[0], records[-1]
    speeds = [r["tokens_per_s"] for r in records[1:]] or [first["tokens_per_s"]]
    drop = 1.0 - last["loss"] / first["loss"] if first["loss"] else 0.0
    plot = plot_loss_svg(records, run_dir / "loss.svg")
    print("=" * 72)
    print(f"run            {run_dir}")
    print(f"steps          {last['step']} ({last['tokens']:,} tokens)")
    print(f"loss           {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']}), "
          f"{drop:.0%} lower")
    print(f"throughput     {sum(speeds) / len(speeds):,.0f} tokens/s (mean of logged intervals)")
    if "mfu" in last:
        print(f"MFU            {last['mfu']:.1%}")
    if "newton_residual_max" in last:
        print(f"Newton resid.  {last['newton_residual_max']:.2e} (max over ParaRNN layers, last step)")
    print(f"skipped steps  {last.get('skipped', 0)}")
    print(f"checkpoint     {find_latest(run_dir)}")
    if args.export:
        print(f"export         {Path(args.export) / 'model.safetensors'}")
    if plot:
        print(f"loss curve     {plot}")
    print("=" * 72)
    if args.min_drop is not None and drop < args.min_drop:
        print(f"report: the loss fell {drop:.0%}, less than the required {args.min_drop:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "report"))
