"""Each mixer and the whole model: shapes, causality, document resets, gradient flow."""
import pytest
import torch

from pretrain.config import load_config
from pretrain.mixers import ShortConv
from pretrain.model import LanguageModel
from pretrain.registry import build_mixer

MIXERS = ["paragru", "paralstm", "deltaproduct", "attention"]


def tiny_cfg(mixers, **extra):
    overrides = ["model.vocab_size=97", "model.d_model=32", f"model.n_layers={len(mixers)}",
                 "model.mixers=[" + ",".join(mixers) + "]", "model.paragru.num_heads=2",
                 "model.paralstm.num_heads=2", "model.deltaproduct.num_heads=2", "model.deltaproduct.head_dim=8",
                 "model.deltaproduct.chunk_size=8", "model.attention.num_heads=2",
                 "model.gated_deltanet.num_heads=2", "model.gated_deltanet.head_dim=8", "model.gated_deltanet.chunk_size=8",
                 "model.paragru.tol=null", "model.paralstm.tol=null",
                 "model.paragru.num_iters=8", "model.paralstm.num_iters=8"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides).model


def make_mixer(name, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_cfg([name])
    model = LanguageModel(cfg)  # the mixer with the model's initialisation
    return model.blocks[0].mixer.double(), cfg


@pytest.mark.parametrize("name", MIXERS)
def test_mixer_shape_and_causality(name):
    mixer, cfg = make_mixer(name)
    B, T = 2, 19  # T not a multiple of the DeltaProduct chunk (8 sub-steps here)
    x = torch.randn(B, T, cfg.d_model, dtype=torch.float64)
    y = mixer(x)
    assert y.shape == (B, T, cfg.d_model)
    assert torch.isfinite(y).all()
    for t in (0, 7, T - 2):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        y2 = mixer(x2)
        # Outputs up to t must not move when tokens after t change (Newton solves to ~1e-12 here).
        assert torch.allclose(y2[:, :t + 1], y[:, :t + 1], atol=1e-9, rtol=0), name
        assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:]), name


@pytest.mark.parametrize("name", MIXERS)
def test_mixer_restarts_at_document_start(name):
    """With doc_start at s, outputs from s on equal a fresh run on x[s:] alone."""
    mixer, cfg = make_mixer(name)
    B, T, s = 2, 21, 9
    x = torch.randn(B, T, cfg.d_model, dtype=torch.float64)
    doc_start = torch.zeros(B, T, dtype=torch.bool)
    doc_start[:, s] = True
    y = mixer(x, doc_start)
    # (Attention: RoPE scores depend on position differences only, so the shift is exact.)
    y_tail = mixer(x[:, s:].contiguous())
    assert torch.allclose(y[:, s:], y_tail, atol=1e-9, rtol=0), name
    assert torch.allclose(y[:, :s], mixer(x[:, :s].contiguous()), atol=1e-9, rtol=0), name


@pytest.mark.parametrize("name", MIXERS)
def test_gradients_reach_every_parameter(name):
    mixer, cfg = make_mixer(name)
    x = torch.randn(2, 13, cfg.d_model, dtype=torch.float64, requires_grad=True)
    mixer(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in mixer.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name}.{pname} got a zero gradient"


def test_short_conv_matches_conv1d_without_resets():
    torch.manual_seed(0)
    conv = ShortConv(6, 4).double()
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    ref = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (3, 0)),
                                     conv.weight.unsqueeze(1), groups=6).transpose(1, 2)
    assert torch.allclose(conv(x), torch.nn.functional.silu(ref), atol=1e-12)


def test_hybrid_model_loss_and_backward():
    torch.manual_seed(0)
    cfg = tiny_cfg(["paragru", "deltaproduct", "attention", "paralstm"])
    model = LanguageModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    logits = model(ids)
    assert logits.shape == (2, 17, cfg.vocab_size)
    loss = model(ids, labels=torch.randint(0, cfg.vocab_size, (2, 17)))
    # At init the predictions are near uniform: loss close to ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.3
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.head.weight is model.embed.weight
    residuals = model.solver_residuals()
    assert set(residuals) == {"layer0.paragru", "layer3.paralstm"}
    assert all(r < 1e-6 for r in residuals.values())


def test_untied_head():
    cfg = tiny_cfg(["attention"], **{"model.tie_embeddings": "false"})
    model = LanguageModel(cfg)
    assert model.head.weight is not model.embed.weight


