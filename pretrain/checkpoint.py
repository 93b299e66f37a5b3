"""Checkpoints: DeepSpeed's per-rank shards plus our own state, written atomically.

    run_dir/checkpoints/
        step_00000100/              one complete checkpoint (the DeepSpeed "tag")
            mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed's shards
            trainer_state.json      step, tokens, config snapshot, tokenizer checksum, topology
            rank_00000.pt           per-rank RNG states and data-loader position
            manifest.json           every file with its size, written last
        latest                      the newest complete tag (DeepSpeed's own pointer format)

A save goes to checkpoints/.tmp/<tag> and is renamed into place only when every rank has
finished; `latest` is replaced after that. A crash mid-save leaves the previous checkpoint and
pointer untouched. Pruning only ever counts checkpoints up to the step just written (a later step
belongs to another run), so the checkpoint just written is never deleted.

Every file is read with torch.load(weights_only=True) -- DeepSpeed's own reads included (see
"Loading without running code") -- and its sha256 checked against the manifest before use.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import ConfigError
from pretrain.deepspeed_io import load_checkpoint_file, load_weights_only

TMP = ".tmp"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    _, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached_gauss)],
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gauss))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class _HashingFile:
    """A binary file that hashes what is written through it (torch.save writes sequentially)."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def save_hashing(obj, path: Path) -> str:
    """torch.save(obj, path); the sha256 of the bytes written (no second read of the file)."""
    f = _HashingFile(path)
    try:
        torch.save(obj, f)
        f.flush()
        os.fsync(f._f.fileno())
    finally:
        f.close()
    return f.sha256.hexdigest()


def _to_host(obj):
    """A copy of obj whose tensors are detached host copies (training goes on changing the
    originals while an asynchronous save writes): what the background writer saves."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return obj.detach().clone()
        out = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=torch.cuda.is_available())
        return out.copy_(obj.detach(), non_blocking=True)
    if isinstance(obj, dict):
        return type(obj)((k, _to_host(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_to_host(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_to_host(v) for v in obj)
    return copy.deepcopy(obj)


class Checkpointer:
    """Saves one run's checkpoints (layout and guarantees: module docstring). Collective: every
    rank calls save() and wait().

    state_of(step) -> (trainer_state, rank_state) is called at save time. Every file DeepSpeed
    writes goes through this object (the engine's checkpoint engine's save is replaced) and is
    hashed while it is written, so the manifest's sha256 costs no second read.

    async_save=False: save() returns when the checkpoint is in place and `latest` names it.
    async_save=True: save() copies what is to be written to host memory (DeepSpeed's collectives
    run as usual) and returns; a background thread per rank writes the files and then a marker
    with their sha256 into the temporary directory; rank 0's thread waits for every rank's
    marker, then writes the manifest, renames the checkpoint into place, updates `latest` and
    prunes. No collective runs off the main thread. A kill at any point leaves the previous
    checkpoint and `latest` as they were (the partial save is cleared by the next save of that
    step). The next save(), and wait() (before exit), first finish the one in flight; training
    holds a host copy of the model and optimizer shards while one is."""

    def __init__(self, engine, run_dir: str | Path, state_of, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = False):
        self.engine, self.state_of = engine, state_of
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last, self.keep_every, self.async_save = keep_last, keep_every, async_save
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self._pending: list[tuple[object, Path]] = []  # (what, where) staged by the engine's save
        self._hashes: dict[str, str] = {}  # this rank's files of the save in progress: name -> sha256
        self._tmp: Path | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_saved: Path | None = None  # in place (async: once the background save finished)
        # Through a weak reference: the engine must not keep this object (and through state_of the
        # data loader and its worker processes) alive after the run.
        me = weakref.ref(self)
        engine.checkpoint_engine.save = lambda state_dict, path: me()._engine_save(state_dict, path)

    def _engine_save(self, state_dict, path: str) -> None:
        path = Path(path)
        if self.async_save:
            self._pending.append((_to_host(state_dict), path))
        else:
            self._hashes[str(path.relative_to(self._tmp))] = save_hashing(state_dict, path)

    def save(self, step: int) -> Path:
        """Collective: checkpoint the engine at `step`; returns the directory it has (or, async,
        will have) once in place."""
        self.wait()
        tag = tag_for_step(step)
        tmp_root = self.root / TMP
        self._tmp = tmp = tmp_root / tag
        self._hashes, self._pending = {}, []
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
            tmp_root.mkdir(parents=True, exist_ok=True)
        barrier()
        trainer_state, rank_state = self.state_of(step)
        self.engine.save_checkpoint(str(tmp_root), tag=tag, save_latest=False)
        own = [(rank_state, tmp / f"rank_{self.rank:05d}.pt")]
        final = self.root / tag
        if not self.async_save:
            for obj, path in own:
                self._hashes[path.name] = save_hashing(obj, path)
            if self.rank == 0:
                self._write_trainer_state(tmp, trainer_state)
            barrier()
            hashes = _merged_over_ranks(self._hashes)
            if self.rank == 0:
                self._put_in_place(tmp, final, step, hashes)
            barrier()
            self.last_saved = final
            return final
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the pinned host copies are complete
        pending = self._pending + [(_to_host(obj), path) for obj, path in own]
        self._pending = []
        trainer_state = copy.deepcopy(trainer_state) if self.rank == 0 else None
        self._thread = threading.Thread(target=self._write_in_background, name=f"checkpoint-{tag}", daemon=True,
                                        args=(tmp, final, step, pending, trainer_state))
        self._thread.start()
        return final

    def wait(self) -> None:
        """Block until this rank's part of an asynchronous save is written (rank 0: until the
        checkpoint is in place); re-raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"the asynchronous checkpoint save failed: {error}") from error

    # -- the pieces

    def _write_trainer_state(self, tmp: Path, trainer_state: dict) -> None:
        text = json.dumps(trainer_state, indent=1)
        write_atomic(tmp / "trainer_state.json", text)
        self._hashes["trainer_state.json"] = hashlib.sha256(text.encode()).hexdigest()

    def _put_in_place(self, tmp: Path, final: Path, step: int, hashes: dict[str, str]) -> None:
        """Rank 0, every rank's files written: the manifest (files DeepSpeed copied rather than
        saved, its recovery scripts, are hashed here), the rename, `latest`, pruning."""
        names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        sha256 = {n: hashes[n] if n in hashes else file_sha256(tmp / n) for n in names}
        files = {n: (tmp / n).stat().st_size for n in names}
        write_atomic(tmp / "manifest.json", json.dumps({"tag": final.name, "step": step, "files": files,
                                                        "sha256": sha256}, indent=1))
        if final.exists():  # re-saving the same step (e.g. stop_at == a save step): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(self.root / "latest", final.name)
        _prune(self.root, self.keep_last, self.keep_every, current_step=step)

    def _write_in_background(self, tmp, final, step, pending, trainer_state) -> None:
        try:
            hashes = {str(path.relative_to(tmp)): save_hashing(obj, path) for obj, path in pending}
            del pending
            if trainer_state is not None:
                self._hashes = hashes
                self._write_trainer_state(tmp, trainer_state)
            write_atomic(tmp / f"{_DONE}{self.rank:05d}.json", json.dumps(hashes))
            if self.rank != 0:
                return
            markers = [tmp / f"{_DONE}{r:05d}.json" for r in range(self.world)]
            while not all(m.is_file() for m in markers):  # the other ranks' threads (shared filesystem)
                time.sleep(0.05)
            for m in markers:
                hashes.update(json.loads(m.read_text()))
                m.unlink()
            self._put_in_place(tmp, final, step, hashes)
            self.last_saved = final
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread by wait()
            self._error = exc


