"""The training loop: DeepSpeed engine (also on one device), AdamW, warmup + cosine/WSD, clipping,
accumulation, checkpoints with exact resume, progress bar / JSONL / wandb logging.

One visible loop in `_train()` (`train()` holds the run dir's lock around it); everything it calls
is a plain function above it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import sys
import time
import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from data.loader import TokenLoader
from data.mixing import parse_mix
from data.regroup import resume_loader
from data.shards import load_manifest
from kernels import selfcheck
from parallel.topology import ParallelDims
from pretrain import checkpoint as ckpt_lib
from pretrain import preemption, reshard
from pretrain.config import Config, ConfigError, to_dict
from pretrain.metrics import MetricsLogger, device_peak_flops, plot_loss_svg, read_metrics
from pretrain.model import LanguageModel
from pretrain.parallelize import (apply_activation_checkpointing, apply_sequence_parallel, apply_tensor_parallel,
                                  sequence_slice, set_kernel_backend, validate_parallel)
from pretrain.run_dir import RunDirLock, clashing_checkpoints, move_aside, refuse_clash

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "preempted, checkpoint saved, run me again"
PREEMPTED_MARKER = "preempted.json"  # written beside the checkpoints on a preemption exit


# ----------------------------------------------------------------------------- setup


def resolve_device(cfg: Config) -> tuple[torch.device, torch.dtype]:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bf16" if use_cuda else "fp32"
    if dtype == "bf16" and not use_cuda:
        raise ConfigError("train.dtype=bf16 needs a GPU here; on CPU use train.dtype=fp32 (or auto)")
    return device, torch.bfloat16 if dtype == "bf16" else torch.float32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU backend would JIT-compile its shared-memory all-reduce op in
    deepspeed.init_distributed (1-4 minutes with g++, in TORCH_EXTENSIONS_DIR; a build interrupted
    there leaves a `lock` file that makes every later run wait silently forever). Only
    inference_all_reduce uses it; training's collectives go through gloo, so the op is marked
    unavailable and never built. Call before deepspeed.init_distributed on CPU."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(device: torch.device) -> None:
    """Join (or, under plain python, create) the process group DeepSpeed will use."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python -m launch.train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if device.type == "cpu":
        skip_cpu_shm_build()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   verbose=False)


def decays(module: torch.nn.Module, name: str) -> bool:
    """Weight decay by role (Megatron/fla convention): every weight matrix decays (projections,
    embeddings, the head, short-conv filters); biases, norm gains and the parameters a module
    lists in its `no_weight_decay` (ParaRNN's diagonal recurrent weights and peepholes,
    DeltaProduct's A_log and dt_bias) do not."""
    if name == "bias" or type(module).__name__.endswith("Norm"):
        return False
    return name not in getattr(module, "no_weight_decay", ())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed by role (see `decays`) and not."""
    decay, no_decay = [], []
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if decays(module, name) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(step: int, t) -> float:
    """Linear warmup, then cosine to min_lr_ratio, WSD (stable then linear decay), or constant."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    if t.schedule == "wsd":
        decay_start = int(t.max_steps * (1 - t.decay_fraction))
        if step < decay_start:
            return 1.0
        frac = (step - decay_start) / max(1, t.max_steps - decay_start)
        return 1.0 - (1.0 - t.min_lr_ratio) * min(frac, 1.0)
    frac = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def deepspeed_config(cfg: Config, dtype: torch.dtype) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


# The optimizer settings a resumed run takes from its config, not from the checkpoint (README, Resume).
SCHEDULE_KEYS = ("lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction", "max_steps", "weight_decay",
                 "beta1", "beta2", "grad_clip")


