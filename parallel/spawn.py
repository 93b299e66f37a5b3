"""Run a function on N local CPU processes joined in a gloo group (tests and CPU benchmarks).

    results = run_gloo(fn, world_size, *args)   # fn(rank, world_size, *args) in every process

Each process gets one torch thread, torch.distributed initialised over TCP on a free localhost
port, and returns fn's (picklable) value; results come back as a list indexed by rank. If any
process raises, the others are terminated and the exception (with the child's traceback) is
raised here. fn must be importable by name (a module-level function).
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, out_dir, timeout_s, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # What torchrun sets, for libraries that read it (DeepSpeed asserts LOCAL_RANK).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_gloo(fn, world_size: int, *args, timeout_s: int = 120) -> list:
    """fn(rank, world_size, *args) on world_size gloo processes; returns [result of rank 0, ...].

    timeout_s bounds every collective and the whole run: a deadlock (ranks disagreeing on
    which collective comes next) fails with TimeoutError instead of hanging.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_entry, args=(fn, world_size, free_port(), out_dir, timeout_s, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=0.5):  # raises if a process failed (the others are killed)
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                raise TimeoutError(f"run_gloo: {getattr(fn, '__name__', fn)} on {world_size} processes "
                                   f"did not finish in {timeout_s}s (a collective mismatch?)")
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results
