"""Text -> tokenizer -> token shards -> manifest.json (see data/shards.py for the format).

Restartable: the manifest is written last, so a directory without one is an unfinished run,
cleaned up and redone; a directory whose manifest records the same settings is returned as is.
"""

from __future__ import annotations

import collections
import multiprocessing
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from data.corpus import default_corpus_files, expand_inputs, inputs_fingerprint, iter_documents
from data.shards import (FORMAT, TOKENIZER, VERSION, SplitWriter, load_manifest, token_dtype,
                         write_atomic, write_manifest)
from data.tokenizer import Tokenizer, train_tokenizer

# Files a prepare run writes; only these are removed when an unfinished run is cleaned up.
_OUR_FILES = re.compile(
    r"^((train|val)-\d{6}\.tar|tokenizer\.model|tokenizer\.tmp\.model|manifest\.json)(\.tmp)?$")
_CHUNK_BYTES = 1 << 20  # documents are sent to tokenising workers in chunks of about this size


def log(msg: str) -> None:
    print(f"prepare_data: {msg}", flush=True)


def bounded_documents(docs: Iterable[str], max_documents: int | None,
                      max_bytes: int | None) -> Iterator[str]:
    """The first documents of `docs` up to max_documents documents and max_bytes UTF-8 bytes;
    the document that crosses max_bytes is cut there."""
    total = 0
    for n, doc in enumerate(docs):
        if max_documents is not None and n >= max_documents:
            return
        if max_bytes is not None:
            size = len(doc.encode("utf-8"))
            if total + size > max_bytes:
                cut = doc.encode("utf-8")[:max_bytes - total].decode("utf-8", errors="ignore")
                if cut:
                    yield cut
                return
            total += size
        yield doc


def is_validation(doc_index: int, val_fraction: float) -> bool:
    """Spread validation documents evenly: after n documents, round(n * val_fraction) of them
    are validation (so the first appears once 1 / (2 val_fraction) documents have been seen)."""
    if val_fraction <= 0:
        return False
    return int((doc_index + 1) * val_fraction + 0.5) > int(doc_index * val_fraction + 0.5)


# -- tokenising, in this process or in a pool of workers ------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_path)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(_worker_tokenizer.encode(t), dtype=np.int64) for t in texts]


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encode_documents(docs: Iterable[str], model_path: Path, num_workers: int) -> Iterator[np.ndarray]:
    """Token ids of each document, in input order."""
    if num_workers <= 1:
        _init_worker(str(model_path))
        for chunk in _chunks(docs):
            yield from _encode_chunk(chunk)
        return
    # Bounded look-ahead (Pool.imap would read the whole corpus into its task queue). An
    # executor, not a Pool: a worker that dies raises BrokenProcessPool instead of hanging.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(num_workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(str(model_path),)) as pool:
        pending: collections.deque = collections.deque()
        try:
            for chunk in _chunks(docs):
                pending.append(pool.submit(_encode_chunk, chunk))
                if len(pending) >= 2 * num_workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool:
            raise RuntimeError("a tokenising worker process died (out of memory, or a __main__ "
                               "that spawned workers cannot re-import); retry with --workers 1") from None
        finally:
            for future in pending:
                future.cancel()


# -- the whole pipeline --------------------------------------------------------------------------

def _existing_manifest(out_dir: Path, overwrite: bool) -> dict | None:
    """The manifest of a finished run in out_dir whose files are all present, else None.
    A manifest this code cannot read is an error unless overwrite (it may be precious)."""
    try:
        manifest, _ = load_manifest(out_dir)
    except FileNotFoundError:
        return None
    except ValueError as e:
        if overwrite:
            return None
        raise ValueError(f"{e.args[0].split('; re-run')[0]}; pass --overwrite to replace it") from None
    files = [manifest.get("tokenizer", TOKENIZER)]
    files += [s["file"] for split in ("train", "val") for s in manifest.get(split, {}).get("shards", [])]
    return manifest if all((out_dir / f).is_file() for f in files) else None