_DONE = ".written_by_rank_"  # async saves: a rank's marker, {file: sha256}; removed before the manifest


def save_checkpoint(engine, run_dir: str | Path, step: int, trainer_state: dict, rank_state: dict,
                    keep_last: int = 3, keep_every: int = 0) -> Path:
    """Collective, synchronous: one checkpoint of `engine` at `step` (Checkpointer for a run)."""
    return Checkpointer(engine, run_dir, lambda _: (trainer_state, rank_state), keep_last, keep_every).save(step)


def step_of(ckpt: Path) -> int:
    return int(Path(ckpt).name.split("_")[1])


def _prune(root: Path, keep_last: int, keep_every: int = 0, *, current_step: int) -> None:
    """Of the complete checkpoints up to `current_step` (the one just written), keep the newest
    `keep_last` and every one whose step is a multiple of `keep_every` (0: none); delete the rest.
    Checkpoints of later steps are not this run's (a damaged one auto-resume skipped, or another
    run's that train.overwrite did not move): never counted, never deleted."""
    if keep_last <= 0:
        return
    done = sorted(p for p in root.glob("step_*")
                  if (p / "manifest.json").is_file() and step_of(p) <= current_step)
    for old in done[:-keep_last]:
        if keep_every > 0 and step_of(old) % keep_every == 0:
            continue
        shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _hash_files_collectively(ckpt: Path, names: list[str] | None = None) -> dict[str, str]:
    """sha256 of the checkpoint's files, the work split over ranks (file i on rank i % world);
    every rank returns the whole dict. Needs the directory on a filesystem all ranks share."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if names is None:
        names = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    return _merged_over_ranks({n: file_sha256(ckpt / n) for i, n in enumerate(names) if i % world == rank})


def _merged_over_ranks(mine: dict) -> dict:
    """Collective: the union of every rank's dict (keys are disjoint), on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(mine)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in sorted(part.items())}


