"""How a run stops early: a problem with the user's input, or a signal."""

from __future__ import annotations

import contextlib
import os
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
    """While entered, SIGINT and SIGTERM are recorded, and :meth:`check` raises :class:`Interrupted`
    for them in the main thread; inside ``interruptible()`` blocks (pure computation, such as the
    held-out check) they raise at once. A second signal ends the process at once.

    A signal never raises at an arbitrary line: one raised while a thread's lock is held (a queue's,
    a writer's) would leave it held, and the checkpoint write after it would wait forever."""

    def __init__(self):
        self._pending, self._interruptible, self._previous = None, False, {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._pending is not None:
            # os.write, not print: the main thread may be inside a write to stderr
            os.write(2, f"\n[train] second signal ({name}): stopped at once, the last checkpoint stands\n".encode())
            os._exit(128 + signum)
        self._pending = signum
        if self._interruptible:
            raise Interrupted(signum)
        os.write(2, f"\n[train] {name}: stopping after the current step (again to stop at once)\n".encode())

    def check(self) -> None:
        """Raises :class:`Interrupted` if a signal came since entering."""
        if self._pending is not None:
            raise Interrupted(self._pending)

    @contextlib.contextmanager
    def interruptible(self):
        self.check()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False