def apply_config_on_resume(optimizer, scheduler, intended: list[dict], t) -> None:
    """Rule: on resume the config's lr, schedule, betas and weight decay apply from the resumed step
    on (lowering train.lr is how a diverging run is continued). The checkpoint's optimizer and
    scheduler state carry the old ones (LambdaLR's base_lrs, each group's lr/betas/weight_decay), so
    `intended` -- each group's settings as built from this config -- is put back after the load;
    unchanged settings give the same numbers bit for bit."""
    for group, want in zip(optimizer.param_groups, intended):
        group.update(want)
    scheduler.base_lrs = [want["initial_lr"] for want in intended]
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * lr_multiplier(scheduler.last_epoch, t)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def changed_on_resume(old_train: dict, t) -> list[str]:
    return [f"train.{k} {old_train.get(k)!r} -> {getattr(t, k)!r}" for k in SCHEDULE_KEYS
            if old_train.get(k) != getattr(t, k)]


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (Slurm's warning before the end) -> save at the end of this step and exit
    (pretrain/preemption.py; a signal caught since launch.train started counts)."""

    def __init__(self):
        preemption.install()

    @property
    def raised(self) -> bool:
        return preemption.received()

    def any_rank(self, device) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def check_resume_compatible(cfg: Config, state: dict, tokenizer_checksum: str, dims: ParallelDims) -> None:
    missing = [k for k in ckpt_lib.TRAINER_STATE_KEYS if k not in state]
    missing += [f"config.{k}" for k in ("model", "parallel") if k not in state.get("config", {})]
    if missing:
        raise ConfigError(f"cannot resume: the checkpoint's trainer_state.json lacks {', '.join(missing)}; "
                          f"use another checkpoint")
    old = state["config"]["model"]
    new = to_dict(cfg.model)
    diffs = [f"model.{k}: checkpoint {old.get(k)!r} vs config {new[k]!r}" for k in new if old.get(k) != new[k]]
    if diffs:
        raise ConfigError("cannot resume: the model config differs from the checkpoint's (" + "; ".join(diffs) + ")")
    if state.get("tokenizer_checksum") != tokenizer_checksum:
        raise ConfigError("cannot resume: the data's tokenizer differs from the checkpoint's "
                          f"({state.get('tokenizer_checksum', '?')[:12]} vs {tokenizer_checksum[:12]})")
    now = {"dp": dims.dp, "sp": dims.sp, "tp": dims.tp}
    was = state["config"]["parallel"].get("zero_stage")
    resharded = reshard.needs_reshard(state, dims)  # what checkpoint.restore will do
    if not resharded and was != cfg.parallel.zero_stage and {was, cfg.parallel.zero_stage} - {1, 2}:  # loaded as written: 1 and 2 share a layout, 0 and 3 not
        raise ConfigError(f"cannot resume: the checkpoint was written with parallel.zero_stage={was}, this run has "
                          f"parallel.zero_stage={cfg.parallel.zero_stage}; resume with parallel.zero_stage={was}"
                          + (" (1 and 2 are interchangeable)" if was in (1, 2) else ""))
    if resharded:
        stages = {state["config"]["parallel"]["zero_stage"], cfg.parallel.zero_stage}
        if stages - {1, 2}:
            raise ConfigError(f"cannot resume: the checkpoint was written with {state.get('topology')}, this run has "
                              f"{now}; another topology needs parallel.zero_stage 1 or 2 in both runs "
                              f"(checkpoint {state['config']['parallel']['zero_stage']}, this run {cfg.parallel.zero_stage})")


def zero_nonfinite_update(engine, world: int) -> bool:
    """For the optimizer DeepSpeed does not check for non-finite gradients (ZeRO-0 in fp32: the
    bare AdamW), before the step at the accumulation boundary: if any gradient on any rank is
    non-finite, zero them all and run this step at lr 0, so the weights stay as they were (AdamW's
    moments still age by one step). Returns whether it did. One host sync."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    device = next(engine.module.parameters()).device
    ok = torch.stack([torch.isfinite(g).all() for g in grads]).all().float() if grads else torch.ones((), device=device)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() == 1.0:
        return False
    for g in grads:
        g.zero_()
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0  # the scheduler's step inside engine.step() sets the next step's lr
    return True


def lock_run_dir(lock: RunDirLock, rank: int, world: int) -> None:
    """Rank 0 takes the run dir's lock (pretrain/run_dir.py: one lock for the job on the shared
    filesystem); every rank raises the same one-line error when another trainer holds it."""
    error = None
    if rank == 0:
        try:
            lock.acquire()
        except ConfigError as exc:
            error = str(exc)
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ConfigError(error)


def check_data_paths(cfg: Config) -> None:
    """Each data directory has a readable manifest: a wrong data.path is one line within seconds,
    before the process group, DeepSpeed or the model are set up."""
    key = "data.mix" if cfg.data.mix else "data.path"
    try:
        paths = [p for p, _ in parse_mix([e if isinstance(e, str) else (e.path, e.weight) for e in cfg.data.mix])] \
            if cfg.data.mix else [cfg.data.path]
        for path in paths:
            load_manifest(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: {exc}") from None


def build_loader(cfg: Config, dims: ParallelDims, split: str = "train") -> TokenLoader:
    """This dp rank's batches of data.path, or of the data.mix datasets mixed by weight."""
    d = cfg.data
    source = [e if isinstance(e, str) else (e.path, e.weight) for e in d.mix] if d.mix else d.path
    try:
        return TokenLoader(source, seq_len=d.seq_len, batch_size=cfg.train.micro_batch_size, split=split,
                           dp_rank=dims.dp_rank, dp_size=dims.dp, seed=d.seed, on_bad_shard=d.on_bad_shard,
                           num_workers=d.num_workers if split == "train" else 0, pin_memory=d.pin_memory,
                           prefetch_factor=d.prefetch_factor)
    except ValueError as exc:  # too few shards for the ranks, too little data for a batch, ...
        where = f"data.mix={d.mix}" if d.mix else f"data.path={d.path}"
        raise ConfigError(f"{where} ({split} split): {exc}") from None


def lay_out_for(loader: TokenLoader, layout_dp: int, grad_accum: int):
    """A fresh run's loader reading the global batches of a run with layout_dp dp ranks: the
    regrouping a resume after a dp change does (data/regroup.py), from position 0. One
    process can so reproduce a multi-node run's losses (tests/test_slurm.py)."""
    state = {**loader.state_dict(), "dp_rank": 0, "dp_size": layout_dp}
    try:
        return resume_loader(loader, state, grad_accum)
    except ValueError as exc:  # a global batch the layout cannot fill, too few shards for layout_dp
        raise ConfigError(f"data.layout_dp={layout_dp}: {exc}") from None


@torch.no_grad()
def evaluate(engine, val_loader: TokenLoader, n_batches: int, dims: ParallelDims, device) -> float:
    """Mean loss over the first n_batches of the val split (the same batches every time), reduced
    over dp like the training loss."""
    engine.eval()
    val_loader.seek(0)
    total = torch.zeros((), device=device)
    for _ in range(n_batches):
        batch = sequence_slice({k: v.to(device, non_blocking=True) for k, v in next(val_loader).items()}, dims)
        total += engine(batch["input_ids"], labels=batch["labels"], doc_start=batch["doc_start"]).float() / n_batches
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, group=dims.dp_sp_group)
        total /= dims.dp
    engine.train()
    return total.item()


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def max_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB, macOS bytes)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _quiet_deepspeed():
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


