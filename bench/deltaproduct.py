"""Tokens/s of the gated DeltaProduct recurrence, forward and forward+backward.

    python -m bench.deltaproduct            # CUDA: the 1B layer shape at T in {2048, 8192, 32768}
                                            # CPU: a reduced setting (see --quick), torch only
    python -m bench.deltaproduct --quick    # the reduced setting on any device

Layer shape of the 1B config: d_model 2048 = 16 heads x head_dim 128, n_h = 2 Householder
factors per token, forget gate on, β ∈ [0, 2]. Inputs are made as the layer makes them (unit
q/k, β = 2σ(·), g ≤ 0); the batch is chosen so that every row of the table processes the same
number of tokens. Backends: `triton` (kernels/deltaproduct_triton.py, CUDA only), `torch`
(deltaproduct_chunkwise), and on CUDA `fla` (flash-linear-attention's chunk_gated_delta_product,
bf16 only) when the package imports. Results go to bench/results/deltaproduct.md.
"""

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.deltaproduct import deltaproduct

RESULTS = Path(__file__).parent / "results" / "deltaproduct.md"


def make_inputs(B, T, H, dk, dv, n_h, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    q = F.normalize(randn(B, T, H, dk), dim=-1).to(dtype)
    k = F.normalize(randn(B, T, n_h, H, dk), dim=-1).to(dtype)
    v = randn(B, T, n_h, H, dv).to(dtype)
    beta = 2 * torch.sigmoid(randn(B, T, n_h, H))  # fp32, as the layer passes it
    g = -F.softplus(randn(B, T, H) - 2.0)  # fp32
    return [q, k, v, beta, g]


def fla_fn():
    """fla's chunk_gated_delta_product adapted to our shapes, or None when fla does not import."""
    try:
        from fla.ops.gated_delta_product import chunk_gated_delta_product
    except Exception:
        return None

    def run(q, k, v, beta, g):
        B, T, n_h, H, dk = k.shape
        # fla takes the interleaved sub-steps: k [B, T·n_h, H, dk], β [B, T·n_h, H].
        return chunk_gated_delta_product(
            q=q, k=k.reshape(B, T * n_h, H, dk), v=v.reshape(B, T * n_h, H, -1), g=g,
            beta=beta.reshape(B, T * n_h, H).to(q.dtype), num_householder=n_h,
            output_final_state=True)

    return run


def backend_fn(name):
    if name == "fla":
        return fla_fn()
    return lambda q, k, v, beta, g: deltaproduct(q, k, v, beta, g, backend=name)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, repeats):
    fn()  # warm-up (Triton compiles here)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_one(name, B, T, args, device, dtype):
    fn = backend_fn(name)
    if fn is None:
        return None
    inputs = make_inputs(B, T, args.heads, args.head_dim, args.head_dim, args.n_h, dtype, device)
    leaves = [x.requires_grad_(True) for x in inputs]
    do = torch.randn(B, T, args.heads, args.head_dim, device=device, dtype=dtype)

    def fwd():
        return fn(*leaves)[0]

    def fwd_bwd():
        o = fn(*leaves)[0]
        torch.autograd.grad(o, leaves, do)

    t_f = time_call(fwd, device, args.repeats)
    t_fb = time_call(fwd_bwd, device, args.repeats)
    return B * T / t_f, B * T / t_fb


def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        desc = f"{torch.cuda.get_device_name(device)}; host {desc}"
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "not installed"
    return f"{desc}; torch {torch.__version__}, triton {tv}, python {platform.python_version()}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="reduced setting (the default on CPU): T in {256, 1024}, 2048 tokens per call")
    p.add_argument("--seq-lens", type=int, nargs="+", help="override the T values")
    p.add_argument("--tokens", type=int, help="tokens per call (batch = tokens / T)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--n-h", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", nargs="+", help="subset of triton torch fla")
    p.add_argument("--no-write", action="store_true", help="print only, leave results/ alone")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    seq_lens = args.seq_lens or ([256, 1024] if quick else [2048, 8192, 32768])
    tokens = args.tokens or (2048 if quick else 32768)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = args.backends or (["triton", "torch", "fla"] if device.type == "cuda" else ["torch"])

    header = ("| backend | T | batch | dtype | fwd tok/s | fwd+bwd tok/s |\n"
              "|---|---|---|---|---|---|")
    rows = []
    print(header)
    for T in seq_lens:
        B = max(1, tokens // T)
        for name in backends:
            res = bench_one(name, B, T, args, device, dtype)
            if res is None:
                row = f"| {name} | {T} | {B} | {str(dtype)[6:]} | n/a (not installed) | n/a |"
            else:
                row = f"| {name} | {T} | {B} | {str(dtype)[6:]} | {res[0]:,.0f} | {res[1]:,.0f} |"
            rows.append(row)
            print(row, flush=True)

    if args.no_write:
        return
    cmd = "python -m bench.deltaproduct " + " ".join(sys.argv[1:] if argv is None else argv)
    setting = (f"H={args.heads}, head_dim={args.head_dim} (dk = dv), n_h={args.n_h}, gate on, "
               f"β ∈ [0, 2], chunk 64 sub-steps, {tokens} tokens per call, best of "
               f"{args.repeats} after one warm-up" + (" — reduced (quick) setting" if quick else ""))
    section = (f"## {device.type.upper()}: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
               f"- command: `{cmd.strip()}`\n- machine: {machine(device)}\n- setting: {setting}\n\n"
               f"{header}\n" + "\n".join(rows) + "\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = RESULTS.read_text() if RESULTS.exists() else ""
    title = "# Gated DeltaProduct recurrence: tokens/s\n\n"
    body = old[len(title):] if old.startswith(title) else old
    # Keep the latest section per device kind: a CPU run does not erase the GPU table.
    kept = [s for s in body.split("\n## ") if s.strip()
            and not s.lstrip("# ").startswith(device.type.upper() + ":")]
    kept = [("## " + s.lstrip("# ")).rstrip() + "\n" for s in kept]
    RESULTS.write_text(title + section + ("\n" + "\n".join(kept) if kept else ""))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
