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

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import ConfigError

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
                    keep_last: int = 3, keep_every: int = 0) -> Path:
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
    if rank == 0:
        _write_atomic(tmp / "trainer_state.json", json.dumps(trainer_state, indent=1))
    _barrier()
    sha256 = _hash_files_collectively(tmp)
    final = root / tag
    if rank == 0:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_atomic(tmp / "manifest.json", json.dumps({"tag": tag, "step": step, "files": files,
                                                         "sha256": sha256}, indent=1))
        if final.exists():  # re-saving the same step (e.g. stop_at == a save step): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", tag)
        _prune(root, keep_last, keep_every, current_step=step)
    _barrier()
    return final


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


def _file_sha256(path: Path) -> str:
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
    mine = {n: _file_sha256(ckpt / n) for i, n in enumerate(names) if i % world == rank}
    if world == 1:
        return mine
    parts = [None] * world
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


# ----------------------------------------------------------------------------- loading without running code
#
# A .pt file is a pickle, and unpickling calls whatever functions the file names: a checkpoint
# someone could write to would run their code in every trainer that resumes from it. So every
# checkpoint file is read by load_checkpoint_file -- torch.load(weights_only=True): tensors,
# containers, numbers, and the few DeepSpeed classes its files really pickle -- including
# DeepSpeed's own reads: engine.load_checkpoint reads through the engine's checkpoint engine
# (load_weights_only swaps its load), zero_to_fp32 through its module's `torch.load`
# (zero_to_fp32_weights_only swaps that while it runs). A file that needs anything else is
# refused with one line naming it. (The sha256 manifest is no defence here: whoever can write the
# file can rewrite the manifest.)


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file whose unpickling would call something other than the allowed classes."""

    rank_specific = True  # the file may be one only this rank loads: launch/errors.py prints it on every rank


def _deepspeed_pickled_classes() -> list[type]:
    """The DeepSpeed classes its checkpoint files hold at our settings (fp32 or bf16, ZeRO 0-3):
    the optimizer states' loss scaler (1.0 unless fp16, which we never enable), ZeRO stage and
    parameter-fragment addresses (tests/test_checkpoint_safety.py lists each file's globals)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint_file(path, map_location="cpu", mmap: bool = False):
    """torch.load with weights_only=True and DeepSpeed's classes allowed; any other global is an
    UnsafeCheckpointError naming the file and what it would have called."""
    torch.serialization.add_safe_globals(_deepspeed_pickled_classes())
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"it would call {found.group(1)}" if found else "it holds objects other than tensors and plain data"
        raise UnsafeCheckpointError(
            f"refusing to load {path}: {what}, which is not a tensor, plain data or one of the DeepSpeed classes "
            f"checkpoints hold; this file was not written by this trainer (or was altered), and unpickling it "
            f"could run code") from None


def load_weights_only(engine) -> None:
    """Make `engine.load_checkpoint` read every file through load_checkpoint_file: DeepSpeed reads
    model, optimizer and ZeRO files through `engine.checkpoint_engine.load`, which would unpickle
    with weights_only=False."""
    engine.checkpoint_engine.load = _checkpoint_engine_load


def _checkpoint_engine_load(path, map_location=None):
    return load_checkpoint_file(path, map_location)


class _TorchWithWeightsOnlyLoad(types.ModuleType):
    """`torch` as zero_to_fp32 sees it inside zero_to_fp32_weights_only: load is ours."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, weights_only=None, mmap=None, **_):
        return load_checkpoint_file(f, map_location, mmap=bool(mmap))


@contextlib.contextmanager
def zero_to_fp32_weights_only():
    """While inside, DeepSpeed's zero_to_fp32 (the ZeRO-3 consolidation) reads every file through
    load_checkpoint_file."""
    from deepspeed.utils import zero_to_fp32

    real = zero_to_fp32.torch
    zero_to_fp32.torch = _TorchWithWeightsOnlyLoad("torch")
    try:
        yield
    finally:
        zero_to_fp32.torch = real


# ----------------------------------------------------------------------------- topology change
#
# A checkpoint is resharded through one topology-free form, the *full state*: every parameter's
# whole fp32 master weight and AdamW moments (ZeRO partitions concatenated, tensor-parallel shards
# reassembled by their `shard_spec`), the AdamW step, the LR schedule and DeepSpeed's counters.
# `python -m launch.convert_checkpoint` writes it as a checkpoint of its own (FULL_STATE file);
# resuming at another dp / sp / tp builds it on the fly and cuts this rank's pieces out of it.

FULL_STATE = "full_state.pt"
FULL_STATE_FORMAT = "recurrent-pretrain/full-state/1"
MOMENTS = ("exp_avg", "exp_avg_sq")


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


def _zero_partitions(ckpt: Path, tp_rank: int) -> dict[str, dict[str, torch.Tensor]]:
    """Whole (tp-local) fp32 weight and moments of every parameter from the ZeRO-1/2 files of one
    tp rank: each parameter's fragments, taken from the dp partitions in rank order."""
    files = sorted(ckpt.glob(f"zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt"),
                   key=lambda f: int(f.name.split("_")[3]))
    shapes = load_checkpoint_file(ckpt / f"mp_rank_{tp_rank:02d}_model_states.pt")["param_shapes"]
    pieces: dict[str, dict[str, list]] = {}
    step = None
    for f in files:
        osd = load_checkpoint_file(f)["optimizer_state_dict"]
        if int(osd["zero_stage"]) not in (1, 2):
            raise ValueError(f"{f} is ZeRO stage {int(osd['zero_stage'])}; only stages 1 and 2 can be resharded")
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            flat = {"fp32": osd["single_partition_of_fp32_groups"][g]}
            state = osd["base_optimizer_state"]["state"].get(g, {})
            flat.update({k: state[k] for k in MOMENTS if k in state})
            if "step" in state:
                step = int(state["step"])
            for name, frag in mapping.items():
                for key, tensor in flat.items():
                    pieces.setdefault(name, {}).setdefault(key, []).append(tensor.narrow(0, frag.start, frag.numel))
    out = {}
    for group in shapes:
        for name, shape in group.items():
            out[name] = {key: torch.cat(parts).reshape(shape).float() for key, parts in pieces[name].items()}
    out["__step__"] = step
    return out


def full_state(ckpt: str | Path) -> dict:
    """The topology-free form of a checkpoint (see the section comment); a converted checkpoint
    is read as it is."""
    ckpt = Path(ckpt)
    if (ckpt / FULL_STATE).is_file():
        return load_checkpoint_file(ckpt / FULL_STATE, mmap=True)
    trainer = read_trainer_state(ckpt)
    topo = trainer.get("topology") or {"tp": 1}
    stage = trainer.get("config", {}).get("parallel", {}).get("zero_stage", 1)
    if stage not in (1, 2):
        raise ValueError(f"{ckpt} was written with parallel.zero_stage={stage}; only ZeRO stage 1 or 2 "
                         f"checkpoints can be converted to another topology")
    tp = topo.get("tp", 1)
    specs = trainer.get("shard_specs")
    if tp > 1 and specs is None:
        raise ValueError(f"{ckpt} (tp={tp}) does not record its shard_specs; it was written by an older version")
    per_tp = [_zero_partitions(ckpt, t) for t in range(tp)]
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
        torch.save(state, tmp / FULL_STATE)
        # Every rank's data-loader position is the same; rank 0's RNG stands for all ranks.
        shutil.copyfile(ckpt / "rank_00000.pt", tmp / "rank_00000.pt")
        _write_atomic(tmp / "trainer_state.json", json.dumps(trainer, indent=1))
        names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        _write_atomic(tmp / "manifest.json", json.dumps({
            "format": FULL_STATE_FORMAT, "tag": out.name, "step": trainer["step"],
            "files": {n: (tmp / n).stat().st_size for n in names}, "sha256": {n: _file_sha256(tmp / n) for n in names}},
            indent=1))
    return out


def needs_reshard(trainer_state: dict, dims) -> bool:
    now = {"dp": dims.dp, "sp": dims.sp, "tp": dims.tp}
    return trainer_state.get("layout") == "full" or trainer_state.get("topology") != now


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
        _barrier()
    state = load_checkpoint_file(source / FULL_STATE, mmap=True)
    _load_full_state(engine, state, dims)
    del state
    _barrier()
    if rank == 0 and source != ckpt:
        shutil.rmtree(source, ignore_errors=True)
    own = ckpt / f"rank_{rank:05d}.pt"
    rank_state = load_checkpoint_file(own if own.is_file() else ckpt / "rank_00000.pt")
    return read_trainer_state(ckpt), rank_state


@torch.no_grad()
def _load_full_state(engine, state: dict, dims) -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer):
        raise ValueError("resuming at another topology needs parallel.zero_stage 1 or 2")
    inner = opt.optimizer
    params = state["params"]
    group_of = {id(p): g for g, group in enumerate(opt.bit16_groups) for p in group}
    flats = {}
    for g, fp32 in enumerate(opt.single_partition_of_fp32_groups):
        st = inner.state.setdefault(fp32, {})
        st["step"] = torch.tensor(float(state["adam_step"] or 0))
        for key in MOMENTS:
            st[key] = torch.zeros_like(fp32)
        flats[g] = {"fp32": fp32, **{k: st[k] for k in MOMENTS}}
    for name, p in engine.module.named_parameters():
        if name not in params:
            raise ValueError(f"the checkpoint has no parameter {name}")
        full = params[name]
        spec = getattr(p, "shard_spec", None)
        local = {k: (cut_shard(v, spec, dims.tp_rank, dims.tp) if spec is not None and dims.tp > 1 else v)
                 for k, v in full.items()}
        if tuple(local["fp32"].shape) != tuple(p.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(local['fp32'].shape)} vs model {tuple(p.shape)}")
        p.copy_(local["fp32"].to(p.dtype))  # the module (bit16) copy every rank holds
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # none of this parameter lies in this rank's ZeRO partition
            continue
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        for key, flat in flats[group_of[id(p)]].items():
            if key in local:
                flat.narrow(0, hp.start, hp.numel).copy_(local[key].flatten().narrow(0, lp.start, lp.numel))
    if state.get("lr_scheduler") is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for group, lr in zip(inner.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    counters = state.get("counters", {})
    engine.global_steps = counters.get("global_steps", 0)
    engine.global_samples = counters.get("global_samples", 0)
    engine.skipped_steps = counters.get("skipped_steps", 0)


# ----------------------------------------------------------------------------- data position on a dp change
#
# The token stream is laid out for one dp size and micro-batch size (the loader state records
# both): step s's global batch is, for every *data rank* r of that layout in order, the next k
# micro-batches of r's stream. After a dp change that layout is kept: each new dp rank reads the
# data ranks whose rows it needs and takes its contiguous slice of the global batch. So the run
# sees exactly the tokens, step by step, it would have seen at the old size, as long as the new
# global batch (dp x grad_accum x micro_batch_size rows) is a multiple of the layout's dp x
# micro_batch_size; otherwise resuming is refused with that rule in the message.


class RegroupedLoader:
    """This dp rank's micro-batches of a token stream laid out for another dp size (see above)."""

    def __init__(self, template, state: dict, grad_accum: int):
        from data.loader import TokenLoader

        data_dp, data_mbs = int(state["dp_size"]), int(state["batch_size"])
        mbs, dp = template.batch_size, template.dp_size
        rows = dp * grad_accum * mbs
        if rows % (data_dp * data_mbs):
            raise ValueError(f"the data were laid out for dp={data_dp} x micro_batch_size={data_mbs}; the global "
                             f"batch of dp={dp} x grad_accum={grad_accum} x micro_batch_size={mbs} = {rows} rows "
                             f"must be a multiple of {data_dp * data_mbs} to continue the same stream")
        self.k = rows // (data_dp * data_mbs)  # micro-batches each data rank contributes per step
        self.grad_accum, self.mbs = grad_accum, mbs
        per_source = self.k * data_mbs
        lo = template.dp_rank * grad_accum * mbs
        first, last = lo // per_source, (lo + grad_accum * mbs - 1) // per_source
        self.offset = lo - first * per_source
        self.sources = []
        data = [(str(path), w) for path, w in template.mix] if template.mix is not None else template.data_dir
        for r in range(first, last + 1):
            src = TokenLoader(data, template.seq_len, data_mbs, template.split, r, data_dp, template.seed,
                              on_bad_shard=template._sources[0].on_bad_shard, num_workers=template.num_workers,
                              pin_memory=template.pin_memory, prefetch_factor=template.prefetch_factor)
            src.load_state_dict(state)
            self.sources.append(src)
        self._queue: list[dict] = []

    def __getattr__(self, name):  # tokenizer_checksum, vocab_size, close(), ... of the stream
        if name == "sources":
            raise AttributeError(name)
        return getattr(self.sources[0], name)

    @property
    def skipped_shards(self) -> int:
        return len({s for src in self.sources for s in src.bad_shards})

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._queue:
            batches = [next(src) for src in self.sources for _ in range(self.k)]
            rows = {key: torch.cat([b[key] for b in batches])[self.offset:self.offset + self.grad_accum * self.mbs]
                    for key in batches[0]}
            self._queue = [{key: v[i * self.mbs:(i + 1) * self.mbs] for key, v in rows.items()}
                           for i in range(self.grad_accum)]
        return self._queue.pop(0)

    def state_dict(self) -> dict:
        """The position in the original layout (all data ranks are at the same one)."""
        return self.sources[0].state_dict()


def resume_loader(loader, state: dict, grad_accum: int):
    """`loader` positioned at `state`, or, when the state's dp size / micro-batch size differ from
    the loader's, a RegroupedLoader continuing the saved layout (raises ValueError when it cannot)."""
    if state.get("dp_size") == loader.dp_size and state.get("batch_size") == loader.batch_size:
        loader.load_state_dict(state)
        return loader
    return RegroupedLoader(loader, state, grad_accum)