class NewtonTelemetry:
    """The ParaRNN layers' Newton residuals for the log, kept on the device between log steps.

    Reading a residual is a host sync, and one per layer per step would stall the GPU's queue
    (the layers' kernels and the optimizer could not be queued ahead). So every micro-batch only
    folds the stacked residuals into device tensors -- per layer the step's largest residual, the
    window's largest and the count of steps above the layer's tol -- and read() syncs once, at a
    log step, for all layers.
    """

    def __init__(self, model):
        self.tol = {f"layer{i}.{b.mixer_name}": b.mixer.rnn_cfg.tol for i, b in enumerate(model.blocks)
                    if getattr(b.mixer, "rnn_cfg", None) is not None}
        self.names = self.tol_vec = self.step_max = self.last = self.peak = self.above = None
        self.first_step, self.steps = None, 0

    def observe(self, model) -> None:
        """After a forward: fold this micro-batch's residuals into the step's maximum (no sync)."""
        names, residuals = model.solver_residual_tensor()
        if residuals is None:
            return
        if self.names is None:
            self.names = names
            self.tol_vec = torch.tensor([math.inf if self.tol.get(n) is None else self.tol[n] for n in names],
                                        device=residuals.device)
            self.above = torch.zeros(len(names), device=residuals.device)
        self.step_max = residuals if self.step_max is None else torch.maximum(self.step_max, residuals)

    def end_step(self, step: int) -> None:
        if self.step_max is None:
            return
        self.above += ~(self.step_max <= self.tol_vec)  # NaN counts as above
        self.peak = self.step_max if self.peak is None else torch.maximum(self.peak, self.step_max)
        self.last, self.step_max = self.step_max, None
        self.first_step = step if self.first_step is None else self.first_step
        self.steps += 1

    def read(self) -> dict | None:
        """{last: {layer: residual of the last step}, peak: {layer: largest in the window},
        above: {layer: steps above tol}, first_step, steps} for the steps since the previous read,
        in one host sync; None when there were none (or no ParaRNN layer)."""
        if not self.steps:
            return None
        values = torch.cat((self.last, self.peak, self.above)).tolist()
        n = len(self.names)
        out = {key: dict(zip(self.names, values[i * n:(i + 1) * n])) for i, key in enumerate(("last", "peak", "above"))}
        out.update(first_step=self.first_step, steps=self.steps)
        self.above.zero_()
        self.peak, self.first_step, self.steps = None, None, 0
        return out

    def warning(self, window: dict, step: int) -> str | None:
        """The console line for layers above their tol in the window, or None."""
        bad = [k for k, count in window["above"].items() if count]
        if not bad:
            return None
        steps = window["steps"]
        where = f"step {step}" if steps == 1 else f"steps {window['first_step']}-{step}"
        return (f"warning: {where}: Newton residual above tol in "
                + ", ".join(f"{k} ({'' if steps == 1 else 'max '}{window['peak'][k]:.2e} > {self.tol[k]:.0e}"
                            + ("" if steps == 1 else f" at {window['above'][k]:.0f} of {steps} steps") + ")"
                            for k in bad)
                + "; raise num_iters / max_iters, set a damping, or lower the lr")


