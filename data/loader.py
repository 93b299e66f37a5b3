"""Batches of packed token windows from one prepared corpus or a weighted mix of several, split
over data-parallel ranks, optionally assembled in worker processes, with an exact resume.

Batch g of a rank (g counts from the start of training) holds windows g * batch_size ..
(g + 1) * batch_size - 1 of the rank's window stream (data/windows.py; for a mix, each window's
dataset comes from data/mixing.py). It is a pure function of (manifests, seed, rank, g): that is
the resume, the saved state being only g and what it is valid with.

Workers: with num_workers = W > 0, the batches from `start` on are grouped in blocks of K
consecutive batches (K from the batch size: about 256K tokens a block, at most 64 batches);
worker w of a torch DataLoader assembles blocks w, w + W, ... and the DataLoader hands them back
in round-robin order, which is the block order, and the loader deals out their batches in turn:
the batches are exactly those of num_workers = 0. One hand-off per block rather than per batch
(a shared-memory tensor pair through a queue, ~1.5 ms) keeps short-sequence batches fast. The
state is the position of
the next batch the caller gets (not how far the workers read ahead), so a run resumes exactly
with any number of workers, the same or another. Each worker reads (and caches) the shards it
needs itself. Workers ignore SIGTERM and SIGUSR1: Slurm signals every process of a job step
(`scancel --signal=TERM JOB.0`), and the trainer's handler, not a dying worker, must decide
what happens (save a checkpoint and exit to be requeued).
"""

from __future__ import annotations

import collections
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.mixing import MixSchedule, parse_mix
from data.shards import SPLITS, ShardError, load_manifest
from data.windows import BAD_SHARD_POLICIES, ShardWindows


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


def _mix_seed(seed: int, dataset: int) -> int:
    """Each mixed dataset shuffles with its own seed (two entries of one directory differ too)."""
    return int(np.random.SeedSequence([seed, dataset, 0x6D6978]).generate_state(1)[0])


class BatchAssembler:
    """Batch g of a rank as tensors, plus the bad shards first met while making it. Picklable:
    each worker process holds a copy (and its own shard cache)."""

    def __init__(self, sources: list[ShardWindows], schedule: MixSchedule | None, batch_size: int):
        self.sources, self.schedule, self.batch_size = sources, schedule, batch_size
        self.seq_len, self.eos_id = sources[0].seq_len, sources[0].eos_id
        self._dtype = sources[0].dtype

    def __call__(self, g: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(windows [batch_size, seq_len + 1] int32, doc_start [batch_size, seq_len], new bad
        shards): the compact form, which is what workers send back."""
        B, L = self.batch_size, self.seq_len
        windows = np.empty((B, L + 1), dtype=self._dtype)
        first_is_start = np.empty(B, dtype=bool)
        if self.schedule is None:
            self.sources[0].fill(np.arange(g * B, (g + 1) * B), windows, first_is_start)
        else:
            dataset, local = self.schedule.assign(g * B, B)
            for d in np.unique(dataset):
                rows = np.flatnonzero(dataset == d)
                part, part_start = np.empty((len(rows), L + 1), self._dtype), np.empty(len(rows), bool)
                self.sources[d].fill(local[rows], part, part_start)
                windows[rows], first_is_start[rows] = part, part_start
        doc_start = np.empty((B, L), dtype=bool)
        doc_start[:, 0] = first_is_start
        np.equal(windows[:, :L - 1], self.eos_id, out=doc_start[:, 1:])
        new_bad = [name for s in self.sources for name in s.new_bad_shards]
        for s in self.sources:
            s.new_bad_shards.clear()
        return torch.from_numpy(windows.astype(np.int32)), torch.from_numpy(doc_start), new_bad


def _as_batch(windows: torch.Tensor, doc_start: torch.Tensor, pin_memory: bool) -> dict[str, torch.Tensor]:
    ids = windows.long()
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "doc_start": doc_start}
    if pin_memory and torch.cuda.is_available():
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


PREEMPTION_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}


def _ignore_preemption_signals(worker_id: int) -> None:
    """A worker's first act: leave SIGTERM / SIGUSR1 to the trainer (torch's own SIGTERM handler
    in workers would exit, and the trainer would die of "DataLoader worker killed"). They were
    blocked since the fork (see TokenLoader.__next__), so one sent meanwhile is dropped here too.
    The trainer still stops its workers: through the DataLoader's shutdown, or their watchdog
    when it dies."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)


BLOCK_TOKENS = 1 << 18  # tokens per worker hand-off (data/loader.py docstring)


