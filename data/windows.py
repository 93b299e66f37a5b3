"""The packed windows of one prepared dataset, as one dp rank sees them: window n of the rank's
endless stream is a pure function of (manifest, seed, rank, n).

A shard of t tokens holds (t - 1) // seq_len windows; window w covers tokens
[w * seq_len, w * seq_len + seq_len + 1): its first seq_len tokens are the inputs, its last
seq_len the labels, so consecutive windows share one token and every token after a shard's first
is a label exactly once. Windows never cross shards; a shard's tail too short for a window is
dropped.

Epoch e: shards are permuted with (seed, e), each shard's windows with (seed, e, shard).
deal="shards" (training): the permuted shards are dealt round-robin to the dp ranks and a rank
reads its own in order. deal="windows" (validation splits, often fewer shards than ranks): every
rank walks all shards in order and takes every dp_size-th window. Every rank gets the same number
of windows per epoch, a bound computed from the manifest alone (so no rank waits on a collective
another never reaches), rounded down to whole batches; windows past it are skipped that epoch.

A shard that is missing or corrupt is a ShardError naming it (on_bad_shard="error"), or
(on_bad_shard="skip") recorded in `bad_shards` and its windows served from the next readable
shard of the rank's epoch order instead: positions do not move, so every rank still yields the
same number of windows and the stream stays a pure function of the position (some windows of
that shard repeat that epoch).
"""

from __future__ import annotations

import collections

import numpy as np

from data.shards import SPLITS, ShardError, empty_split_reason, load_manifest, load_shard
from data.sources import open_source

_CACHED_SHARDS = 2  # a batch may span two shards
BAD_SHARD_POLICIES = ("error", "skip")
DEALS = ("shards", "windows")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


# Local shards hashed by this process (data.shards.read_shard): each is verified once per process
# (a streamed shard is hashed as it streams, every time it is read).
_VERIFIED: dict = {}


class ShardWindows:
    """Windows of one split of one prepared directory (or URL, or pipe: source) for one dp rank."""

    def __init__(self, data_dir, seq_len: int, batch_size: int, split: str = "train",
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, deal: str = "shards",
                 on_bad_shard: str = "error"):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        if deal not in DEALS:
            raise ValueError(f"deal {deal!r} is not one of {', '.join(DEALS)}")
        if on_bad_shard not in BAD_SHARD_POLICIES:
            raise ValueError(f"on_bad_shard {on_bad_shard!r} is not one of {', '.join(BAD_SHARD_POLICIES)}")
        self.source = open_source(data_dir)
        self.data_dir = self.source.root  # a Path, or the URL / pipe: spec as given
        self.manifest, self.manifest_sha256 = load_manifest(self.source)
        self.seq_len, self.split, self.seed = seq_len, split, seed
        self.dp_rank, self.dp_size, self.deal, self.on_bad_shard = dp_rank, dp_size, deal, on_bad_shard
        self.eos_id = self.manifest["eos_id"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self._shards = self.manifest[split]["shards"]
        self._windows = np.array([max(0, (s["tokens"] - 1) // seq_len) for s in self._shards],
                                 dtype=np.int64)
        self.windows_per_epoch = self._windows_per_rank(batch_size) // batch_size * batch_size
        if self.windows_per_epoch == 0:
            where = f"split {split!r} of {self.data_dir}"
            if not self._shards:
                why = empty_split_reason(self.manifest)
                raise ValueError(f"{where} is empty: {why}; prepare the data with a larger --val-fraction "
                                 f"or more text, or do not read it (train.eval_every=0)")
            if deal == "shards" and len(self._shards) < dp_size:
                raise ValueError(f"{where} has {len(self._shards)} shards, fewer than dp_size {dp_size}; "
                                 f"prepare it with smaller --shard-tokens or use fewer dp ranks")
            raise ValueError(f"{where} is too small: a rank's share holds fewer than batch_size "
                             f"{batch_size} windows of seq_len + 1 = {seq_len + 1} tokens")
        self.bad_shards: dict[str, str] = {}  # file -> why, in this process
        self.new_bad_shards: list[str] = []   # found since the caller last took them
        self._plans: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self._window_orders: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def _windows_per_rank(self, batch_size: int) -> int:
        if self.deal == "windows":
            return int(self._windows.sum()) // self.dp_size
        # Every rank gets at least floor(S / dp) shards, so at least the windows of the
        # floor(S / dp) smallest shards, whatever the epoch's permutation.
        return int(np.sort(self._windows)[:len(self._shards) // self.dp_size].sum())

    # -- where a window lives --

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The shards this rank walks in the epoch, and cumulative window counts over them."""
        if epoch not in self._plans:
            order = _rng(self.seed, epoch).permutation(len(self._shards))
            if self.deal == "shards":
                order = order[self.dp_rank::self.dp_size]
            first = np.concatenate([[0], np.cumsum(self._windows[order])])
            self._plans[epoch] = (order, first)
            if len(self._plans) > 2:  # a batch spans at most two epochs
                self._plans.popitem(last=False)
        return self._plans[epoch]

    def _window_order(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._window_orders:
            self._window_orders[key] = _rng(self.seed, epoch, shard).permutation(int(self._windows[shard]))
            if len(self._window_orders) > 8:  # only the current shards' orders are needed
                self._window_orders.popitem(last=False)
        return self._window_orders[key]

    def _tokens(self, shard: int) -> np.ndarray | None:
        """The shard's tokens; None when it is bad and the policy is skip."""
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        entry = self._shards[shard]
        if entry["file"] in self.bad_shards:
            return None
        try:
            tokens = load_shard(self.source, entry, self.dtype, verified=_VERIFIED)
        except ShardError as e:
            if self.on_bad_shard == "error":
                raise
            self.bad_shards[entry["file"]] = str(e)
            self.new_bad_shards.append(str(self.source.location(entry["file"])))
            return None
        self._cache[shard] = tokens
        if len(self._cache) > _CACHED_SHARDS:
            self._cache.popitem(last=False)
        return tokens

    def _locate(self, n: int) -> tuple[np.ndarray, int, int]:
        """(tokens of the shard, shard index, first token) of window n of the rank's stream."""
        epoch, j = divmod(n, self.windows_per_epoch)
        order, first = self._plan(epoch)
        if self.deal == "windows":
            j = j * self.dp_size + self.dp_rank
        k = int(np.searchsorted(first, j, side="right")) - 1
        offset = j - int(first[k])
        for step in range(len(order)):  # the shard, or (skip) the next readable one
            shard = int(order[(k + step) % len(order)])
            if self._windows[shard] == 0:
                continue
            tokens = self._tokens(shard)
            if tokens is not None:
                w = int(self._window_order(epoch, shard)[offset % self._windows[shard]])
                return tokens, shard, w * self.seq_len
        raise ShardError(f"every shard of split {self.split!r} in {self.data_dir} that dp rank "
                         f"{self.dp_rank} reads in epoch {epoch} is bad (e.g. "
                         f"{next(iter(self.bad_shards))}); re-run the preparation")

    def fill(self, local: np.ndarray, windows: np.ndarray, first_is_start: np.ndarray) -> None:
        """Write windows `local` (indices into the rank's stream) into rows of `windows`
        [len(local), seq_len + 1], and whether each window's first token begins a document."""
        L = self.seq_len
        for row, n in enumerate(local):
            tokens, shard, start = self._locate(int(n))
            windows[row] = tokens[start:start + L + 1]
            first_is_start[row] = (tokens[start - 1] == self.eos_id) if start > 0 else \
                self._shards[shard]["starts_document"]