# ----------------------------------------------------------------------------- the loop


def kernel_fallbacks() -> list[str]:
    """Triton kernels that failed their startup self-check on this rank and run on the torch
    reference instead (each also printed one line when it happened)."""
    return [f"{v.op} ({', '.join(v.shape_class)}): {v.detail}" for v in selfcheck.report() if not v.ok]


def train(cfg: Config) -> dict:
    """Run (or resume) the job described by cfg; returns a summary dict. The run dir is locked
    against a second trainer from before it is read until the run ends (pretrain/run_dir.py)."""
    preemption.install()
    lock = RunDirLock(cfg.train.run_dir)
    try:
        return _train(cfg, lock)
    finally:
        lock.release()


@dataclasses.dataclass
class Run:
    """What build() sets up and the loop works on: the layout, the engine, the data, and where the
    run stands (step, tokens, skipped steps)."""

    cfg: Config
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int
    dims: ParallelDims
    engine: object  # deepspeed.DeepSpeedEngine
    scheduler: object
    loader: object  # TokenLoader, or data.regroup.RegroupedLoader after a dp change
    val_loader: object
    run_dir: Path
    lineage: str
    resume_from: Path | None
    newton: NewtonTelemetry
    n_params: int
    flops_per_token: float
    step: int = 0
    tokens_seen: int = 0
    skipped: int = 0  # steps with a non-finite loss or gradient (not applied)
    ds_skipped: int = 0  # DeepSpeed's own count of skipped updates, as of the last step

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * self.cfg.data.seq_len * t.grad_accum * self.dims.dp

    def checkpoint_state(self, at_step: int) -> tuple[dict, dict]:
        """(trainer state, this rank's state) for a checkpoint at `at_step` (ckpt_lib.Checkpointer)."""
        d = self.dims
        trainer_state = {"step": at_step, "tokens": self.tokens_seen, "skipped_steps": self.skipped,
                         "config": to_dict(self.cfg), "tokenizer_checksum": self.loader.tokenizer_checksum,
                         "world_size": self.world, "topology": {"dp": d.dp, "sp": d.sp, "tp": d.tp},
                         "shard_specs": reshard.shard_specs(self.engine.module), "lineage": self.lineage}
        return trainer_state, {"rng": ckpt_lib.rng_state(), "loader": self.loader.state_dict()}


