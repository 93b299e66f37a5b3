"""The mixer registry: one MixerSpec per name a config may list in model.mixers.

A spec is everything the rest of the system needs to know about a mixer, in one place:

    module            the nn.Module, built as module(cfg, c, layer_idx) (pretrain/mixers.py)
    config, section   the dataclass of its config section and the section's key, model.<section>
    section_defaults  what this entry changes in the dataclass's defaults (an alias's settings)
    ranges, validate  its config checks: ranges (always, like every other key) and the checks
                      that apply only when a layer uses it; each returns the one-line message
    check_parallel    what parallel.tp / parallel.sp must divide, checked before building
    flops             {term: (forward, backward)} FLOPs per token (pretrain/flops.py)
    activation_bytes  (saved, transient) bytes per token of one block (pretrain/memory.py)
    tp_plan           submodule or parameter path -> tensor-parallel style (pretrain/plans.py)
    sp_plan           submodule path ("" = the mixer) -> how its `sequence_op` crosses sp ranks
    kernel            the kernels/ op family it runs ("pararnn", "deltaproduct" or None), for the
                      offline GPU checks

config.py makes model.<section> keys and the model.mixers choices from this table;
model.py builds blocks through build_mixer; parallelize.py applies the plans with one generic
function; flops.py and memory.py ask the spec. Adding a mixer is: its op in kernels/, its class
and config dataclass in pretrain/mixers.py, one register() here, and its tests. The gated
DeltaNet entry at the end is DeltaProduct with one Householder factor, added by this file alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping

from pretrain import flops, memory
from pretrain.mixers import (AttentionConfig, AttentionMixer, DeltaProductConfig, DeltaProductMixer, ParaGRUMixer,
                             ParaLSTMMixer, ParaRNNConfig)
from pretrain.plans import (Column, Headwise, Row, Shard, SharedNorm, attention_over_sp, conv_over_sp,
                            deltaproduct_over_sp, pararnn_over_sp)

Rule = tuple[str, Any, bool, str]  # (full key, value, valid?, what is valid)


def _no_rules(c, key) -> list[Rule]:
    return []


def _no_check(*args) -> str | None:
    return None


@dataclass(frozen=True)
class MixerSpec:
    name: str
    module: type
    config: type
    section: str = ""
    section_defaults: Mapping[str, Any] = field(default_factory=dict)
    ranges: Callable[[Any, str], list[Rule]] = _no_rules                 # (c, key)
    validate: Callable[[Any, Any, str], str | None] = _no_check             # (model cfg, c, key)
    check_parallel: Callable[[Any, Any, str, int, int, int], str | None] = _no_check  # (+ seq_len, tp, sp)
    flops: Callable[..., dict] | None = None             # (model cfg, c, seq_len, num_iters, form)
    activation_bytes: Callable[..., tuple] | None = None  # (model cfg, c, seq_len, tp, act_bytes, backend)
    tp_plan: Mapping[str, Any] = field(default_factory=dict)
    sp_plan: Mapping[str, Callable] = field(default_factory=dict)
    kernel: str | None = None

    def __post_init__(self):
        if not self.section:
            object.__setattr__(self, "section", self.name)

    def default_section(self):
        return self.config(**self.section_defaults)

    def section_of(self, model_cfg):
        """This mixer's section of a ModelConfig (model.<section>)."""
        return getattr(model_cfg, self.section)


MIXERS: dict[str, MixerSpec] = {}


def register(spec: MixerSpec) -> MixerSpec:
    if spec.name in MIXERS:
        raise ValueError(f"mixer {spec.name!r} is registered twice")
    clash = [s.name for s in MIXERS.values() if s.section == spec.section and s.config is not spec.config]
    if clash:
        raise ValueError(f"mixer {spec.name!r}: section model.{spec.section} already holds {clash[0]}'s config")
    MIXERS[spec.name] = spec
    return spec


def mixer_spec(name: str) -> MixerSpec:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; valid: {', '.join(MIXERS)}")
    return MIXERS[name]


