"""python -m launch.generate --export DIR [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-k K]

Loads an export (model.safetensors + config.json + tokenizer.model) and prints the prompt and a
sampled continuation (--temperature 0: greedy). Decoding is recurrent: one parallel prefill over
the prompt, then one step per new token with each layer's state (O(1) per recurrent layer;
attention appends to its KV cache). --no-cache re-runs the whole sequence for every token instead.
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
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true",
                        help="re-run the whole sequence for every new token (slow; for comparison)")
    args = parser.parse_args(argv)

    from pretrain.config import ConfigError

    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: no limit), got {args.top_k}")
    if not args.prompt:
        raise ConfigError("--prompt is empty; generation continues a prompt of at least one token")

    import torch

    from data.tokenizer import Tokenizer
    from pretrain.export import load_exported

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_exported(args.export, device)
    tok = Tokenizer(f"{args.export}/tokenizer.model")
    prompt = tok.encode(args.prompt)
    if not prompt:
        raise ConfigError(f"--prompt {args.prompt!r} encodes to no tokens; give a non-empty prompt")
    ids = torch.tensor([prompt], device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(ids, args.max_new_tokens, args.temperature, args.top_k, generator=gen,
                         eos_id=tok.eos_id, use_cache=not args.no_cache, vocab_limit=tok.vocab_size)
    print(tok.decode(out[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "generate"))