def build(cfg: Config, lock: RunDirLock) -> Run:
    """Everything before the first step: checks that can refuse the run (data, layout, resume
    compatibility, run-dir clashes) before anything is written, the model with its parallel
    plans, the DeepSpeed engine, the resumed state; then the first writes to the run dir."""
    import deepspeed

    check_data_paths(cfg)
    _quiet_deepspeed()
    device, dtype = resolve_device(cfg)
    t = cfg.train
    init_distributed(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != 0:  # library and deprecation warnings once per job (rank 0), not once per rank
        warnings.simplefilter("ignore")
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.ERROR)
    try:
        dims = ParallelDims.from_world(sp=cfg.parallel.sp, tp=cfg.parallel.tp, world_size=world)
    except ValueError as exc:
        raise ConfigError(f"{exc} (torchrun --nproc-per-node x nodes must be a multiple of parallel.tp x parallel.sp)") from None
    validate_parallel(cfg, dims)
    if cfg.parallel.zero_stage == 3 and dims.tp > 1:
        raise ConfigError("parallel.zero_stage=3 needs parallel.tp=1 (ZeRO-3 partitions would split the tp shards "
                          "again); use zero_stage 1 or 2 with tensor parallelism")
    dims.build_groups()

    # Data first: a missing or mismatched dataset fails before anything is written. sp and tp
    # ranks of one dp rank read the same batches (and slice the sequence for sp).
    loader = build_loader(cfg, dims)
    val_loader = build_loader(cfg, dims, "val") if t.eval_every else None
    if cfg.model.vocab_size < loader.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({loader.vocab_size}) in {loader.data_dir}; set model.vocab_size>={loader.vocab_size}")

    run_dir = Path(t.run_dir)
    lock_run_dir(lock, rank, world)
    resume_from, damaged = None, []
    if t.resume == "auto":  # collective: files re-hashed; a damaged newer checkpoint is reported and skipped
        resume_from = ckpt_lib.find_latest(run_dir, report=lambda msg: print(msg, flush=True) if rank == 0 else None,
                                           verify=True, skipped=damaged)
    elif t.resume != "none":
        resume_from = Path(t.resume)
        why = ckpt_lib.damage(resume_from) if resume_from.is_dir() else "it does not exist"
        if why is not None:
            raise ConfigError(f"train.resume={t.resume} is not a loadable checkpoint ({why}); pass "
                              f"<run_dir>/checkpoints/step_XXXXXXXX, train.resume=auto or train.resume=none")
        ckpt_lib.verify_checksums(resume_from)
    resumed = ckpt_lib.read_trainer_state(resume_from) if resume_from is not None else None
    if resumed is not None:
        check_resume_compatible(cfg, resumed, loader.tokenizer_checksum, dims)
    elif cfg.data.layout_dp not in (0, dims.dp):
        loader = lay_out_for(loader, cfg.data.layout_dp, t.grad_accum)
    # One run per run dir (pretrain/run_dir.py): no checkpoint of a later step or of another run.
    clash = clashing_checkpoints(run_dir, resumed, damaged)
    if clash and not t.overwrite:
        refuse_clash(run_dir, clash, t.resume, resumed["step"] if resumed else 0)
    # The run's lineage: inherited on resume, new from step 0 (only rank 0 writes trainer_state).
    lineage = (resumed or {}).get("lineage") or uuid.uuid4().hex

    torch.manual_seed(t.seed)  # the same full weights on every rank; the plans keep each rank's shard
    model = LanguageModel(cfg.model)
    n_params, flops_per_token = model.num_params(), model.flops_per_token(cfg.data.seq_len)
    apply_tensor_parallel(model, dims)
    apply_sequence_parallel(model, dims)
    set_kernel_backend(model, t.kernel_backend)
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                  eps=1e-8, fused=False, foreach=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, t))
    intended = [{k: g[k] for k in ("initial_lr", "betas", "weight_decay")} for g in optimizer.param_groups]
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=deepspeed_config(cfg, dtype),
                                                           mpu=dims.mpu() if dims.tp * dims.sp > 1 else None)

    step, tokens_seen, skipped = 0, 0, 0
    if resume_from is not None:
        trainer_state, rank_state = ckpt_lib.restore(engine, resume_from, dims)
        step, tokens_seen, skipped = trainer_state["step"], trainer_state["tokens"], trainer_state["skipped_steps"]
        try:
            loader = resume_loader(loader, rank_state["loader"], t.grad_accum)
        except ValueError as exc:
            raise ConfigError(f"cannot resume from {resume_from}: {exc}") from None
        ckpt_lib.set_rng_state(rank_state["rng"])
        apply_config_on_resume(optimizer, scheduler, intended, t)
        changed = changed_on_resume(trainer_state["config"].get("train", {}), t)
        if changed and rank == 0:
            print(f"resuming with changed settings, applied from step {step} on: {', '.join(changed)}", flush=True)
    # The seed (and RNG restore on resume) come before anything random on the training path.
    if rank == 0:  # the first writes to the run dir, after every check that can refuse the run
        if clash:  # train.overwrite=true
            aside = move_aside(run_dir, clash, new_run=resumed is None)
            print(f"moved the earlier run's checkpoints to {aside} ({', '.join(c.name for c in clash)}; "
                  f"train.overwrite=true)", flush=True)
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    # Newton convergence is never silent: layers whose residual stays above their tol (after the
    # solver's extra iterations up to max_iters) are warned about with layer and steps, and counted
    # -- read from the device once per log step, not once per layer and step.
    run = Run(cfg, device, dtype, rank, world, dims, engine, scheduler, loader, val_loader, run_dir, lineage,
              resume_from, NewtonTelemetry(model), n_params, flops_per_token, step, tokens_seen, skipped)
    run.ds_skipped = engine.skipped_steps
    return run


