"""launch.export --format hf: transformers loads the directory with AutoModelForCausalLM (trust_remote_code),
its logits equal ours, generate() runs with the recurrent cache, its tokenizer encodes as ours; the
generated modeling code imports nothing of this package; the fla name mapping loads into fla's
GatedDeltaProduct. transformers is in the test extra (it does not depend on torch)."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import to_dict
from pretrain.model import LanguageModel
from test_model import tiny_cfg

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
HYBRID = ["paragru", "deltaproduct", "attention", "paralstm", "gated_deltanet"]  # every registered mixer
PROMPT = "def forward(self, x):"

# Run in a fresh interpreter without this repository on the path, as a transformers user would.
HF_SCRIPT = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
hf_dir, out, ids = sys.argv[1], sys.argv[2], torch.tensor(eval(sys.argv[3]))
model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).double().eval()
tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
prompt = tok(PROMPT, return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(ids, use_cache=False).logits
    prefill = model(ids[:, :7])
    steps = [prefill.logits]
    cache = prefill.past_key_values
    for t in range(7, ids.shape[1]):
        o = model(ids[:, t:t + 1], past_key_values=cache)
        steps.append(o.logits)
        cache = o.past_key_values
greedy = model.generate(prompt, max_new_tokens=12, do_sample=False)
greedy_no_cache = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
torch.manual_seed(0)
sampled = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0)
ours = [m for m in ("pretrain", "kernels", "parallel", "data", "launch") if m in sys.modules]
torch.save({"logits": logits, "stepwise": torch.cat(steps, 1), "prompt": prompt, "greedy": greedy,
            "greedy_no_cache": greedy_no_cache, "sampled": sampled, "decoded": tok.decode(greedy[0]), "ours_imported": ours,
            "model_class": type(model).__name__}, out)
""".replace("PROMPT", repr(PROMPT))


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory):
    """A random fp32 hybrid of every mixer written as an HF directory, and the model it came from."""
    from data.tokenizer import train_tokenizer
    from pretrain.hf_export import write_hf_directory

    root = tmp_path_factory.mktemp("hf")
    docs = [p.read_text() for p in sorted((REPO / "pretrain").glob("*.py"))]
    tok = train_tokenizer(docs, root / "tokenizer", vocab_size=512)
    cfg = tiny_cfg(HYBRID, **{"model.vocab_size": 520})
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    out = root / "export"
    out.mkdir()
    write_hf_directory(out, to_dict(cfg), {k: v for k, v in model.state_dict().items() if k != "head.weight"},
                       tok.model_path, torch.float32, {"step": 0})
    ids = torch.randint(0, tok.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    result = root / "hf.pt"
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HOME": str(root / "hf_home"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", HF_SCRIPT, str(out), str(result), str(ids.tolist())],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"dir": out, "model": model, "tok": tok, "ids": ids, "hf": torch.load(result)}


def test_transformers_loads_it_and_its_logits_equal_ours(hf_export):
    hf, model, ids = hf_export["hf"], hf_export["model"], hf_export["ids"]
    assert hf["model_class"] == "RecurrentLMForCausalLM"
    assert hf["ours_imported"] == []  # the shipped code is self-contained
    ours = model.double()(ids)
    # fp64: our Newton (8 iterations) and chunkwise forms against the per-token references the HF
    # model runs: equal to rounding.
    assert torch.allclose(hf["logits"], ours, rtol=0, atol=1e-10), (hf["logits"] - ours).abs().max()
    assert torch.allclose(hf["stepwise"], ours, rtol=0, atol=1e-10), (hf["stepwise"] - ours).abs().max()
    model.float()


def test_transformers_generate_uses_the_recurrent_cache_and_matches_ours(hf_export):
    hf, model, tok = hf_export["hf"], hf_export["model"], hf_export["tok"]
    prompt = torch.tensor([tok.encode(PROMPT)])
    assert torch.equal(hf["prompt"], prompt)  # the shipped tokenizer encodes as ours
    ours = model.double().generate(prompt, 12, temperature=0.0, vocab_limit=tok.vocab_size, eos_id=tok.eos_id)
    model.float()
    assert torch.equal(hf["greedy"], ours)
    # sampling: tokens only from the tokenizer's vocabulary (generation_config's suppress_tokens)
    assert hf["sampled"].shape[1] > prompt.shape[1] and int(hf["sampled"].max()) < tok.vocab_size
    assert torch.equal(hf["greedy_no_cache"], ours)
    assert hf["decoded"] == tok.decode(ours[0].tolist())


