"""Recurrent decoding: prefill + one step per token equals the full-sequence forward (fp64), the
cached states equal the parallel path's, generation with the cache equals re-running the prefix,
and launch.generate on an export."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.deltaproduct import deltaproduct_naive, deltaproduct_step
from pretrain.mixers import ShortConv
from pretrain.model import LanguageModel, sample_next_token
from test_model import tiny_cfg

REPO = Path(__file__).resolve().parents[1]
HYBRID = ["paragru", "deltaproduct", "attention", "paralstm"]
MODELS = {  # name -> (mixers, extra config)
    "paragru": (["paragru"], {}),
    "paralstm": (["paralstm"], {}),
    "deltaproduct": (["deltaproduct"], {}),
    "deltaproduct-plain": (["deltaproduct"], {"model.deltaproduct.use_short_conv": "false",
                                              "model.deltaproduct.use_forget_gate": "false",
                                              "model.deltaproduct.allow_neg_eigval": "false",
                                              "model.deltaproduct.num_householder": 3}),
    "attention": (["attention"], {}),
    "attention-no-doc-mask": (["attention"], {"model.attention.doc_mask": "false"}),
    "hybrid": (HYBRID, {}),
    "hybrid-no-resets": (HYBRID, {"model.reset_at_doc_start": "false"}),
}
B, T = 2, 21


def fp64_model(name, seed=0):
    mixers, extra = MODELS[name]
    torch.manual_seed(seed)
    return LanguageModel(tiny_cfg(mixers, **extra)).double().eval()


def tokens_and_documents(vocab_size, seed=0):
    ids = torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    doc_start = torch.zeros(B, T, dtype=torch.bool)
    doc_start[0, 5] = doc_start[0, 15] = doc_start[1, 11] = True  # different documents per row
    return ids, doc_start


def decode_stepwise(model, ids, doc_start, k):
    """Logits [B, T, V] of prefill(ids[:, :k]) then one step per token of ids[:, k:], and the cache."""
    logits, cache = model.prefill(ids[:, :k], doc_start[:, :k])
    out = [logits]
    for t in range(k, ids.shape[1]):
        step_logits, cache = model.step(ids[:, t], cache, doc_start[:, t])
        out.append(step_logits[:, None])
    return torch.cat(out, dim=1), cache


def state_tensors(state):
    """A layer's state as a flat dict of tensors (conv windows included)."""
    out = {}
    for field, value in vars(state).items():
        if isinstance(value, tuple):
            out.update({f"{field}{i}": v for i, v in enumerate(value)})
        elif value is not None:
            out[field] = value
    return out


# DeltaProduct: chunk_size 8 sub-steps with n_h = 2 is 4 tokens per chunk, so k = 8 prefills two
# whole chunks and k = 13 ends inside one; T = 21 ends inside one too.
@pytest.mark.parametrize("k", [0, 1, 8, 13, T - 1])
@pytest.mark.parametrize("name", list(MODELS))
def test_prefill_then_steps_equal_the_full_forward(name, k):
    """Documents start at 5 and 15 (row 0) and 11 (row 1): inside the prefill, inside the steps or
    both, depending on k."""
    model = fp64_model(name)
    ids, doc_start = tokens_and_documents(model.cfg.vocab_size)
    with torch.no_grad():
        full = model(ids, doc_start=doc_start)
        stepped, _ = decode_stepwise(model, ids, doc_start, k)
    assert stepped.shape == full.shape
    err = (stepped - full).abs().max().item()
    assert err < 1e-9, (name, k, err)


@pytest.mark.parametrize("name", ["paragru", "paralstm", "deltaproduct", "attention"])
def test_a_step_depends_on_the_prefilled_state(name):
    """The comparison above can fail: a step from the empty state instead of the prompt's is off."""
    model = fp64_model(name)
    ids, _ = tokens_and_documents(model.cfg.vocab_size)
    with torch.no_grad():
        full = model(ids)
        _, cache = model.prefill(ids[:, :13])
        right, _ = model.step(ids[:, 13], cache)
        wrong, _ = model.step(ids[:, 13], model.empty_cache(B))
    assert (right - full[:, 13]).abs().max() < 1e-9
    assert (wrong - full[:, 13]).abs().max() > 1e-3


