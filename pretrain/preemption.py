"""SIGTERM / SIGUSR1 (Slurm's warning before the end) -> a flag the training loop reads: save at the
end of the current step and exit 75 to be requeued.

Light on purpose (no torch): launch.train installs the handler before its heavy imports, so a
signal during start-up is a preemption too (exit 75 once start-up is done, nothing written), not a
bare exit 143 that nothing requeues. A second signal ends the process at once, as without a handler.
"""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


def _handle(signum, frame) -> None:
    if _received:  # a second signal: the sender insists (or we are stuck); die as without a handler
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
    _received.append(signum)


def install() -> None:
    """Catch SIGTERM / SIGUSR1 from now on (idempotent; signals already caught are kept)."""
    for sig in SIGNALS:
        if signal.getsignal(sig) is not _handle:
            signal.signal(sig, _handle)


def received() -> bool:
    return bool(_received)
