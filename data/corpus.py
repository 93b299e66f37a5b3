"""Where documents come from: plain text files, JSON-lines files, directories of them, and the
embedded default corpus (the Python standard library's own source, present on any machine)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
ACCEPTED = "a directory, plain text (" + ", ".join(TEXT_SUFFIXES) + ") or JSON lines (" + \
    ", ".join(JSONL_SUFFIXES) + ")"

# Directories of the standard library that hold test suites or third-party packages.
_SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def default_corpus_files() -> list[Path]:
    """The standard library's .py files, sorted, without test suites or site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library at {root}")
    return sorted(files)


def _kind(path: Path) -> str | None:
    name = path.name
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def expand_inputs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The files named by `paths`, directories expanded recursively in sorted order.

    A file named explicitly must have an accepted suffix; inside a directory, files with other
    suffixes are skipped, but a directory with no accepted file at all is an error."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f) is not None)
            if not found:
                raise ValueError(f"input directory {p} holds no readable files; accepted: {ACCEPTED}")
            files.extend(found)
        elif p.is_file():
            if _kind(p) is None:
                raise ValueError(f"unsupported input file {p}; accepted: {ACCEPTED}")
            files.append(p)
        else:
            raise ValueError(f"input path {p} does not exist; accepted: {ACCEPTED}")
    if not files:
        raise ValueError(f"no input paths given; accepted: {ACCEPTED}")
    return files


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{path}:{lineno}: record has no field {text_field!r} "
                                     f"(choose the field with --text-field)")
                text = record[text_field]
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: field {text_field!r} is "
                                     f"{type(text).__name__}, expected a string")
                if text:
                    yield text
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; truncated gzip is EOFError
        raise ValueError(f"cannot read {path}: {e}") from None


def iter_documents(paths, text_field: str = "text") -> Iterator[str]:
    """Document strings in a fixed order: one per text file, one per JSON line.

    Empty documents are skipped. Unsupported or missing paths raise ValueError here, when
    called, not later during iteration."""
    return _iter_files(expand_inputs(paths), text_field)


def _iter_files(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        if _kind(path) == "jsonl":
            yield from _iter_jsonl(path, text_field)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text:
                yield text


def inputs_fingerprint(files: list[Path]) -> str:
    """A cheap identity of the input files (path, size, mtime), to tell whether a prepared
    corpus is still up to date without reading the files."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
