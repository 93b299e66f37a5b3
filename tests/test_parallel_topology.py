"""parallel/topology.py: validation, rank layout, process groups, and the DeepSpeed mpu.

Validation and rank arithmetic need no processes. One spawn of 4 gloo processes builds the
groups of three layouts and checks every group's members against the rank arithmetic, then runs
one DeepSpeed ZeRO-1 and one ZeRO-2 SGD step (gradient clipping active) with tp=2 x sp=2 through our mpu and
compares the parameters with the single-process step (fp32 inside DeepSpeed: tolerance 1e-6).
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from parallel.spawn import run_gloo
from parallel.topology import ParallelDims


def test_product_must_equal_world_size():
    with pytest.raises(ValueError, match=r"dp=1 x sp=2 x tp=3 = 6 must equal the world size 8"):
        ParallelDims(dp=1, sp=2, tp=3, world_size=8)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_degrees_must_be_positive_ints(bad):
    with pytest.raises(ValueError, match=r"parallel\.tp must be a positive int"):
        ParallelDims(dp=1, sp=1, tp=bad, world_size=1)


def test_from_world_infers_dp_and_rejects_indivisible():
    assert (ParallelDims.from_world(sp=2, tp=2, world_size=8).dp) == 2
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by parallel.sp=2 x parallel.tp=2"):
        ParallelDims.from_world(sp=2, tp=2, world_size=6)


def test_divisibility_errors_name_the_config_key():
    dims = ParallelDims(dp=1, sp=2, tp=3, world_size=6)
    dims.check_tp_divisible(12, "model.attention.num_heads")
    with pytest.raises(ValueError, match=r"^model\.deltaproduct\.num_heads=8 is not divisible by parallel\.tp=3$"):
        dims.check_tp_divisible(8, "model.deltaproduct.num_heads")
    with pytest.raises(ValueError, match=r"^data\.seq_len=15 is not divisible by parallel\.sp=2$"):
        dims.check_sp_divisible(15, "data.seq_len")


def test_rank_layout_tp_innermost_then_sp_then_dp():
    dims = ParallelDims(dp=2, sp=2, tp=2, world_size=8)
    assert [dims.coords(r) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert all(dims.rank_of(*dims.coords(r)) == r for r in range(8))
    assert dims.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.group_ranks("sp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.group_ranks("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.group_ranks("dp_sp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(ValueError, match="unknown group kind 'pp'"):
        dims.group_ranks("pp")


def test_world_of_one_needs_no_distributed():
    # In a fresh interpreter: other tests in this process may have initialised torch.distributed.
    code = """
import pytest, torch.distributed as dist
from parallel.topology import ParallelDims
assert not dist.is_initialized()
dims = ParallelDims(dp=1, sp=1, tp=1, world_size=1).build_groups()
assert (dims.tp_rank, dims.sp_rank, dims.dp_rank) == (0, 0, 0)
assert dims.tp_group is None and dims.dp_sp_group is None
with pytest.raises(RuntimeError, match="call build_groups"):
    ParallelDims(dp=1, sp=1, tp=1, world_size=1).tp_group
