"""python -m launch.generate --export DIR [--prompt TEXT] [--max-new-tokens N]

Loads an export (model.safetensors + config.json + tokenizer.model) and prints a sampled continuation.
"""
from __future__ import annotations

import argparse
import sys

from launch.errors import run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, help="directory written by python -m launch.export")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from data.tokenizer import Tokenizer
    from pretrain.export import load_exported

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_exported(args.export, device)
    tok = Tokenizer(f"{args.export}/tokenizer.model")
    ids = torch.tensor([tok.encode(args.prompt)], device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(ids, args.max_new_tokens, args.temperature, args.top_k, generator=gen, eos_id=tok.eos_id)
    print(tok.decode(out[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "generate"))
