"""Decoding speed: ms per new token against prompt length, recurrent cache vs re-running the prefix.

    python -m bench.generate [--config configs/smoke.yaml | --export DIR] [section.key=value ...]
        [--prompt-lengths 64,256,1024,2048] [--steps 64] [--rerun-tokens 3] [--repeats 2] [--threads 1]
        [--device cpu] [--out FILE]

--config (default configs/smoke.yaml): a randomly initialised model per mixer type with the
config's sizes (every layer that mixer), and the config's own mixer list. --export: that model.
One sequence (batch 1), fp32, greedy. Per prompt length P:
  prefill ms     model.prefill over the P prompt tokens (the parallel path: Newton, chunkwise, attention)
  cached ms/tok  fastest (and median) of --steps calls of model.step after that prefill
                 (O(1) per recurrent layer)
  re-run ms/tok  fastest over --rerun-tokens new tokens of generate(use_cache=False)'s work per
                 token: a forward over the whole sequence
Writes a markdown table (command, date, machine, threads) to --out (bench/results/generate.md).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from launch.errors import run_cli
from pretrain.config import ConfigError, load_config
from pretrain.model import LanguageModel
from pretrain.registry import MIXERS as REGISTERED

RESULTS = Path(__file__).parent / "results" / "generate.md"
MIXERS = tuple(REGISTERED)  # every registered mixer (pretrain/registry.py)


def models_to_measure(args) -> list[tuple[str, LanguageModel]]:
    if args.export:
        from pretrain.export import load_exported

        model, _ = load_exported(args.export)
        return [(f"export {Path(args.export).name} [{','.join(model.cfg.layer_mixers())}]", model)]
    cfg = load_config(args.config, args.overrides).model
    mixer_lists = [[m] for m in MIXERS]  # one name: every layer that mixer
    if len(set(cfg.layer_mixers())) > 1:
        mixer_lists.append(cfg.layer_mixers())
    out = []
    for mixers in mixer_lists:
        cfg_m = load_config(args.config, [*args.overrides, "model.mixers=[" + ",".join(mixers) + "]",
                                          f"model.n_layers={cfg.n_layers}"]).model
        torch.manual_seed(0)
        name = mixers[0] if len(mixers) == 1 else "hybrid [" + ",".join(mixers) + "]"
        out.append((name, LanguageModel(cfg_m).eval()))
    return out


@torch.no_grad()
def measure(model: LanguageModel, prompt_len: int, steps: int, rerun_tokens: int) -> dict:
    """Per call the fastest and the median time: on a shared machine the fastest call is the
    cost of the work itself, the median what a user waits."""
    device = model.head.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), generator=gen).to(device)
    sync()
    t0 = time.perf_counter()
    logits, cache = model.prefill(prompt)
    sync()
    prefill_s = time.perf_counter() - t0
    nxt = logits[:, -1].argmax(-1)
    cached_tokens, step_s = [nxt], []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, cache = model.step(nxt, cache)
        nxt = logits.argmax(-1)
        sync()
        step_s.append(time.perf_counter() - t0)
        cached_tokens.append(nxt)
    row = {"prompt": prompt_len, "prefill_ms": 1e3 * prefill_s, "step_ms": 1e3 * min(step_s),
           "step_median_ms": 1e3 * statistics.median(step_s)}
    if rerun_tokens:
        # generate(use_cache=False)'s loop, each token timed: a forward over the whole sequence.
        ids, rerun_s = prompt, []
        for _ in range(rerun_tokens):
            t0 = time.perf_counter()
            nxt = model(ids)[:, -1].argmax(-1)
            sync()
            rerun_s.append(time.perf_counter() - t0)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        row["rerun_ms"] = 1e3 * min(rerun_s)
        row["same_tokens"] = torch.equal(ids[0, prompt_len:], torch.cat(cached_tokens)[:rerun_tokens])
    return row


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"**GPU** {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "cpu"
    return (f"**CPU** {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parents[1]).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def render(results, command: str, args, load: str, device: torch.device) -> str:
    lines = ["# Decoding: ms per new token vs prompt length (recurrent cache vs re-running the prefix)", "",
             f"`{command}`", "",
             f"{datetime.datetime.now():%Y-%m-%d %H:%M}, commit {commit()}, {machine(device)}. "
             f"Batch 1, fp32, greedy; random weights (the speed does not depend on them). "
             f"Load average at the start {load}: the machine was shared, so times are the fastest call "
             f"(the work's own cost) and, for the cached step, the median (what a user waits), over "
             f"{args.repeats} measurements of each prompt length. "
             f"cached ms/token: {args.steps} `model.step` calls after `model.prefill(prompt)`; "
             f"re-run ms/token: fastest of {args.rerun_tokens} new tokens of `generate(use_cache=False)`'s "
             f"work per token, one forward of the whole sequence (what `LanguageModel.generate` did before); "
             f"same tokens: whether the two produced the same greedy tokens.", "",
             "| model | params | prompt | prefill ms | cached ms/token (median) | re-run ms/token | re-run / cached | same tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for name, params, rows in results:
        for r in rows:
            rerun = f"{r['rerun_ms']:.1f}" if "rerun_ms" in r else "-"
            ratio = f"{r['rerun_ms'] / r['step_ms']:.1f}x" if "rerun_ms" in r else "-"
            same = ("yes" if r["same_tokens"] else "no") if "same_tokens" in r else "-"
            lines.append(f"| {name} | {params / 1e6:.1f}M | {r['prompt']} | {r['prefill_ms']:.1f} | "
                         f"{r['step_ms']:.2f} ({r['step_median_ms']:.2f}) | {rerun} | {ratio} | {same} |")
    lines += ["", "Cached ms/token (fastest call) at the longest prompt over the shortest (1.0 = flat in "
              "prompt length):", ""]
    for name, _, rows in results:
        lines.append(f"- {name}: {rows[-1]['step_ms'] / rows[0]['step_ms']:.2f} "
                     f"({rows[0]['prompt']} -> {rows[-1]['prompt']} tokens)")
    lines += ["", "Notes:", "",
              "- A recurrent layer's step reads and writes a state of fixed size (ParaGRU h, ParaLSTM (c, h), "
              "DeltaProduct S [H, dk, dv] and three conv windows), so its cost does not depend on the prompt. "
              "An attention step reads its whole KV cache and `torch.cat` copies it: O(T) per token, which "
              "is what grows in the attention and hybrid rows.",
              "- Re-running costs one forward over the whole sequence per token, so it grows with the "
              "prompt; the prefill is one such forward, paid once.",
              "- At these sizes a step is bound by per-op overhead in eager PyTorch, not by FLOPs: one "
              "mixer step dispatches ~40 (ParaGRU), ~50 (ParaLSTM), ~60 (attention) and ~180 "
              "(DeltaProduct: projections, three conv windows, the n_h Householder updates in a loop, "
              "gated norm) aten ops. Fusing a layer's step into one kernel (or CUDA graphs on a GPU) "
              "is the next speed-up; not done here."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", default=None, help="YAML config (default configs/smoke.yaml)")
    source.add_argument("--export", default=None, help="an export directory (python -m launch.export)")
    parser.add_argument("overrides", nargs="*", help="section.key=value (with --config)")
    parser.add_argument("--prompt-lengths", default="64,256,1024,2048")
    parser.add_argument("--steps", type=int, default=64, help="cached steps timed per prompt length")
    parser.add_argument("--rerun-tokens", type=int, default=3, help="new tokens timed by re-running (0: skip)")
    parser.add_argument("--repeats", type=int, default=2, help="measure each prompt length this many times")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the models run in fp32 there)")
    parser.add_argument("--out", default=str(RESULTS), help="markdown file to write ('-': stdout only)")
    args = parser.parse_args(argv)
    if args.export and args.overrides:
        raise ConfigError("config overrides apply to --config models, not to an --export")
    if not args.export and not args.config:
        args.config = "configs/smoke.yaml"
    try:
        lengths = [int(x) for x in args.prompt_lengths.split(",")]
    except ValueError:
        raise ConfigError(f"--prompt-lengths must be comma-separated integers, got {args.prompt_lengths!r}") from None
    if not lengths or min(lengths) < 1 or args.steps < 1 or args.rerun_tokens < 0 or args.threads < 1 \
            or args.repeats < 1:
        raise ConfigError(f"need prompt lengths >= 1 (got {lengths}), --steps >= 1 (got {args.steps}), "
                          f"--rerun-tokens >= 0 (got {args.rerun_tokens}), --threads and --repeats >= 1 "
                          f"(got {args.threads}, {args.repeats})")
    torch.set_num_threads(args.threads)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"
    command = "python -m bench.generate " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    device = torch.device(args.device)
    results = []
    for name, model in models_to_measure(args):
        model = model.to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # Newton above tol on random weights: a speed run
            measure(model, min(lengths), args.steps, 1)  # warm-up
            rows = []
            for n in lengths:
                # The fastest of --repeats measurements of each number (the median of the medians).
                runs = [measure(model, n, args.steps, args.rerun_tokens) for _ in range(args.repeats)]
                r = {key: (statistics.median if key == "step_median_ms" else min)(run[key] for run in runs)
                     for key in runs[0] if key.endswith("_ms")}
                r["prompt"] = n
                if "same_tokens" in runs[0]:
                    r["same_tokens"] = all(run["same_tokens"] for run in runs)
                rows.append(r)
                print(f"{name:40s} prompt {n:5d}: prefill {r['prefill_ms']:8.1f} ms, cached {r['step_ms']:6.2f} "
                      f"ms/token, re-run {r.get('rerun_ms', float('nan')):8.1f} ms/token", flush=True)
        results.append((name, model.num_params(), rows))
    text = render(results, command.strip(), args, load, device)
    if args.out != "-":
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "bench.generate"))
