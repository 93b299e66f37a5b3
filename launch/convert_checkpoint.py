"""python -m launch.convert_checkpoint --checkpoint RUN_DIR|CHECKPOINT_DIR --out DIR

Writes a topology-free copy of a ZeRO-1/2 checkpoint: full fp32 weights and AdamW moments (ZeRO
partitions concatenated, tensor-parallel shards reassembled), the schedule, the data position and
our trainer state. Resume it at any dp / sp / tp with train.resume=DIR, or export it.
(Resuming at another topology converts on the fly; this command does it once, ahead of time.)
DIR must be new, empty, or an earlier conversion: nothing else is ever replaced.
"""
from __future__ import annotations

import argparse
import sys

from launch.errors import run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.convert_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run dir (uses its latest checkpoint) or a checkpoint dir")
    parser.add_argument("--out", required=True, help="output checkpoint directory (new, empty, or an earlier conversion)")
    args = parser.parse_args(argv)
    from pretrain.reshard import CONVERSION, convert_to_full, is_conversion
    from pretrain.config import ConfigError
    from pretrain.export import resolve_checkpoint
    from pretrain.output_dir import check_replaceable

    check_replaceable(args.out, is_conversion, CONVERSION)  # before any work
    ckpt = resolve_checkpoint(args.checkpoint)
    try:
        out = convert_to_full(ckpt, args.out)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"converted {ckpt} to {out} (resume with train.resume={out} at any dp / sp / tp)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "convert_checkpoint"))
