"""Data benchmark: preparation tokens/s per core and loader tokens/s per process.

    python -m bench.data            # ~8 MB of stdlib text to prepare, a 64M-token corpus to load
    python -m bench.data --quick    # smaller, well under a minute

Preparation: a tokenizer (vocab 32000, BPE) is trained on the first --prepare-bytes of the
standard library's source (timed apart), then `prepare_corpus` tokenises that text with it and
writes shards in one worker process: tokens/s per core. Loader: a synthetic corpus of --tokens
uint16 tokens (about; documents of random length) in shards of 4Mi is read by one TokenLoader (dp rank 0
of 1, seq_len 2048, batch 8) for one epoch, with 0 and with 2
worker processes; tokens/s is input tokens handed to the caller per second of wall time, shard
reads, sha256 checks and worker start-up included. The same corpus is then read with 2 workers
from the other sources data.path can name (data/sources.py): its http:// URL, served by a
ThreadingHTTPServer in a separate process on 127.0.0.1, and `pipe:cat DIR/{file}`; these shards
are streamed and hashed as they arrive. Results replace bench/results/data.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import http.server
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data.corpus import default_corpus_files, iter_documents
from data.loader import TokenLoader
from data.prepare import bounded_documents, prepare_corpus, write_token_corpus
from data.tokenizer import train_tokenizer

RESULTS = Path(__file__).parent / "results" / "data.md"
NOTE = ("With workers, batches come back in blocks of consecutive batches (about 256K tokens, at most 64 batches; data/loader.py), one shared-memory hand-off per block rather than per batch (~1.5 ms each on this machine): short-sequence batches no longer pay it each. Workers pay off when shard reads are slow (network file systems) and overlap them with the training step; in-process (num_workers=0) is the default. A local shard is hashed once per process (data/shards.py); a streamed one (http, pipe) is hashed as it arrives, every time a worker reads it, and crosses a socket or pipe: on this 2-core machine the server process, the `cat`s, two workers and the main process share the cores.")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores visible, load average (1/5/15 min) {load}"


def bench_prepare(root: Path, prepare_bytes: int) -> dict:
    corpus = root / "text"
    corpus.mkdir()
    docs = list(bounded_documents(iter_documents(default_corpus_files()), None, prepare_bytes))
    for i, d in enumerate(docs):
        (corpus / f"{i:06d}.txt").write_text(d, encoding="utf-8")
    t0 = time.perf_counter()
    tok = train_tokenizer(iter(docs), root / "tok", 32000, max_sentences=300_000)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = prepare_corpus([corpus], root / "prepared", tokenizer_model=tok.model_path, num_workers=1,
                              shard_tokens=1 << 20, progress=False)
    t_prep = time.perf_counter() - t0
    return {"bytes": sum(len(d.encode()) for d in docs), "documents": len(docs),
            "tokens": manifest["total_tokens"], "tokenizer_s": t_tok, "prepare_s": t_prep,
            "vocab": tok.vocab_size}


def _serve(directory: str, port) -> None:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=directory))
    port.send(httpd.server_address[1])
    httpd.serve_forever()


def http_server(directory: Path) -> tuple[multiprocessing.Process, str]:
    """A local HTTP server of directory in its own process (as a remote server would be), and its URL."""
    ours, theirs = multiprocessing.get_context("fork").Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_serve, args=(str(directory), theirs), daemon=True)
    proc.start()
    return proc, f"http://127.0.0.1:{ours.recv()}"


def bench_loader(root: Path, tokens: int, seq_len: int, batch_size: int, runs: list[tuple[str, int]]) -> list[dict]:
    """runs: (source, workers) pairs; source local, http or pipe."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 5000, size=tokens // 2000)
    docs = (rng.integers(2, 32000, size=n) for n in lengths)
    manifest = write_token_corpus(root / "tokens", docs, vocab_size=32000, eos_id=1, shard_tokens=1 << 22,
                                  val_fraction=0.0, tokenizer_sha256="0" * 64, settings={})
    rows = [{"corpus_tokens": manifest["total_tokens"], "shards": len(manifest["train"]["shards"])}]
    server, url = http_server(root / "tokens")
    specs = {"local": root / "tokens", "http": url, "pipe": f"pipe:cat {root / 'tokens'}/{{file}}"}
    try:
        for source, w in runs:
            loader = TokenLoader(specs[source], seq_len, batch_size, num_workers=w)
            n = loader.batches_per_epoch
            t0 = time.perf_counter()
            for _ in range(n):
                next(loader)
            dt = time.perf_counter() - t0
            loader.close()
            rows.append({"source": source, "workers": w, "batches": n, "tokens": n * batch_size * seq_len, "s": dt})
    finally:
        server.terminate()
        server.join()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--prepare-bytes", type=int)
    p.add_argument("--tokens", type=int, help="loader corpus size in tokens")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    prepare_bytes = args.prepare_bytes or (2_000_000 if args.quick else 8_000_000)
    tokens = args.tokens or (16 << 20 if args.quick else 64 << 20)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        prep = bench_prepare(Path(tmp), prepare_bytes)
        loads = bench_loader(Path(tmp), tokens, args.seq_len, args.batch_size,
                             [("local", 0), ("local", 2), ("http", 2), ("pipe", 2)])
    command = " ".join(["python -m bench.data", *(argv if argv is not None else __import__("sys").argv[1:])])
    lines = [
        "# Data benchmark", "",
        "Written by `python -m bench.data` (see its docstring for what is measured); a run replaces this file.", "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; python "
        f"{platform.python_version()}, torch {torch.__version__}", "",
        "## Preparation (one tokenising process)", "",
        f"- input: {prep['bytes'] / 1e6:.1f} MB of stdlib source, {prep['documents']:,} documents, "
        f"{prep['tokens']:,} tokens (vocab {prep['vocab']})",
        f"- tokenizer training (sentencepiece BPE, vocab 32000): {prep['tokenizer_s']:.1f} s",
        f"- tokenise + write shards + manifest: {prep['prepare_s']:.1f} s = "
        f"**{prep['tokens'] / prep['prepare_s'] / 1e6:.2f} M tokens/s per core** "
        f"({prep['bytes'] / prep['prepare_s'] / 1e6:.1f} MB/s of text)", "",
        f"## Loader (one process, seq_len {args.seq_len}, batch {args.batch_size}, "
        f"{loads[0]['corpus_tokens']:,}-token uint16 corpus in {loads[0]['shards']} shards of 4Mi tokens)", "",
        "| data.path | workers | batches | input tokens | time | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    shown = {"local": "local directory", "http": "`http://127.0.0.1:PORT` (server process)",
             "pipe": "`pipe:cat DIR/{file}`"}
    for r in loads[1:]:
        lines.append(f"| {shown[r['source']]} | {r['workers']} | {r['batches']} | {r['tokens']:,} | {r['s']:.2f} s | "
                     f"**{r['tokens'] / r['s'] / 1e6:.1f} M** |")
    lines += ["", NOTE, "", "Goal (issue 6): loader >= 2M tokens/s per process (a 1B model on one H200 reads ~50k/s).", ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
