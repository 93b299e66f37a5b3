"""Checkpoints across topologies: a checkpoint written at one dp / sp / tp resumes at another.

A checkpoint is resharded through one topology-free form, the *full state*: every parameter's
whole fp32 master weight and AdamW moments (ZeRO partitions concatenated, tensor-parallel shards
reassembled by their `shard_spec`), the AdamW step, the LR schedule and DeepSpeed's counters.
`python -m launch.convert_checkpoint` writes it as a checkpoint of its own (FULL_STATE file);
resuming at another dp / sp / tp builds it on the fly and cuts this rank's pieces out of it.
Where DeepSpeed keeps the pieces is pretrain/deepspeed_io.py's business.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.checkpoint import TMP, barrier, file_sha256, read_trainer_state, save_hashing, write_atomic
from pretrain.deepspeed_io import load_checkpoint_file, load_full_state, zero_partitions

FULL_STATE = "full_state.pt"
FULL_STATE_FORMAT = "recurrent-pretrain/full-state/1"


def shard_specs(module: torch.nn.Module) -> dict:
    """{parameter name: [dim, shape, axis]} of every tensor-parallel parameter (for the trainer state)."""
    return {name: [p.shard_spec[0], list(p.shard_spec[1]) if p.shard_spec[1] else None, p.shard_spec[2]]
            for name, p in module.named_parameters() if hasattr(p, "shard_spec")}


def merge_shards(shards: list[torch.Tensor], spec) -> torch.Tensor:
    """Inverse of parallel.tensor_parallel.shard_tensor: the full tensor from every tp rank's shard."""
    dim, shape, axis = spec
    n = len(shards)
    dim = dim % shards[0].dim()
    shape = (shards[0].shape[dim] * n,) if shape is None else tuple(shape)
    local = list(shape)
    local[axis] //= n
    lead, tail = shards[0].shape[:dim], shards[0].shape[dim + 1:]
    parts = [s.reshape(lead + tuple(local) + tail) for s in shards]
    return torch.cat(parts, dim=dim + axis).reshape(lead + (-1,) + tail)


def cut_shard(full: torch.Tensor, spec, rank: int, n: int) -> torch.Tensor:
    """This tp rank's shard of `full` (the same cut as parallel.tensor_parallel.shard_tensor)."""
    dim, shape, axis = spec
    dim = dim % full.dim()
    shape = (full.shape[dim],) if shape is None else tuple(shape)
    x = full.reshape(full.shape[:dim] + shape + full.shape[dim + 1:]).chunk(n, dim=dim + axis)[rank]
    return x.reshape(full.shape[:dim] + (-1,) + full.shape[dim + 1:])


def full_state(ckpt: str | Path) -> dict:
    """The topology-free form of a checkpoint (see the section comment); a converted checkpoint
    is read as it is."""
    ckpt = Path(ckpt)
    if (ckpt / FULL_STATE).is_file():
        return load_checkpoint_file(ckpt / FULL_STATE, mmap=True)
    trainer = read_trainer_state(ckpt)
    stage = trainer["config"]["parallel"]["zero_stage"]
    if stage not in (1, 2):
        raise ValueError(f"{ckpt} was written with parallel.zero_stage={stage}; only ZeRO stage 1 or 2 "
                         f"checkpoints can be converted to another topology")
    tp, specs = trainer["topology"]["tp"], trainer["shard_specs"]
    per_tp = [zero_partitions(ckpt, t) for t in range(tp)]
    step = per_tp[0].pop("__step__")
    for part in per_tp[1:]:
        part.pop("__step__")
    params = {}
    for name, first in per_tp[0].items():
        if tp > 1 and name in specs:
            params[name] = {k: merge_shards([part[name][k] for part in per_tp], specs[name]) for k in first}
        else:  # replicated over tp: every rank holds the same values
            params[name] = first
    model_states = load_checkpoint_file(ckpt / "mp_rank_00_model_states.pt")
    return {"format": FULL_STATE_FORMAT, "params": params, "adam_step": step,
            "lr_scheduler": model_states.get("lr_scheduler"),
            "counters": {k: model_states.get(k, 0) for k in ("global_steps", "global_samples", "skipped_steps")}}


