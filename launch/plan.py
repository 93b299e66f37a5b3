"""python -m launch.plan --config X --nodes N --gpus-per-node G [--gpu-mem-gb 80] [section.key=value ...]

Before submitting: the parameter count, per-rank memory (weights, gradients, optimizer state by
ZeRO stage, activations with and without activation checkpointing, the kernels' workspace),
whether it fits the GPU, and if not, tp / sp / micro-batch / checkpointing settings that do.
The estimates are pretrain/memory.py's (bf16 mixed precision, the Triton kernels' activations).
"""
from __future__ import annotations

import argparse
import itertools
import sys

from launch.errors import run_cli
from pretrain.config import Config, ConfigError, load_config
from pretrain.memory import GiB, activation_bytes, model_state_bytes, parameter_counts

HEADROOM = 0.90  # of GPU memory usable by the estimate: CUDA context, NCCL and allocator slack


def check_degrees(cfg: Config, world: int, gpus_per_node: int) -> None:
    """One-line ConfigErrors for degrees that cannot run on this world."""
    from parallel.topology import ParallelDims
    from pretrain.parallelize import validate_parallel

    tp, sp = cfg.parallel.tp, cfg.parallel.sp
    if world % (tp * sp):
        raise ConfigError(f"world {world} GPUs is not divisible by parallel.tp={tp} x parallel.sp={sp} = {tp * sp}; "
                          f"choose degrees whose product divides the GPU count")
    if gpus_per_node % tp:
        raise ConfigError(f"parallel.tp={tp} must divide --gpus-per-node {gpus_per_node} (tensor parallelism stays "
                          f"inside a node)")
    if cfg.parallel.zero_stage == 3 and tp > 1:
        raise ConfigError("parallel.zero_stage=3 needs parallel.tp=1; use zero_stage 1 or 2 with tensor parallelism")
    validate_parallel(cfg, ParallelDims.from_world(sp=sp, tp=tp, world_size=world))


def estimate(cfg: Config, world: int, counts: tuple[int, int]) -> dict:
    """Per-rank bytes of one configuration (cfg's degrees, micro-batch, checkpointing)."""
    p, t = cfg.parallel, cfg.train
    dp_sp = world // p.tp
    states = model_state_bytes(*counts, tp=p.tp, dp_sp=dp_sp, zero_stage=p.zero_stage)
    acts = {ckpt: activation_bytes(cfg.model, t.micro_batch_size, cfg.data.seq_len, tp=p.tp, sp=p.sp,
                                   checkpointing=ckpt)
            for ckpt in (False, True)}
    chosen = acts[t.activation_checkpointing]
    return {"states": states, "acts": acts, "total": states.total + chosen.total}


def _candidates(cfg: Config, world: int, gpus_per_node: int):
    """Settings to try, the least model parallelism and largest micro-batch first."""
    mbs = sorted({cfg.train.micro_batch_size, *[m for m in (8, 4, 2, 1) if m < cfg.train.micro_batch_size]},
                 reverse=True)
    degrees = [1, 2, 4, 8, 16, 32]
    options = []
    for tp, sp, mb, ckpt, zero in itertools.product(degrees, degrees, mbs, (False, True), (cfg.parallel.zero_stage, 2, 3)):
        if tp > gpus_per_node or world % (tp * sp) or (zero == 3 and tp > 1) or zero < cfg.parallel.zero_stage:
            continue
        options.append((ckpt, tp * sp, zero, -mb, tp, sp, mb))  # no recompute, least model parallelism
    for ckpt, _, zero, _, tp, sp, mb in sorted(set(options)):
        c = load_config_copy(cfg)
        c.parallel.tp, c.parallel.sp, c.parallel.zero_stage = tp, sp, zero
        c.train.micro_batch_size, c.train.activation_checkpointing = mb, ckpt
        try:
            check_degrees(c, world, gpus_per_node)
        except ConfigError:
            continue
        yield c