def sections() -> dict[str, MixerSpec]:
    """section key -> the first spec that uses it (the one whose defaults the section takes)."""
    out = {}
    for spec in MIXERS.values():
        out.setdefault(spec.section, spec)
    return out


def build_mixer(model_cfg, name: str, layer_idx: int):
    spec = mixer_spec(name)
    return spec.module(model_cfg, spec.section_of(model_cfg), layer_idx)


# ----------------------------------------------------------------------------- ParaRNN (GRU, LSTM)

def _pararnn_ranges(c: ParaRNNConfig, key: str) -> list[Rule]:
    positive = "> 0"
    return [
        (f"{key}.expand", c.expand, c.expand > 0, positive),
        (f"{key}.num_heads", c.num_heads, c.num_heads > 0, positive),
        (f"{key}.num_iters", c.num_iters, c.num_iters > 0, positive),
        (f"{key}.max_iters", c.max_iters, c.tol is None or c.max_iters >= c.num_iters,
         f">= {key}.num_iters={c.num_iters} (with a tol it caps the iterations)"),
        (f"{key}.tol", c.tol, c.tol is None or c.tol > 0, "> 0 or null (never iterate further)"),
        (f"{key}.damping", c.damping, c.damping is None or c.damping > 0,
         "> 0 (the largest Newton step per element) or null (no clamp)"),
    ]


def _pararnn_validate(m, c: ParaRNNConfig, key: str) -> str | None:
    hidden = int(c.expand * m.d_model)
    if hidden < c.num_heads or hidden % c.num_heads or m.d_model % c.num_heads:
        return (f"{key}.num_heads={c.num_heads} must divide d_model={m.d_model} "
                f"and the hidden size {hidden} (expand={c.expand} x d_model)")
    return None


def _heads_divisible(attr: str, by_sp: bool = False):
    """check_parallel: c.<attr> divisible by tp (by tp x sp where heads are split over both)."""
    def check(m, c, key, seq_len, tp, sp):
        degree, what = (tp * sp, "parallel.tp x parallel.sp") if by_sp else (tp, "parallel.tp")
        value = getattr(c, attr)
        if value % degree:
            return f"{key}.{attr}={value} is not divisible by {what}={degree}; choose degrees that divide it"
        return None
    return check


PARAGRU_TP = {"in_proj": Headwise(), "recurrent": Shard(dim=1), "out_proj": Row()}  # over channels
PARALSTM_TP = {**PARAGRU_TP, "peephole": Shard(dim=1)}
PARARNN_SP = {"": pararnn_over_sp}

register(MixerSpec(
    name="paragru", module=ParaGRUMixer, config=ParaRNNConfig, ranges=_pararnn_ranges, validate=_pararnn_validate,
    check_parallel=_heads_divisible("num_heads"), flops=partial(flops.pararnn_mixer_flops, cell="paragru"),
    activation_bytes=partial(memory.pararnn_activation_bytes, cell="paragru"),
    tp_plan=PARAGRU_TP, sp_plan=PARARNN_SP, kernel="pararnn"))
register(MixerSpec(
    name="paralstm", module=ParaLSTMMixer, config=ParaRNNConfig, ranges=_pararnn_ranges, validate=_pararnn_validate,
    check_parallel=_heads_divisible("num_heads"), flops=partial(flops.pararnn_mixer_flops, cell="paralstm"),
    activation_bytes=partial(memory.pararnn_activation_bytes, cell="paralstm"),
    tp_plan=PARALSTM_TP, sp_plan=PARARNN_SP, kernel="pararnn"))


# ----------------------------------------------------------------------------- DeltaProduct

def _deltaproduct_ranges(c: DeltaProductConfig, key: str) -> list[Rule]:
    return [(f"{key}.{k}", getattr(c, k), getattr(c, k) > 0, "> 0")
            for k in ("num_heads", "head_dim", "expand_v", "num_householder", "conv_size", "chunk_size")]


