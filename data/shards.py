"""The on-disk format of a prepared corpus, shared by the writer (prepare) and the reader (loader).

A prepared directory holds:
  tokenizer.model        the sentencepiece model
  train-000000.tar ...   webdataset shards; each holds one sample `<stem>.tokens.npy`, a 1-D
  val-000000.tar ...     array of exactly `shard_tokens` token ids (the last shard of a split may
                         be shorter), uint16 when vocab_size < 65536 else uint32
  manifest.json          written last: what a loader needs, and the settings that made it

A split's token stream is its documents in order, each followed by EOS, cut into shards.
`starts_document` of a shard says whether its first token begins a document (the previous
shard ended with EOS, or it is the split's first shard).

The directory may also be served from elsewhere (data/sources.py: an http(s) base URL or a pipe:
command): the manifest and the shards are then streamed, a shard's tar read member by member
while its bytes are hashed, never stored whole on local disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds

from data.sources import Source, SourceError, open_source

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
FORMAT = "recurrent-pretrain/token-shards"
VERSION = 1
SPLITS = ("train", "val")


class ShardError(ValueError):
    """A shard that is missing, unreadable, or does not match its manifest entry."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for a vocabulary below 65536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size < 1 << 16 else np.dtype(np.uint32)


def prepare_hint(data_dir: str | os.PathLike) -> str:
    return f"python -m launch.prepare_data --out {data_dir}"


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, then rename: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(path: Path, tokens: np.ndarray) -> str:
    """Write one shard atomically; returns its sha256."""
    buf = io.BytesIO()
    # mtime fixed so that the same tokens give the same bytes (and checksum) on every run.
    with wds.TarWriter(buf, mtime=0) as sink:
        sink.write({"__key__": path.stem, "tokens.npy": np.ascontiguousarray(tokens)})
    data = buf.getvalue()
    write_atomic(path, data)
    return bytes_sha256(data)


