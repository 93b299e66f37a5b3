"""The mixer registry (pretrain/registry.py): every entry's parallel plans name real parts of its
mixer and cover every parameter, and the gated DeltaNet alias, added by one register() call, is
DeltaProduct with one Householder factor everywhere the system looks (config, module, FLOPs,
memory, export). Its tensor/sequence-parallel equality runs in tests/test_parallel_model.py."""
import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.plans import _resolve
from pretrain.registry import MIXERS, build_mixer

SMALL = ["model.vocab_size=64", "model.d_model=32", "model.paragru.num_heads=2", "model.paralstm.num_heads=2",
         "model.deltaproduct.num_heads=2", "model.deltaproduct.head_dim=8", "model.deltaproduct.chunk_size=8",
         "model.gated_deltanet.num_heads=2", "model.gated_deltanet.head_dim=8", "model.gated_deltanet.chunk_size=8",
         "model.attention.num_heads=2"]


def small_cfg(*mixers, extra=()):
    return load_config(None, SMALL + [f"model.n_layers={len(mixers)}", "model.mixers=[" + ",".join(mixers) + "]",
                                      *extra]).model


@pytest.mark.parametrize("name", list(MIXERS))
def test_each_plan_names_parts_of_its_mixer_and_the_tp_plan_covers_every_parameter(name):
    mixer = build_mixer(small_cfg(name), name, 0)  # the defaults turn every optional part on
    spec = MIXERS[name]
    for path in spec.tp_plan:
        assert _resolve(mixer, path) is not None, f"{name}: tp_plan path {path!r} is not a part of {type(mixer).__name__}"
    for path in spec.sp_plan:
        target = mixer if path == "" else getattr(*_resolve(mixer, path))
        assert callable(getattr(target, "sequence_op", None)), f"{name}: sp_plan path {path!r} has no sequence_op"
    uncovered = [p for p, _ in mixer.named_parameters()
                 if not any(p == path or p.startswith(path + ".") for path in spec.tp_plan)]
    assert not uncovered, f"{name}: parameters left out of the tp_plan: {uncovered}"


def test_gated_deltanet_is_deltaproduct_with_one_householder_factor():
    dn_cfg = small_cfg("gated_deltanet")
    assert dn_cfg.gated_deltanet.num_householder == 1 and not dn_cfg.gated_deltanet.allow_neg_eigval
    dp_cfg = small_cfg("deltaproduct", extra=["model.deltaproduct.num_householder=1",
                                              "model.deltaproduct.allow_neg_eigval=false"])
    torch.manual_seed(0)
    dn = build_mixer(dn_cfg, "gated_deltanet", 0).double()
    torch.manual_seed(0)
    dp = build_mixer(dp_cfg, "deltaproduct", 0).double()
    assert type(dn) is type(dp) and dn.nh == 1
    assert {k: v.shape for k, v in dn.state_dict().items()} == {k: v.shape for k, v in dp.state_dict().items()}
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    doc_start = torch.zeros(2, 19, dtype=torch.bool)
    doc_start[1, 7] = True
    torch.testing.assert_close(dn(x, doc_start), dp(x, doc_start), rtol=0, atol=0)

    from pretrain.flops import mixer_flops
    from pretrain.memory import layer_activation_bytes
    assert mixer_flops(dn_cfg, "gated_deltanet", 256) == mixer_flops(dp_cfg, "deltaproduct", 256)
    assert layer_activation_bytes(dn_cfg, "gated_deltanet", 256) == layer_activation_bytes(dp_cfg, "deltaproduct", 256)


def test_gated_deltanet_has_its_own_config_section_and_one_line_errors():
    with pytest.raises(ConfigError, match=r"^model\.gated_deltanet\.num_householder=2: gated DeltaNet has one "
                                          r"Householder factor per token; use the mixer 'deltaproduct' for more$"):
        small_cfg("gated_deltanet", extra=["model.gated_deltanet.num_householder=2"])
    with pytest.raises(ConfigError, match=r"model\.gated_deltanet\.head_dim must be > 0"):
        small_cfg("attention", extra=["model.gated_deltanet.head_dim=0"])  # ranges hold for every section
    with pytest.raises(ConfigError, match="expected one of .*'gated_deltanet'"):
        small_cfg("mamba9")


def test_a_gated_deltanet_model_exports_with_its_section():
    from pretrain.hf_export import modeling_source

    source = modeling_source()
    assert "gated_deltanet: DeltaProductConfig = field(default_factory=lambda: DeltaProductConfig(" in source
    assert "'gated_deltanet': (DeltaProductMixer, 'gated_deltanet')" in source
    compile(source, "modeling_recurrent_lm.py", "exec")