def block_batches(batch_size: int, seq_len: int) -> int:
    return max(1, min(64, BLOCK_TOKENS // (batch_size * (seq_len + 1))))


class _WorkerBlocks(IterableDataset):
    """In worker w of W: blocks w, w + W, ... of `block` consecutive batches from `start`, each
    one item (windows [k, B, L+1], doc_start [k, B, L], new bad shards per batch, error). A
    ShardError ends the worker's stream with the batches made before it and its one-line message
    in the same item (so the round-robin order of items is kept)."""

    def __init__(self, assemble: BatchAssembler, start: int, block: int):
        self.assemble, self.start, self.block = assemble, start, block

    def __iter__(self):
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        b = w
        while True:
            windows, starts, bad, error = [], [], [], None
            first = self.start + b * self.block
            for g in range(first, first + self.block):
                try:
                    win, ds, new_bad = self.assemble(g)
                except ShardError as e:
                    error = str(e)
                    break
                windows.append(win)
                starts.append(ds)
                bad.append(new_bad)
            yield (torch.stack(windows) if windows else None, torch.stack(starts) if starts else None,
                   bad, error)
            if error is not None:
                return
            b += W


class TokenLoader:
    """An endless iterator of dicts: input_ids, labels (LongTensor [batch_size, seq_len]) and
    doc_start (BoolTensor: input token t begins a document, i.e. the token before it is EOS).

    `data` is a prepared directory (or its http(s) base URL, or a pipe: command template; see
    data/sources.py), or a mix: a list of "path:weight" strings, (path, weight)
    pairs or {"path", "weight"} dicts whose manifests share one tokenizer. split "val" deals
    windows (not shards) to the ranks unless deal says otherwise. num_workers > 0 assembles
    batches in that many processes (same batches) through a torch DataLoader with that
    prefetch_factor; pin_memory pins the batches (when CUDA is there). on_bad_shard: "error" (a ShardError naming the shard) or "skip" (counted in
    `skipped_shards`, one line on stderr each; see data/windows.py)."""

    def __init__(self, data, seq_len: int, batch_size: int, split: str = "train",
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, *, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int = 2, on_bad_shard: str = "error",
                 deal: str | None = None):
        for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                 ("dp_size", dp_size, 1), ("seed", seed, 0),
                                 ("num_workers", num_workers, 0), ("prefetch_factor", prefetch_factor, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} {value!r} must be an integer >= {low}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        if on_bad_shard not in BAD_SHARD_POLICIES:
            raise ValueError(f"on_bad_shard {on_bad_shard!r} is not one of {', '.join(BAD_SHARD_POLICIES)}")
        deal = deal or ("shards" if split == "train" else "windows")
        self.seq_len, self.batch_size, self.split = seq_len, batch_size, split
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        kw = dict(seq_len=seq_len, batch_size=batch_size, split=split, dp_rank=dp_rank,
                  dp_size=dp_size, deal=deal, on_bad_shard=on_bad_shard)
        if isinstance(data, (str, os.PathLike)):
            self.mix = None
            sources = [ShardWindows(data, seed=seed, **kw)]
            schedule = None
        else:
            self.mix = parse_mix(data)
            sources = [ShardWindows(path, seed=_mix_seed(seed, d), **kw)
                       for d, (path, _) in enumerate(self.mix)]
            first = sources[0]
            for s in sources[1:]:
                if s.manifest["tokenizer_sha256"] != first.manifest["tokenizer_sha256"]:
                    raise ValueError(
                        f"data.mix: {s.data_dir} was tokenised with tokenizer "
                        f"{s.manifest['tokenizer_sha256'][:12]}, {first.data_dir} with "
                        f"{first.manifest['tokenizer_sha256'][:12]}; prepare every mixed dataset with "
                        f"one tokenizer (python -m launch.prepare_data --tokenizer "
                        f"{first.source.location(first.manifest['tokenizer'])} ...)")
            schedule = MixSchedule([w for _, w in self.mix], seed)
        self._sources = sources
        self._assemble = BatchAssembler(sources, schedule, batch_size)
        self.data_dir = sources[0].data_dir
        self.manifest = sources[0].manifest
        self.batches_per_epoch = sources[0].windows_per_epoch // batch_size if self.mix is None else None
        self.bad_shards: list[str] = []  # shards skipped so far (on_bad_shard="skip")
        self.position = 0  # the next batch's index g
        self._workers = None
        self._pending: collections.deque = collections.deque()
        self._pending_error: str | None = None

    # -- properties from the manifest --

    @property
    def manifest_sha256(self):
        """Of the manifest; for a mix, the list of each dataset's."""
        shas = [s.manifest_sha256 for s in self._sources]
        return shas[0] if self.mix is None else shas

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.manifest["eos_id"]

    @property
    def tokenizer_path(self) -> Path | str:
        """The tokenizer beside the shards (a URL or a pipe: command for a remote source)."""
        return self._sources[0].source.location(self.manifest["tokenizer"])

    @property
    def tokenizer_checksum(self) -> str:
        return self.manifest["tokenizer_sha256"]

    @property
    def tokens_per_epoch(self) -> int | None:
        """Input tokens this rank yields per epoch (None for a mix: each dataset has its own)."""
        return None if self.mix is not None else self.batches_per_epoch * self.batch_size * self.seq_len

    @property
    def epoch(self) -> int | None:
        return None if self.mix is not None else self.position // self.batches_per_epoch

    @property
    def batch_in_epoch(self) -> int | None:
        return None if self.mix is not None else self.position % self.batches_per_epoch

    @property
    def skipped_shards(self) -> int:
        """How many distinct shards were found bad and skipped (for the logs)."""
        return len(self.bad_shards)

    # -- iteration --

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.num_workers == 0:
            windows, doc_start, new_bad = self._assemble(self.position)
        else:
            if self._workers is None:
                # Workers are forked with the preemption signals blocked, until they ignore them.
                mask = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
                try:
                    block = block_batches(self.batch_size, self.seq_len)
                    self._workers = iter(DataLoader(
                        _WorkerBlocks(self._assemble, self.position, block), batch_size=None,
                        num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                        worker_init_fn=_ignore_preemption_signals))
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if not self._pending and self._pending_error is None:
                windows, doc_start, bads, self._pending_error = next(self._workers)
                if windows is not None:
                    self._pending.extend(zip(windows, doc_start, bads))
            if not self._pending:  # the block ended at a bad shard: raise at that very batch
                error = self._pending_error
                self.close()
                raise ShardError(error)
            windows, doc_start, new_bad = self._pending.popleft()
        for name in new_bad:
            if name not in self.bad_shards:
                self.bad_shards.append(name)
                print(f"data: skipping bad shard {name} (on_bad_shard=skip)", file=sys.stderr, flush=True)
        self.position += 1
        return _as_batch(windows, doc_start, self.pin_memory)

    def seek(self, position: int) -> None:
        """Make batch `position` the next one (restarting workers if any)."""
        self.close()
        self.position = position

    def close(self) -> None:
        """Stop the worker processes (they restart on the next batch)."""
        self._workers = None  # the DataLoader iterator shuts its workers down when dropped
        self._pending.clear()  # batches of the last block not handed out yet
        self._pending_error = None

    # -- resume --

    def state_dict(self) -> dict:
        """Position of the next batch, and what it is only valid with. num_workers is not part
        of it: any number of workers continues the same sequence."""
        state = {"position": self.position, "seed": self.seed, "split": self.split,
                 "dp_rank": self.dp_rank, "dp_size": self.dp_size, "seq_len": self.seq_len,
                 "batch_size": self.batch_size, "manifest_sha256": self.manifest_sha256,
                 "bad_shards": list(self.bad_shards)}
        if self.mix is None:
            state.update(epoch=self.epoch, batch=self.batch_in_epoch)
        else:
            state["mix_weights"] = [w for _, w in self.mix]
        return state

    def load_state_dict(self, state: dict) -> None:
        # dp_rank may differ: all ranks hold the same position, so any rank's state will do.
        keys = ["seq_len", "batch_size", "dp_size", "seed", "split", "manifest_sha256"]
        if self.mix is not None:
            keys.append("mix_weights")
        ours = self.state_dict()
        for key in keys:
            if state.get(key) != ours[key]:
                what = "the data directory's manifest.json changed since" if key == "manifest_sha256" \
                    else f"{key} is {ours[key]!r} now, {state.get(key)!r} in"
                raise ValueError(f"cannot resume the data loader: {what} the saved state")
        if "position" in state:
            position = int(state["position"])
        else:  # a state saved before positions were recorded
            epoch, batch = int(state["epoch"]), int(state["batch"])
            if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
                raise ValueError(f"cannot resume the data loader: position epoch {epoch} batch {batch} "
                                 f"is outside an epoch of {self.batches_per_epoch} batches")
            position = epoch * self.batches_per_epoch + batch
        if position < 0:
            raise ValueError(f"cannot resume the data loader: position {position} is negative")
        self.seek(position)
        self.bad_shards = list(state.get("bad_shards", []))
