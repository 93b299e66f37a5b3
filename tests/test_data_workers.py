"""data/: worker processes, mixing by weights, the bad-shard policy, and validation in the trainer."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from data.loader import TokenLoader
from data.mixing import block_quota, parse_mix
from data.prepare import write_token_corpus
from data.shards import ShardError, load_manifest, read_shard

REPO = Path(__file__).resolve().parents[1]
EOS = 1
UNEVEN = [37, 5, 80, 12, 150, 3, 44, 61, 9, 120, 28, 70]  # 12 documents, 619 tokens + 12 EOS
B_OFFSET = 30000  # dataset B's token ids start here, so a window names its dataset


def _synthetic_corpus(out: Path, doc_lengths, shard_tokens: int, offset: int = 0,
                      tokenizer_sha256: str = "0" * 64) -> dict:
    """Token i of the stream is offset + 2 + i unless it is an EOS (never two EOS in a row)."""
    docs, nxt = [], 2 + offset
    for n in doc_lengths:
        docs.append(np.arange(nxt, nxt + n))
        nxt += n + 1
    return write_token_corpus(out, docs, vocab_size=60000, eos_id=EOS, shard_tokens=shard_tokens,
                              val_fraction=0.0, tokenizer_sha256=tokenizer_sha256, settings={})


def _stream(out: Path) -> np.ndarray:
    manifest, _ = load_manifest(out)
    return np.concatenate([read_shard(out / s["file"], s["sha256"], np.dtype(manifest["dtype"]), s["tokens"])
                           for s in manifest["train"]["shards"]])


def _starts(batch: dict) -> list[int]:
    """Stream token ids of each window's first position (offset + 2 + position)."""
    return [int(r[0]) if int(r[0]) != EOS else int(r[1]) - 1 for r in batch["input_ids"]]


