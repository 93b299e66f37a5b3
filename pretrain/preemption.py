"""SIGTERM / SIGUSR1 (Slurm's warning before the end) -> a flag the training loop reads: save at the
end of the current step and exit 75 to be requeued.

Light on purpose (no torch): launch.train installs the handler before its heavy imports, so a
signal during start-up is a preemption too (exit 75 once start-up is done, nothing written), not a
bare exit 143 that nothing requeues. (A trainer stuck in start-up is still ended by the launcher's
SIGKILL: torchrun sends it 30 s after SIGTERM.)
"""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


def _handle(signum, frame) -> None:
    # Every signal only sets the flag: under Slurm + torchrun one preemption reaches a trainer twice
    # (`scancel --signal=TERM JOB.0` signals the whole step, and torchrun forwards its own copy).
    _received.append(signum)


def install() -> None:
    """Catch SIGTERM / SIGUSR1 from now on (idempotent; signals already caught are kept)."""
    for sig in SIGNALS:
        if signal.getsignal(sig) is not _handle:
            signal.signal(sig, _handle)


def received() -> bool:
    return bool(_received)
