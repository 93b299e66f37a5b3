"""Typed configuration: YAML -> dataclasses, with `section.key=value` command-line overrides.

Every user mistake (unknown key, wrong type, unknown mixer) is a ConfigError whose message is one
line naming the key and what would be valid; launch/ prints it and exits non-zero.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pretrain.mixers import AttentionConfig, DeltaProductConfig, ParaRNNConfig  # noqa: F401 (re-exported)
from pretrain.registry import MIXERS, sections


class ConfigError(ValueError):
    """A configuration a user wrote that cannot be used; the message is one line."""


# ----------------------------------------------------------------------------- model


@dataclass
class ModelConfigBase:
    vocab_size: int = 1024        # must be >= the tokenizer's vocabulary
    d_model: int = 256            # residual stream width
    n_layers: int = 4
    # One mixer name per layer, or a single name for every layer (the names of pretrain/registry.py).
    mixers: list[str] = field(default_factory=lambda: ["paragru", "deltaproduct", "attention", "paragru"])
    mlp_ratio: float = 8 / 3      # SwiGLU hidden = mlp_ratio * d_model, rounded up to mlp_multiple
    mlp_multiple: int = 64
    tie_embeddings: bool = True   # the output head shares the embedding matrix
    norm_eps: float = 1e-5        # RMSNorm epsilon
    init_std: float = 0.02        # std of the normal initialisation of weights
    reset_at_doc_start: bool = True  # recurrent state and conv windows restart at each document

    def layer_mixers(self) -> list[str]:
        if len(self.mixers) == 1:
            return list(self.mixers) * self.n_layers
        return list(self.mixers)


def _model_config_class() -> type:
    """ModelConfig: ModelConfigBase plus one section per registered mixer section (model.<section>,
    the mixer's config dataclass with the registry entry's defaults), and model.mixers restricted
    to the registered names, so that a new registry entry is a new config section by itself."""
    default_mixers = next(f for f in dataclasses.fields(ModelConfigBase) if f.name == "mixers").default_factory
    fields = [("mixers", list[Literal[tuple(MIXERS)]], field(default_factory=default_mixers))]
    for key, spec in sections().items():
        fields.append((key, spec.config, field(default_factory=spec.default_section)))
    cls = dataclasses.make_dataclass("ModelConfig", fields, bases=(ModelConfigBase,))
    cls.__module__, cls.__qualname__ = __name__, "ModelConfig"  # picklable as pretrain.config.ModelConfig
    return cls


ModelConfig = _model_config_class()


# ----------------------------------------------------------------------------- data / train


@dataclass
class MixEntry:
    path: str
    weight: float


@dataclass
class DataConfig:
    path: str = "runs/data/smoke"   # a directory written by `python -m launch.prepare_data`
    # Several directories mixed by weight, "path:weight" or {path, weight}; replaces path when set.
    mix: list[str | MixEntry] = field(default_factory=list)
    seq_len: int = 256              # tokens per training sequence
    seed: int = 1234                # data order (shuffle) seed
    num_workers: int = 0            # batch-assembling processes per rank; 0 = in the trainer
    pin_memory: bool = False        # page-locked batches for faster host-to-GPU copies
    prefetch_factor: int = 2        # batches each worker keeps ready
    on_bad_shard: Literal["error", "skip"] = "error"  # skip: serve other windows, count it
    # Read the training data as laid out for this many dp ranks (0: this run's dp): one process
    # with 2 sees the global batches of a dp=2 run (dp x grad_accum x micro_batch_size rows a
    # multiple of layout_dp x micro_batch_size). A resumed run keeps its checkpoint's layout.
    layout_dp: int = 0


@dataclass
class ParallelConfig:
    tp: int = 1                   # tensor-parallel degree (inside a node)
    sp: int = 1                   # sequence-parallel degree (scans cross ranks by summaries)
    zero_stage: int = 1           # DeepSpeed ZeRO stage 0-3 over the data-parallel ranks (3 needs tp=1)


@dataclass
class TrainConfig:
    run_dir: str = "runs/smoke"   # checkpoints, metrics.jsonl, loss.svg, config.yaml (one run per dir)
    micro_batch_size: int = 8     # sequences per rank per forward
    grad_accum: int = 1           # micro-batches per optimizer step
    max_steps: int = 200          # optimizer steps of the schedule
    stop_at: int = 0              # stop (after saving) at this step though the schedule runs to max_steps
    lr: float = 3e-3              # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1     # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 20        # linear warmup steps
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2   # wsd: the final fraction of steps that decays
    weight_decay: float = 0.1     # AdamW decoupled weight decay
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0        # global gradient-norm clip (0: off)
    seed: int = 1234              # model initialisation and RNG seed
    dtype: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    save_every: int = 100         # steps between checkpoints
    keep_last: int = 3            # newest checkpoints kept
    keep_every: int = 0           # also keep every checkpoint whose step is a multiple of this (0: none)
    async_save: bool = False      # write checkpoints in a background thread from a host copy (training goes on)
    resume: str = "auto"          # auto (newest complete checkpoint if any) | none | a checkpoint dir
    overwrite: bool = False       # move checkpoints of another run, or of later steps, aside (pretrain/run_dir.py)
    peak_tflops: Optional[float] = None  # device peak for MFU; None = known GPUs only
    activation_checkpointing: bool = False  # recompute each block in backward (less memory)
    # auto: Triton kernels on CUDA, torch reference on CPU; torch forces the reference (to rule
    # out a kernel problem); triton forces the kernels (CPU only under TRITON_INTERPRET=1).
    kernel_backend: Literal["auto", "torch", "triton"] = "auto"
    eval_every: int = 0           # steps between val_loss evaluations on the "val" split; 0 = never
    eval_batches: int = 10        # micro-batches per evaluation
    # Stop (exit 3, nothing saved) after this many optimizer steps in a row were skipped for a
    # non-finite loss or gradient: the run has diverged; resume from the last checkpoint with a lower lr.
    max_consecutive_nonfinite: int = 10


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"  # offline unless asked
    project: str = "recurrent-pretrain"
    name: Optional[str] = None    # run name (null: wandb picks one)


@dataclass
class LoggingConfig:
    log_every: int = 10           # steps between metrics.jsonl lines (and progress refreshes)
    progress: bool = True         # the console progress bar
    # bar: a tqdm progress bar; plain: one line per log step (for Slurm logs, no carriage returns);
    # auto: the bar when stdout is a terminal, plain lines otherwise
    console: Literal["auto", "bar", "plain"] = "auto"
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, from_string: bool) -> Any:
    """Check (and for command-line strings, parse) `value` as type `tp`."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (from_string and str(value).lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, from_string)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise bad
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if from_string and isinstance(value, str):
            # `model.mixers=[paragru,attention]` or `model.mixers=paragru,attention`
            text = value.strip()
            if text.startswith("["):
                text = text[1:-1] if text.endswith("]") else text[1:]
            value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, list):
            raise bad
        return [_convert(v, item_tp, f"{key}[{i}]", from_string) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_string and str(value).lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return str(value).lower() in ("true", "yes", "1", "on")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if from_string:
            try:
                return int(str(value).replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if from_string:
            return str(value)
        raise bad
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # our bug, not the user's


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], full, from_string=False)
    return cls(**kwargs)