print("ok")
"""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Multi-process: the groups, and DeepSpeed through the mpu.


def check_groups(dims, out, tag):
    rank = dist.get_rank()
    dp, sp, tp = dims.coords(rank)
    ok = (dims.dp_rank, dims.sp_rank, dims.tp_rank) == (dp, sp, tp)
    for kind in ("tp", "sp", "dp", "dp_sp"):
        group = getattr(dims, f"{kind}_group")
        members = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
        dist.all_gather(members, torch.tensor([rank]), group=group)
        ok &= [int(m) for m in members] == dims.ranks_in(kind)
        ok &= dims.ranks_in(kind) in dims.group_ranks(kind)
    mpu = dims.mpu()
    ok &= mpu.get_model_parallel_rank() == dist.get_rank(mpu.get_model_parallel_group()) == tp
    ok &= mpu.get_model_parallel_world_size() == dims.tp
    ok &= mpu.get_data_parallel_rank() == dist.get_rank(mpu.get_data_parallel_group()) == dp
    ok &= mpu.get_sequence_parallel_rank() == dist.get_rank(mpu.get_sequence_parallel_group()) == sp
    ok &= mpu.get_sequence_data_parallel_rank() == dist.get_rank(mpu.get_sequence_data_parallel_group())
    ok &= mpu.get_sequence_data_parallel_world_size() == dims.dp * dims.sp
    out[f"groups/{tag}"] = bool(ok)


class TinyMLP(nn.Module):
    """A replicated norm-like scale, then a tp MLP: per-token, so sp pieces are independent tokens."""

    def __init__(self, d=4, hidden=8):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.w_in = nn.Linear(d, hidden, bias=False)
        self.w_out = nn.Linear(hidden, d, bias=True)

    def forward(self, x):
        return self.w_out(torch.tanh(self.w_in(x * self.scale)))


def check_deepspeed_step(out, stage):
    """One ZeRO-`stage` SGD step, tp=2 x sp=2, equals the single-process step on the whole batch.

    With clipping at 1.0 (the norm here is ~2.3), so the global grad norm must be right too."""
    import deepspeed

    from parallel.sequence_parallel import sequence_piece, sp_token_count
    from parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from pretrain.train import skip_cpu_shm_build

    skip_cpu_shm_build()  # no JIT build of DeepSpeed's CPU shm op (as the trainer)
    deepspeed.init_distributed(dist_backend="gloo")
    dims = ParallelDims(dp=1, sp=2, tp=2, world_size=4).build_groups()
    torch.manual_seed(0)
    full = TinyMLP()
    x = torch.randn(2, 8, 4)
    target = torch.randn(2, 8, 4)
    lr = 0.1

    # Single process: mean squared error over all tokens, one SGD step.
    ref = TinyMLP()
    ref.load_state_dict(full.state_dict())
    ((ref(x) - target) ** 2).sum(-1).mean().backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=1.0)  # DeepSpeed clips too
    with torch.no_grad():
        for p in ref.parameters():
            p -= lr * p.grad

    # tp=2 x sp=2 through DeepSpeed: each sp rank its piece of the tokens, loss normalised by the
    # token count over the sp group (DeepSpeed sums gradients over sp, averages over dp).
    model = TinyMLP()
    model.load_state_dict(full.state_dict())
    model.w_in = ColumnParallelLinear.from_linear(full.w_in, dims.tp_group)
    model.w_out = RowParallelLinear.from_linear(full.w_out, dims.tp_group)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0,
              "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                                      config=config, mpu=dims.mpu())
    xs, ts = sequence_piece(x, dims.sp_group), sequence_piece(target, dims.sp_group)
    n_tokens = sp_token_count(xs.shape[0] * xs.shape[1], dims.sp_group)
    loss = ((engine(xs) - ts) ** 2).sum() / n_tokens
    before = {k: p.detach().clone() for k, p in engine.module.named_parameters()}
    engine.backward(loss)
    engine.step()
    tp, r = dims.tp, dims.tp_rank
    want = {"scale": ref.scale, "w_in.weight": ref.w_in.weight.chunk(tp, 0)[r],
            "w_out.weight": ref.w_out.weight.chunk(tp, 1)[r], "w_out.bias": ref.w_out.bias}
    got = dict(engine.module.named_parameters())
    out[f"deepspeed{stage}/grad_norm_clipped"] = 1.0 if ref_norm > 1.5 else 0.0
    out[f"deepspeed{stage}/step"] = max((got[k].detach() - v.detach()).abs().max().item() for k, v in want.items())
    out[f"deepspeed{stage}/params_moved"] = min((got[k].detach() - before[k]).abs().max().item() for k in want)


def run_checks(rank, world_size):
    out = {}
    for tag, (dp, sp, tp) in {"dp2_sp2": (2, 2, 1), "sp2_tp2": (1, 2, 2), "dp2_tp2": (2, 1, 2)}.items():
        check_groups(ParallelDims(dp, sp, tp, world_size).build_groups(), out, tag)
    for stage in (1, 2):
        check_deepspeed_step(out, stage)
    return out


@pytest.fixture(scope="module")
def results():
    return run_gloo(run_checks, 4, timeout_s=180)


@pytest.mark.parametrize("tag", ["dp2_sp2", "sp2_tp2", "dp2_tp2"])
def test_groups_match_rank_layout(results, tag):
    assert all(out[f"groups/{tag}"] for out in results)


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_step_through_mpu_equals_single_process(results, stage):
    for rank, out in enumerate(results):
        assert out[f"deepspeed{stage}/params_moved"] > 1e-4, f"rank {rank}: the step changed nothing"
        assert out[f"deepspeed{stage}/grad_norm_clipped"], "the reference norm should exceed the clip threshold"
        assert out[f"deepspeed{stage}/step"] <= 1e-6, f"rank {rank}: |params - single| = {out[f'deepspeed{stage}/step']:.3e}"
