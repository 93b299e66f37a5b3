"""python -m launch.prepare_data --out DIR [--input PATH ...] [options]

Text / JSON lines -> sentencepiece tokenizer -> webdataset token shards + manifest.json.
Without --input, the corpus is the Python standard library's source (the smoke-test corpus).
"""
from __future__ import annotations

import argparse
import sys

USER_ERROR_EXIT_CODE = 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.prepare_data",
                                     description=__doc__.splitlines()[2])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--input", action="append", metavar="PATH",
                        help="text file, .jsonl(.gz) file, or directory of them; repeatable "
                             "(default: the Python standard library's source)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary to train")
    parser.add_argument("--tokenizer", metavar="MODEL", help="use this sentencepiece .model instead of training one")
    parser.add_argument("--shard-tokens", type=int, default=1 << 22, help="tokens per shard")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl records")
    parser.add_argument("--workers", type=int, default=1, help="tokenising processes")
    parser.add_argument("--max-bytes", type=int, help="stop after this many bytes of text")
    parser.add_argument("--max-documents", type=int, help="stop after this many documents")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="fraction of documents held out as the val split")
    parser.add_argument("--max-sentences", type=int, default=300_000,
                        help="lines sampled to train the tokenizer")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a corpus prepared in --out with other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from data.prepare import prepare_corpus  # after argument errors, which need no imports

    prepare_corpus(args.input, args.out, vocab_size=args.vocab_size, tokenizer_model=args.tokenizer,
                   shard_tokens=args.shard_tokens, model_type=args.model_type,
                   text_field=args.text_field, max_sentences=args.max_sentences,
                   num_workers=args.workers, max_documents=args.max_documents,
                   max_bytes=args.max_bytes, val_fraction=args.val_fraction,
                   overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def cli(argv=None) -> int:
    """main() with user errors (bad inputs, settings) as one line on stderr and exit code 2."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("prepare_data: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
