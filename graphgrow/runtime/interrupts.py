"""SIGINT and SIGTERM during a run: remembered, agreed on by the ranks of a data-parallel run,
and turned into a checkpoint and :class:`RunInterrupted` at the run's next safe point
(graphgrow.runtime.checkpoint.Checkpointer)."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

#: the signals a run stops at with a checkpoint; when ranks received different ones, the last wins
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def handling_stop_signals(handler: Callable) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``handler`` inside the context (in the main thread, where
    signal handlers live; elsewhere nothing changes); the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        for s in STOP_SIGNALS:
            signal.signal(s, handler)
        yield
    finally:
        for s, restored in previous.items():
            signal.signal(s, restored)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after writing a checkpoint. ``exit_status`` is
    128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports it."""

    def __init__(self, signum: int, checkpoint: Path, command: str):
        self.signum, self.checkpoint, self.command = signum, checkpoint, command
        self.exit_status = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint {checkpoint} written; "
                         f"resume with: {command}")


class InterruptFlag:
    """Remembers a SIGINT/SIGTERM instead of stopping at once, so a run stops at its next safe
    point (after a step or an epoch) with a checkpoint.

    In a data-parallel run (``shared``) the ranks must stop at the same point, though a signal
    reaches them at different moments (or only one of them, under torchrun). Each rank's
    ``vote()`` rides along in the sums over the ranks that every step makes anyway
    (runtime.distributed.DataParallel.sum), and ``settle`` sets the signal all ranks agreed on
    at that sum: ``signum`` is then the agreed signal, the same on every rank at every point."""

    def __init__(self):
        self.received: int | None = None  # the signal this process received
        self.shared = False
        self._agreed: int | None = None

    @property
    def signum(self) -> int | None:
        """The signal the run stops at (None: carry on)."""
        return self._agreed if self.shared else self.received

    def vote(self) -> list[float]:
        """This process's vote: one entry per stop signal, 1 for the one received."""
        return [float(self.received == s) for s in STOP_SIGNALS]

    def settle(self, votes: list[float]) -> None:
        """Agree on the votes summed over the ranks (the first agreement stands)."""
        chosen = [s for s, count in zip(STOP_SIGNALS, votes) if count > 0]
        if chosen and self._agreed is None:
            self._agreed = int(chosen[-1])

    def installed(self):
        """A context in which SIGINT and SIGTERM set this flag (a second SIGINT stops at once)."""
        def remember(signum, frame):
            if self.received is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.received = signum
        return handling_stop_signals(remember)


def resume_command(engine: str, rundir: str | Path, nproc: int = 1) -> str:
    return f"graphgrow {engine} --resume {rundir}" + (f" --nproc {nproc}" if nproc > 1 else "")
