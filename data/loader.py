"""Batches of packed token windows from a prepared corpus, split over data-parallel ranks, with
an exact resume.

A shard of n tokens holds (n - 1) // seq_len windows; window w covers tokens
[w * seq_len, w * seq_len + seq_len + 1): its first seq_len tokens are the inputs, its last
seq_len the labels, so consecutive windows share one token and every token after a shard's first
is a label exactly once. Windows never cross shards; a shard's tail too short for a window is
dropped.

Epoch e, for a rank: shards are permuted with (seed, e) and dealt round-robin to the dp ranks;
the rank reads its shards in that order, each shard's windows permuted with (seed, e, shard).
Every rank yields the same number of batches per epoch, a bound computed from the manifest alone
(so no rank waits on a collective another never reaches); windows past it are skipped that epoch.
Batch b of epoch e is a pure function of (manifest, seed, rank, e, b): that is the resume.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import torch

from data.shards import SPLITS, load_manifest, read_shard

_CACHED_SHARDS = 2  # a batch may span two shards


def check_tokenizer_matches(manifest, vocab_size: int) -> None:
    """The model's embedding must cover every token id: vocab_size >= the tokenizer's.

    `manifest` is a manifest dict, a TokenLoader, or a prepared data directory."""
    if isinstance(manifest, TokenLoader):
        manifest = manifest.manifest
    elif isinstance(manifest, (str, os.PathLike)):
        manifest, _ = load_manifest(manifest)
    if vocab_size < manifest["vocab_size"]:
        raise ValueError(f"model vocab_size {vocab_size} is smaller than the tokenizer's vocab_size "
                         f"{manifest['vocab_size']}; set the model's vocab_size to at least "
                         f"{manifest['vocab_size']}")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


class TokenLoader:
    """An infinite iterator of dicts: input_ids, labels (LongTensor [batch_size, seq_len]) and
    doc_start (BoolTensor: input token t begins a document, i.e. the token before it is EOS)."""

    def __init__(self, data_dir, seq_len: int, batch_size: int, split: str = "train",
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                 ("dp_size", dp_size, 1), ("seed", seed, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} {value!r} must be an integer >= {low}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        self.data_dir = Path(data_dir)
        self.manifest, self.manifest_sha256 = load_manifest(self.data_dir)
        self.seq_len, self.batch_size, self.split = seq_len, batch_size, split
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self._dtype = np.dtype(self.manifest["dtype"])
        self._shards = self.manifest[split]["shards"]
        self._windows = np.array([max(0, (s["tokens"] - 1) // seq_len) for s in self._shards],
                                 dtype=np.int64)
        self.batches_per_epoch = self._batches_per_epoch()
        self.epoch, self.batch_in_epoch = 0, 0
        self._plan_epoch: int | None = None
        self._window_orders: dict[int, np.ndarray] = {}
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def _batches_per_epoch(self) -> int:
        # Every rank gets at least floor(S / dp) shards, so at least the windows of the
        # floor(S / dp) smallest shards, whatever the epoch's permutation.
        n_shards = len(self._shards)
        per_rank = n_shards // self.dp_size
        batches = int(np.sort(self._windows)[:per_rank].sum()) // self.batch_size
        if batches == 0:
            where = f"split {self.split!r} of {self.data_dir}"
            if per_rank == 0:
                raise ValueError(f"{where} has {n_shards} shards, fewer than dp_size {self.dp_size}; "
                                 f"prepare it with smaller --shard-tokens or use fewer dp ranks")
            raise ValueError(f"{where} is too small: a rank's {per_rank} shards hold fewer than "
                             f"batch_size {self.batch_size} windows of seq_len + 1 = "
                             f"{self.seq_len + 1} tokens")
        return batches

    # -- properties from the manifest --

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.manifest["eos_id"]

    @property
    def tokenizer_path(self) -> Path:
        return self.data_dir / self.manifest["tokenizer"]

    @property
    def tokenizer_checksum(self) -> str:
        return self.manifest["tokenizer_sha256"]

    @property
    def tokens_per_epoch(self) -> int:
        """Input tokens this rank yields per epoch."""
        return self.batches_per_epoch * self.batch_size * self.seq_len

    # -- where a window lives --

    def _plan(self, epoch: int) -> None:
        """This rank's shards for the epoch and the cumulative window counts over them."""
        if self._plan_epoch == epoch:
            return
        order = _rng(self.seed, epoch).permutation(len(self._shards))
        self._my_shards = order[self.dp_rank::self.dp_size]
        self._first_window = np.concatenate([[0], np.cumsum(self._windows[self._my_shards])])
        self._window_orders.clear()
        self._plan_epoch = epoch

    def _window_order(self, epoch: int, shard: int) -> np.ndarray:
        if shard not in self._window_orders:
            if len(self._window_orders) >= 8:  # only the current shard's order is needed
                self._window_orders.clear()
            self._window_orders[shard] = _rng(self.seed, epoch, shard).permutation(
                int(self._windows[shard]))
        return self._window_orders[shard]

    def _shard_tokens(self, shard: int) -> np.ndarray:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        entry = self._shards[shard]
        tokens = read_shard(self.data_dir / entry["file"], entry["sha256"], self._dtype,
                            entry["tokens"])
        self._cache[shard] = tokens
        if len(self._cache) > _CACHED_SHARDS:
            self._cache.popitem(last=False)
        return tokens

    def _batch(self, epoch: int, batch: int) -> dict[str, torch.Tensor]:
        self._plan(epoch)
        L, eos = self.seq_len, self.eos_id
        windows = np.empty((self.batch_size, L + 1), dtype=np.int64)
        doc_start = np.empty((self.batch_size, L), dtype=bool)
        for row, j in enumerate(range(batch * self.batch_size, (batch + 1) * self.batch_size)):
            k = int(np.searchsorted(self._first_window, j, side="right")) - 1
            shard = int(self._my_shards[k])
            start = int(self._window_order(epoch, shard)[j - self._first_window[k]]) * L
            tokens = self._shard_tokens(shard)
            windows[row] = tokens[start:start + L + 1]
            doc_start[row, 0] = (tokens[start - 1] == eos) if start > 0 else \
                self._shards[shard]["starts_document"]
            doc_start[row, 1:] = windows[row, :L - 1] == eos
        windows_t = torch.from_numpy(windows)
        return {"input_ids": windows_t[:, :-1].contiguous(), "labels": windows_t[:, 1:].contiguous(),
                "doc_start": torch.from_numpy(doc_start)}

    # -- iteration and resume --

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        out = self._batch(self.epoch, self.batch_in_epoch)
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        """Position of the next batch, and what it is only valid with."""
        return {"epoch": self.epoch, "batch": self.batch_in_epoch, "seed": self.seed,
                "split": self.split, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "seq_len": self.seq_len, "batch_size": self.batch_size,
                "manifest_sha256": self.manifest_sha256}

    def load_state_dict(self, state: dict) -> None:
        # dp_rank may differ: all ranks hold the same position, so any rank's state will do.
        for key in ("seq_len", "batch_size", "dp_size", "seed", "split", "manifest_sha256"):
            if state.get(key) != getattr(self, key):
                what = "the data directory's manifest.json changed since" if key == "manifest_sha256" \
                    else f"{key} is {getattr(self, key)!r} now, {state.get(key)!r} in"
                raise ValueError(f"cannot resume the data loader: {what} the saved state")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"cannot resume the data loader: position epoch {epoch} batch {batch} "
                             f"is outside an epoch of {self.batches_per_epoch} batches")
        self.epoch, self.batch_in_epoch = epoch, batch
