"""A run dir belongs to one run: one trainer at a time (the lock), one run's checkpoints (the rule).

**The lock.** Two trainers on one run dir would interleave their metrics and checkpoints and
prune each other's saves. The lock is flock(2) on `trainer.lock`, taken by global rank 0 alone:
the run dir sits on a filesystem every rank shares (checkpoints need that), so one lock speaks
for the whole job, and a lock per node would only make the job's own nodes collide. The file
holds who took it (host, pid, start time) for the message a second trainer gets.

The kernel drops a flock when its holder dies (kill -9; a crashed node's, once its NFS lease expires), so a
lock file left behind is stale but never blocks. Forked children (loader workers) close their
inherited descriptor, so a worker outliving a killed trainer does not keep the lock either.
Filesystems without flock (Lustre mounted `noflock`) cannot lock: a one-line warning, and the
run goes on unprotected.

**The rule.** Every checkpoint records its run's lineage (an id made when a run starts from
step 0 and inherited by every resume). A run starting at step s (0 for a new run, the
checkpoint's step when resuming) refuses a run dir whose checkpoints/ holds a checkpoint of a
later step than s, or one of another lineage: the new run's saves would be pruned in favour of
them or overwrite them, and auto-resume would pick them up. Such a run needs a new
train.run_dir, or train.overwrite=true, which moves those checkpoints (and a copy of the metrics
log) into <run_dir>/replaced-<time>/ -- itself a run dir one can resume from -- and deletes
nothing. Damaged checkpoints that auto-resume skipped do not count (this run replaces them when
it reaches their step). Pruning then only ever counts this run's checkpoints up to the one just
written (pretrain/checkpoint.py).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import weakref
from pathlib import Path

from pretrain.checkpoint import lineage_of, step_of
from pretrain.config import ConfigError

LOCK_FILE = "trainer.lock"


class RunDirLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self._made_dir = False
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: ref() is not None and ref()._forget_in_child())

    def acquire(self) -> None:
        """Take the lock, or raise a ConfigError naming the trainer that holds it."""
        self._made_dir = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create train.run_dir={self.run_dir}: {exc.strerror}; choose a directory "
                              f"you can write to") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise ConfigError(f"cannot open {self.path}: {exc.strerror}; train.run_dir must be a directory "
                                  f"you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    self._undo_mkdir()
                    raise ConfigError(f"{self.run_dir} is in use by another trainer ({_describe(holder)}); wait for "
                                      f"it to finish or stop it, or choose another train.run_dir") from None
                print(f"warning: cannot lock {self.path} ({os.strerror(exc.errno)}): nothing stops a second "
                      f"trainer from using this run dir", file=sys.stderr, flush=True)
                return
            try:  # the file we locked must still be the one at the path (another holder may unlink it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}).encode())
        self.fd = fd

    def release(self) -> None:
        """Drop the lock. If acquire() made the run dir and nothing else was written to it, the
        directory goes again (an error before the run wrote anything leaves nothing behind)."""
        if self.fd is None:
            return
        if self._made_dir and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            self.path.unlink()  # while still holding it: a waiter re-checks the inode
        os.close(self.fd)
        self.fd = None
        self._undo_mkdir()

    def _undo_mkdir(self) -> None:
        if self._made_dir:
            try:
                self.run_dir.rmdir()  # only if empty
            except OSError:
                pass

    def _forget_in_child(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown: it is just starting"


# ----------------------------------------------------------------------------- one run's checkpoints


def clashing_checkpoints(run_dir: Path, resumed: dict | None, skipped: list[Path]) -> list[Path]:
    """The checkpoints in run_dir that a run resuming from the checkpoint whose trainer state is
    `resumed` (None: a new run, from step 0) may not share the directory with (see the module
    docstring); `skipped`: damaged ones auto-resume passed over."""
    start = resumed["step"] if resumed else 0
    lineage = resumed.get("lineage") if resumed else None
    clash = []
    for ckpt in sorted((Path(run_dir) / "checkpoints").glob("step_*")):
        if not ckpt.is_dir() or ckpt in skipped:
            continue
        theirs = lineage_of(ckpt)
        if resumed is None or step_of(ckpt) > start or (None not in (theirs, lineage) and theirs != lineage):
            clash.append(ckpt)
    return clash


def _names(ckpts: list[Path]) -> str:
    return ckpts[0].name if len(ckpts) == 1 else f"{ckpts[0].name} .. {ckpts[-1].name}"


def refuse_clash(run_dir: Path, clash: list[Path], resume: str, start_step: int) -> None:
    """The one-line error for clashing checkpoints when train.overwrite is false."""
    if resume == "none" or start_step == 0:
        what = (f"train.resume={resume} starts a new run in {run_dir}, which holds another run's checkpoints "
                f"({_names(clash)}); this run's saves would be pruned in favour of them and auto-resume would "
                f"continue the old run")
    else:
        later = [c for c in clash if step_of(c) > start_step]
        other = [c for c in clash if step_of(c) <= start_step]
        holds = " and ".join(([f"later checkpoints ({_names(later)})"] if later else [])
                             + ([f"another run's checkpoints ({_names(other)})"] if other else []))
        what = (f"train.resume={resume} continues at step {start_step}, but {run_dir}/checkpoints holds {holds}; "
                f"this run would overwrite them or be pruned in their favour, and auto-resume would pick them")
    raise ConfigError(f"{what}. Choose a new train.run_dir, or pass train.overwrite=true to move them into "
                      f"{run_dir}/replaced-<time>/ (nothing is deleted)")


def move_aside(run_dir: Path, clash: list[Path], new_run: bool) -> Path:
    """train.overwrite=true: move the clashing checkpoints into run_dir/replaced-<time>/checkpoints
    with a `latest` naming the newest, copy metrics.jsonl / loss.svg / config.yaml beside them
    (and move wandb_id.txt there when a new run starts, so it gets its own wandb run), and point
    the run dir's `latest` at its newest remaining checkpoint. Returns the new directory."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        aside = run_dir / (f"replaced-{stamp}" if n == 1 else f"replaced-{stamp}-{n}")
        try:
            (aside / "checkpoints").mkdir(parents=True)
            break
        except FileExistsError:
            continue
    for ckpt in clash:
        os.replace(ckpt, aside / "checkpoints" / ckpt.name)
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file() and pointer.read_text().strip() in {c.name for c in clash}:
        os.replace(pointer, aside / "checkpoints" / "latest")
        remaining = sorted(p.name for p in root.glob("step_*") if p.is_dir())
        if remaining:
            pointer.write_text(remaining[-1])
    else:
        (aside / "checkpoints" / "latest").write_text(clash[-1].name)
    for name in ("metrics.jsonl", "loss.svg", "config.yaml"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, aside / name)
    if new_run and (run_dir / "wandb_id.txt").is_file():
        os.replace(run_dir / "wandb_id.txt", aside / "wandb_id.txt")  # a new run: a new wandb run
    return aside
