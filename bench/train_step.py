"""Tokens/s, MFU and peak memory of full training steps (forward + backward + AdamW step).

    python -m bench.train_step --config configs/deltaproduct-1b.yaml [section.key=value ...]
        [--steps 5] [--warmup 1] [--note "..."]

One device: the config's model, AdamW with the training loop's parameter groups
(pretrain.train.param_groups), gradient clipping, the model held in the
training dtype (bf16 on GPU, fp32 on CPU), activation checkpointing if the config asks, random
tokens. No DeepSpeed engine (on one rank ZeRO adds no compute). FLOPs per token from
pretrain/flops.py; MFU against pretrain/metrics' bf16 peak when the device is known.
Appends a row to bench/results/train_step.md.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from launch.errors import run_cli
from pretrain.config import load_config
from pretrain.flops import model_flops_per_token
from pretrain.metrics import device_peak_flops
from pretrain.model import LanguageModel
from pretrain.parallelize import apply_activation_checkpointing

RESULTS = Path(__file__).parent / "results" / "train_step.md"


def measure(cfg, steps: int, warmup: int) -> dict:
    from pretrain.train import param_groups, resolve_device

    device, dtype = resolve_device(cfg)
    t = cfg.train
    torch.manual_seed(t.seed)
    model = LanguageModel(cfg.model).to(device=device, dtype=dtype)
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                            foreach=device.type == "cuda")
    B, T, V = t.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    ids = torch.randint(0, V, (B, T + 1), device=device)
    doc_start = torch.zeros(B, T, dtype=torch.bool, device=device)
    doc_start[:, 0] = True

    def step():
        loss = model(ids[:, :-1], labels=ids[:, 1:], doc_start=doc_start)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tok_s = B * T / dt
    flops = model_flops_per_token(cfg.model, T)["total"]
    peak = device_peak_flops(device, t.peak_tflops)
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process max RSS (KiB -> GiB)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": str(dtype).replace("torch.", ""), "params": model.num_params(), "tok_s": tok_s, "step_s": dt,
            "flops_per_token": flops, "mfu": tok_s * flops / peak if peak else None, "mem_gib": mem,
            "tokens": B * T, "loss": loss}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--note", default="")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    r = measure(cfg, args.steps, args.warmup)
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no bf16 peak for this device)"
    cmd = "python -m bench.train_step --config " + args.config + "".join(" " + o for o in args.overrides)
    row = (f"| {Path(args.config).stem} | {r['params'] / 1e6:.1f}M | {cfg.train.micro_batch_size}x{cfg.data.seq_len} "
           f"| {'on' if cfg.train.activation_checkpointing else 'off'} | {r['device']} {r['dtype']} | {r['tok_s']:,.0f} "
           f"| {r['flops_per_token'] / 1e9:.3f} | {mfu} | {r['mem_gib']:.2f} | `{cmd}` |")
    print(f"{r['tok_s']:,.0f} tokens/s, {r['step_s']:.2f} s/step, MFU {mfu}, peak memory {r['mem_gib']:.2f} GiB, "
          f"loss {r['loss']:.3f}")
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        text = RESULTS.read_text() if RESULTS.exists() else ""
        marker = "<!-- rows -->\n"
        if marker not in text:
            text += marker
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        text = text.replace(marker, marker + row + f" {stamp} {args.note} |\n", 1)
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "bench.train_step"))
