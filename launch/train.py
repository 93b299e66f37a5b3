"""python -m launch.train --config configs/X.yaml [section.key=value ...]

Runs under plain python (one device), torchrun, the deepspeed launcher, or srun + torchrun.
"""
from __future__ import annotations

import argparse
import json
import sys

from pretrain import preemption

preemption.install()  # first: SIGTERM during the imports and start-up is a preemption (exit 75)

from launch.errors import run_cli  # noqa: E402
from pretrain.config import config_help, load_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0],
                                     epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the built-in defaults)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    from pretrain.train import train  # heavy imports after the config is known to be valid

    summary = train(cfg)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        fl, ll = summary["first_loss"], summary["last_loss"]
        if fl is not None:
            print(f"done: step {summary['step']}, loss {fl:.4f} -> {ll:.4f} (this run's first step -> its last "
                  f"logged window, as in metrics.jsonl), "
                  f"{summary['tokens_per_s']:,.0f} tokens/s, checkpoint {summary['checkpoint']}", flush=True)
        elif summary["exit_code"] == 0:
            print(f"done: nothing to do, already at step {summary['step']}", flush=True)
        print("summary: " + json.dumps(summary), flush=True)
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(run_cli(main, "train"))
