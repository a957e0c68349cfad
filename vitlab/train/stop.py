"""Stopping a run cleanly when a scheduler asks: preemption, a requeue, the end of a job's time.

SLURM, Kubernetes and spot-instance services send SIGTERM some seconds before they kill a job (SLURM's
``--signal=USR1@120`` sends SIGUSR1 earlier). While a run trains, :class:`StopSignals` turns these signals into a
request instead of the end of the process; every process of the run agrees on it at a step boundary (a
max-reduction, so a signal that reached one process stops them all at the same step), ``checkpoints/last.pt`` is
written, one line is logged and :class:`RunStopped` ends the run: exit status :data:`EXIT_STOPPED` (75, ``EX_TEMPFAIL``
of sysexits.h: "try again"), which a job script can tell from a failure (1, 2) and from a kill (137, 143). The same
command with ``--resume auto`` continues the run to the weights of an uninterrupted one.

``VITLAB_STOP_SIGNALS`` (comma-separated names, default ``SIGTERM,SIGUSR1``) chooses the signals.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

from ..errors import InvalidValueError, Stopped

EXIT_STOPPED = 75
DEFAULT_SIGNALS = "SIGTERM,SIGUSR1"


class RunStopped(Stopped):
    """The run stopped on a stop signal at ``step`` with ``last.pt`` written (the line is in the run's log)."""

    exit_status = EXIT_STOPPED

    def __init__(self, message: str, step: int, signal_name: str, shown: bool = True):
        super().__init__(message, shown=shown)
        self.step, self.signal_name = step, signal_name


def stop_signals() -> list[signal.Signals]:
    """The signals that stop a run cleanly (``VITLAB_STOP_SIGNALS``)."""
    text = os.environ.get("VITLAB_STOP_SIGNALS", DEFAULT_SIGNALS)
    chosen = []
    for name in (n.strip().upper() for n in text.split(",") if n.strip()):
        name = name if name.startswith("SIG") else "SIG" + name
        if name in ("SIGKILL", "SIGSTOP") or not hasattr(signal.Signals, name):
            raise InvalidValueError(f"VITLAB_STOP_SIGNALS={text}: {name} is not a signal a process can catch "
                                    "(e.g. SIGTERM,SIGUSR1)")
        chosen.append(signal.Signals[name])
    return chosen


class StopSignals:
    """Between :meth:`install` and :meth:`restore` (or while entered; in the main thread, elsewhere it does
    nothing) the stop signals are recorded instead of ending the process. The loop installs it only while steps
    run: Python runs a handler only between bytecodes, so a process blocked elsewhere (a rendezvous, a collective
    whose peer is gone) must keep the default action to end when torchrun or the scheduler asks."""

    def __init__(self):
        self.signals = stop_signals()
        self.received: int = 0
        self._pid = os.getpid()
        self._previous: dict = {}
        self._pending: tuple | None = None  # (work, flag): the agreement started at the last step boundary

    def _record(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # a forked data-loading worker: its parent ends it; dying here would fail the step being loaded
            return
        self.received = signum

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)

    def restore(self) -> None:
        """The handlers from before :meth:`install` (a no-op when not installed)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self._pending = None  # every process started it: it completes without being read

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def agreed(self) -> int:
        """The stop signal (its number) if a process of the run has received one, else 0. Alone, this process's
        own. Under torchrun it is a collective, so every process must call it at the same step boundaries: each
        call starts a max-reduction of the signals received so far and returns the one started at the boundary
        before, which has had a whole step to complete. Every process reads the same value at the same boundary (a
        signal stops them all at the same step, one step after the one that saw it) and no step waits for it: the
        flag is a CPU tensor reduced over a gloo group, so a CUDA run never waits for its device here."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received
        signum = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            signum = int(flag.item())
        self._pending = None
        if not signum:  # the same on every process: all start the next agreement, or none
            flag = torch.tensor([self.received], dtype=torch.int64)
            self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_host_group(), async_op=True), flag)
        return signum


_HOST_GROUP: tuple = (None, None)  # (the default process group, a gloo group of the same processes)


def _host_group():
    """A gloo group of all the run's processes, for reductions of CPU tensors whatever the default backend (NCCL
    takes only CUDA tensors), apart from the training's collectives; made once per default group, by every process
    at the same point (a collective). A gloo run gets one too, so that CPU runs test the path CUDA runs take."""
    global _HOST_GROUP
    world = dist.group.WORLD
    if _HOST_GROUP[0] is not world:
        _HOST_GROUP = (world, dist.new_group(backend="gloo"))
    return _HOST_GROUP[1]