def test_the_modeling_code_is_copied_from_our_source():
    import ast
    import inspect

    from kernels import deltaproduct, pararnn
    from pretrain import hf_export, mixers, model

    source = hf_export.modeling_source()
    for obj in (model.LanguageModel, model.Block, mixers.DeltaProductMixer, mixers.ParaGRUMixer,
                mixers.ParaLSTMMixer, mixers.AttentionMixer, mixers.ShortConv, pararnn.ParaGRUCell,
                pararnn.ParaLSTMCell, deltaproduct.deltaproduct_naive, deltaproduct.deltaproduct_step):
        assert inspect.getsource(obj) in source, obj
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or "").split(".")[0])
    assert imported == {"__future__", "math", "dataclasses", "functools", "typing", "torch", "transformers", ".configuration_recurrent_lm"}


def test_the_hf_directory_is_readable_by_the_group(cli_trained, tmp_path):
    """launch.export --format hf from a trained run: the transformers files, group-readable."""
    from trainer_cli import run

    out = tmp_path / "hf"
    run(["-m", "launch.export", "--checkpoint", str(cli_trained), "--out", str(out), "--format", "hf"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "recurrent_lm" and config["architectures"] == ["RecurrentLMForCausalLM"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "tokenizer.model", "tokenizer_config.json", "modeling_recurrent_lm.py"} <= names
    for p in [out, *out.iterdir()]:
        assert p.stat().st_mode & stat.S_IRGRP, (p, oct(p.stat().st_mode))
    # the native export too
    native = tmp_path / "native"
    run(["-m", "launch.export", "--checkpoint", str(cli_trained), "--out", str(native)])
    for p in [native, *native.iterdir()]:
        assert p.stat().st_mode & stat.S_IRGRP, (p, oct(p.stat().st_mode))
    # an HF export is not a native one: replacing one with the other is refused
    proc = run(["-m", "launch.export", "--checkpoint", str(cli_trained), "--out", str(out)], check=False)
    assert proc.returncode == 2 and "not empty and is not an earlier export" in proc.stderr
    assert os.listdir(out) and (out / "modeling_recurrent_lm.py").is_file()


def test_launch_eval_reads_the_hf_directory(hf_export, tmp_path):
    import numpy as np

    from pretrain.evaluate import evaluate, score, text_tokens

    doc = tmp_path / "doc.txt"
    doc.write_text("def add(a, b):\n    return a + b\n")
    result = evaluate(hf_export["dir"], text=[str(doc)], seq_len=8, device="cpu")
    tok, model = hf_export["tok"], hf_export["model"].float()
    stream = np.concatenate([[tok.eos_id], text_tokens([str(doc)], tok)])
    nll, count = score(model, stream, tok.eos_id, 8, 8, "cpu")
    assert result["tokens"] == count and result["loss"] == pytest.approx(nll / count, rel=1e-6)


def test_the_fla_mapping_keeps_the_conv_tap_order():
    """Our ShortConv [C, K] as the depthwise nn.Conv1d [C, 1, K] fla's ShortConvolution is (no fla needed)."""
    from pretrain.hf_export import fla_gated_deltaproduct_state_dict
    from pretrain.mixers import ShortConv

    torch.manual_seed(0)
    conv = ShortConv(6, 4).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    w = fla_gated_deltaproduct_state_dict({"q_conv.weight": conv.weight})["q_conv1d.weight"]
    assert w.shape == (6, 1, 4)
    theirs = torch.nn.functional.silu(torch.nn.functional.conv1d(x.transpose(1, 2), w, padding=3, groups=6)[..., :9])
    assert torch.allclose(conv(x), theirs.transpose(1, 2), rtol=0, atol=1e-14)


def test_fla_gated_deltaproduct_loads_our_weights_strictly_and_computes_our_outputs():
    """With flash-linear-attention installed (not a dependency; skipped otherwise), its Triton
    kernels run under the CPU interpreter set up as in bench/fla_interpreter.py."""
    pytest.importorskip("fla")
    from bench.fla_interpreter import fla_environment, pretend_h200
    from pretrain.hf_export import fla_gated_deltaproduct_kwargs, fla_state_dict

    with pretend_h200():
        from fla.layers import GatedDeltaProduct
    cfg = tiny_cfg(["deltaproduct"], **{"model.deltaproduct.head_dim": 16})
    torch.manual_seed(0)
    model = LanguageModel(cfg)
    fla = GatedDeltaProduct(**fla_gated_deltaproduct_kwargs(cfg, 0)).eval()
    fla.load_state_dict(fla_state_dict(model)["blocks.0.mixer"], strict=True)
    mixer = model.blocks[0].mixer
    for T, dtype, atol in ((20, torch.float32, 1e-5), (70, torch.float16, 1e-4)):  # fused_recurrent, chunk
        x = torch.randn(2, T, cfg.d_model)
        with torch.no_grad(), fla_environment():
            ours = mixer(x)
            theirs = fla.to(dtype)(x.to(dtype))[0].float()
        # differences: fla's q/k L2 norm adds 1e-6 under the square root (ours does not); fp16 in chunk mode
        assert torch.allclose(ours, theirs, rtol=0, atol=atol), (T, (ours - theirs).abs().max(), ours.abs().max())