@pytest.mark.parametrize("k", [0, 1, 13])
@pytest.mark.parametrize("name", ["hybrid", "deltaproduct-plain", "attention-no-doc-mask"])
def test_cached_states_equal_the_parallel_paths(name, k):
    """Each layer's state after prefill(ids[:, :k]) and steps to T equals prefill(ids)'s:
    ParaGRU h, ParaLSTM (c, h), DeltaProduct S and conv windows, the KV cache and its mask."""
    model = fp64_model(name)
    ids, doc_start = tokens_and_documents(model.cfg.vocab_size)
    with torch.no_grad():
        _, stepped = decode_stepwise(model, ids, doc_start, k)
        _, parallel = model.prefill(ids, doc_start)
    for i, (a, b) in enumerate(zip(stepped, parallel)):
        assert type(a) is type(b)
        ta, tb = state_tensors(a), state_tensors(b)
        assert ta.keys() == tb.keys()
        for field in ta:
            assert ta[field].shape == tb[field].shape, (i, field)
            if ta[field].dtype == torch.bool:
                assert torch.equal(ta[field], tb[field]), (i, field)
            else:
                assert (ta[field] - tb[field]).abs().max() < 1e-10, (i, field)


def test_recurrent_states_do_not_grow_with_the_prompt_and_are_fp32():
    torch.manual_seed(0)
    model = LanguageModel(tiny_cfg(HYBRID)).eval()
    sizes = {}
    with torch.no_grad():
        for T_prompt in (3, 40):
            _, cache = model.prefill(torch.randint(0, 97, (B, T_prompt)))
            sizes[T_prompt] = [sum(t.numel() for t in state_tensors(s).values()) for s in cache]
            for block, state in zip(model.blocks, cache):
                if block.mixer_name != "attention":
                    assert state_tensors(state).get("S", state_tensors(state).get("h")).dtype == torch.float32
    recurrent = [i for i, m in enumerate(HYBRID) if m != "attention"]
    assert [sizes[3][i] for i in recurrent] == [sizes[40][i] for i in recurrent]
    attention = HYBRID.index("attention")
    assert sizes[40][attention] > sizes[3][attention]  # the KV cache grows with its tokens


