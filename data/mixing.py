"""Several prepared datasets mixed by weights: which dataset each window of a rank's stream comes
from, as a pure function of its position.

The stream is cut into blocks of BLOCK windows. Every block holds exactly quota[d] windows of
dataset d (the weights apportioned to BLOCK by largest remainder), in an order permuted with
(seed, block). So window i of the mix is window `block * quota[d] + (its rank among block's d
windows)` of dataset d's own stream: no history is needed to find it, whatever the position,
rank or worker, and the realised weights are quota / BLOCK (within 1 / BLOCK of those asked).
Every dp rank uses the same schedule, so a step draws the same mixture on every rank.
"""

from __future__ import annotations

import math
import os

import numpy as np

BLOCK = 4096
_TAG = 0x6D6978  # "mix": keeps these permutations apart from the loader's shuffles


def parse_mix(entries) -> list[tuple[str, float]]:
    """[(path, weight)] from "path:weight" strings, (path, weight) pairs or {path, weight} dicts;
    the weights are normalised to sum to 1."""
    if isinstance(entries, (str, os.PathLike)) or not entries:
        raise ValueError(f"data.mix {entries!r} must be a non-empty list of path:weight entries")
    parsed = []
    for entry in entries:
        if isinstance(entry, dict):
            if set(entry) != {"path", "weight"}:
                raise ValueError(f"data.mix entry {entry!r} must have exactly the keys path and weight")
            path, weight = entry["path"], entry["weight"]
        elif isinstance(entry, (tuple, list)) and len(entry) == 2:
            path, weight = entry
        elif isinstance(entry, str) and ":" in entry:
            path, weight = entry.rsplit(":", 1)
        else:
            raise ValueError(f"data.mix entry {entry!r} must look like path:weight, e.g. data/web:0.7")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"data.mix entry {entry!r}: weight {weight!r} is not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"data.mix entry {entry!r}: weight must be positive and finite")
        parsed.append((str(path), weight))
    total = sum(w for _, w in parsed)
    return [(p, w / total) for p, w in parsed]


def block_quota(weights, block: int = BLOCK) -> np.ndarray:
    """Windows of each dataset per block: largest-remainder apportionment of block * weights."""
    share = np.asarray(weights, dtype=np.float64) * block
    quota = np.floor(share).astype(np.int64)
    short = block - int(quota.sum())
    quota[np.argsort(-(share - quota), kind="stable")[:short]] += 1
    if (quota == 0).any():
        d = int(np.argmin(quota))
        raise ValueError(f"data.mix weight {weights[d]:.2g} of entry {d} is below 1/{block}: "
                         f"that dataset would never be drawn; raise it or drop the entry")
    return quota


class MixSchedule:
    """Window i of the mixed stream -> (dataset, window index in that dataset's own stream)."""

    def __init__(self, weights, seed: int, block: int = BLOCK):
        self.weights = [float(w) for w in weights]
        self.seed, self.block = seed, block
        self.quota = block_quota(self.weights, block)
        self._labels = np.repeat(np.arange(len(self.quota)), self.quota)
        self._cached_block: int | None = None

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached_block != b:
            rng = np.random.default_rng([self.seed, _TAG, b])
            dataset = self._labels[rng.permutation(self.block)]
            local = np.empty(self.block, dtype=np.int64)
            for d, q in enumerate(self.quota):
                where = dataset == d
                local[where] = b * q + np.arange(q)
            self._dataset, self._local, self._cached_block = dataset, local, b
        return self._dataset, self._local

    def assign(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, local window index) of mixed windows first .. first + count - 1."""
        datasets, locals_ = [], []
        i, end = first, first + count
        while i < end:
            b, o = divmod(i, self.block)
            n = min(end - i, self.block - o)
            dataset, local = self._block(b)
            datasets.append(dataset[o:o + n])
            locals_.append(local[o:o + n])
            i += n
        return np.concatenate(datasets), np.concatenate(locals_)