def is_conversion(path: Path) -> bool:
    """Whether `path` is a conversion of ours (convert_to_full) holding only the files it wrote."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    written = set(manifest.get("files", {})) | {"manifest.json"}
    return manifest.get("format") == FULL_STATE_FORMAT and {p.name for p in path.iterdir()} <= written


CONVERSION = "an earlier conversion"


def convert_to_full(ckpt: str | Path, out: str | Path) -> Path:
    """Write `ckpt` as a topology-free checkpoint directory `out` (atomically, with a manifest of
    sizes and sha256); it resumes at any dp / sp / tp (train.resume=<out>) and exports like any
    checkpoint. `out` must be new, empty, or an earlier conversion (pretrain/output_dir.py)."""
    from pretrain.output_dir import check_replaceable, write_replacing

    ckpt, out = Path(ckpt), check_replaceable(out, is_conversion, CONVERSION)
    state = full_state(ckpt)
    trainer = read_trainer_state(ckpt)
    trainer["layout"] = "full"
    trainer.pop("shard_specs", None)
    with write_replacing(out, is_conversion, CONVERSION) as tmp:
        hashed = {FULL_STATE: save_hashing(state, tmp / FULL_STATE)}  # the big file: hashed while written
        # Every rank's data-loader position is the same; rank 0's RNG stands for all ranks.
        shutil.copyfile(ckpt / "rank_00000.pt", tmp / "rank_00000.pt")
        write_atomic(tmp / "trainer_state.json", json.dumps(trainer, indent=1))
        names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        write_atomic(tmp / "manifest.json", json.dumps({
            "format": FULL_STATE_FORMAT, "tag": out.name, "step": trainer["step"],
            "files": {n: (tmp / n).stat().st_size for n in names}, "sha256": {n: hashed.get(n) or file_sha256(tmp / n) for n in names}},
            indent=1))
    return out


def needs_reshard(trainer_state: dict, dims) -> bool:
    now = {"dp": dims.dp, "sp": dims.sp, "tp": dims.tp}
    return trainer_state.get("layout") == "full" or trainer_state.get("topology") != now


def _tp_piece(p, full: dict, dims) -> dict:
    """The pieces of a parameter's full tensors this tp rank holds."""
    spec = getattr(p, "shard_spec", None)
    if spec is None or dims.tp == 1:
        return full
    return {k: cut_shard(v, spec, dims.tp_rank, dims.tp) for k, v in full.items()}


def load_resharded(engine, ckpt: str | Path, dims) -> tuple[dict, dict]:
    """Collective: load a checkpoint written at another topology (or a converted one) into a ZeRO-1/2
    engine: rank 0 builds the full state once, every rank copies its tp shard's ZeRO fragment of
    each weight and moment into place; then the schedule and counters. Returns (trainer, rank) state."""
    ckpt = Path(ckpt)
    rank = dist.get_rank() if dist.is_initialized() else 0
    source = ckpt
    if not (ckpt / FULL_STATE).is_file():
        source = ckpt.parent / TMP / (ckpt.name + ".full")
        if rank == 0:
            shutil.rmtree(source, ignore_errors=True)
            source.mkdir(parents=True)
            torch.save(full_state(ckpt), source / FULL_STATE)
        barrier()
    state = load_checkpoint_file(source / FULL_STATE, mmap=True)
    load_full_state(engine, state, lambda name, p, full: _tp_piece(p, full, dims))
    del state
    barrier()
    if rank == 0 and source != ckpt:
        shutil.rmtree(source, ignore_errors=True)
    own = ckpt / f"rank_{rank:05d}.pt"
    rank_state = load_checkpoint_file(own if own.is_file() else ckpt / "rank_00000.pt")
    return read_trainer_state(ckpt), rank_state