@pytest.mark.parametrize("gate", [True, False])
def test_deltaproduct_step_is_the_naive_loops_body(gate):
    gen = torch.Generator().manual_seed(0)
    Bs, Ts, nh, H, dk, dv = 2, 7, 2, 3, 5, 4
    q = torch.nn.functional.normalize(torch.randn(Bs, Ts, H, dk, generator=gen, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(Bs, Ts, nh, H, dk, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(Bs, Ts, nh, H, dv, generator=gen, dtype=torch.float64)
    beta = 2 * torch.rand(Bs, Ts, nh, H, generator=gen, dtype=torch.float64)
    g = -torch.rand(Bs, Ts, H, generator=gen, dtype=torch.float64) if gate else None
    S0 = torch.randn(Bs, H, dk, dv, generator=gen, dtype=torch.float64)
    o_ref, S_ref = deltaproduct_naive(q, k, v, beta, g, initial_state=S0)
    S, outs = S0, []
    for t in range(Ts):
        o, S = deltaproduct_step(q[:, t], k[:, t], v[:, t], beta[:, t], None if g is None else g[:, t], S)
        outs.append(o)
    assert torch.allclose(torch.stack(outs, 1), o_ref, rtol=0, atol=1e-13)
    assert torch.allclose(S, S_ref, rtol=0, atol=1e-13)


def test_short_conv_window_and_step_continue_the_forward():
    torch.manual_seed(0)
    conv = ShortConv(6, 4).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    doc_start = torch.zeros(2, 9, dtype=torch.bool)
    doc_start[0, 6] = True  # row 0's last document holds only 2 inputs before position 8
    y = conv(x, doc_start)
    for k in (0, 1, 2, 7):  # windows shorter than K-1, across the document start, full
        window = conv.window(x[:, :k], doc_start[:, :k]) if k else torch.zeros(2, 3, 6, dtype=torch.float64)
        for t in range(k, 9):
            y_t, window = conv.step(x[:, t], window, doc_start[:, t])
            assert torch.allclose(y_t, y[:, t], rtol=0, atol=1e-14), (k, t)
        assert torch.equal(window, conv.window(x, doc_start))


# ----------------------------------------------------------------------------- generate


@pytest.mark.parametrize("name", ["hybrid", "deltaproduct"])
def test_greedy_generation_with_the_cache_equals_rerunning_the_prefix(name):
    model = fp64_model(name)
    prompt = torch.randint(0, model.cfg.vocab_size, (B, 9), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt, 16, temperature=0.0)
    rerun = model.generate(prompt, 16, temperature=0.0, use_cache=False)
    assert cached.shape == (B, 9 + 16)
    assert torch.equal(cached[:, :9], prompt)
    assert torch.equal(cached, rerun)
    # Greedy: each new token is the argmax of the full forward at the position before it.
    with torch.no_grad():
        assert torch.equal(model(cached[:, :-1])[:, 8:].argmax(-1), cached[:, 9:])


def test_sampling_with_a_fixed_generator_is_reproducible():
    model = fp64_model("hybrid")
    prompt = torch.randint(0, model.cfg.vocab_size, (B, 5), generator=torch.Generator().manual_seed(2))

    def sample(seed, use_cache=True):
        return model.generate(prompt, 12, temperature=1.0, top_k=20, use_cache=use_cache,
                              generator=torch.Generator().manual_seed(seed))

    first = sample(0)
    assert torch.equal(first, sample(0))
    assert torch.equal(first, sample(0, use_cache=False))  # same logits (to 1e-15), same draws
    assert not torch.equal(first, sample(1))


def test_top_k_and_greedy_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).expand(500, 4)
    assert torch.equal(sample_next_token(logits, temperature=0.0), torch.ones(500, dtype=torch.long))
    drawn = sample_next_token(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 3}
    assert torch.equal(sample_next_token(logits, temperature=0.0, vocab_limit=1), torch.zeros(500, dtype=torch.long))
    drawn = sample_next_token(logits, temperature=1.0, top_k=2, vocab_limit=3, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 2}
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample_next_token(logits, temperature=-1.0)


def test_generation_stops_once_every_row_sampled_eos():
    model = fp64_model("paragru")
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(3))
    greedy = model.generate(prompt, 6, temperature=0.0)
    eos = int(greedy[0, 6])  # the third new token
    stopped = model.generate(prompt, 6, temperature=0.0, eos_id=eos)
    first_eos = 4 + (greedy[0, 4:] == eos).nonzero()[0].item()
    assert torch.equal(stopped, greedy[:, :first_eos + 1])


def test_generate_rejects_an_empty_prompt_and_negative_lengths():
    model = fp64_model("paragru")
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), -1)
    assert torch.equal(model.generate(torch.ones(1, 3, dtype=torch.long), 0), torch.ones(1, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- launch.generate


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """An export directory as launch.export writes it: a random fp32 hybrid and a small tokenizer."""
    from safetensors.torch import save_file

    from data.tokenizer import train_tokenizer
    from pretrain.config import to_dict
    from pretrain.export import EXPORT_FORMAT

    out = tmp_path_factory.mktemp("export")
    docs = [p.read_text() for p in sorted((REPO / "pretrain").glob("*.py"))]
    tok = train_tokenizer(docs, out / "tokenizer", vocab_size=512)
    # A model vocabulary above the tokenizer's (as when it is rounded up): never sample the rest.
    cfg = tiny_cfg(HYBRID, **{"model.vocab_size": 640, "model.paragru.num_iters": 3,
                              "model.paralstm.num_iters": 3})
    torch.manual_seed(0)
    model = LanguageModel(cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": EXPORT_FORMAT})
    meta = {"format": EXPORT_FORMAT, "model": to_dict(cfg), "dtype": "fp32", "step": 0, "tokens": 0,
            "tokenizer_checksum": tok.checksum}
    (out / "config.json").write_text(json.dumps(meta))
    return out


def generate_cli(*args):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "launch.generate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)


def test_launch_generate_on_an_export_uses_the_cache(tiny_export):
    from data.tokenizer import Tokenizer
    from pretrain.export import load_exported

    model, _ = load_exported(tiny_export)
    tok = Tokenizer(tiny_export / "tokenizer.model")
    prompt = torch.tensor([tok.encode("def forward(self")])
    expected = {}
    for temperature in (0.0, 0.8):
        out = model.generate(prompt, 10, temperature=temperature, top_k=40, vocab_limit=tok.vocab_size,
                             generator=torch.Generator().manual_seed(0), eos_id=tok.eos_id)
        expected[temperature] = tok.decode(out[0].tolist())
    rerun = model.generate(prompt, 10, temperature=0.0, eos_id=tok.eos_id, use_cache=False,
                           vocab_limit=tok.vocab_size)
    assert tok.decode(rerun[0].tolist()) == expected[0.0]

    greedy = generate_cli("--export", str(tiny_export), "--prompt", "def forward(self", "--max-new-tokens", "10",
                          "--temperature", "0")
    sampled = generate_cli("--export", str(tiny_export), "--prompt", "def forward(self", "--max-new-tokens", "10")
    no_cache = generate_cli("--export", str(tiny_export), "--prompt", "def forward(self", "--max-new-tokens", "10",
                            "--temperature", "0", "--no-cache")
    for proc in (greedy, sampled, no_cache):
        assert proc.returncode == 0, proc.stderr
    assert greedy.stdout == expected[0.0] + "\n"
    assert sampled.stdout == expected[0.8] + "\n"
    assert no_cache.stdout == greedy.stdout
    assert greedy.stdout.startswith("def forward(self")


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "--prompt is empty"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--top-k", "-3"], "--top-k must be >= 0"),
])
def test_launch_generate_bad_input_is_one_line(tiny_export, args, message):
    proc = generate_cli("--export", str(tiny_export), *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("generate: error:") and message in lines[0], proc.stderr
