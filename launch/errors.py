"""User errors become one line on stderr and a non-zero exit; our bugs keep their traceback."""
from __future__ import annotations

import os
import sys

from data.shards import ShardError
from pretrain.config import ConfigError

USER_ERROR_EXIT_CODE = 2


def run_cli(main, name: str) -> int:
    try:
        return main()
    except (ConfigError, ShardError, FileNotFoundError) as exc:
        # Under torchrun every rank meets the same bad config or data (each validates the same
        # input, or rank 0 broadcasts its finding): rank 0 says it once and the other ranks exit
        # with the same code silently. Errors that can be one rank's own (a damaged shard that only
        # it reads, a checkpoint file only it loads) are printed by whichever rank meets them, naming it.
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        shared = isinstance(exc, ConfigError) and not getattr(exc, "rank_specific", False)
        if world == 1 or rank == 0 or not shared:
            where = f" (rank {rank})" if world > 1 and not shared else ""
            print(f"{name}: error{where}: {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