def train_step(run: Run) -> tuple[float, bool, float]:
    """One optimizer step (grad_accum micro-batches). Returns (the loss: mean over dp of the full
    sequences' loss, nan if any micro-batch's was; whether the step was non-finite and so not
    applied; seconds spent waiting for data)."""
    t, engine, dims = run.cfg.train, run.engine, run.dims
    step_loss = torch.zeros((), device=run.device)
    dropped, zeroed, data_wait = 0, False, 0.0
    for micro in range(t.grad_accum):
        t_wait = time.perf_counter()
        raw = next(run.loader)
        data_wait += time.perf_counter() - t_wait
        batch = sequence_slice({k: v.to(run.device, non_blocking=True) for k, v in raw.items()}, dims)
        loss = engine(batch["input_ids"], labels=batch["labels"], doc_start=batch["doc_start"])
        run.newton.observe(engine.module)
        finite = torch.isfinite(loss.detach()).float()
        if run.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        step_loss += loss.detach() / t.grad_accum  # nan for the step if any micro-batch is
        dropped += int(finite.item() != 1.0)
        # Backpropagated even when non-finite: the gradients are then too, and the whole step
        # is skipped (DeepSpeed's optimizer wrappers; zero_nonfinite_update for the one without).
        engine.backward(loss)
        if micro == t.grad_accum - 1 and not hasattr(engine.optimizer, "overflow"):
            zeroed = zero_nonfinite_update(engine, run.world)
        engine.step()
    run.step += 1
    # A step is non-finite when a micro-batch's loss was (not backpropagated) or DeepSpeed skipped
    # the update for non-finite gradients ("OVERFLOW!", engine.skipped_steps); both are the same on
    # every rank.
    nonfinite = dropped > 0 or zeroed or engine.skipped_steps > run.ds_skipped
    run.ds_skipped = engine.skipped_steps
    run.skipped += int(nonfinite)
    run.tokens_seen += run.tokens_per_step
    if run.world > 1:  # the mean over dp of the full sequences' loss (sp ranks hold partial sums)
        dist.all_reduce(step_loss, group=dims.dp_sp_group)
        step_loss /= dims.dp
    run.newton.end_step(run.step)
    return step_loss.item(), nonfinite, data_wait


