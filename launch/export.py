"""python -m launch.export --checkpoint RUN_DIR|CHECKPOINT_DIR --out DIR [--dtype fp32|bf16] [--format native|hf]

Writes model.safetensors, config.json and tokenizer.model into DIR (atomically). DIR must be new,
empty, or an earlier export of the same format: nothing else is ever replaced. The checkpoint's
files are checked against the sha256 in its manifest first. --format hf writes a transformers
directory instead: AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) loads it.
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
    parser.add_argument("--format", default="native", choices=["native", "hf"],
                        help="native: for launch.generate / launch.eval; hf: a transformers directory "
                             "(trust_remote_code) with its modeling code, safetensors and tokenizer")
    args = parser.parse_args(argv)
    from pretrain.export import export

    out = export(args.checkpoint, args.out, args.dtype, args.format)
    if args.format == "hf":
        print(f"exported {out} (transformers: AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True))")
    else:
        print(f"exported {out}/model.safetensors, config.json, tokenizer.model")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "export"))
