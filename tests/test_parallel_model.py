"""The whole model under tp=2, sp=2, tp=2 x sp=2 and dp=2 equals the single-process model:
the loss and every parameter's gradient (each rank's shard of it), for each mixer and a hybrid,
with document starts inside pieces and on a piece boundary. fp64, gloo, spawned processes."""
import pytest
import torch

from parallel.spawn import run_gloo
from parallel.tensor_parallel import shard_tensor
from parallel.topology import ParallelDims
from pretrain.config import ConfigError, load_config
from pretrain.model import LanguageModel
from pretrain.parallelize import (apply_sequence_parallel, apply_tensor_parallel, sequence_slice,
                                  validate_parallel)

MIXERS = {"paragru": ["paragru"], "paralstm": ["paralstm"], "deltaproduct": ["deltaproduct"],
          "attention": ["attention"], "hybrid": ["paragru", "deltaproduct", "attention", "paralstm", "gated_deltanet"]}
B, T = 4, 16
TOL = 1e-9


def make_cfg(mixers, **extra):
    overrides = ["model.vocab_size=64", "model.d_model=32", f"model.n_layers={len(mixers)}",
                 "model.mixers=[" + ",".join(mixers) + "]", "model.paragru.num_heads=2",
                 "model.paralstm.num_heads=2", "model.deltaproduct.num_heads=2", "model.deltaproduct.head_dim=8",
                 "model.deltaproduct.chunk_size=8", "model.attention.num_heads=4",
                 "model.gated_deltanet.num_heads=2", "model.gated_deltanet.head_dim=8", "model.gated_deltanet.chunk_size=8", "model.paragru.tol=null",
                 "model.paralstm.tol=null", "model.paragru.num_iters=10", "model.paralstm.num_iters=10",
                 f"data.seq_len={T}"]
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


def make_batch(vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, T + 1), generator=g)
    doc_start = torch.zeros(B, T, dtype=torch.bool)
    doc_start[0, 5] = True      # inside the first piece
    doc_start[1, T // 2] = True  # exactly on the sp=2 boundary
    doc_start[2, T // 2 + 1] = True
    doc_start[3, T - 1] = True
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_start": doc_start}


def build(cfg):
    torch.manual_seed(0)
    return LanguageModel(cfg.model).double()


def reference(cfg, batch):
    model = build(cfg)
    loss = model(batch["input_ids"], labels=batch["labels"], doc_start=batch["doc_start"])
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def check_topology(rank, world, dp, sp, tp):
    import torch.distributed as dist

    dims = ParallelDims(dp, sp, tp, world).build_groups()
    report = {}
    for name, mixers in MIXERS.items():
        cfg = make_cfg(mixers)
        batch = make_batch(cfg.model.vocab_size)
        ref_loss, ref_grads = reference(cfg, batch)
        model = build(cfg)
        validate_parallel(cfg, dims)
        apply_tensor_parallel(model, dims)
        apply_sequence_parallel(model, dims)
        rows = B // dp
        local = {k: v[dims.dp_rank * rows:(dims.dp_rank + 1) * rows] for k, v in batch.items()}
        local = sequence_slice(local, dims)
        loss = model(local["input_ids"], labels=local["labels"], doc_start=local["doc_start"])
        loss.backward()
        # What DeepSpeed does with the mpu: sum over sp, average over dp.
        total = loss.detach().clone()
        if dims.sp > 1:
            dist.all_reduce(total, group=dims.sp_group)
        if dims.dp > 1:
            dist.all_reduce(total, group=dims.dp_group)
            total /= dims.dp
        errors = {"loss": abs(total - ref_loss).item()}
        for pname, p in model.named_parameters():
            grad = p.grad.detach().clone()
            for size, group in ((dims.sp, dims.sp_group), (dims.dp, dims.dp_group)):
                if size > 1:
                    dist.all_reduce(grad, group=group)
            grad /= dims.dp
            expected = ref_grads[pname]
            spec = getattr(p, "shard_spec", None)
            if spec is not None:
                expected = shard_tensor(expected, dims.tp_group, *spec)
            assert grad.shape == expected.shape, (name, pname, grad.shape, expected.shape)
            errors[pname] = ((grad - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
        report[name] = errors
    return report


@pytest.mark.parametrize("dp, sp, tp", [(1, 1, 2), (1, 2, 1), (1, 2, 2), (2, 1, 1)],
                         ids=["tp2", "sp2", "tp2xsp2", "dp2"])
def test_parallel_model_equals_single_process(dp, sp, tp):
    reports = run_gloo(check_topology, dp * sp * tp, dp, sp, tp, timeout_s=300)
    for rank, report in enumerate(reports):
        for mixer, errors in report.items():
            worst = max(errors, key=errors.get)
            assert errors[worst] < TOL, f"rank {rank} {mixer}: {worst} off by {errors[worst]:.2e} (relative)"
            assert len(errors) > 5  # the loss and the parameters were all compared


def test_bad_topology_is_one_clear_line():
    cfg = make_cfg(["deltaproduct"], **{"model.deltaproduct.num_heads": 8, "model.vocab_size": 66})
    with pytest.raises(ConfigError, match=r"model.deltaproduct.num_heads=8 is not divisible by parallel.tp=3"):
        validate_parallel(cfg, ParallelDims(1, 1, 3, 3))
    with pytest.raises(ConfigError, match=r"data.seq_len=16 is not divisible by parallel.sp=3"):
        validate_parallel(make_cfg(["paragru"]), ParallelDims(1, 3, 1, 3))
    with pytest.raises(ValueError, match="must equal the world size 8"):
        ParallelDims(1, 2, 3, 8)