class Progress:
    """The console (a progress bar, or plain lines for logs), metrics.jsonl / wandb, and the
    run's first and last loss: steps are averaged over a window and logged every log_every."""

    def __init__(self, run: Run, metrics: MetricsLogger, end_step: int):
        from tqdm import tqdm

        cfg = run.cfg
        console = cfg.logging.console
        if console == "auto":
            console = "bar" if sys.stdout.isatty() else "plain"
        show = run.rank == 0 and cfg.logging.progress
        self.pbar = tqdm(total=end_step, initial=run.step, unit="step", dynamic_ncols=True, smoothing=0.1,
                         disable=not (show and console == "bar"))
        self.plain = show and console == "plain"
        self.rank, self.metrics, self.end_step, self.start_step = run.rank, metrics, end_step, run.step
        self.peak = device_peak_flops(run.device, cfg.train.peak_tflops)
        self.last_logged_loss, self.data_wait = None, 0.0
        self.first_loss = self.last_loss = None
        self.window_loss, self.window_steps, self.window_finite, self.window_t0 = 0.0, 0, 0, time.perf_counter()
        self.run_t0, self.run_tokens = time.perf_counter(), 0
        self.unconverged = 0  # layer-steps above tol since step 0 of this run

    def write(self, line: str) -> None:
        """A console line above the bar (rank 0)."""
        if self.rank == 0:
            self.pbar.write(line)

    def step_done(self, run: Run, loss_value: float, data_wait: float) -> None:
        self.data_wait += data_wait
        self.run_tokens += run.tokens_per_step
        self.first_loss = loss_value if self.first_loss is None else self.first_loss
        self.last_loss = loss_value
        if math.isfinite(loss_value):  # the logged loss is the mean over the window's finite steps
            self.window_loss += loss_value
            self.window_finite += 1
        self.window_steps += 1
        self.pbar.update(1)

    def log(self, run: Run) -> None:
        """Close the window: one record (metrics.jsonl, wandb), the bar's postfix or a plain line,
        a warning for layers whose Newton solve stayed above tol."""
        step, engine = run.step, run.engine
        elapsed = time.perf_counter() - self.window_t0
        tok_s = self.window_steps * run.tokens_per_step / max(elapsed, 1e-9)
        mfu = tok_s * run.flops_per_token / (self.peak * run.world) if self.peak else None
        window = run.newton.read()  # the one host sync for every layer's residual
        if window is not None:
            self.unconverged += int(sum(window["above"].values()))
            line = run.newton.warning(window, step)
            if line:
                self.write(line)
        record = {"step": step, "loss": self.window_loss / self.window_finite if self.window_finite else math.nan,
                  "lr": run.scheduler.get_last_lr()[0], "tokens": run.tokens_seen, "tokens_per_s": tok_s,
                  "skipped": run.skipped, "grad_norm": float(engine.get_global_grad_norm() or 0.0)}
        if mfu is not None:
            record["mfu"] = mfu
        record.update(time=round(time.time(), 3), elapsed_s=round(time.perf_counter() - self.run_t0, 3),
                      data_wait_s=round(self.data_wait, 4), max_rss_mb=round(max_rss_mb(), 1))
        if run.device.type == "cuda":
            record["cuda_max_allocated_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 3)
        self.data_wait = 0.0
        if window is not None:
            record["newton_residual_max"] = max(window["last"].values())  # over layers, last step
            record["newton_unconverged"] = self.unconverged
            record.update({f"newton_residual/{k}": v for k, v in window["last"].items()})
        if run.loader.skipped_shards:
            record["skipped_shards"] = run.loader.skipped_shards
        fallbacks = kernel_fallbacks()
        if fallbacks:  # Triton kernels that failed their startup self-check (kernels/selfcheck.py)
            record["kernel_fallbacks"] = len(fallbacks)
        self.metrics.log(record)
        self.last_logged_loss = record["loss"]
        postfix = (f"loss {record['loss']:.3f} | {tok_s:,.0f} tok/s"
                   + (f" | MFU {mfu:.1%}" if mfu is not None else " | MFU n/a (CPU)")
                   + (f" | skipped {run.skipped}" if run.skipped else "")
                   + (f" | newton unconverged {self.unconverged}" if self.unconverged else ""))
        self.pbar.set_postfix_str(postfix, refresh=False)
        if self.plain:
            done_steps = step - self.start_step
            eta = (self.end_step - step) * (time.perf_counter() - self.run_t0) / max(done_steps, 1)
            print(f"step {step}/{self.end_step} | {postfix} | lr {record['lr']:.2e} | "
                  f"ETA {_hms(eta)}", flush=True)
        self.window_loss, self.window_steps, self.window_finite, self.window_t0 = 0.0, 0, 0, time.perf_counter()

    def close(self) -> None:
        self.pbar.close()


def _train(cfg: Config, lock: RunDirLock) -> dict:
    """build, then train_step / Progress.log / eval / save until end_step or a preemption."""
    run = build(cfg, lock)
    t, rank, run_dir = cfg.train, run.rank, run.run_dir
    end_step = t.stop_at or t.max_steps
    metrics = MetricsLogger(run_dir, to_dict(cfg), cfg.logging.wandb, enabled=rank == 0, resume_step=run.step)
    preempt = PreemptionFlag()
    if rank == 0:
        d = run.dims
        print(f"model: {run.n_params / 1e6:.2f}M parameters, mixers {cfg.model.layer_mixers()}; device {run.device}, "
              f"{str(run.dtype).replace('torch.', '')}, world {run.world} = dp {d.dp} x sp {d.sp} x tp {d.tp}, "
              f"ZeRO-{cfg.parallel.zero_stage}; "
              + (f"resuming from {run.resume_from} at step {run.step}" if run.resume_from else "starting at step 0"),
              flush=True)
    checkpointer = ckpt_lib.Checkpointer(run.engine, run_dir, run.checkpoint_state, t.keep_last, t.keep_every,
                                         t.async_save)
    progress = Progress(run, metrics, end_step)
    last_ckpt = run.resume_from
    exit_code = 0
    if preempt.any_rank(run.device):  # a signal during start-up: nothing new to save, requeue as it is
        exit_code = REQUEUE_EXIT_CODE
        if rank == 0:
            (run_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": run.step, "checkpoint": str(last_ckpt)}))
            print(f"preempted during start-up (step {run.step}, checkpoint {last_ckpt}); exiting with "
                  f"{REQUEUE_EXIT_CODE} to be requeued", flush=True)
    # No checkpoint is written right after a non-finite step; max_consecutive_nonfinite in a row
    # stop the run.
    nonfinite_run = 0
    run.engine.train()
    while run.step < end_step and exit_code == 0:
        loss_value, nonfinite, data_wait = train_step(run)
        step = run.step
        nonfinite_run = nonfinite_run + 1 if nonfinite else 0
        progress.step_done(run, loss_value, data_wait)

        diverged = nonfinite_run >= t.max_consecutive_nonfinite
        if step == 1 or step % cfg.logging.log_every == 0 or step == end_step or diverged:
            progress.log(run)

        if diverged or (nonfinite_run and step == end_step):
            checkpointer.wait()
            progress.close()
            metrics.close()
            raise ConfigError(
                f"the run diverged: {nonfinite_run} optimizer steps in a row (steps {step - nonfinite_run + 1}-{step}) "
                f"had a non-finite loss or gradient (train.max_consecutive_nonfinite={t.max_consecutive_nonfinite}); "
                "nothing was saved after them; the last good checkpoint is "
                + (f"{last_ckpt}: resume from it (train.resume=auto) with a lower train.lr" if last_ckpt else
                   "none (no checkpoint was written): start again with a lower train.lr"))

        if t.eval_every and step % t.eval_every == 0:
            val_loss = evaluate(run.engine, run.val_loader, t.eval_batches, run.dims, run.device)
            metrics.log({"step": step, "val_loss": val_loss})
            progress.write(f"step {step}: val_loss {val_loss:.4f}")

        preempted = preempt.any_rank(run.device)
        if nonfinite_run and (step % t.save_every == 0 or preempted):
            # weights after a skipped (non-finite) step are not checkpointed
            progress.write(f"step {step}: not saved: the last {nonfinite_run} step(s) had a non-finite loss or "
                           f"gradient; the last good checkpoint is {last_ckpt}")
        elif step % t.save_every == 0 or step == end_step or preempted:
            last_ckpt = checkpointer.save(step)
            if step == end_step or preempted:  # about to exit: the save must be in place first
                checkpointer.wait()
            progress.write(f"saved checkpoint {last_ckpt}" if not t.async_save or step == end_step or preempted
                           else f"saving checkpoint {last_ckpt} in the background")
        if preempted:
            if rank == 0:
                # The marker survives launchers (torchrun) that do not pass exit codes through.
                (run_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": step, "checkpoint": str(last_ckpt)}))
            progress.write((f"preempted: checkpoint saved at step {step}" if nonfinite_run == 0 else
                            f"preempted: not saved (non-finite steps); the last good checkpoint is {last_ckpt}")
                           + f"; exiting with {REQUEUE_EXIT_CODE} to be requeued")
            exit_code = REQUEUE_EXIT_CODE
            break
    checkpointer.wait()
    progress.close()

    wall = time.perf_counter() - progress.run_t0
    # first_loss: step 1's (logged alone); last_loss: the last logged value, the mean over the final
    # log window's finite steps -- what the progress bar and metrics.jsonl show
    last_loss = progress.last_logged_loss if progress.last_logged_loss is not None else progress.last_loss
    summary = {"run_dir": str(run_dir), "step": run.step, "first_loss": progress.first_loss, "last_loss": last_loss,
               "tokens_per_s": progress.run_tokens / max(wall, 1e-9), "checkpoint": str(last_ckpt) if last_ckpt else None,
               "skipped_steps": run.skipped, "exit_code": exit_code, "kernel_fallbacks": kernel_fallbacks()}
    if rank == 0:
        plot = plot_loss_svg(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.svg")
        summary["loss_plot"] = str(plot) if plot else None
    metrics.close()
    return summary
