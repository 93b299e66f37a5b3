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
pointer untouched.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

TMP = ".tmp"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
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


def save_checkpoint(engine, run_dir: str | Path, step: int, trainer_state: dict, rank_state: dict,
                    keep_last: int = 3) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = Path(run_dir) / "checkpoints"
    tag = tag_for_step(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp_root = root / TMP
    if rank == 0:
        shutil.rmtree(tmp_root / tag, ignore_errors=True)  # leftovers of a crashed save
        tmp_root.mkdir(parents=True, exist_ok=True)
    _barrier()
    engine.save_checkpoint(str(tmp_root), tag=tag, save_latest=False)
    tmp = tmp_root / tag
    torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
    _barrier()
    final = root / tag
    if rank == 0:
        _write_atomic(tmp / "trainer_state.json", json.dumps(trainer_state, indent=1))
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_atomic(tmp / "manifest.json", json.dumps({"tag": tag, "step": step, "files": files}, indent=1))
        if final.exists():  # re-saving the same step (e.g. stop_at == a save step): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", tag)
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in root.glob("step_*") if (p / "manifest.json").is_file())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def damage(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be loaded (missing manifest, a missing or truncated file), or None if intact."""
    manifest = ckpt / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "manifest.json is unreadable"
    for name, size in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def is_complete(ckpt: Path) -> bool:
    return Path(ckpt).is_dir() and damage(Path(ckpt)) is None


def find_latest(run_dir: str | Path, report=None) -> Path | None:
    """The newest intact checkpoint. A damaged newer one is reported (report(msg)) and skipped."""
    root = Path(run_dir) / "checkpoints"
    candidates = sorted(root.glob("step_*"), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for ckpt in candidates:
        why = damage(ckpt) if ckpt.is_dir() else "it does not exist"
        if why is None:
            return ckpt
        if report is not None:
            report(f"skipping checkpoint {ckpt}: {why}")
    return None


def read_trainer_state(ckpt: str | Path) -> dict:
    return json.loads((Path(ckpt) / "trainer_state.json").read_text())


def load_checkpoint(engine, ckpt: str | Path) -> tuple[dict, dict]:
    """Collective: restores model, optimizer and schedule into `engine`; returns (trainer, rank) state."""
    ckpt = Path(ckpt)
    rank = dist.get_rank() if dist.is_initialized() else 0
    path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {ckpt}")
    rank_state = torch.load(ckpt / f"rank_{rank:05d}.pt", weights_only=True)
    return read_trainer_state(ckpt), rank_state
