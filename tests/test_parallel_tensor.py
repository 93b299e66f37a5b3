"""parallel/tensor_parallel.py: each tp layer against the unsharded module it was built from.

One spawn of 2 gloo processes (tp=2). Each rank builds the full module from a seed, computes the
single-process forward and gradients, builds its tp shard with from_linear/from_embedding, and
reports max |difference| of outputs, input gradients and (its shard of) weight gradients. fp64;
tolerance 1e-12. The last check runs DeepSpeed's own clip_grad_norm_ with our mpu: the global
norm over sharded + replicated parameters equals the single-process norm (fp32 inside DeepSpeed:
relative 1e-6), and differs without the tensor_model_parallel marks.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.mappings import group_rank, group_size
from parallel.spawn import run_gloo
from parallel.tensor_parallel import (ColumnParallelLinear, HeadParallelHeadwiseLinear, RowParallelLinear,
                                      VocabParallelEmbedding, vocab_parallel_cross_entropy)
from parallel.topology import ParallelDims

TOL = 1e-12


def err(a, b):
    return (a.detach() - b.detach()).abs().max().item()


def rnd(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def check_column(group, out):
    n, r = group_size(group), group_rank(group)
    torch.manual_seed(0)
    lin = nn.Linear(6, 8, bias=True).double()
    x, w = rnd(2, 5, 6), rnd(2, 5, 8)
    xr = x.clone().requires_grad_(True)
    y = lin(xr)
    (y * w).sum().backward()
    for gather in (False, True):
        col = ColumnParallelLinear.from_linear(lin, group, gather_output=gather)
        xs = x.clone().requires_grad_(True)
        ys = col(xs)
        # gathered: every rank holds the whole output, the loss counted once (every rank's
        # backward then brings only its slice home); sharded: each rank its slice's term.
        ((ys * w).sum() if gather else (ys * w.chunk(n, -1)[r]).sum()).backward()
        key = f"column/{'gather' if gather else 'sharded'}"
        out[key + "/y"] = err(ys, y if gather else y.chunk(n, -1)[r])
        out[key + "/grad_x"] = err(xs.grad, xr.grad)
        out[key + "/grad_w"] = err(col.weight.grad, lin.weight.grad.chunk(n, 0)[r])
        out[key + "/grad_b"] = err(col.bias.grad, lin.bias.grad.chunk(n, 0)[r])
        out[key + "/marked"] = 0.0 if getattr(col.weight, "tensor_model_parallel", False) else 1.0
    # Strided sharding: output features as (3, H, hd) = (q, k, v) x heads x head_dim, heads sharded.
    lin3 = nn.Linear(6, 3 * 4 * 2, bias=False).double()
    col = ColumnParallelLinear.from_linear(lin3, group, shape=(3, 4, 2), axis=1)
    want = lin3(x).unflatten(-1, (3, 4, 2)).chunk(n, -2)[r].flatten(-3)
    out["column/strided_heads/y"] = err(col(x), want)


def check_row(group, out):
    n, r = group_size(group), group_rank(group)
    torch.manual_seed(1)
    lin = nn.Linear(8, 6, bias=True).double()
    x, w = rnd(2, 5, 8), rnd(2, 5, 6)
    xr = x.clone().requires_grad_(True)
    y = lin(xr)
    (y * w).sum().backward()
    for parallel_in in (True, False):
        row = RowParallelLinear.from_linear(lin, group, input_is_parallel=parallel_in)
        xs = (x.chunk(n, -1)[r] if parallel_in else x).clone().requires_grad_(True)
        ys = row(xs)
        (ys * w).sum().backward()  # the output is replicated: one loss, counted once
        key = f"row/{'parallel_input' if parallel_in else 'full_input'}"
        out[key + "/y"] = err(ys, y)
        out[key + "/grad_x"] = err(xs.grad, xr.grad.chunk(n, -1)[r] if parallel_in else xr.grad)
        out[key + "/grad_w"] = err(row.weight.grad, lin.weight.grad.chunk(n, 1)[r])
        out[key + "/grad_b"] = err(row.bias.grad, lin.bias.grad)  # replicated, identical on all ranks
        out[key + "/marked"] = 0.0 if (row.weight.tensor_model_parallel
                                       and not hasattr(row.bias, "tensor_model_parallel")) else 1.0


def check_mlp(group, out):
    from pretrain.model import SwiGLU

    n, r = group_size(group), group_rank(group)
    torch.manual_seed(2)
    mlp = SwiGLU(6, 8).double()
    x, w = rnd(2, 5, 6), rnd(2, 5, 6)
    xr = x.clone().requires_grad_(True)
    (mlp(xr) * w).sum().backward()
    gate = ColumnParallelLinear.from_linear(mlp.w_gate, group)
    up = ColumnParallelLinear.from_linear(mlp.w_up, group)
    down = RowParallelLinear.from_linear(mlp.w_down, group)
    xs = x.clone().requires_grad_(True)
    ys = down(F.silu(gate(xs)) * up(xs))
    (ys * w).sum().backward()
    out["mlp/y"] = err(ys, mlp(x))
    out["mlp/grad_x"] = err(xs.grad, xr.grad)
    out["mlp/grad_w"] = max(err(gate.weight.grad, mlp.w_gate.weight.grad.chunk(n, 0)[r]),
                            err(up.weight.grad, mlp.w_up.weight.grad.chunk(n, 0)[r]),
                            err(down.weight.grad, mlp.w_down.weight.grad.chunk(n, 1)[r]))


def check_headwise(group, out):
    from pretrain.mixers import HeadwiseLinear

    n, r = group_size(group), group_rank(group)
    torch.manual_seed(3)
    hw = HeadwiseLinear(8, 12, num_heads=4, num_gates=3).double()
    nn.init.normal_(hw.bias)
    x, w = rnd(2, 5, 8), rnd(2, 5, 3, 12)
    xr = x.clone().requires_grad_(True)
    u = hw(xr)
    (u * w).sum().backward()
    par = HeadParallelHeadwiseLinear.from_headwise(hw.weight, hw.bias, group)
    xs = x.clone().requires_grad_(True)
    us = par(xs)
    (us * w.chunk(n, -1)[r]).sum().backward()
    out["headwise/u"] = err(us, u.chunk(n, -1)[r])
    out["headwise/grad_x"] = err(xs.grad, xr.grad)
    out["headwise/grad_w"] = err(par.weight.grad, hw.weight.grad.chunk(n, 0)[r])
    out["headwise/grad_b"] = err(par.bias.grad, hw.bias.grad.chunk(n, -1)[r])


def check_embedding_and_loss(group, out):
    n, r = group_size(group), group_rank(group)
    torch.manual_seed(4)
    V, d = 10, 4
    emb = nn.Embedding(V, d).double()
    head = nn.Linear(d, V, bias=False).double()
    ids = torch.randint(0, V, (3, 7))
    target = torch.randint(0, V, (3, 7))
    target[0, :3] = -100  # ignored positions
    # Single process: embed -> head -> mean cross-entropy over the counted tokens.
    h = emb(ids)
    loss = F.cross_entropy(head(h).flatten(0, 1), target.flatten(), ignore_index=-100)
    loss.backward()
    per_token = F.cross_entropy(head(h).flatten(0, 1), target.flatten(), ignore_index=-100,
                                reduction="none").view(3, 7)
    # Tensor parallel: vocab-sharded embedding, column-parallel head, vocab-parallel loss.
    pemb = VocabParallelEmbedding.from_embedding(emb, group)
    phead = ColumnParallelLinear.from_linear(head, group)
    hs = pemb(ids)
    logits = phead(hs)  # [3, 7, V/tp]: the full logits never exist on one rank
    tok = vocab_parallel_cross_entropy(logits, target, group)
    ls = tok.sum() / (target != -100).sum()
    ls.backward()
    out["embedding/y"] = err(hs, h)
    out["embedding/grad_w"] = err(pemb.weight.grad, emb.weight.grad.chunk(n, 0)[r])
    out["cross_entropy/per_token"] = err(tok, per_token)
    out["cross_entropy/loss"] = abs(ls.item() - loss.item())
    out["cross_entropy/grad_head"] = err(phead.weight.grad, head.weight.grad.chunk(n, 0)[r])
    out["cross_entropy/logits_local"] = 0.0 if logits.shape[-1] == V // n else 1.0
    # Gradient w.r.t. logits, directly: softmax - onehot on the local shard, 0 where ignored.
    z = torch.randn(3, 7, V, dtype=torch.float64)
    zr = z.clone().requires_grad_(True)
    F.cross_entropy(zr.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum").backward()
    zs = z.chunk(n, -1)[r].clone().requires_grad_(True)
    vocab_parallel_cross_entropy(zs, target, group).sum().backward()
    out["cross_entropy/grad_logits"] = err(zs.grad, zr.grad.chunk(n, -1)[r])


def check_deepspeed_grad_norm(dims, out):
    """DeepSpeed's clip_grad_norm_(mpu=...) counts sharded params on every tp rank and
    replicated ones on tp rank 0: the global norm equals the single-process norm."""
    import deepspeed
    from deepspeed.runtime.utils import clip_grad_norm_

    from pretrain.train import skip_cpu_shm_build

    skip_cpu_shm_build()  # no JIT build of DeepSpeed's CPU shm op (as the trainer)
    deepspeed.init_distributed(dist_backend="gloo")
    group = dims.tp_group
    torch.manual_seed(5)
    mlp_in = nn.Linear(6, 8, bias=False).double()
    mlp_out = nn.Linear(8, 6, bias=True).double()
    scale = nn.Parameter(torch.rand(6, dtype=torch.float64) + 0.5)  # a replicated norm weight
    x, w = rnd(2, 5, 6), rnd(2, 5, 6)
    (mlp_out(torch.tanh(mlp_in(x * scale))) * w).sum().backward()
    params = [mlp_in.weight, mlp_out.weight, mlp_out.bias, scale]
    want = torch.sqrt(sum(p.grad.pow(2).sum() for p in params)).item()
    col = ColumnParallelLinear.from_linear(mlp_in, group)
    row = RowParallelLinear.from_linear(mlp_out, group)
    scale_s = nn.Parameter(scale.detach().clone())
    (row(torch.tanh(col(x * scale_s))) * w).sum().backward()
    sharded = [col.weight, row.weight, row.bias, scale_s]
    got = float(clip_grad_norm_(sharded, max_norm=1e9, mpu=dims.mpu()))
    # DeepSpeed takes norms in fp32: relative tolerance 1e-6 for this one number.
    out["deepspeed/global_grad_norm"] = abs(got - want) / want * (TOL / 1e-6)
    # Control: without the marks DeepSpeed counts the shards on tp rank 0 only -- a wrong norm.
    for p in (col.weight, row.weight):
        del p.tensor_model_parallel
    unmarked = float(clip_grad_norm_(sharded, max_norm=1e9, mpu=dims.mpu()))
    out["deepspeed/unmarked_norm_is_wrong"] = 0.0 if abs(unmarked - want) / want > 1e-3 else 1.0


def run_checks(rank, world_size):
    torch.set_default_dtype(torch.float64)
    dims = ParallelDims(dp=1, sp=1, tp=2, world_size=world_size).build_groups()
    out = {}
    for check in (check_column, check_row, check_mlp, check_headwise, check_embedding_and_loss):
        check(dims.tp_group, out)
    check_deepspeed_grad_norm(dims, out)
    return out


@pytest.fixture(scope="module")
def results():
    return run_gloo(run_checks, 2)


@pytest.mark.parametrize("kind", ["column", "row", "mlp", "headwise", "embedding", "cross_entropy", "deepspeed"])
def test_tensor_parallel_equals_single_process(results, kind):
    errors = {f"rank{rk}:{name}": e for rk, o in enumerate(results) for name, e in o.items()
              if name.startswith(kind + "/")}
    assert errors, f"no checks ran for {kind}"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst}: max |tp - single| = {errors[worst]:.3e} > {TOL}"
