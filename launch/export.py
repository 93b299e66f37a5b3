"""python -m launch.export --checkpoint RUN_DIR|CHECKPOINT_DIR --out DIR [--dtype fp32|bf16]

Writes model.safetensors, config.json and tokenizer.model into DIR (atomically). DIR must be new,
empty, or an earlier export: nothing else is ever replaced. The checkpoint's files are checked
against the sha256 in its manifest first.
"""
from __future__ import annotations

import argparse
import sys

from launch.errors import run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run dir (uses its latest checkpoint) or a checkpoint dir")
    parser.add_argument("--out", required=True, help="output directory (new, empty, or an earlier export)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args(argv)
    from pretrain.export import export

    out = export(args.checkpoint, args.out, args.dtype)
    print(f"exported {out}/model.safetensors, config.json, tokenizer.model")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "export"))
