"""The data position on a dp change.

The token stream is laid out for one dp size and micro-batch size (the loader state records
both): step s's global batch is, for every *data rank* r of that layout in order, the next k
micro-batches of r's stream. After a dp change that layout is kept: each new dp rank reads the
data ranks whose rows it needs and takes its contiguous slice of the global batch. So the run
sees exactly the tokens, step by step, it would have seen at the old size, as long as the new
global batch (dp x grad_accum x micro_batch_size rows) is a multiple of the layout's dp x
micro_batch_size; otherwise resuming is refused with that rule in the message.
"""
from __future__ import annotations

import torch

from data.loader import TokenLoader


class RegroupedLoader:
    """This dp rank's micro-batches of a token stream laid out for another dp size (see above)."""

    def __init__(self, template, state: dict, grad_accum: int):
        data_dp, data_mbs = int(state["dp_size"]), int(state["batch_size"])
        mbs, dp = template.batch_size, template.dp_size
        rows = dp * grad_accum * mbs
        if rows % (data_dp * data_mbs):
            raise ValueError(f"the data were laid out for dp={data_dp} x micro_batch_size={data_mbs}; the global "
                             f"batch of dp={dp} x grad_accum={grad_accum} x micro_batch_size={mbs} = {rows} rows "
                             f"must be a multiple of {data_dp * data_mbs} to continue the same stream")
        self.k = rows // (data_dp * data_mbs)  # micro-batches each data rank contributes per step
        self.grad_accum, self.mbs = grad_accum, mbs
        per_source = self.k * data_mbs
        lo = template.dp_rank * grad_accum * mbs
        first, last = lo // per_source, (lo + grad_accum * mbs - 1) // per_source
        self.offset = lo - first * per_source
        self.sources = []
        data = [(str(path), w) for path, w in template.mix] if template.mix is not None else template.data_dir
        for r in range(first, last + 1):
            src = TokenLoader(data, template.seq_len, data_mbs, template.split, r, data_dp, template.seed,
                              on_bad_shard=template._sources[0].on_bad_shard, num_workers=template.num_workers,
                              pin_memory=template.pin_memory, prefetch_factor=template.prefetch_factor)
            src.load_state_dict(state)
            self.sources.append(src)
        self._queue: list[dict] = []

    def __getattr__(self, name):  # tokenizer_checksum, vocab_size, close(), ... of the stream
        if name == "sources":
            raise AttributeError(name)
        return getattr(self.sources[0], name)

    @property
    def skipped_shards(self) -> int:
        return len({s for src in self.sources for s in src.bad_shards})

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._queue:
            batches = [next(src) for src in self.sources for _ in range(self.k)]
            rows = {key: torch.cat([b[key] for b in batches])[self.offset:self.offset + self.grad_accum * self.mbs]
                    for key in batches[0]}
            self._queue = [{key: v[i * self.mbs:(i + 1) * self.mbs] for key, v in rows.items()}
                           for i in range(self.grad_accum)]
        return self._queue.pop(0)

    def state_dict(self) -> dict:
        """The position in the original layout (all data ranks are at the same one)."""
        return self.sources[0].state_dict()


def resume_loader(loader, state: dict, grad_accum: int):
    """`loader` positioned at `state`, or, when the state's dp size / micro-batch size differ from
    the loader's, a RegroupedLoader continuing the saved layout (raises ValueError when it cannot)."""
    if state.get("dp_size") == loader.dp_size and state.get("batch_size") == loader.batch_size:
        loader.load_state_dict(state)
        return loader
    return RegroupedLoader(loader, state, grad_accum)