def _set_override(cfg: Any, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key '{dotted}'; valid keys under {where}: {', '.join(names)}")
        if i == len(parts) - 1:
            tp = typing.get_type_hints(type(obj))[part]
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"'{dotted}' is a section; set one of its keys, e.g. {dotted}.{dataclasses.fields(tp)[0].name}=...")
            setattr(obj, part, _convert(raw, tp, dotted, from_string=True))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"'{'.'.join(parts[:i + 1])}' is a value, not a section; cannot set '{dotted}'")


def _check_ranges(cfg: Config) -> None:
    """Each numeric key against the values that make sense; the first one outside is a one-line
    error naming the key, its value and what is valid."""
    m, d, t, p = cfg.model, cfg.data, cfg.train, cfg.parallel
    positive = "> 0"
    rules = [  # (key, value, valid?, what is valid)
        ("model.vocab_size", m.vocab_size, m.vocab_size > 0, positive),
        ("model.d_model", m.d_model, m.d_model > 0, positive),
        ("model.n_layers", m.n_layers, m.n_layers > 0, positive),
        ("model.mlp_ratio", m.mlp_ratio, m.mlp_ratio > 0, positive),
        ("model.mlp_multiple", m.mlp_multiple, m.mlp_multiple > 0, positive),
        ("model.norm_eps", m.norm_eps, m.norm_eps > 0, positive),
        ("model.init_std", m.init_std, m.init_std > 0, positive),
        ("data.seq_len", d.seq_len, d.seq_len > 0, positive),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
        ("data.prefetch_factor", d.prefetch_factor, d.prefetch_factor >= 1, ">= 1"),
        ("data.layout_dp", d.layout_dp, d.layout_dp >= 0, ">= 0 (0: this run's dp size)"),
        ("train.micro_batch_size", t.micro_batch_size, t.micro_batch_size > 0, positive),
        ("train.grad_accum", t.grad_accum, t.grad_accum > 0, positive),
        ("train.max_steps", t.max_steps, t.max_steps > 0, positive),
        ("train.stop_at", t.stop_at, 0 <= t.stop_at <= t.max_steps, f"in [0, train.max_steps={t.max_steps}] (0: run to max_steps)"),
        ("train.lr", t.lr, 0 < t.lr < math.inf, "a finite number > 0"),
        ("train.min_lr_ratio", t.min_lr_ratio, 0 <= t.min_lr_ratio <= 1, "in [0, 1] (the final lr as a fraction of train.lr)"),
        ("train.warmup_steps", t.warmup_steps, 0 <= t.warmup_steps <= t.max_steps, f"in [0, train.max_steps={t.max_steps}]"),
        ("train.decay_fraction", t.decay_fraction, 0 <= t.decay_fraction <= 1, "in [0, 1] (the fraction of steps that decays)"),
        ("train.weight_decay", t.weight_decay, 0 <= t.weight_decay < math.inf, "a finite number >= 0"),
        ("train.beta1", t.beta1, 0 <= t.beta1 < 1, "in [0, 1)"),
        ("train.beta2", t.beta2, 0 <= t.beta2 < 1, "in [0, 1)"),
        ("train.grad_clip", t.grad_clip, 0 <= t.grad_clip < math.inf, "a finite number >= 0 (0: no clipping)"),
        ("train.save_every", t.save_every, t.save_every > 0, "> 0 (steps between checkpoints)"),
        ("train.keep_last", t.keep_last, t.keep_last >= 0, ">= 0 (0: keep every checkpoint)"),
        ("train.keep_every", t.keep_every, t.keep_every >= 0, ">= 0 (0: none)"),
        ("train.max_consecutive_nonfinite", t.max_consecutive_nonfinite, t.max_consecutive_nonfinite > 0,
         "> 0 (consecutive skipped steps after which the run stops)"),
        ("train.peak_tflops", t.peak_tflops, t.peak_tflops is None or t.peak_tflops > 0, "> 0 or null"),
        ("train.eval_every", t.eval_every, t.eval_every >= 0, ">= 0 (0: never)"),
        ("train.eval_batches", t.eval_batches, t.eval_batches >= 1, ">= 1"),
        ("parallel.tp", p.tp, p.tp > 0, positive),
        ("parallel.sp", p.sp, p.sp > 0, positive),
        ("parallel.zero_stage", p.zero_stage, p.zero_stage in (0, 1, 2, 3), "one of 0, 1, 2, 3"),
        ("logging.log_every", cfg.logging.log_every, cfg.logging.log_every > 0, positive),
    ]
    for section, spec in sections().items():
        rules += spec.ranges(getattr(m, section), f"model.{section}")
    for key, value, ok, valid in rules:
        if not ok:  # `not ok` also catches nan, whose every comparison is False
            raise ConfigError(f"{key} must be {valid}, got {value!r}")