def _remove_our_files(out_dir: Path) -> None:
    stale = [p for p in out_dir.iterdir() if p.is_file() and _OUR_FILES.match(p.name)]
    if stale:
        log(f"removing {len(stale)} files of an earlier unfinished or replaced run in {out_dir}")
    for p in stale:
        p.unlink()


def _check_args(vocab_size, shard_tokens, model_type, num_workers, max_documents, max_bytes,
                val_fraction, max_sentences):
    if shard_tokens < 2:
        raise ValueError(f"shard_tokens {shard_tokens} is too small; use at least seq_len + 1 "
                         f"(millions in practice)")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type {model_type!r} is not supported; choose bpe or unigram")
    if vocab_size < 16:
        raise ValueError(f"vocab_size {vocab_size} is too small; use at least a few hundred")
    if num_workers < 1:
        raise ValueError(f"num_workers {num_workers} must be at least 1")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents {max_documents} must be at least 1 (or unset)")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes {max_bytes} must be at least 1 (or unset)")
    if not 0 <= val_fraction < 0.5:
        raise ValueError(f"val_fraction {val_fraction} must be in [0, 0.5)")
    if max_sentences < 1:
        raise ValueError(f"max_sentences {max_sentences} must be at least 1")


def write_token_corpus(out_dir: Path, documents: Iterable, *, vocab_size: int, eos_id: int,
                       shard_tokens: int, val_fraction: float, tokenizer_sha256: str,
                       settings: dict) -> dict:
    """Shard already-tokenised documents (EOS is appended here) into train/val splits and
    write manifest.json last; returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    writers = {split: SplitWriter(out_dir, split, shard_tokens, dtype, eos_id)
               for split in ("train", "val")}
    for i, ids in enumerate(documents):
        writers["val" if is_validation(i, val_fraction) else "train"].add_document(ids)
    splits = {split: w.finish() for split, w in writers.items()}
    if splits["train"]["tokens"] == 0:
        raise ValueError("the inputs hold no text: no training tokens were produced")
    manifest = {
        "format": FORMAT, "version": VERSION,
        "tokenizer": TOKENIZER, "tokenizer_sha256": tokenizer_sha256,
        "vocab_size": vocab_size, "eos_id": eos_id, "dtype": dtype.name,
        "shard_tokens": shard_tokens,
        "total_tokens": splits["train"]["tokens"] + splits["val"]["tokens"],
        "documents": splits["train"]["documents"] + splits["val"]["documents"],
        "train": splits["train"], "val": splits["val"],
        "settings": settings,
    }
    write_manifest(out_dir, manifest)
    if val_fraction > 0 and splits["val"]["documents"] == 0:
        log(f"warning: no validation split: {manifest['documents']:,} documents at val_fraction "
            f"{val_fraction} give none (the first is document {first_validation_document(val_fraction):,}); "
            f"train.eval_every needs one: use --val-fraction >= {1 / (2 * manifest['documents']):.3g} "
            f"or more text")
    return manifest


def first_validation_document(val_fraction: float) -> int:
    """The 1-based index of the first document is_validation sends to "val"."""
    return next(i + 1 for i in range(1 << 62) if is_validation(i, val_fraction))


def prepare_corpus(inputs, out_dir, vocab_size: int = 1024,
                   tokenizer_model=None, shard_tokens: int = 1 << 22, model_type: str = "bpe",
                   text_field: str = "text", max_sentences: int = 300_000, num_workers: int = 1,
                   max_documents: int | None = None, max_bytes: int | None = None,
                   val_fraction: float = 0.01, byte_fallback: bool = True,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Prepare `inputs` (paths; None = the standard library's source) into out_dir and return
    the manifest.

    With tokenizer_model, that sentencepiece model is copied and used (vocab_size, model_type,
    max_sentences and byte_fallback are then unused); otherwise one is trained on the bounded
    corpus. Documents go to the "val" split at the rate val_fraction, spread evenly, else to
    "train". A directory already prepared with other settings is an error unless overwrite.
    """
    out_dir = Path(out_dir)
    _check_args(vocab_size, shard_tokens, model_type, num_workers, max_documents, max_bytes,
                val_fraction, max_sentences)
    files = default_corpus_files() if inputs is None else expand_inputs(inputs)
    if tokenizer_model is not None:
        tokenizer_model = Path(tokenizer_model)
        tokenizer_settings = {"given_sha256": Tokenizer(tokenizer_model).checksum}  # loads it
        # Read now: it may be the tokenizer.model of out_dir, removed below when redoing.
        tokenizer_bytes = tokenizer_model.read_bytes()
    else:
        tokenizer_settings = {"vocab_size": vocab_size, "model_type": model_type,
                              "max_sentences": max_sentences, "byte_fallback": byte_fallback}
    settings = {
        "inputs": "python stdlib" if inputs is None else [str(f.resolve()) for f in files],
        "inputs_fingerprint": inputs_fingerprint(files),
        "text_field": text_field, "max_documents": max_documents, "max_bytes": max_bytes,
        "shard_tokens": shard_tokens, "val_fraction": val_fraction,
        "tokenizer": tokenizer_settings,
    }

    if out_dir.is_dir():
        existing = _existing_manifest(out_dir, overwrite)
        if existing is not None and existing.get("settings") == settings:
            log(f"{out_dir} already holds this corpus ({existing['total_tokens']:,} tokens); "
                f"nothing to do")
            return existing
        if existing is not None and not overwrite:
            old = existing.get("settings", {})
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(f"{out_dir} holds a corpus prepared with other settings "
                             f"({', '.join(diff)} differ); choose another --out or pass --overwrite")
        _remove_our_files(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def documents() -> Iterator[str]:
        return bounded_documents(iter_documents(files, text_field), max_documents, max_bytes)

    t0 = time.time()
    model_path = out_dir / TOKENIZER
    if tokenizer_model is not None:
        write_atomic(model_path, tokenizer_bytes)
        tokenizer = Tokenizer(model_path)
        log(f"using tokenizer {tokenizer_model} (vocab {tokenizer.vocab_size})")
    else:
        train_tokenizer(documents(), out_dir / "tokenizer.tmp", vocab_size, model_type=model_type,
                        max_sentences=max_sentences, byte_fallback=byte_fallback)
        (out_dir / "tokenizer.tmp.model").replace(model_path)
        tokenizer = Tokenizer(model_path)
        note = "" if tokenizer.vocab_size == vocab_size else \
            f" (asked for {vocab_size}: the corpus supports no more)"
        log(f"trained a {model_type} tokenizer with vocab {tokenizer.vocab_size}{note} "
            f"in {time.time() - t0:.1f}s")

    t1 = time.time()
    encoded = encode_documents(documents(), model_path, num_workers)
    bar = tqdm(encoded, desc="prepare_data: tokenising", unit=" docs", disable=not progress,
               file=sys.stderr, mininterval=1.0)
    manifest = write_token_corpus(out_dir, bar, vocab_size=tokenizer.vocab_size,
                                  eos_id=tokenizer.eos_id, shard_tokens=shard_tokens,
                                  val_fraction=val_fraction, tokenizer_sha256=tokenizer.checksum,
                                  settings=settings)
    log(f"wrote {len(manifest['train']['shards'])} train shards "
        f"({manifest['train']['tokens']:,} tokens) and {len(manifest['val']['shards'])} val "
        f"shards ({manifest['val']['tokens']:,} tokens) from {manifest['documents']:,} documents "
        f"to {out_dir} in {time.time() - t1:.1f}s")
    return manifest