def _deltaproduct_parallel(m, c: DeltaProductConfig, key, seq_len, tp, sp) -> str | None:
    heads = _heads_divisible("num_heads")(m, c, key, seq_len, tp, sp)
    if heads:
        return heads
    if sp > 1 and c.use_short_conv and seq_len // sp < c.conv_size - 1:
        return (f"data.seq_len / parallel.sp = {seq_len // sp} is shorter than the short conv's "
                f"halo ({c.conv_size - 1}); use a longer seq_len or a smaller sp")
    return None


# Heads are split over tp: q/g/a by rows, k/v/beta (laid out [n_h, H, d]) along H, and so are the
# convs' channels; the output norm's weight is shared by all heads.
DELTAPRODUCT_TP = {
    "q_proj": Column(), "k_proj": Column(shape=("nh", "H", "dk"), axis=1),
    "v_proj": Column(shape=("nh", "H", "dv"), axis=1), "b_proj": Column(shape=("nh", "H"), axis=1),
    "g_proj": Column(), "a_proj": Column(), "A_log": Shard(dim=0), "dt_bias": Shard(dim=0),
    "q_conv.weight": Shard(dim=0), "k_conv.weight": Shard(dim=0, shape=("nh", "H", "dk"), axis=1),
    "v_conv.weight": Shard(dim=0, shape=("nh", "H", "dv"), axis=1),
    "o_norm": SharedNorm(), "out_proj": Row(),
}
DELTAPRODUCT_SP = {"": deltaproduct_over_sp, "q_conv": conv_over_sp, "k_conv": conv_over_sp, "v_conv": conv_over_sp}

register(MixerSpec(
    name="deltaproduct", module=DeltaProductMixer, config=DeltaProductConfig, ranges=_deltaproduct_ranges,
    check_parallel=_deltaproduct_parallel, flops=flops.deltaproduct_mixer_flops,
    activation_bytes=memory.deltaproduct_activation_bytes, tp_plan=DELTAPRODUCT_TP, sp_plan=DELTAPRODUCT_SP,
    kernel="deltaproduct"))


# ----------------------------------------------------------------------------- attention

def _attention_ranges(c: AttentionConfig, key: str) -> list[Rule]:
    return [(f"{key}.num_heads", c.num_heads, c.num_heads > 0, "> 0"),
            (f"{key}.rope_theta", c.rope_theta, c.rope_theta > 0, "> 0")]


def _attention_validate(m, c: AttentionConfig, key: str) -> str | None:
    if m.d_model % c.num_heads:
        return f"{key}.num_heads={c.num_heads} must divide d_model={m.d_model}"
    return None


register(MixerSpec(
    name="attention", module=AttentionMixer, config=AttentionConfig, ranges=_attention_ranges,
    validate=_attention_validate, check_parallel=_heads_divisible("num_heads", by_sp=True),
    flops=flops.attention_mixer_flops, activation_bytes=memory.attention_activation_bytes,
    tp_plan={"qkv_proj": Column(shape=(3, "H", "hd"), axis=1), "out_proj": Row()},
    sp_plan={"": attention_over_sp}))


def replace(spec: MixerSpec, **changes) -> MixerSpec:
    """A new entry that is `spec` with some fields changed (an alias)."""
    return dataclasses.replace(spec, **changes)


# ----------------------------------------------------------------------------- gated DeltaNet (an alias)

def _one_householder(m, c: DeltaProductConfig, key: str) -> str | None:
    if c.num_householder != 1:
        return (f"{key}.num_householder={c.num_householder}: gated DeltaNet has one Householder factor per token; "
                f"use the mixer 'deltaproduct' for more")
    return None


# Gated DeltaNet (Yang et al., 2024) is gated DeltaProduct with n_h = 1, and beta = sigmoid (eigenvalues
# of I - beta k k^T in [0, 1]) as in its paper and fla's GatedDeltaNet: the same module, kernels,
# formulas and plans under its own section, model.gated_deltanet.
register(replace(MIXERS["deltaproduct"], name="gated_deltanet", section="gated_deltanet",
                 section_defaults={"num_householder": 1, "allow_neg_eigval": False}, validate=_one_householder))
