"""User errors become one line on stderr and a non-zero exit; our bugs keep their traceback."""
from __future__ import annotations

import sys

from data.shards import ShardError
from pretrain.config import ConfigError

USER_ERROR_EXIT_CODE = 2


def run_cli(main, name: str) -> int:
    try:
        return main()
    except (ConfigError, ShardError, FileNotFoundError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
