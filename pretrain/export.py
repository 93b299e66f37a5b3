"""Export a checkpoint to `model.safetensors` + `config.json` + `tokenizer.model`, and load it back.

ZeRO-1/2 partitions and tensor-parallel shards are consolidated into full fp32 weights by
pretrain.reshard.full_state (the same path a topology change takes), ZeRO-3 partitions by
DeepSpeed's zero_to_fp32 reader; a checkpoint written without ZeRO holds the weights (tp shards)
in its model-states files. Every file is read with weights_only=True (DeepSpeed's zero_to_fp32
included) after its sha256 is checked against the checkpoint's manifest; the output directory is
written beside --out and renamed into place, never replacing anything but an earlier export
(pretrain/output_dir.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data.mixing import parse_mix
from data.shards import TOKENIZER
from data.sources import SourceError, open_source
from pretrain import checkpoint as ckpt_lib
from pretrain import deepspeed_io, reshard
from pretrain.config import ConfigError, model_config_from_dict
from pretrain.hf_export import is_hf_export, write_hf_directory
from pretrain.model import LanguageModel
from pretrain.output_dir import check_replaceable, write_replacing

EXPORT_FORMAT = "recurrent-pretrain/1"
EXPORT_FILES = {"model.safetensors", "config.json", "tokenizer.model"}
EXPORT = "an earlier export"
HF_EXPORT = "an earlier export --format hf"


def _report(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint dir (…/checkpoints/step_N), a checkpoints dir, or a run dir; the
    checkpoint's files must match the sha256 in its manifest. For a run dir that is its newest
    intact checkpoint (a damaged newer one is reported on stderr and skipped); a named checkpoint
    that is damaged is an error naming the file."""
    path = Path(path)
    if ckpt_lib.is_complete(path):
        ckpt_lib.verify_checksums(path)
        return path
    for run_dir in (path, path.parent):
        if path in (run_dir, run_dir / "checkpoints"):
            found = ckpt_lib.find_latest(run_dir, report=_report, verify=True)
            if found is not None:
                return found
    why = ckpt_lib.damage(path) if path.is_dir() and (path / "manifest.json").is_file() else None
    raise ConfigError(f"{path} is not a complete checkpoint{f' ({why})' if why else ''} (nor a run dir with one); "
                      f"pass <run_dir> or <run_dir>/checkpoints/step_XXXXXXXX")


