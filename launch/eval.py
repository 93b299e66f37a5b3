"""python -m launch.eval --model PATH (--data DIR [--split val] | --text FILE ...) [--seq-len N]

Held-out perplexity, bits per token and bits per byte of an export or a checkpoint (a run dir's
newest intact one, or a checkpoint dir) on a prepared split or on raw text files. Prints one line
and, with --json FILE, writes the numbers. How tokens are scored and bytes counted:
pretrain/evaluate.py's docstring (every token is predicted once, from windows of
--seq-len tokens; bytes are the UTF-8 bytes of the text the scored tokens decode to, one per EOS).
"""
from __future__ import annotations

import argparse
import sys

from launch.errors import run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="an export dir (launch.export), a run dir, or a checkpoint dir")
    parser.add_argument("--data", help="a directory written by python -m launch.prepare_data, its http(s) base "
                                       "URL, or a pipe: command printing DIR/{file} (as data.path)")
    parser.add_argument("--split", default="val", help="which split of --data (default: val)")
    parser.add_argument("--text", nargs="+", help="raw .txt / .jsonl(.gz) files or directories instead of --data")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens predicted per window (default 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, help="score only the first N tokens of the stream")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)

    from pretrain.evaluate import evaluate, summary_line, to_json

    result = evaluate(args.model, data=args.data, split=args.split, text=args.text, seq_len=args.seq_len,
                      batch_size=args.batch_size, max_tokens=args.max_tokens)
    print(summary_line(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "eval"))
