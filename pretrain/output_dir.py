"""Output directories of `launch.export` and `launch.convert_checkpoint`: never delete what we
did not write.

`--out DIR` may be absent, an empty directory, or a previous output of the same command that
holds nothing but the files that command writes (recognised by the format marker it writes:
config.json's / manifest.json's "format"). Anything else -- a run dir, a directory with a
user's file in it, a file -- is refused before any work is done, with one line naming what is
there. The output is written into a fresh temporary directory beside DIR and renamed into place
when complete; a previous output of ours is renamed aside first and removed only after that.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from pretrain.config import ConfigError


def check_replaceable(out: str | Path, is_ours: Callable[[Path], bool], what: str) -> Path:
    """`out` resolved, or a ConfigError when it exists and is neither empty nor `what` (a previous
    output of ours, as `is_ours` tells)."""
    out = Path(out).resolve()
    if not out.exists():
        return out
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; pass a new or empty directory")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not is_ours(out):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ConfigError(f"--out {out} is not empty and is not {what} (it holds {shown}); nothing was written: "
                          f"pass a new or empty directory, or {what} to replace")
    return out


@contextlib.contextmanager
def write_replacing(out: Path, is_ours: Callable[[Path], bool], what: str):
    """Yield a new temporary directory beside `out`; when the block succeeds, it becomes `out`
    (re-checking that `out` is still replaceable). On failure the temporary directory -- ours --
    is removed and `out` is untouched."""
    out = check_replaceable(out, is_ours, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    # mkdtemp makes it 0700; the result is shared with the group like any directory we mkdir
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    try:
        yield tmp
        # and so is every file in it (safetensors' save_file creates its file 0600)
        for path in tmp.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        check_replaceable(out, is_ours, what)  # nothing of the user's appeared meanwhile
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)  # an empty dir, or ours: renamed aside, then removed
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