def load_config_copy(cfg: Config) -> Config:
    import copy

    return copy.deepcopy(cfg)


def _describe(cfg: Config) -> str:
    p, t = cfg.parallel, cfg.train
    return (f"parallel.tp={p.tp} parallel.sp={p.sp} parallel.zero_stage={p.zero_stage} "
            f"train.micro_batch_size={t.micro_batch_size} train.activation_checkpointing={str(t.activation_checkpointing).lower()}")


def plan(cfg: Config, nodes: int, gpus_per_node: int, gpu_mem_gb: float) -> dict:
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be positive; got {nodes} and {gpus_per_node}")
    if gpu_mem_gb <= 0:
        raise ConfigError(f"--gpu-mem-gb must be positive; got {gpu_mem_gb}")
    world = nodes * gpus_per_node
    check_degrees(cfg, world, gpus_per_node)
    counts = parameter_counts(cfg.model)
    est = estimate(cfg, world, counts)
    budget = HEADROOM * gpu_mem_gb * 1e9
    result = {"params": counts[0], "world": world, "estimate": est, "budget": budget,
              "fits": est["total"] <= budget, "suggestions": []}
    if not result["fits"]:
        for c in _candidates(cfg, world, gpus_per_node):
            if estimate(c, world, counts)["total"] <= budget:
                result["suggestions"].append((_describe(c), estimate(c, world, counts)["total"]))
                if len(result["suggestions"]) == 3:
                    break
    return result


def report(cfg: Config, r: dict, nodes: int, gpus_per_node: int, gpu_mem_gb: float) -> str:
    p, t = cfg.parallel, cfg.train
    est, st = r["estimate"], r["estimate"]["states"]
    dp = r["world"] // (p.tp * p.sp)
    tokens = t.micro_batch_size * cfg.data.seq_len // p.sp
    gb = lambda x: f"{x / GiB:7.2f} GiB"  # noqa: E731
    lines = [
        f"parameters: {r['params'] / 1e9:.3f}B ({r['params']:,})",
        f"world: {nodes} nodes x {gpus_per_node} GPUs = {r['world']} = dp {dp} x sp {p.sp} x tp {p.tp}; "
        f"ZeRO-{p.zero_stage}; micro-batch {t.micro_batch_size} x {cfg.data.seq_len // p.sp} tokens = {tokens} per rank",
        "per-rank memory (bf16 weights and grads, fp32 AdamW master + moments):",
        f"  weights           {gb(st.weights)}",
        f"  gradients         {gb(st.gradients)}",
        f"  optimizer state   {gb(st.optimizer)}",
    ]
    for ckpt in (False, True):
        a = est["acts"][ckpt]
        mark = "  <- this config" if ckpt == t.activation_checkpointing else ""
        lines.append(f"  activations, checkpointing {'on ' if ckpt else 'off'}: {gb(a.saved)} saved + "
                     f"{gb(a.transient)} workspace{mark}")
    kinds = est["acts"][False].per_kind
    lines.append("  saved per block: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in kinds.items()))
    lines.append(f"  total             {gb(est['total'])} of {gpu_mem_gb:g} GB ({HEADROOM:.0%} usable = "
                 f"{r['budget'] / GiB:.1f} GiB)")
    if r["fits"]:
        lines.append("fits: yes")
    else:
        lines.append("fits: NO")
        if r["suggestions"]:
            lines += ["settings that fit:"] + [f"  {s}   ({tot / GiB:.1f} GiB)" for s, tot in r["suggestions"]]
        else:
            lines.append("no tp/sp/micro-batch/checkpointing setting fits; use more nodes or larger GPUs")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0)
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.tp=2")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    r = plan(cfg, args.nodes, args.gpus_per_node, args.gpu_mem_gb)
    print(report(cfg, r, args.nodes, args.gpus_per_node, args.gpu_mem_gb), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "plan"))