def _take(loader: TokenLoader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def _assert_same(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        for key in ("input_ids", "labels", "doc_start"):
            assert torch.equal(a[key], b[key]), (i, key)


@pytest.fixture
def corpus(tmp_path) -> Path:
    # 8 shards of 97 tokens = 12 windows of 8 + 1 tokens each: 4 shards per rank at dp=2
    _synthetic_corpus(tmp_path / "a", UNEVEN + [776 - 631 - 1], shard_tokens=97)
    return tmp_path / "a"


# -- workers ------------------------------------------------------------------------------------

def test_two_ranks_by_two_workers_cover_an_epoch_exactly_once(corpus):
    stream = _stream(corpus)
    seen = []
    for rank in range(2):
        kw = dict(seq_len=8, batch_size=3, dp_rank=rank, dp_size=2, seed=3)
        workers = TokenLoader(corpus, num_workers=2, **kw)
        in_process = TokenLoader(corpus, **kw)
        assert workers.batches_per_epoch == 16
        batches = _take(workers, 16)
        _assert_same(batches, _take(in_process, 16))  # the same sequence as num_workers=0
        for batch in batches:
            for row, first in enumerate(_starts(batch)):
                pos = first - 2
                np.testing.assert_array_equal(batch["input_ids"][row].numpy(), stream[pos:pos + 8])
                np.testing.assert_array_equal(batch["labels"][row].numpy(), stream[pos + 1:pos + 9])
                seen.append(pos)
        assert workers.epoch == 1 and workers.batch_in_epoch == 0
        workers.close()
    assert sorted(seen) == [k * 97 + w * 8 for k in range(8) for w in range(12)]


@pytest.mark.parametrize("workers_before,workers_after", [(2, 2), (2, 0), (0, 3), (3, 1)])
def test_resume_mid_epoch_with_any_worker_count_is_exact(corpus, workers_before, workers_after):
    stop = random.Random(workers_before * 10 + workers_after).randrange(1, 40)  # epochs of 16
    kw = dict(seq_len=8, batch_size=3, dp_rank=1, dp_size=2, seed=5)
    reference = _take(TokenLoader(corpus, **kw), stop + 20)
    run = TokenLoader(corpus, num_workers=workers_before, **kw)
    _take(run, stop)
    state = json.loads(json.dumps(run.state_dict()))
    run.close()
    assert state["position"] == stop and (state["epoch"], state["batch"]) == divmod(stop, 16)
    resumed = TokenLoader(corpus, num_workers=workers_after, **kw)
    resumed.load_state_dict(state)
    _assert_same(_take(resumed, 20), reference[stop:])
    resumed.close()


def test_a_state_without_position_still_resumes(corpus):
    kw = dict(seq_len=8, batch_size=3, dp_size=2, seed=5)
    reference = _take(TokenLoader(corpus, **kw), 25)
    state = TokenLoader(corpus, **kw).state_dict()
    state.pop("position")
    state.update(epoch=1, batch=4)  # as checkpoints written before positions were saved
    old = TokenLoader(corpus, **kw)
    old.load_state_dict(state)
    assert old.position == 20
    _assert_same(_take(old, 5), reference[20:])


# -- mixing -------------------------------------------------------------------------------------

@pytest.fixture
def two_corpora(tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    _synthetic_corpus(a, UNEVEN * 3, shard_tokens=200)           # 1893 tokens
    _synthetic_corpus(b, UNEVEN, shard_tokens=160, offset=B_OFFSET)  # 631 tokens
    return a, b


def test_parse_mix_and_block_quota():
    assert parse_mix(["x:0.7", ("y", 0.1), {"path": "s3://z:1", "weight": 0.2}]) == \
        [("x", pytest.approx(0.7)), ("y", pytest.approx(0.1)), ("s3://z:1", pytest.approx(0.2))]
    assert parse_mix(["x:3", "y:1"]) == [("x", 0.75), ("y", 0.25)]
    for bad, msg in ((["x"], r"must look like path:weight"), (["x:-1"], "positive"),
                     (["x:abc"], "not a number"), ([], "non-empty")):
        with pytest.raises(ValueError, match=msg):
            parse_mix(bad)
    assert block_quota([0.7, 0.3]).tolist() == [2867, 1229]  # 2867.2, 1228.8: largest remainder
    assert block_quota([0.5, 0.25, 0.25], 10).tolist() == [5, 3, 2]
    with pytest.raises(ValueError, match=r"below 1/4096"):
        block_quota([0.9999, 0.0001])


def test_mix_realises_the_weights_and_each_dataset_keeps_its_epochs(two_corpora):
    a, b = two_corpora
    loader = TokenLoader([f"{a}:0.7", f"{b}:0.3"], 8, 8, seed=2)
    assert loader.batches_per_epoch is None and loader.epoch is None
    starts = [s for batch in _take(loader, 512) for s in _starts(batch)]  # one block of 4096 windows
    from_b = [s >= B_OFFSET for s in starts]
    assert sum(from_b) == 1229  # exactly the block's quota
    assert abs(np.mean(from_b[:800]) - 0.3) < 0.05  # and close to it over any stretch
    # each dataset's own stream: its windows follow its epochs (every window once per epoch)
    b_windows = [s - B_OFFSET - 2 for s in starts if s >= B_OFFSET]
    # b: shards of 160, 160, 160, 151 tokens hold 19 + 19 + 19 + 18 = 75 windows; an epoch is
    # the whole batches of them, 72
    wpe_b = 72
    for e in range(len(b_windows) // wpe_b):
        epoch = b_windows[e * wpe_b:(e + 1) * wpe_b]
        assert len(set(epoch)) == wpe_b
        assert all(p % 160 % 8 == 0 for p in epoch)


def test_mix_resume_is_exact_with_workers_and_ranks_stay_in_step(two_corpora):
    a, b = two_corpora
    mix = [(str(a), 0.6), (str(b), 0.4)]
    kw = dict(seq_len=8, batch_size=4, dp_rank=1, dp_size=2, seed=9)
    reference = _take(TokenLoader(mix, **kw), 60)
    run = TokenLoader(mix, num_workers=2, **kw)
    _take(run, 37)
    state = json.loads(json.dumps(run.state_dict()))
    run.close()
    resumed = TokenLoader(mix, num_workers=1, **kw)
    resumed.load_state_dict(state)
    _assert_same(_take(resumed, 23), reference[37:])
    resumed.close()
    # the two ranks draw the same dataset for every row, from disjoint shards
    other = _take(TokenLoader(mix, **{**kw, "dp_rank": 0}), 60)
    for x, y in zip(reference, other):
        assert [s >= B_OFFSET for s in _starts(x)] == [s >= B_OFFSET for s in _starts(y)]
    with pytest.raises(ValueError, match=r"mix_weights is .* now"):
        TokenLoader([(str(a), 0.5), (str(b), 0.5)], **kw).load_state_dict(state)


def test_mixed_datasets_must_share_the_tokenizer(tmp_path):
    _synthetic_corpus(tmp_path / "a", UNEVEN, shard_tokens=100)
    _synthetic_corpus(tmp_path / "b", UNEVEN, shard_tokens=100, tokenizer_sha256="f" * 64)
    with pytest.raises(ValueError, match=r"data\.mix: .*b was tokenised with tokenizer ffffffffffff, "
                                         r".*a with 000000000000; prepare every mixed dataset with one "
                                         r"tokenizer") as info:
        TokenLoader([f"{tmp_path / 'a'}:1", f"{tmp_path / 'b'}:1"], 8, 2)
    assert "\n" not in str(info.value)


# -- bad shards ---------------------------------------------------------------------------------

def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))


def test_skip_policy_counts_the_shard_and_keeps_ranks_in_step(corpus, capsys):
    _corrupt(corpus / "train-000002.tar")  # stream positions 194 .. 290
    for rank in range(2):
        kw = dict(seq_len=8, batch_size=3, dp_rank=rank, dp_size=2, seed=5, on_bad_shard="skip")
        loaders = [TokenLoader(corpus, **kw), TokenLoader(corpus, num_workers=2, **kw)]
        epochs = [_take(ld, 2 * 16) for ld in loaders]  # seed 5: rank 0 has the shard in epoch 0, rank 1 in 1
        _assert_same(epochs[1], epochs[0])
        starts = [s - 2 for batch in epochs[0] for s in _starts(batch)]
        assert len(starts) == 2 * 16 * 3  # the same number of windows as with a good shard
        assert not [p for p in starts if 194 <= p < 291]
        for ld in loaders:
            assert ld.skipped_shards == 1 and ld.bad_shards == [str(corpus / "train-000002.tar")]
            assert ld.state_dict()["bad_shards"] == ld.bad_shards
            ld.close()
    err = capsys.readouterr().err
    assert err.count(f"data: skipping bad shard {corpus / 'train-000002.tar'}") == 4


def test_error_policy_names_the_shard_from_a_worker(corpus):
    _corrupt(corpus / "train-000005.tar")
    loader = TokenLoader(corpus, 8, 3, dp_size=1, seed=0, num_workers=2)
    with pytest.raises(ShardError, match=r"shard .*train-000005\.tar is corrupt") as info:
        _take(loader, loader.batches_per_epoch)
    assert "\n" not in str(info.value)


def test_skip_policy_with_every_shard_bad_is_an_error(tmp_path):
    _synthetic_corpus(tmp_path, UNEVEN, shard_tokens=400)
    for name in ("train-000000.tar", "train-000001.tar"):
        (tmp_path / name).unlink()
    loader = TokenLoader(tmp_path, 8, 2, on_bad_shard="skip")
    with pytest.raises(ShardError, match=r"every shard of split 'train' .* is bad"):
        next(loader)


def test_val_split_deals_windows_when_ranks_outnumber_shards(tmp_path):
    docs = [np.arange(2, 2 + n) for n in UNEVEN]
    write_token_corpus(tmp_path, docs, vocab_size=60000, eos_id=EOS, shard_tokens=10_000,
                       val_fraction=0.25, tokenizer_sha256="0" * 64, settings={})
    manifest, _ = load_manifest(tmp_path)
    assert len(manifest["val"]["shards"]) == 1
    val = [TokenLoader(tmp_path, 8, 2, split="val", dp_rank=r, dp_size=2) for r in range(2)]
    windows = (manifest["val"]["tokens"] - 1) // 8
    assert val[0].batches_per_epoch == val[1].batches_per_epoch == windows // 2 // 2
    rows = [tuple(r.tolist()) for ld in val for b in _take(ld, ld.batches_per_epoch) for r in b["input_ids"]]
    assert len(rows) == len(set(rows)) == 4 * (windows // 4)


# -- validation in the trainer ------------------------------------------------------------------

@pytest.mark.slow
def test_trainer_logs_val_loss_every_eval_every_steps_with_workers(tmp_path):
    from tests.test_end_to_end import TINY, run

    data = tmp_path / "corpus"
    run(["-m", "launch.prepare_data", "--out", str(data), "--vocab-size", "512", "--max-bytes", "400000",
         "--shard-tokens", "16384", "--val-fraction", "0.05", "--no-progress"])
    out = run(["-m", "launch.train", *TINY, f"data.path={data}", f"train.run_dir={tmp_path / 'run'}",
               "train.eval_every=2", "train.eval_batches=3", "data.num_workers=2"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    train = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(val) == [2, 4, 6] and sorted(train) == [1, 2, 3, 4, 5, 6]
    assert f"step 2: val_loss {val[2]:.4f}" in out.stdout
    # an untrained model of vocab 512 starts near ln(512) = 6.24; training lowers it
    assert abs(val[2] - math.log(512)) < 1.0 and val[6] < val[2]
    assert abs(val[6] - train[6]) < 1.5


@pytest.mark.parametrize("workers", [2, 3])
def test_blocks_of_batches_from_several_workers_come_back_in_order_and_resume_mid_block(
        corpus, monkeypatch, workers):
    """Workers hand batches back in blocks (data/loader.py); with blocks of 4 batches the stream
    crosses many blocks and workers, and a resume inside a block continues exactly."""
    import data.loader as loader_mod

    kw = dict(seq_len=8, batch_size=3, dp_rank=0, dp_size=1, seed=2)
    monkeypatch.setattr(loader_mod, "BLOCK_TOKENS", 4 * 3 * 9)
    assert loader_mod.block_batches(3, 8) == 4
    reference = _take(TokenLoader(corpus, **kw), 45)
    run = TokenLoader(corpus, num_workers=workers, **kw)
    _assert_same(_take(run, 30), reference[:30])
    state = run.state_dict()
    run.close()
    resumed = TokenLoader(corpus, num_workers=workers, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # position 30: inside a block of 4
    _assert_same(_take(resumed, 15), reference[30:])
    resumed.close()


def test_a_bad_shard_inside_a_block_stops_at_the_same_batch_as_without_workers(corpus, monkeypatch):
    import data.loader as loader_mod

    monkeypatch.setattr(loader_mod, "BLOCK_TOKENS", 5 * 3 * 9)
    _corrupt(corpus / "train-000003.tar")
    reached = []
    for workers in (0, 2):
        loader = TokenLoader(corpus, 8, 3, dp_size=1, seed=0, num_workers=workers)
        with pytest.raises(ShardError, match=r"train-000003\.tar is corrupt"):
            for _ in range(loader.batches_per_epoch):
                next(loader)
        reached.append(loader.position)
        loader.close()
    assert reached[0] == reached[1] > 0
