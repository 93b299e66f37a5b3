"""data/: corpus reading, tokenizer, shard preparation, and the resumable dp-sharded loader."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.corpus import default_corpus_files, iter_documents
from data.loader import TokenLoader, check_tokenizer_matches
from data.prepare import bounded_documents, is_validation, prepare_corpus, write_token_corpus
from data.shards import ShardError, load_manifest, read_shard
from data.tokenizer import Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
EOS = 1


def _random_text_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "def f(x):", "return x",
             "    if x:", "café", "naïve", "12345", "(a, b)", "{k: v}"]
    return ["".join(rng.choice(words) + rng.choice([" ", " ", "\n"]) for _ in range(rng.randrange(3, 120)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> Path:
    """A directory of .txt files, one .jsonl and one .jsonl.gz: 60 documents in all."""
    root = tmp_path_factory.mktemp("corpus")
    docs = _random_text_documents(60)
    for i, d in enumerate(docs[:40]):
        (root / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
    (root / "sub").mkdir()
    with open(root / "sub" / "a.jsonl", "w", encoding="utf-8") as f:
        for d in docs[40:50]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    with gzip.open(root / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs[50:]:
            f.write(json.dumps({"text": d}) + "\n")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


@pytest.fixture(scope="module")
def tokenizer_model(text_corpus, tmp_path_factory) -> Path:
    tok = train_tokenizer(iter_documents(text_corpus), tmp_path_factory.mktemp("tok") / "t", 320)
    return tok.model_path


@pytest.fixture(scope="module")
def prepared(text_corpus, tokenizer_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare_corpus([text_corpus], out, tokenizer_model=tokenizer_model, shard_tokens=700,
                   val_fraction=0.1, progress=False)
    return out


def _synthetic_corpus(out: Path, doc_lengths, shard_tokens: int, vocab_size: int = 60000) -> dict:
    """Shards whose token ids are unique stream positions (EOS aside), so every window is
    identifiable: token i of the stream is 2 + i unless it is an EOS."""
    docs, nxt = [], 2
    for n in doc_lengths:
        docs.append(np.arange(nxt, nxt + n) % vocab_size)
        nxt += n + 1  # the EOS takes a position too
    return write_token_corpus(out, docs, vocab_size=vocab_size, eos_id=EOS,
                              shard_tokens=shard_tokens, val_fraction=0.0,
                              tokenizer_sha256="0" * 64, settings={})


def _stream(out: Path, split: str = "train") -> np.ndarray:
    manifest, _ = load_manifest(out)
    return np.concatenate([read_shard(out / s["file"], s["sha256"], np.dtype(manifest["dtype"]),
                                      s["tokens"]) for s in manifest[split]["shards"]])


# -- corpus -------------------------------------------------------------------------------------

def test_iter_documents_reads_text_jsonl_and_gz_in_sorted_order(text_corpus):
    docs = list(iter_documents(text_corpus))
    expected = _random_text_documents(60)
    # sorted paths: doc000..doc039.txt, then sub/a.jsonl, sub/b.jsonl.gz
    assert docs == expected
    assert list(iter_documents(text_corpus / "sub" / "a.jsonl")) == expected[40:50]


def test_iter_documents_rejects_bad_paths_and_records(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"unsupported input file .*x\.bin.*accepted"):
        iter_documents(tmp_path / "x.bin")
    with pytest.raises(ValueError, match=r"nope.* does not exist"):
        iter_documents([tmp_path / "nope"])
    (tmp_path / "r.jsonl").write_text('{"body": "hi"}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl:1: record has no field 'text'"):
        list(iter_documents(tmp_path / "r.jsonl"))
    assert list(iter_documents(tmp_path / "r.jsonl", text_field="body")) == ["hi"]


def test_default_corpus_is_stdlib_without_tests():
    files = default_corpus_files()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "site-packages"} & set(f.parts) for f in files)
    assert any(f.name == "os.py" for f in files)


def test_bounded_documents_cuts_at_max_bytes():
    docs = ["aaaa", "bbbb", "cccc"]
    assert list(bounded_documents(docs, None, 10)) == ["aaaa", "bbbb", "cc"]
    assert list(bounded_documents(docs, 2, None)) == ["aaaa", "bbbb"]
    assert list(bounded_documents(["é" * 5], None, 3)) == ["é"]  # never half a character


# -- tokenizer ----------------------------------------------------------------------------------

def test_tokenizer_round_trip_and_determinism(text_corpus, tokenizer_model, tmp_path):
    tok = Tokenizer(tokenizer_model)
    assert tok.vocab_size == 320 and tok.eos_id == EOS
    text = "def f(x):\n    return x  # ünïcode ∑ 中\n"
    assert tok.decode(tok.encode(text)) == text  # byte fallback: nothing is lost
    assert EOS not in tok.encode("</s>")  # the EOS piece cannot come from text
    again = train_tokenizer(iter_documents(text_corpus), tmp_path / "again", 320)
    assert again.checksum == tok.checksum


# -- prepare ------------------------------------------------------------------------------------

def test_prepare_writes_exact_shards_of_the_token_stream(prepared, text_corpus, tokenizer_model):
    manifest, _ = load_manifest(prepared)
    tok = Tokenizer(prepared / "tokenizer.model")
    assert tok.checksum == manifest["tokenizer_sha256"] == Tokenizer(tokenizer_model).checksum
    assert manifest["dtype"] == "uint16" and manifest["eos_id"] == tok.eos_id
    docs = list(iter_documents(text_corpus))
    val = [i for i in range(len(docs)) if is_validation(i, 0.1)]
    assert len(val) == 6 and manifest["val"]["documents"] == 6
    for split, idx in (("train", [i for i in range(len(docs)) if i not in val]), ("val", val)):
        expected = np.concatenate([tok.encode(docs[i]) + [tok.eos_id] for i in idx])
        shards = manifest[split]["shards"]
        assert [s["tokens"] for s in shards[:-1]] == [700] * (len(shards) - 1)
        assert 0 < shards[-1]["tokens"] <= 700
        stream = _stream(prepared, split)
        assert stream.dtype == np.uint16
        np.testing.assert_array_equal(stream, expected)
        assert manifest[split]["tokens"] == len(expected)
        for s, prev_end in zip(shards, [None] + list(np.cumsum([s["tokens"] for s in shards]))):
            assert s["starts_document"] == (prev_end is None or stream[prev_end - 1] == tok.eos_id)
    assert len(manifest["train"]["shards"]) >= 3 and len(manifest["val"]["shards"]) >= 1
    assert manifest["total_tokens"] == manifest["train"]["tokens"] + manifest["val"]["tokens"]


def test_prepare_rerun_returns_existing_manifest(prepared, text_corpus, tokenizer_model, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    manifest = prepare_corpus([text_corpus], prepared, tokenizer_model=tokenizer_model,
                              shard_tokens=700, val_fraction=0.1, progress=False)
    assert "nothing to do" in capsys.readouterr().out
    assert manifest == load_manifest(prepared)[0]
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == before
    with pytest.raises(ValueError, match=r"other settings \(shard_tokens differ\).*--overwrite"):
        prepare_corpus([text_corpus], prepared, tokenizer_model=tokenizer_model,
                       shard_tokens=800, val_fraction=0.1, progress=False)


def test_partial_prepare_is_cleaned_and_redone(prepared, text_corpus, tokenizer_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"junk from a killed run")
    (out / "train-000007.tar.tmp").write_bytes(b"half a shard")
    (out / "notes.txt").write_text("not ours")
    manifest = prepare_corpus([text_corpus], out, tokenizer_model=tokenizer_model,
                              shard_tokens=700, val_fraction=0.1, progress=False)
    reference, _ = load_manifest(prepared)
    assert manifest["train"] == reference["train"] and manifest["val"] == reference["val"]
    assert not (out / "train-000007.tar.tmp").exists() and (out / "notes.txt").exists()
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_prepare_with_two_workers_gives_the_same_shards(prepared, text_corpus, tokenizer_model,
                                                        tmp_path):
    manifest = prepare_corpus([text_corpus], tmp_path, tokenizer_model=tokenizer_model,
                              shard_tokens=700, val_fraction=0.1, num_workers=2, progress=False)
    reference, _ = load_manifest(prepared)
    assert manifest["train"] == reference["train"] and manifest["val"] == reference["val"]


def test_prepare_trains_a_tokenizer_and_bounds_the_corpus(text_corpus, tmp_path):
    manifest = prepare_corpus([text_corpus], tmp_path, vocab_size=300, shard_tokens=500,
                              max_documents=20, val_fraction=0.0, progress=False)
    assert manifest["documents"] == 20 and manifest["vocab_size"] == 300
    assert Tokenizer(tmp_path / "tokenizer.model").checksum == manifest["tokenizer_sha256"]
    assert manifest["val"]["shards"] == []


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.prepare_data", "--out", str(tmp_path / "o"),
                           "--input", str(tmp_path / "missing.txt")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare_data: error: ") and "missing.txt" in lines[0]


# -- loader -------------------------------------------------------------------------------------

UNEVEN = [37, 5, 80, 12, 150, 3, 44, 61, 9, 120, 28, 70]  # 12 documents, 619 tokens + 12 EOS


def _epoch(loader: TokenLoader) -> list[dict]:
    return [next(loader) for _ in range(loader.batches_per_epoch)]


def _window_starts(batch: dict) -> list[int]:
    """Stream positions of a batch's windows (in _synthetic_corpus, the token at position p is
    p + 2 unless it is an EOS; two EOS never follow each other)."""
    x = batch["input_ids"]
    return [int(r[0]) - 2 if int(r[0]) != EOS else int(r[1]) - 3 for r in x]


def _check_window(stream: np.ndarray, batch: dict, row: int, start: int) -> None:
    seq_len = batch["input_ids"].shape[1]
    np.testing.assert_array_equal(batch["input_ids"][row].numpy(), stream[start:start + seq_len])
    np.testing.assert_array_equal(batch["labels"][row].numpy(), stream[start + 1:start + seq_len + 1])


def test_one_epoch_covers_every_window_exactly_once_across_ranks(tmp_path):
    # 8 shards of 97 tokens = 12 windows of 8 + 1 tokens each, 4 shards per rank: nothing dropped
    _synthetic_corpus(tmp_path, UNEVEN + [776 - 631 - 1], shard_tokens=97)
    stream = _stream(tmp_path)
    assert len(stream) == 776
    loaders = [TokenLoader(tmp_path, 8, 3, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    assert [ld.batches_per_epoch for ld in loaders] == [16, 16]
    seen = []
    for ld in loaders:
        for batch in _epoch(ld):
            for row, start in enumerate(_window_starts(batch)):
                _check_window(stream, batch, row, start)
                seen.append(start)
    every_window = [k * 97 + w * 8 for k in range(8) for w in range(12)]
    assert sorted(seen) == every_window  # each exactly once, across both ranks
    # shard-level split: a rank's windows come from its own 4 shards only
    rank0 = {s // 97 for b in _epoch(loaders[0]) for s in _window_starts(b)}
    rank1 = {s // 97 for b in _epoch(loaders[1]) for s in _window_starts(b)}
    assert len(rank0) == len(rank1) == 4 and not rank0 & rank1


def test_uneven_shards_never_repeat_a_window(tmp_path):
    manifest = _synthetic_corpus(tmp_path, UNEVEN, shard_tokens=100)  # 7 shards, the last 31
    assert [s["tokens"] for s in manifest["train"]["shards"]] == [100] * 6 + [31]
    stream = _stream(tmp_path)
    loaders = [TokenLoader(tmp_path, 8, 1, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    # a shard of 100 tokens holds (100 - 1) // 8 = 12 windows, the last 3; every rank has at
    # least 3 shards, the worst 3 holding 3 + 12 + 12 windows
    assert [ld.batches_per_epoch for ld in loaders] == [27, 27]
    seen = []
    for ld in loaders:
        for batch in _epoch(ld):
            (start,) = _window_starts(batch)
            _check_window(stream, batch, 0, start)
            offset, shard_len = start % 100, manifest["train"]["shards"][start // 100]["tokens"]
            assert offset % 8 == 0 and offset + 9 <= shard_len  # inside one shard
            seen.append(start)
    assert len(seen) == len(set(seen)) == 54


def test_epochs_reshuffle_and_ranks_stay_in_lockstep(tmp_path):
    _synthetic_corpus(tmp_path, UNEVEN, shard_tokens=64)  # 10 shards over 3 ranks: 4, 3, 3
    loaders = [TokenLoader(tmp_path, 6, 2, dp_rank=r, dp_size=3, seed=1) for r in range(3)]
    n = loaders[0].batches_per_epoch
    assert all(ld.batches_per_epoch == n for ld in loaders) and n > 0
    for ld in loaders:
        e0 = _epoch(ld)
        assert ld.epoch == 1 and ld.batch_in_epoch == 0
        e1 = _epoch(ld)
        assert len(e0) == len(e1) == n
        assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(e0, e1))


def test_shuffle_depends_on_seed_and_epoch(tmp_path):
    _synthetic_corpus(tmp_path / "one", UNEVEN, shard_tokens=10_000)  # a single shard
    orders = {}
    for seed in (0, 1):
        ld = TokenLoader(tmp_path / "one", 8, 1, seed=seed)
        orders[seed] = [[s for b in _epoch(ld) for s in _window_starts(b)] for _ in range(2)]
    assert sorted(orders[0][0]) == sorted(orders[0][1]) == list(range(0, 8 * 78, 8))
    assert orders[0][0] != orders[0][1] and orders[0][0] != orders[1][0]  # windows reshuffled
    again = TokenLoader(tmp_path / "one", 8, 1, seed=0)
    assert [s for b in _epoch(again) for s in _window_starts(b)] == orders[0][0]
    # shards are re-dealt to ranks every epoch
    _synthetic_corpus(tmp_path / "many", UNEVEN, shard_tokens=100)
    ld = TokenLoader(tmp_path / "many", 8, 1, dp_rank=0, dp_size=2, seed=0)
    shard_sets = {frozenset(s // 100 for b in _epoch(ld) for s in _window_starts(b)) for _ in range(6)}
    assert len(shard_sets) > 1


@pytest.mark.parametrize("stop", [0, 5, 17, 29, 40])
def test_resume_is_exact_mid_epoch_and_across_epochs(tmp_path, stop):
    _synthetic_corpus(tmp_path, UNEVEN, shard_tokens=100)
    kw = dict(seq_len=8, batch_size=3, dp_rank=1, dp_size=2, seed=7)
    reference = TokenLoader(tmp_path, **kw)
    assert reference.batches_per_epoch == 9  # so stops 17, 29, 40 lie in epochs 1, 3, 4
    batches = [next(reference) for _ in range(stop + 12)]
    run = TokenLoader(tmp_path, **kw)
    for _ in range(stop):
        next(run)
    state = run.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain data, fits in a checkpoint
    resumed = TokenLoader(tmp_path, **kw)
    resumed.load_state_dict(state)
    assert resumed.epoch == stop // 9
    for expected in batches[stop:]:
        got = next(resumed)
        for key in ("input_ids", "labels", "doc_start"):
            assert torch.equal(got[key], expected[key]), key


def test_doc_start_marks_exactly_the_positions_after_eos(tmp_path):
    # documents end at stream positions 37, 43, 124, 137, 288, 292, 337, 399: shard 4 (from 400)
    # begins a document, so its windows at offset 0 start one
    manifest = _synthetic_corpus(tmp_path, UNEVEN, shard_tokens=100)
    assert [s["starts_document"] for s in manifest["train"]["shards"]] == \
        [True, False, False, False, True, False, False]
    stream = _stream(tmp_path)
    loader = TokenLoader(tmp_path, 8, 4, seed=0)
    marked = 0
    for batch in _epoch(loader):
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        assert batch["doc_start"].dtype == torch.bool
        for row, start in enumerate(_window_starts(batch)):
            _check_window(stream, batch, row, start)
            positions = np.arange(start, start + 8)
            expected = [p == 0 or stream[p - 1] == EOS for p in positions]
            assert batch["doc_start"][row].tolist() == expected
            marked += sum(expected)
    assert marked >= 10


def test_uint32_shards_for_large_vocab(tmp_path):
    manifest = _synthetic_corpus(tmp_path, [70000, 50, 300], shard_tokens=30000, vocab_size=100000)
    assert manifest["dtype"] == "uint32"
    loader = TokenLoader(tmp_path, 16, 4)
    ids = torch.cat([next(loader)["input_ids"].flatten() for _ in range(loader.batches_per_epoch)])
    assert int(ids.max()) > 65535 and int(ids.max()) < 100000
    stream = _stream(tmp_path)
    assert stream.dtype == np.uint32 and int(stream.max()) == 70353
    _synthetic_corpus(tmp_path / "small", [100], shard_tokens=50, vocab_size=65535)
    assert load_manifest(tmp_path / "small")[0]["dtype"] == "uint16"


def test_every_rank_gets_the_same_number_of_batches_with_uneven_shards(tmp_path):
    # 3 shards (the last short) over 2 ranks: one rank gets two shards, the other one
    _synthetic_corpus(tmp_path, [250], shard_tokens=100)
    for seed in range(4):
        loaders = [TokenLoader(tmp_path, 10, 2, dp_rank=r, dp_size=2, seed=seed) for r in range(2)]
        assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch == 2  # 5 windows of the worst single shard
        for ld in loaders:
            for _ in range(3 * ld.batches_per_epoch):
                next(ld)
            assert ld.epoch == 3
    with pytest.raises(ValueError, match=r"3 shards, fewer than dp_size 4"):
        TokenLoader(tmp_path, 10, 1, dp_size=4, dp_rank=0)
    with pytest.raises(ValueError, match=r"too small"):
        TokenLoader(tmp_path, 10, 100)


def test_corrupt_shard_names_it(tmp_path):
    _synthetic_corpus(tmp_path, UNEVEN, shard_tokens=100)
    path = tmp_path / "train-000002.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the .npy payload
    path.write_bytes(bytes(data))
    loader = TokenLoader(tmp_path, 8, 4, seed=0)
    with pytest.raises(ShardError, match=r"shard .*train-000002\.tar is corrupt") as info:
        for _ in range(loader.batches_per_epoch):
            next(loader)
    assert "\n" not in str(info.value)
    path.unlink()
    loader = TokenLoader(tmp_path, 8, 4, seed=0)
    with pytest.raises(ShardError, match=r"shard .*train-000002\.tar cannot be read"):
        for _ in range(loader.batches_per_epoch):
            next(loader)


def test_missing_data_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; .*python -m launch\.prepare_data --out") as info:
        TokenLoader(tmp_path / "nowhere", 8, 2)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json.*python -m launch\.prepare_data"):
        TokenLoader(tmp_path, 8, 2)


def test_state_mismatch_is_an_error(tmp_path):
    _synthetic_corpus(tmp_path, UNEVEN, shard_tokens=100)
    state = TokenLoader(tmp_path, 8, 2, dp_size=2).state_dict()
    for kw, key in ((dict(seq_len=6, batch_size=2, dp_size=2), "seq_len"),
                    (dict(seq_len=8, batch_size=3, dp_size=2), "batch_size"),
                    (dict(seq_len=8, batch_size=2, dp_size=1), "dp_size")):
        with pytest.raises(ValueError, match=rf"{key} is .* now, .* in the saved state"):
            TokenLoader(tmp_path, **kw).load_state_dict(state)
    with pytest.raises(ValueError, match=r"manifest\.json changed"):
        TokenLoader(tmp_path, 8, 2, dp_size=2).load_state_dict({**state, "manifest_sha256": "x"})


def test_loader_exposes_tokenizer_facts(prepared):
    loader = TokenLoader(prepared, 16, 2)
    manifest, _ = load_manifest(prepared)
    assert loader.vocab_size == manifest["vocab_size"] == Tokenizer(loader.tokenizer_path).vocab_size
    assert loader.tokenizer_checksum == Tokenizer(loader.tokenizer_path).checksum
    assert loader.eos_id == EOS
    check_tokenizer_matches(manifest, 512)
    check_tokenizer_matches(loader, 320)
    with pytest.raises(ValueError, match=r"model vocab_size 256 is smaller than the tokenizer's vocab_size 320"):
        check_tokenizer_matches(prepared, 256)
    val = TokenLoader(prepared, 16, 2, split="val")
    batch = next(val)
    assert batch["input_ids"].shape == (2, 16)


def test_a_small_corpus_without_validation_documents_says_so_at_prepare_and_at_eval(tmp_path, capsys):
    """Reported: 10 documents at the default val_fraction 0.01 silently gave no val shard, and
    reading it then blamed --val-fraction 0. Now prepare warns with the numbers and the fix, and
    the loader's error says what really happened."""
    from data.windows import ShardWindows

    docs = [np.arange(1, 40, dtype=np.int64) for _ in range(10)]
    write_token_corpus(tmp_path, docs, vocab_size=1000, eos_id=EOS, shard_tokens=1000,
                       val_fraction=0.01, tokenizer_sha256="0" * 64,
                       settings={"val_fraction": 0.01})
    out = capsys.readouterr().out
    assert "warning: no validation split: 10 documents at val_fraction 0.01 give none" in out
    assert "--val-fraction >= 0.05" in out
    with pytest.raises(ValueError, match=r"its 10 documents at --val-fraction 0.01 put none in it"):
        ShardWindows(tmp_path, seq_len=8, batch_size=1, split="val")


def test_a_shard_is_hashed_once_per_process_and_again_when_its_file_changes(tmp_path, monkeypatch):
    import os

    from data import shards as shards_mod

    manifest = _synthetic_corpus(tmp_path, [50, 70, 30], shard_tokens=64)
    entry = manifest["train"]["shards"][0]
    path, dtype = tmp_path / entry["file"], np.dtype(manifest["dtype"])
    hashed = []
    real = shards_mod.bytes_sha256
    monkeypatch.setattr(shards_mod, "bytes_sha256", lambda data: hashed.append(1) or real(data))
    verified = {}
    first = read_shard(path, entry["sha256"], dtype, entry["tokens"], verified=verified)
    again = read_shard(path, entry["sha256"], dtype, entry["tokens"], verified=verified)
    np.testing.assert_array_equal(first, again)
    assert len(hashed) == 1
    data = bytearray(path.read_bytes())
    data[-700] ^= 0xFF  # a flipped byte inside the .npy payload, written anew (new mtime)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1))
    with pytest.raises(ShardError, match="corrupt"):
        read_shard(path, entry["sha256"], dtype, entry["tokens"], verified=verified)
    assert len(hashed) == 2