def validate(cfg: Config) -> Config:
    _check_ranges(cfg)
    m = cfg.model
    mixers = m.layer_mixers()
    if len(mixers) != m.n_layers:
        raise ConfigError(f"model.mixers has {len(m.mixers)} entries but model.n_layers={m.n_layers}; "
                          f"give one mixer per layer or a single mixer for all")
    for name in dict.fromkeys(mixers):
        spec = MIXERS[name]
        error = spec.validate(m, spec.section_of(m), f"model.{spec.section}")
        if error:
            raise ConfigError(error)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from the defaults), apply `a.b=value` overrides, validate."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file, e.g. configs/smoke.yaml")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                              f"save the config as UTF-8 YAML") from None
        if not text.strip() or all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines()):
            raise ConfigError(f"{path} is empty; write the sections to change (model:, data:, train:, ...), "
                              f"or leave out --config for the defaults")
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, train:, ...)")
    cfg = _build(Config, values, "")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.max_steps=100")
        key, raw = item.split("=", 1)
        _set_override(cfg, key.strip(), raw.strip())
    return validate(cfg)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(values: dict) -> ModelConfig:
    return _build(ModelConfig, values, "model")


def config_from_dict(values: dict) -> Config:
    return validate(_build(Config, values, ""))


# ----------------------------------------------------------------------------- help


def _field_comments(cls: type) -> dict[str, str]:
    """field name -> its comment in the class source (trailing, or the full-line comments just
    above it): the help text lives beside the default it explains, in one place. A class made
    at run time (ModelConfig) takes its fields' comments from its bases' source."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_own_field_comments(klass))
    return comments


def _own_field_comments(cls: type) -> dict[str, str]:
    import inspect
    import io
    import tokenize

    comments, pending, current, line_of_field = {}, [], {}, {}
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            row = tok.start[0]
            owner = line_of_field.get(row)
            if owner is not None:  # trailing comment
                current[owner].append(text)
            else:
                pending.append(text)
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names:
            line_of_field[tok.start[0]] = tok.string
            current[tok.string] = pending
            pending = []
        elif tok.type == tokenize.NL and not pending:
            continue
    for name, parts in current.items():
        comments[name] = " ".join(p for p in parts if p)
    return comments


def config_help() -> str:
    """Every config key with its type, default and help, one per line, grouped by section."""
    lines = []

    def walk(cls: type, prefix: str, default_obj) -> None:
        hints = typing.get_type_hints(cls)
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            value = getattr(default_obj, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"\n{prefix}{f.name}:")
                walk(type(value), f"{prefix}{f.name}.", value)
                continue
            default = "null" if value is None else json.dumps(value) if isinstance(value, (list, str, bool)) else value
            text = f"  {prefix}{f.name} ({_type_name(tp)}, default {default})"
            if comments.get(f.name):
                text += f": {comments[f.name]}"
            lines.append(text)

    walk(Config, "", Config())
    return "config keys (set in the YAML file or as section.key=value):" + "\n".join(lines)
