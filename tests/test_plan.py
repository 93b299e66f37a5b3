"""launch.plan and pretrain/memory.py: the CLI answers for every config, counts match the model,
model states scale with ZeRO stage and tp as stated, and the activation estimate is within 15% of
the bytes autograd saves for backward on CPU (torch references, fp32), measured with
saved_tensors_hooks (distinct storages, parameters excluded)."""
from pathlib import Path

import pytest
import torch

from launch.plan import main as plan_main
from pretrain.config import load_config, model_config_from_dict
from pretrain.memory import activation_bytes, model_state_bytes, parameter_counts
from pretrain.model import LanguageModel

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_plan_cli_answers_for_every_config(path, capsys):
    assert plan_main(["--config", str(path), "--nodes", "8", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out or ("fits: NO" in out and "settings that fit" in out)
    cfg = load_config(path)
    with torch.device("meta"):
        n = LanguageModel(cfg.model).num_params()
    assert f"({n:,})" in out


def test_parameter_count_equals_the_models():
    cfg = load_config(CONFIGS[0])
    with torch.device("meta"):
        model = LanguageModel(cfg.model)
    total, replicated = parameter_counts(cfg.model)
    assert total == model.num_params()
    assert replicated == sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight")
                             or n.endswith(("norm1.weight", "norm2.weight")))


def test_model_states_scale_with_zero_stage_and_tp():
    N, R, dp = 1_000_000, 1000, 8
    s0 = model_state_bytes(N, R, tp=1, dp_sp=dp, zero_stage=0)
    assert (s0.weights, s0.gradients, s0.optimizer) == (2 * N, 2 * N, 12 * N)
    s1 = model_state_bytes(N, R, tp=1, dp_sp=dp, zero_stage=1)
    assert (s1.weights, s1.gradients, s1.optimizer) == (2 * N, 2 * N, 12 * N / dp)
    s2 = model_state_bytes(N, R, tp=1, dp_sp=dp, zero_stage=2)
    assert (s2.weights, s2.gradients, s2.optimizer) == (2 * N, 2 * N / dp, 12 * N / dp)
    s3 = model_state_bytes(N, R, tp=1, dp_sp=dp, zero_stage=3)
    assert (s3.weights, s3.gradients, s3.optimizer) == (2 * N / dp, 2 * N / dp, 12 * N / dp)
    t4 = model_state_bytes(N, R, tp=4, dp_sp=dp, zero_stage=1)
    assert t4.weights == pytest.approx(2 * ((N - R) / 4 + R), rel=1e-12)  # norms replicated over tp


def measured_saved_bytes(cfg, B, T):
    torch.manual_seed(0)
    model = LanguageModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    doc_start = torch.zeros(B, T, dtype=torch.bool)
    doc_start[:, 0] = True
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids, doc_start=doc_start)
    return sum(seen.values())


@pytest.mark.parametrize("mixer", ["paragru", "paralstm", "deltaproduct", "attention"])
def test_activation_estimate_within_15_percent_of_saved_tensors(mixer):
    cfg = model_config_from_dict(dict(
        vocab_size=256, d_model=64, n_layers=2, mixers=[mixer], tie_embeddings=False,
        paragru=dict(expand=1.0, num_heads=4, tol=None), paralstm=dict(expand=1.5, num_heads=4, tol=None),
        deltaproduct=dict(num_heads=2, head_dim=32, chunk_size=16), attention=dict(num_heads=4)))
    B, T = 2, 64
    estimate = activation_bytes(cfg, B, T, act_bytes=4, backend="torch").saved
    assert estimate == pytest.approx(measured_saved_bytes(cfg, B, T), rel=0.15)


def test_checkpointing_keeps_block_inputs_and_one_block():
    cfg = load_config(CONFIGS[0]).model  # deltaproduct-1b: one mixer kind
    assert len(set(cfg.layer_mixers())) == 1
    off = activation_bytes(cfg, 1, 4096, checkpointing=False)
    on = activation_bytes(cfg, 1, 4096, checkpointing=True)
    block = off.per_kind[cfg.layer_mixers()[0]]
    head = off.saved - cfg.n_layers * block
    # bf16 block inputs (2 bytes x d_model per token) + one block recomputed + the head's
    assert on.saved == pytest.approx(cfg.n_layers * 2 * cfg.d_model * 4096 + block + head, rel=1e-9)
    assert on.saved < off.saved / 5


@pytest.mark.parametrize("args,needle", [
    (["--nodes", "1", "--gpus-per-node", "6", "parallel.tp=4"], "not divisible by parallel.tp=4"),
    (["--nodes", "2", "--gpus-per-node", "4", "parallel.tp=8"], "must divide --gpus-per-node 4"),
    (["--nodes", "1", "--gpus-per-node", "8", "parallel.tp=2", "parallel.zero_stage=3"], "zero_stage=3 needs"),
])
def test_invalid_degrees_are_one_line_errors(args, needle, capsys):
    from launch.errors import run_cli
    code = run_cli(lambda: plan_main(["--config", str(CONFIGS[0])] + args), "plan")
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_deltaproduct_triton_saved_bytes_equal_what_its_autograd_keeps(dtype):
    """The plan counts what kernels/deltaproduct_triton.py saves for backward beyond its inputs
    (blocked inverse, Wk, W, chunk states, gate cumsums, segment ids), exactly, per token."""
    pytest.importorskip("triton")
    from kernels.deltaproduct import deltaproduct
    from pretrain.memory import deltaproduct_triton_bytes

    B, T, nh, H, dk, dv, C = 1, 32, 2, 2, 32, 16, 16  # T * nh a multiple of C: no padding
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, dk, generator=g).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, nh, H, dk, generator=g), dim=-1).to(dtype)
    v = torch.randn(B, T, nh, H, dv, generator=g).to(dtype)
    beta = torch.rand(B, T, nh, H, generator=g)
    gate = -torch.rand(B, T, H, generator=g)
    for t in (q, k, v, beta, gate):
        t.requires_grad_(True)
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, beta, gate)}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        deltaproduct(q, k, v, beta, gate, chunk_size=C, backend="triton")
    a = 4 if dtype == torch.float32 else 2
    saved, _ = deltaproduct_triton_bytes(H, dk, dv, nh, C, a)
    assert sum(seen.values()) == pytest.approx(saved * B * T, rel=1e-9)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_scale_config_fits_80gb_gpus_as_written(path, capsys):
    """The 1B configs at 32 GPUs and the 7B configs at 64 (what their token comments assume) fit
    per launch.plan on 80 GB GPUs, with the activations the GPU kernels actually save."""
    if path.stem == "smoke":
        pytest.skip("smoke is the CPU config")
    nodes = 8 if path.stem.endswith("7b") else 4
    assert plan_main(["--config", str(path), "--nodes", str(nodes), "--gpus-per-node", "8"]) == 0
    assert "fits: yes" in capsys.readouterr().out
