"""The lm-evaluation-harness adapter (pretrain/harness.py): its three methods against the model's own
forward / generate on Instance-like objects (always), and, where lm_eval is installed (an optional
extra, not in CI's test extra: it pulls datasets, pandas, scipy, scikit-learn), lm_eval's evaluator
on three small tasks defined by local files (multiple choice, rolling loglikelihood, generation)."""
import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pretrain.model import LanguageModel
from test_model import tiny_cfg

REPO = Path(__file__).resolve().parents[1]
HYBRID = ["paragru", "deltaproduct", "attention", "paralstm"]


def request(*args):
    return SimpleNamespace(args=args)  # what the adapter reads of lm_eval's Instance


@pytest.fixture(scope="module")
def lm():
    from data.tokenizer import train_tokenizer
    from pretrain.harness import RecurrentLM

    root = Path(tempfile.mkdtemp(prefix="lm-eval-tok-"))
    docs = [p.read_text() for p in sorted((REPO / "pretrain").glob("*.py"))]
    tok = train_tokenizer(docs, root / "tokenizer", vocab_size=512)
    torch.manual_seed(0)
    model = LanguageModel(tiny_cfg(HYBRID, **{"model.vocab_size": 520})).double()
    return RecurrentLM(model=model, tokenizer=tok, device="cpu", max_length=64)