def checksum_mismatch(ckpt: str | Path) -> str | None:
    """Collective: re-hash every file the manifest lists (split over ranks); the first file whose
    content differs, as a sentence, or None. Checkpoints written before checksums were recorded
    pass on sizes alone."""
    ckpt = Path(ckpt)
    recorded = json.loads((ckpt / "manifest.json").read_text()).get("sha256")
    if not recorded:
        return None
    actual = _hash_files_collectively(ckpt, sorted(recorded))
    for name in sorted(recorded):
        if actual.get(name) != recorded[name]:
            return f"{name} does not match the sha256 in its manifest"
    return None


def verify_checksums(ckpt: str | Path) -> None:
    """Collective: a one-line error naming the first file whose content differs from the manifest."""
    why = checksum_mismatch(ckpt)
    if why is not None:
        raise ConfigError(f"checkpoint {ckpt} is damaged: {why}; use an older one "
                          f"(<run_dir>/checkpoints/step_XXXXXXXX)")


def damage(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be loaded (missing manifest, a missing or truncated file), or None if intact."""
    manifest = ckpt / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        values = json.loads(manifest.read_text())
        files, sha = values["files"], values.get("sha256", {})
    except (ValueError, KeyError, TypeError, AttributeError):
        return "manifest.json is unreadable (not JSON, or no 'files')"
    if not (isinstance(files, dict) and all(isinstance(v, int) for v in files.values()) and isinstance(sha, dict)):
        return "manifest.json is malformed ('files' must map names to sizes, 'sha256' names to hashes)"
    for name, size in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def is_complete(ckpt: Path) -> bool:
    return Path(ckpt).is_dir() and damage(Path(ckpt)) is None


def lineage_of(ckpt: Path) -> str | None:
    """The lineage id a checkpoint's trainer state records: made when a run starts from step 0,
    inherited by every resume (None: written before lineages were recorded, or unreadable)."""
    try:
        return json.loads((Path(ckpt) / "trainer_state.json").read_text()).get("lineage")
    except (OSError, ValueError, AttributeError):
        return None


def find_latest(run_dir: str | Path, report=None, verify: bool = False, skipped: list | None = None) -> Path | None:
    """The newest intact checkpoint of the run `latest` names: the highest step of its lineage
    (`latest` is written just after a checkpoint is renamed into place, so it can lag by one),
    then anything else, newest first (checkpoints without a lineage: `latest`'s own first). A
    damaged one is reported (report(msg)), appended to `skipped`, and passed over. verify=True
    (collective) also re-hashes each candidate's files against its manifest, so a flipped byte
    falls back to the older checkpoint too."""
    root = Path(run_dir) / "checkpoints"
    candidates = sorted(root.glob("step_*"), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        lineage = lineage_of(named)
        first = [c for c in candidates if lineage is not None and lineage_of(c) == lineage]
        if not first:
            first = [named]
        candidates = first + [c for c in candidates if c not in first]
    for ckpt in candidates:
        why = damage(ckpt) if ckpt.is_dir() else "it does not exist"
        if why is None and verify:
            why = checksum_mismatch(ckpt)
        if why is None:
            return ckpt
        if report is not None:
            report(f"skipping checkpoint {ckpt}: {why}")
        if skipped is not None and ckpt.is_dir():
            skipped.append(ckpt)
    return None


TRAINER_STATE_KEYS = ("step", "tokens", "skipped_steps", "config")


def read_trainer_state(ckpt: str | Path) -> dict:
    """trainer_state.json; a one-line error when it is not a JSON object (an edited or damaged file
    whose manifest was rewritten to match: the sha256 check cannot catch that)."""
    path = Path(ckpt) / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); use another checkpoint") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} is not a JSON object; use another checkpoint")
    return state


def restore(engine, ckpt: str | Path, dims) -> tuple[dict, dict]:
    """Collective: the training state of `ckpt` into `engine`, whatever topology wrote it (resharded
    by pretrain/reshard.py when its dp/sp/tp differ from `dims`, or it is a converted one); returns
    (trainer state, this rank's state). What train.py calls to resume."""
    from pretrain import reshard  # reshard builds on this module

    if reshard.needs_reshard(read_trainer_state(ckpt), dims):
        return reshard.load_resharded(engine, ckpt, dims)
    return load_checkpoint(engine, ckpt)


def load_checkpoint(engine, ckpt: str | Path) -> tuple[dict, dict]:
    """Collective: restores model, optimizer and schedule into `engine`; returns (trainer, rank) state."""
    ckpt = Path(ckpt)
    rank = dist.get_rank() if dist.is_initialized() else 0
    load_weights_only(engine)
    path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {ckpt}")
    rank_state = load_checkpoint_file(ckpt / f"rank_{rank:05d}.pt")
    return read_trainer_state(ckpt), rank_state