def is_export(path: Path) -> bool:
    """Whether `path` is an export of ours holding only the files export() writes."""
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == EXPORT_FORMAT and {p.name for p in path.iterdir()} <= EXPORT_FILES


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the model saved in `ckpt`, whatever the ZeRO stage and tp degree:
    ZeRO-1/2 partitions and tensor-parallel shards through reshard.full_state (the fp32 master
    weights), ZeRO-3 through DeepSpeed's zero_to_fp32 (tp=1 only), no ZeRO from the model-states
    files (shards merged by the shard_spec recorded in trainer_state.json)."""
    trainer_state = ckpt_lib.read_trainer_state(ckpt)
    stage = trainer_state.get("config", {}).get("parallel", {}).get("zero_stage", 1)
    if (ckpt / reshard.FULL_STATE).is_file() or (stage in (1, 2) and list(ckpt.glob("*optim_states.pt"))):
        state = {name: v["fp32"] for name, v in reshard.full_state(ckpt)["params"].items()}
    elif list(ckpt.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with deepspeed_io.zero_to_fp32_weights_only():
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        tp, specs = trainer_state["topology"]["tp"], trainer_state["shard_specs"]
        per_tp = [deepspeed_io.load_checkpoint_file(ckpt / f"mp_rank_{t:02d}_model_states.pt")["module"] for t in range(tp)]
        state = {name: reshard.merge_shards([m[name] for m in per_tp], specs[name]) if name in specs and tp > 1
                 else v for name, v in per_tp[0].items()}
    return {k: v.float().contiguous() for k, v in state.items()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export(checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32", format: str = "native") -> Path:
    """Write the checkpoint's weights to out_dir: format "native" (model.safetensors, config.json,
    tokenizer.model; load_exported reads it) or "hf" (a transformers directory, pretrain/hf_export.py)."""
    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"export dtype must be fp32 or bf16, got {dtype!r}")
    if format not in ("native", "hf"):
        raise ConfigError(f"export format must be native or hf, got {format!r}")
    is_ours, what = (is_export, EXPORT) if format == "native" else (is_hf_export, HF_EXPORT)
    out_dir = check_replaceable(out_dir, is_ours, what)  # before any work
    ckpt = resolve_checkpoint(checkpoint)
    trainer_state = ckpt_lib.read_trainer_state(ckpt)
    with run_tokenizer(trainer_state) as tokenizer:
        return _write_export(ckpt, trainer_state, tokenizer, out_dir, dtype, format)


@contextlib.contextmanager
def run_tokenizer(trainer_state: dict):
    """The tokenizer.model beside the run's data (data.path, or the first data.mix entry) as a local
    file, checked against the checkpoint's checksum; a URL's or pipe: command's is fetched to a
    temporary file for the time of the export."""
    data = trainer_state["config"]["data"]
    spec = parse_mix(data["mix"])[0][0] if data.get("mix") else data["path"]
    source = open_source(spec)
    with tempfile.TemporaryDirectory(prefix="export-tokenizer-") as tmp:
        if not source.remote:
            tokenizer = source.location(TOKENIZER)
            if not tokenizer.is_file():
                raise ConfigError(f"the tokenizer {tokenizer} recorded by the checkpoint is missing; "
                                  f"the export needs it beside the weights")
        else:
            try:
                tokenizer = source.fetch(TOKENIZER, Path(tmp) / TOKENIZER)
            except SourceError as e:
                raise ConfigError(f"the tokenizer recorded by the checkpoint cannot be fetched ({e}); "
                                  f"the export needs it beside the weights") from None
        if _sha256(tokenizer) != trainer_state["tokenizer_checksum"]:
            raise ConfigError(f"{source.location(TOKENIZER)} is not the tokenizer this checkpoint was trained "
                              f"with (checksum differs)")
        yield tokenizer


def _write_export(ckpt: Path, trainer_state: dict, tokenizer: Path, out_dir: Path, dtype: str, format: str) -> Path:
    model_cfg = trainer_state["config"]["model"]
    state = consolidated_state_dict(ckpt)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    if format == "hf":
        extra = {"step": trainer_state["step"], "tokens": trainer_state["tokens"],
                 "tokenizer_checksum": trainer_state["tokenizer_checksum"], "source_checkpoint": str(ckpt)}
        with write_replacing(out_dir, is_hf_export, HF_EXPORT) as tmp:
            write_hf_directory(tmp, model_cfg, state, tokenizer, torch_dtype, extra)
        return out_dir
    if model_cfg["tie_embeddings"]:
        state.pop("head.weight", None)  # one tensor stored once; reloading ties it again
    state = {k: v.to(torch_dtype).contiguous() for k, v in state.items()}

    meta = {"format": EXPORT_FORMAT, "model": model_cfg, "dtype": dtype, "step": trainer_state["step"],
            "tokens": trainer_state["tokens"], "tokenizer_checksum": trainer_state["tokenizer_checksum"],
            "source_checkpoint": str(ckpt)}
    with write_replacing(out_dir, is_export, EXPORT) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": EXPORT_FORMAT})
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        (tmp / "config.json").write_text(json.dumps(meta, indent=1))
    return out_dir


def load_exported(export_dir: str | Path, device: str | torch.device = "cpu") -> tuple[LanguageModel, dict]:
    """Rebuild the model from an export; returns (model in eval mode, config.json contents)."""
    export_dir = Path(export_dir)
    meta_path = export_dir / "config.json"
    if not meta_path.is_file():
        raise ConfigError(f"{export_dir} has no config.json; pass a directory written by `python -m launch.export`")
    meta = json.loads(meta_path.read_text())
    cfg = model_config_from_dict(meta["model"])
    with torch.device("meta"):
        model = LanguageModel(cfg)
    model = model.to_empty(device=device)
    state = load_file(str(export_dir / "model.safetensors"), device=str(device))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    allowed_missing = {"head.weight"} if cfg.tie_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise ConfigError(f"{export_dir}/model.safetensors does not match its config.json "
                          f"(missing {sorted(set(missing) - allowed_missing)}, unexpected {sorted(unexpected)})")
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    return model.eval(), meta