def forward_logprobs(lm, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 by one full forward (fp64), a document starting after each EOS."""
    x = torch.tensor([ids])
    doc_start = torch.cat([torch.ones(1, 1, dtype=torch.bool), x[:, :-2] == lm.eos_id], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(x[:, :-1], doc_start=doc_start), dim=-1)[0]
    return logp.gather(1, x[0, 1:, None])[:, 0], logp.argmax(-1) == x[0, 1:]


def test_loglikelihood_equals_the_forward_and_shares_the_prefill(lm):
    tok = lm.tokenizer
    context = "def forward(self, x):\n    return "
    choices = ["self.proj(x)", "x", "None\n"]
    out = lm.loglikelihood([request(context, c) for c in choices] + [request("import ", "torch")])
    for (context_, cont), (value, greedy) in zip([(context, c) for c in choices] + [("import ", "torch")], out):
        stripped = context_.rstrip()
        whole = [tok.eos_id] + tok.encode(stripped + context_[len(stripped):] + cont)
        n_context = 1 + len(tok.encode(stripped))
        logp, is_greedy = forward_logprobs(lm, whole)
        assert value == pytest.approx(float(logp[n_context - 1:].sum()), abs=1e-9)
        assert greedy == bool(is_greedy[n_context - 1:].all())
    # the greedy continuation is recognised as greedy
    prompt = [tok.eos_id] + tok.encode("class Block")
    ids = lm.model.generate(torch.tensor([prompt]), 6, temperature=0.0)[0, len(prompt):].tolist()
    text = tok.decode(ids)
    if tok.encode("class Block" + text)[len(tok.encode("class Block")):] == ids:  # tokenisation round-trips
        assert lm.loglikelihood([request("class Block", text)])[0][1] is True


def test_loglikelihood_rolling_scores_every_token_once(lm):
    from pretrain.evaluate import score

    tok = lm.tokenizer
    short = "x = [i * i for i in range(9)]\n"
    text = short * 12  # longer than max_length (64): several windows
    values = lm.loglikelihood_rolling([request(short), request(text)])
    logp, _ = forward_logprobs(lm, [tok.eos_id] + tok.encode(short))
    assert values[0] == pytest.approx(float(logp.sum()), rel=1e-6)  # launch.eval's score: fp32 softmax
    stream = np.asarray([tok.eos_id] + tok.encode(text))
    assert len(stream) > 2 * lm.max_length
    nll, count = score(lm.model, stream, tok.eos_id, lm.max_length, 8, "cpu")
    assert count == len(stream) - 1 and values[1] == pytest.approx(-nll, rel=1e-12)


def test_generate_until_decodes_recurrently_and_stops_at_the_stop_strings(lm):
    tok = lm.tokenizer
    context = "def forward(self"
    ids = [tok.eos_id] + tok.encode(context)
    n_prompt = len(ids)
    for _ in range(12):  # greedy by re-running the whole sequence (no cache), EOS starting a document
        x = torch.tensor([ids])
        doc_start = torch.cat([torch.ones(1, 1, dtype=torch.bool), x[:, :-1] == tok.eos_id], dim=1)
        with torch.no_grad():
            nxt = int(lm.model(x, doc_start=doc_start)[0, -1, :tok.vocab_size].argmax())
        if nxt == tok.eos_id:
            break
        ids.append(nxt)
    greedy = tok.decode(ids[n_prompt:])
    free, = lm.generate_until([request(context, {"until": [], "max_gen_toks": 12})])
    assert free == greedy and len(free) > 2
    stop = free[len(free) // 2]
    cut, = lm.generate_until([request(context, {"until": [stop, "never"], "max_gen_toks": 12})])
    assert cut == free[:free.index(stop)]


# ----------------------------------------------------------------------------- lm_eval itself

TASKS = {
    "local_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                 "doc_to_choice": "{{choices}}", "metric_list": [{"metric": "acc"}]},
    "local_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                  "metric_list": [{"metric": "bits_per_byte"}]},
    "local_gen": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
                  "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
                  "metric_list": [{"metric": "exact_match"}]},
}
DOCS = {
    "local_mc": [{"question": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "None"], "answer": 0},
                 {"question": "import", "choices": ["os", "torch", "math"], "answer": 1},
                 {"question": "for i in", "choices": ["range(n):", "x", "self"], "answer": 0}],
    "local_ppl": [{"text": "x = [i * i for i in range(9)]\n"}, {"text": "class Block(nn.Module):\n    pass\n"}],
    "local_gen": [{"prompt": "def forward(self", "target": ", x):"}, {"prompt": "import", "target": " torch"}],
}


def write_local_tasks(directory: Path) -> None:
    """TASKS as lm_eval task YAMLs over local jsonl files (the datasets cache inside directory too)."""
    import yaml

    for name, spec in TASKS.items():
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in DOCS[name]))
        (directory / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)},
                                                                     "cache_dir": str(directory / "cache")},
            "test_split": "test", **spec}))


def test_lm_eval_runs_local_tasks_through_the_adapter(lm, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm_eval is optional (pip install lm_eval)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    write_local_tasks(tmp_path)
    # Only the local tasks indexed: lm_eval's ~15,000 built-in ones take ~9 s and are not used here.
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    results = simple_evaluate(model=lm, tasks=list(TASKS), task_manager=manager, num_fewshot=0,
                              bootstrap_iters=0)["results"]
    # multiple choice: accuracy of the argmax of our own loglikelihoods (lm_eval puts " " before a choice)
    correct = [int(np.argmax([v for v, _ in lm.loglikelihood([request(d["question"], " " + c)
                                                                for c in d["choices"]])])) == d["answer"]
               for d in DOCS["local_mc"]]
    assert results["local_mc"]["acc,none"] == pytest.approx(np.mean(correct))
    # rolling loglikelihood: bits per byte of the texts
    texts = [d["text"] for d in DOCS["local_ppl"]]
    nll = -sum(lm.loglikelihood_rolling([request(t) for t in texts]))
    expected = nll / math.log(2) / sum(len(t.encode()) for t in texts)
    assert results["local_ppl"]["bits_per_byte,none"] == pytest.approx(expected, rel=1e-9)
    # generation: exact match of our own greedy continuations
    outs = lm.generate_until([request(d["prompt"], TASKS["local_gen"]["generation_kwargs"]) for d in DOCS["local_gen"]])
    expected = np.mean([o == d["target"] for o, d in zip(outs, DOCS["local_gen"])])
    assert results["local_gen"]["exact_match,none"] == pytest.approx(expected)


def test_launch_harness_runs_tasks_or_says_lm_eval_is_missing(cli_trained, tmp_path):
    from trainer_cli import one_line_error, run

    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        line = one_line_error(run(["-m", "launch.harness", "--model", str(cli_trained), "--tasks", "local_mc"],
                                  check=False, env=env), "harness")
        assert "lm_eval is not installed" in line and ".[harness]" in line
        return
    write_local_tasks(tmp_path)
    args = ["-m", "launch.harness", "--model", str(cli_trained), "--include-path", str(tmp_path)]
    run([*args, "--tasks", ",".join(TASKS), "--output", str(tmp_path / "r.json")], env=env)
    results = json.loads((tmp_path / "r.json").read_text())
    assert 0 <= results["local_mc"]["acc,none"] <= 1 and results["local_ppl"]["bits_per_byte,none"] > 0
    line = one_line_error(run([*args, "--tasks", "no_such_task"], check=False, env=env), "harness")
    assert "no_such_task" in line
