"""DeepSpeed internals, behind one module: how its checkpoint files are read without running code,
and where its ZeRO-1/2 optimizer keeps each parameter's fp32 master weight and moments.

Tested with the DeepSpeed version pyproject.toml pins: the attribute names used here
(engine.checkpoint_engine, DeepSpeedZeroOptimizer.bit16_groups / single_partition_of_fp32_groups,
a parameter's _hp_mapping, the ZeRO file layout: param_slice_mappings, base_optimizer_state) are
not public API; a DeepSpeed upgrade is checked against tests/test_checkpoint*.py first.
"""
from __future__ import annotations

import contextlib
import pickle
import re
import types
from pathlib import Path

import torch

from pretrain.config import ConfigError

MOMENTS = ("exp_avg", "exp_avg_sq")


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


# ----------------------------------------------------------------------------- ZeRO-1/2 partitions


def zero_partitions(ckpt: Path, tp_rank: int) -> dict[str, dict[str, torch.Tensor]]:
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


@torch.no_grad()
def load_full_state(engine, state: dict, local_piece) -> None:
    """Copy a full state (pretrain/reshard.py) into a ZeRO-1/2 engine: every parameter's module
    copy, and this rank's fragment of its fp32 weight and moments; then the schedule and the
    counters. local_piece(name, param, {key: full tensor}) -> {key: this rank's tensor}."""
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
        local = local_piece(name, p, full)
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
