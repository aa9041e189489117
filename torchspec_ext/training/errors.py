"""How a run stops early: a problem with the user's input, or a signal."""

from __future__ import annotations

import contextlib
import signal
import threading


class TrainError(Exception):
    """A problem with the user's input or setup: printed as one message, exit status 2."""


class Interrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's notice) reached the training loop."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.name = signum, signal.Signals(signum).name


class StopSignals:
    """While entered, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, except
    inside ``deferred()`` blocks (an optimiser update, a checkpoint write), which finish first."""

    def __init__(self):
        self._deferring, self._pending, self._previous = False, None, {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self._deferring:
            self._pending = signum
        else:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            if self._pending is not None:
                signum, self._pending = self._pending, None
                raise Interrupted(signum)