def read_shard(path: Path, sha256: str, dtype: np.dtype, tokens: int, verified: dict | None = None) -> np.ndarray:
    """A shard's tokens, after checking its bytes against the manifest's sha256 and count.

    verified: a per-process dict; a shard whose file (device, inode, size, mtime) is unchanged
    since it was hashed here against this sha256 is not hashed again (hashing was ~40% of the
    loader's time when shards are re-read as the cache cycles). A rewritten file is hashed anew.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as e:
        raise ShardError(f"shard {path} cannot be read ({e.strerror}); re-run "
                         f"{prepare_hint(path.parent)}") from None
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, sha256)
    if verified is None or verified.get(str(path)) != identity:
        if bytes_sha256(data) != sha256:
            raise ShardError(f"shard {path} is corrupt: its sha256 does not match manifest.json; "
                             f"re-run {prepare_hint(path.parent)}")
        if verified is not None:
            verified[str(path)] = identity
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            parts = [np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False)
                     for m in tar.getmembers() if m.isfile() and m.name.endswith(".npy")]
    except (tarfile.TarError, ValueError, OSError) as e:
        raise ShardError(f"shard {path} cannot be decoded ({e})") from None
    return _checked_tokens(parts, path, dtype, tokens)


def load_shard(source: Source, entry: dict, dtype: np.dtype, verified: dict | None = None) -> np.ndarray:
    """The tokens of the manifest `entry`'s shard in `source`: read_shard for a local directory,
    stream_shard for a URL or a pipe command."""
    if not source.remote:
        return read_shard(source.location(entry["file"]), entry["sha256"], dtype, entry["tokens"], verified)
    return stream_shard(source, entry["file"], entry["sha256"], dtype, entry["tokens"])


class _Hashing:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw):
        self.raw, self.sha = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class _Reader:
    def __init__(self, read):
        self.read = read


def _decode_stream(stream: _Hashing) -> list[np.ndarray]:
    """The .npy members of a tar read front to back (nothing seeks back, nothing is buffered whole)."""
    parts = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for m in tar:
            if m.isfile() and m.name.endswith(".npy"):
                # read_array reads a plain read()-only object in bounded chunks (a file-like
                # object would make it ask for fileno(), which a tar member has none of).
                member = _Reader(tar.extractfile(m).read)
                parts.append(np.lib.format.read_array(member, allow_pickle=False))
    return parts


def stream_shard(source: Source, file: str, sha256: str, dtype: np.dtype, tokens: int) -> np.ndarray:
    """A remote shard's tokens, decoded while its bytes stream in and are hashed (so every read is
    verified; the bytes are held only as the token array). Errors name the shard and where it is."""
    where = source.location(file)

    def consume(raw) -> tuple[list[np.ndarray] | None, str | None, str]:
        stream = _Hashing(raw)
        try:
            parts, why = _decode_stream(stream), None
        except (tarfile.TarError, ValueError, EOFError) as e:
            parts, why = None, str(e) or type(e).__name__
        stream.drain()  # the tar's end padding, or the rest after a decode error: all is hashed
        return parts, why, stream.sha.hexdigest()

    try:
        parts, why, got = source.read(file, consume)
    except SourceError as e:
        raise ShardError(f"shard {file}: {e}") from None
    if got != sha256:
        raise ShardError(f"shard {where} is corrupt: its sha256 does not match manifest.json; the source holds "
                         f"another file than its manifest lists (copy the prepared directory there again)")
    if parts is None:
        raise ShardError(f"shard {where} cannot be decoded ({why})")
    return _checked_tokens(parts, where, dtype, tokens)


def _checked_tokens(parts: list[np.ndarray], where, dtype: np.dtype, tokens: int) -> np.ndarray:
    arr = np.concatenate(parts) if parts else np.empty(0, dtype)
    if arr.dtype != dtype or arr.ndim != 1 or len(arr) != tokens:
        raise ShardError(f"shard {where} holds {len(arr)} {arr.dtype} tokens, manifest.json "
                         f"says {tokens} {dtype}")
    return arr


class SplitWriter:
    """Appends documents (+ EOS) to a split's token stream and cuts it into shards."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype: np.dtype,
                 eos_id: int):
        self.out_dir, self.split = Path(out_dir), split
        self.shard_tokens, self.dtype, self.eos_id = shard_tokens, np.dtype(dtype), eos_id
        self.shards: list[dict] = []
        self.documents = 0
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._last_token: int | None = None  # last token of the previous shard

    def add_document(self, ids) -> None:
        doc = np.empty(len(ids) + 1, self.dtype)
        doc[:-1] = ids
        doc[-1] = self.eos_id
        self._pending.append(doc)
        self._pending_tokens += len(doc)
        self.documents += 1
        while self._pending_tokens >= self.shard_tokens:
            self._write(self.shard_tokens)

    def _write(self, n: int) -> None:
        stream = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        shard, rest = stream[:n], stream[n:]
        self._pending = [rest] if len(rest) else []
        self._pending_tokens = len(rest)
        name = f"{self.split}-{len(self.shards):06d}.tar"
        sha = write_shard(self.out_dir / name, shard)
        starts = self._last_token is None or self._last_token == self.eos_id
        self.shards.append({"file": name, "tokens": int(n), "sha256": sha,
                            "starts_document": bool(starts)})
        self._last_token = int(shard[-1])

    def finish(self) -> dict:
        if self._pending_tokens:
            self._write(self._pending_tokens)
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents,
                "shards": self.shards}


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def write_manifest(out_dir: Path, manifest: dict) -> None:
    write_atomic(Path(out_dir) / MANIFEST, manifest_bytes(manifest))


def empty_split_reason(manifest: dict) -> str:
    """Why a prepared directory's val split holds nothing (its val_fraction and documents)."""
    frac = manifest.get("settings", {}).get("val_fraction")
    if not frac:
        return "it was prepared with --val-fraction 0"
    return f"its {manifest.get('documents', 0):,} documents at --val-fraction {frac} put none in it"


def load_manifest(data_dir) -> tuple[dict, str]:
    """(manifest, sha256 of its bytes) of a prepared directory, URL or pipe: source. Missing
    directory or manifest, unreachable URL, failing command: FileNotFoundError that says what to do."""
    source = open_source(data_dir)
    if not source.remote:
        data_dir = source.path
        if not data_dir.is_dir():
            raise FileNotFoundError(f"data directory {data_dir} does not exist; create it with: "
                                    f"{prepare_hint(data_dir)}")
        path = data_dir / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{data_dir} has no {MANIFEST} (no finished prepare run); "
                                    f"run: {prepare_hint(data_dir)}")
        data = path.read_bytes()
        hint = f"re-run {prepare_hint(data_dir)}"
    else:
        path = source.location(MANIFEST)
        try:
            data = source.read_bytes(MANIFEST)
        except SourceError as e:
            raise SourceError(f"{e}; the data must be a prepared directory, its base URL (with "
                              f"BASE/{MANIFEST}) or a pipe: command that prints DIR/{{file}}") from None
        hint = f"serve a directory written by {prepare_hint('DIR')} there"
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {hint}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest; {hint}")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path} has format version {manifest.get('version')}, this code reads "
                         f"version {VERSION}; {hint}")
    return manifest, bytes_sha256(data)
