"""A company server's periodic work on a thread of its own: the protocol host's ticker, the
status replica's heartbeat watchdog, the outage handler.

:class:`Periodic` calls a function every ``interval_s`` wall seconds on a daemon thread, and at
once after :meth:`Periodic.wake`, until :meth:`Periodic.stop`. An exception in the function is
logged and the next period comes as usual: one failed round never stops the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

__all__ = ["Periodic"]


class Periodic:
    """``fn()`` every ``interval_s`` wall seconds (and at once after :meth:`wake`) on a daemon
    thread named ``name``, from :meth:`start` until :meth:`stop`."""

    def __init__(self, name: str, interval_s: float, fn: Callable[[], None]) -> None:
        self.name = name
        self.interval_s = interval_s
        self.fn = fn
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (nothing if it runs already)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """Run ``fn`` now instead of at the end of the current period."""
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and wait up to ``timeout_s`` for a round in progress to end."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.fn()
            except Exception:
                log.exception("%s failed", self.name)
