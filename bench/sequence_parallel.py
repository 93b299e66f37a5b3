"""python -m bench.sequence_parallel [--seq 512] [--steps 3] [--out bench/results/sequence_parallel.md]

Weak scaling of sequence parallelism on CPU (gloo): one training step (forward + backward) of a
one-layer model per mixer with sp=1 at length T against sp=2 at length 2T (each rank holds T
tokens either way), as time per token; and the bytes each rank sends per layer per step, against
the activation bytes of that layer's input on one rank (B x T x d_model x 4).

The bytes are counted by wrapping torch.distributed's collectives in the worker processes: for an
all-gather or all-to-all a rank sends its input to every other rank of the group, for an
all-reduce (ring) about 2 (n-1)/n of its tensor.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.spawn import run_gloo
from pretrain.registry import MIXERS as REGISTERED

MIXERS = list(REGISTERED)  # every registered mixer (pretrain/registry.py)
BATCH, D_MODEL = 2, 128


def _count_bytes():
    sent = {"bytes": 0}
    originals = {}

    def wrap(name, size_of):
        fn = getattr(dist, name)
        originals[name] = fn

        def counted(*args, **kwargs):
            group = kwargs.get("group")
            n = dist.get_world_size(group)
            sent["bytes"] += size_of(args, n)
            return fn(*args, **kwargs)

        setattr(dist, name, counted)

    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    wrap("all_gather", lambda a, n: nbytes(a[1]) * (n - 1))
    wrap("all_reduce", lambda a, n: int(nbytes(a[0]) * 2 * (n - 1) / n))
    wrap("all_to_all", lambda a, n: sum(nbytes(t) for t in a[1]) * (n - 1) // n)
    return sent, originals


def _step_worker(rank, world, mixer, seq_local, steps):
    from pretrain.config import load_config
    from pretrain.model import LanguageModel
    from pretrain.parallelize import apply_sequence_parallel, sequence_slice
    from parallel.topology import ParallelDims

    sp = world
    T = seq_local * sp
    cfg = load_config(None, [f"model.mixers=[{mixer}]", "model.n_layers=1", f"model.d_model={D_MODEL}",
                             "model.vocab_size=512", "model.deltaproduct.head_dim=32", f"data.seq_len={T}"])
    dims = ParallelDims(1, sp, 1, world).build_groups()
    torch.manual_seed(0)
    model = LanguageModel(cfg.model)
    apply_sequence_parallel(model, dims)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (BATCH, T + 1), generator=g)
    batch = sequence_slice({"input_ids": ids[:, :-1], "labels": ids[:, 1:],
                            "doc_start": torch.zeros(BATCH, T, dtype=torch.bool)}, dims)

    def step():
        model.zero_grad(set_to_none=True)
        model(batch["input_ids"], labels=batch["labels"], doc_start=batch["doc_start"]).backward()

    step()  # warm-up
    sent, _ = _count_bytes()
    step()
    bytes_per_step = sent["bytes"]
    if world > 1:
        dist.barrier()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "tokens": BATCH * seq_local, "bytes": bytes_per_step,
            "activation_bytes": BATCH * seq_local * D_MODEL * 4}


def run(seq: int, steps: int) -> list[dict]:
    rows = []
    for mixer in MIXERS:
        one = run_gloo(_step_worker, 1, mixer, seq, steps, timeout_s=600)[0]
        two = run_gloo(_step_worker, 2, mixer, seq, steps, timeout_s=600)
        slowest = max(r["seconds"] for r in two)
        rows.append({"mixer": mixer,
                     "sp1_us_per_token": one["seconds"] / one["tokens"] * 1e6,
                     "sp2_us_per_token": slowest / two[0]["tokens"] * 1e6,
                     "bytes_sent": max(r["bytes"] for r in two), "activation_bytes": two[0]["activation_bytes"]})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sequence_parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512, help="tokens per rank (sp=1 runs T, sp=2 runs 2T)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="bench/results/sequence_parallel.md")
    args = parser.parse_args(argv)
    rows = run(args.seq, args.steps)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    lines = [
        "# Sequence parallelism: weak scaling on CPU",
        "",
        f"- command: `python -m bench.sequence_parallel --seq {args.seq} --steps {args.steps}`",
        f"- machine: {cpu}, {torch.get_num_threads()} torch thread(s) per process, gloo; "
        f"torch {torch.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end of the run",
        f"- one layer of each mixer (d_model {D_MODEL}) + SwiGLU + head, batch {BATCH}; sp=1 at T={args.seq} vs "
        f"sp=2 at T={2 * args.seq} (each rank {args.seq} tokens); forward + backward, best of {args.steps}",
        "- bytes: what one rank sends per step for that layer (and the loss's token count), from wrapped "
        "collectives; activation: the layer input on one rank (B x T/sp x d_model x 4 bytes)",
        "",
        "| mixer | sp=1 µs/token | sp=2 µs/token | ratio | bytes sent / rank / step | activation bytes | sent / activation |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mixer']} | {r['sp1_us_per_token']:.1f} | {r['sp2_us_per_token']:.1f} | "
                     f"{r['sp2_us_per_token'] / r['sp1_us_per_token']:.2f} | {r['bytes_sent']:,} | "
                     f"{r['activation_bytes']:,} | {r['bytes_sent'] / r['activation_bytes']:.3f} |")
    lines += ["", "Ratio 1.0 is perfect weak scaling. The two sp=2 processes share this machine's 2 cores with "
              "each other (and whatever else runs), so the CPU ratio is an upper bound on the overhead; the "
              "bytes column is exact and device-independent."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