def test_activation_checkpointing_keeps_names_loss_and_gradients():
    from pretrain.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    cfg = tiny_cfg(["paragru", "deltaproduct", "attention"])
    ref = LanguageModel(cfg).double()
    ckpt = LanguageModel(cfg).double()
    ckpt.load_state_dict(ref.state_dict())
    apply_activation_checkpointing(ckpt)
    assert list(ckpt.state_dict()) == list(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    doc_start = torch.zeros(2, 19, dtype=torch.bool)
    doc_start[0, 7] = True
    losses = []
    for model in (ref, ckpt):
        loss = model(ids, labels=ids.roll(-1, 1), doc_start=doc_start)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-12, atol=0)
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12), name


def test_triton_kernels_inside_the_model_match_the_torch_kernels():
    """train.kernel_backend=triton (run here by the Triton interpreter) == torch, loss and grads."""
    from pretrain.parallelize import set_kernel_backend

    cfg = tiny_cfg(["paragru", "deltaproduct", "paralstm"], **{
        "model.deltaproduct.head_dim": 16, "model.deltaproduct.chunk_size": 16,
        "model.paragru.num_iters": 4, "model.paralstm.num_iters": 4})
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    doc_start = torch.zeros(2, 13, dtype=torch.bool)
    doc_start[1, 6] = True
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = set_kernel_backend(LanguageModel(cfg), backend)
        loss = model(ids, labels=ids.roll(-1, 1), doc_start=doc_start)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (l_ref, g_ref), (l_tri, g_tri) = results["torch"], results["triton"]
    assert torch.allclose(l_tri, l_ref, rtol=1e-5, atol=0)
    for name, g in g_ref.items():  # fp32, different summation orders: 1e-4 of the gradient's scale
        assert torch.allclose(g_tri[name], g, rtol=0, atol=1e-4 * g.abs().max().item() + 1e-8), name


def test_weight_decay_is_chosen_by_parameter_role_not_shape():
    """Matrices (projections, embeddings, head, conv filters) decay; biases, norm gains, ParaRNN's
    diagonal recurrent weights and peepholes, DeltaProduct's A_log and dt_bias do not, at any
    size: with 2 heads the old `shape[0] > 3` rule left a_proj (2 x d) undecayed."""
    from pretrain.train import param_groups

    cfg = load_config(None, ["model.vocab_size=64", "model.d_model=32", "model.n_layers=4",
                             "model.mixers=[paragru,paralstm,deltaproduct,attention]",
                             "model.tie_embeddings=false", "model.paragru.num_heads=2",
                             "model.paralstm.num_heads=2", "model.deltaproduct.num_heads=2",
                             "model.deltaproduct.head_dim=16", "model.attention.num_heads=2"]).model
    model = LanguageModel(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    norms = {f"blocks.{i}.norm{j}.weight" for i in range(4) for j in (1, 2)} | {"norm.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == norms | {
        "blocks.0.mixer.in_proj.bias", "blocks.0.mixer.recurrent",
        "blocks.1.mixer.in_proj.bias", "blocks.1.mixer.recurrent", "blocks.1.mixer.peephole",
        "blocks.2.mixer.A_log", "blocks.2.mixer.dt_bias", "blocks.2.mixer.o_norm.weight"}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"blocks.2.mixer.a_proj.weight", "blocks.2.mixer.b_proj.weight", "blocks.2.mixer.q_conv.weight",
            "embed.weight", "head.weight", "blocks.0.mixer.in_proj.weight"} <= decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decayed) + len(no_decay["params"]) == len(list(model.parameters()))


def test_deltaproduct_without_short_conv_applies_silu_to_q_k_v_as_fla():
    """fla's GatedDeltaProduct with use_short_conv=False feeds silu(q/k/v_proj(x)) to the
    recurrence; so must ours (with the conv, the conv's own SiLU does it)."""
    cfg = load_config(None, ["model.mixers=[deltaproduct]", "model.n_layers=1", "model.d_model=32",
                             "model.deltaproduct.num_heads=2", "model.deltaproduct.head_dim=16",
                             "model.deltaproduct.use_short_conv=false"]).model
    torch.manual_seed(0)
    mixer = build_mixer(cfg, "deltaproduct", 0)
    seen = {}
    original = mixer._recurrence_inputs

    def capture(x, q, k, v):
        seen.update(q=q, k=k, v=v)
        return original(x, q, k, v)

    mixer._recurrence_inputs = capture
    x = torch.randn(2, 5, 32)
    mixer(x)
    for name in ("q", "k", "v"):
        expected = torch.nn.functional.silu(getattr(mixer, f"{name}_proj")(x))
        torch.testing.assert_close(seen[name], expected, rtol=0, atol=0)
