"""Fault injection for the live network: the hooks a company server runs.

Injection (inside a company server)
-----------------------------------
:class:`FaultInjector` is read from the environment by :class:`live.server.node.ProtocolHost`
(``None`` when neither variable is set: no overhead, nothing changes):

* ``EVSIM_FAULT``: fault specs, comma separated, armed when the server starts;
* ``EVSIM_FAULT_FILE``: a file holding specs, re-read whenever it changes (the launcher's
  ``faults=True`` gives every server one, :meth:`live.launcher.LiveNetwork.arm` writes it),
  so a running server can be armed without a restart.  When a spec fires the injector writes
  ``{file}.fired`` (the spec and the pid), and a crash removes the file first, so the
  restarted server does not crash again.

A spec is ``ACTION_WHEN:POINT:N`` (fire at the N-th match, counted from arming) or
``partition``:

=====================  ======================================================================
``ACTION``             ``crash``: ``os._exit(137)`` -- no cleanup, no flush, no DISCONNECT,
                       exactly a ``kill -9`` as far as SQLite and the broker can tell;
                       ``pause``: ``SIGSTOP`` to itself (a frozen process; ``SIGCONT`` from
                       outside resumes it);
                       ``cut``: from then on drop every protocol message in and out (the
                       company is cut off the bus; its timers keep running) until the file
                       changes.
``WHEN:POINT``         ``after:RECORD[.EVENT]`` -- right after the commit of a transaction
                       holding such a record, before anything of that step is sent (no
                       protocol message, no vehicle notification): ``TRIP_STARTED``,
                       ``TRIP_CHANGED.ALL_YES`` (COMMIT decided), ``TRIP_CHANGED.VOTE_NO``,
                       ``TRIP_CHANGED.ALL_ACKED``, ``BOOKING_CREATED`` (hold placed, vote not
                       sent), ``BOOKING_CHANGED.CONFIRM`` (committed, ACK not sent)...;
                       ``before:MSG`` / ``after:MSG`` -- before publishing / after the broker
                       acknowledged (``flush``) the N-th message of that wire type to another
                       company: ``PREPARE``, ``VOTE``, ``COMMIT``, ``COMMIT_ACK``, ``ABORT``...
=====================  ======================================================================

Messages between a company's own participant and coordinator are delivered in-process and
never match ``before:`` / ``after:`` message points.

The invariant checker and the fault-case matrix that arm these hooks are in
:mod:`live.fault_matrix`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evsim.protocol import Message, Record

__all__ = ["FaultInjector"]

log = logging.getLogger(__name__)

ACTIONS = ("crash", "pause", "cut")


def _default_crash(spec: str) -> None:  # pragma: no cover - the process ends here
    os._exit(137)


def _default_pause(spec: str) -> None:  # pragma: no cover - needs a second process
    os.kill(os.getpid(), signal.SIGSTOP)


@dataclass
class _Spec:
    text: str
    action: str
    when: str  # "after" | "before"
    point: str  # RECORD[.EVENT] or MSG type
    n: int
    seen: int = 0
    fired: bool = False


def parse_specs(text: str) -> tuple[list[_Spec], bool]:
    """(trigger specs, partitioned now) of a spec string; ValueError if malformed."""
    specs: list[_Spec] = []
    partition = False
    for raw in text.replace("\n", ",").split(","):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if s == "partition":
            partition = True
            continue
        parts = s.split(":")
        if len(parts) != 3 or "_" not in parts[0]:
            raise ValueError(f"bad fault spec {s!r} (ACTION_WHEN:POINT:N or 'partition')")
        action, _, when = parts[0].partition("_")
        if action not in ACTIONS or when not in ("after", "before"):
            raise ValueError(f"bad fault spec {s!r}: action {action!r}, when {when!r}")
        n = int(parts[2])
        if n < 1:
            raise ValueError(f"bad fault spec {s!r}: N must be >= 1")
        specs.append(_Spec(s, action, when, parts[1].strip().upper(), n))
    return specs, partition


class FaultInjector:
    """Deterministic faults at protocol steps (see the module docstring).

    ``crash`` / ``pause`` are the actions for the ``crash`` / ``pause`` specs (defaults:
    ``os._exit(137)`` / ``SIGSTOP`` to this process); tests in one process pass callbacks.
    """

    def __init__(
        self,
        specs: str = "",
        path: str | Path | None = None,
        *,
        crash: Callable[[str], None] = _default_crash,
        pause: Callable[[str], None] = _default_pause,
    ) -> None:
        self.path = Path(path) if path else None
        self._crash, self._pause = crash, pause
        self._lock = threading.Lock()
        self._base, self._base_partition = parse_specs(specs)
        self._file_specs: list[_Spec] = []
        self._file_partition = False
        self._cut = False
        self._stamp: tuple[int, int, int] | None = None
        self.fired: list[str] = []
        self._refresh()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FaultInjector | None:
        e = os.environ if env is None else env
        specs, path = e.get("EVSIM_FAULT", ""), e.get("EVSIM_FAULT_FILE", "")
        if not specs and not path:
            return None
        return cls(specs, path or None)

    # ------------------------------------------------------------------ spec file

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return
        self._stamp = stamp
        text = ""
        if stamp is not None:
            with contextlib.suppress(OSError):
                text = self.path.read_text()
        try:
            self._file_specs, self._file_partition = parse_specs(text)
        except ValueError:
            log.exception("fault file %s ignored", self.path)
            self._file_specs, self._file_partition = [], False
        self._cut = False  # any change of the file heals a cut
        log.warning("fault specs now %r (file %s)", text.strip(), self.path)

    def _specs(self) -> list[_Spec]:
        return self._base + self._file_specs

    # ------------------------------------------------------------------ hooks

    def partitioned(self) -> bool:
        """True while protocol traffic in and out must be dropped."""
        with self._lock:
            self._refresh()
            return self._base_partition or self._file_partition or self._cut

    def after_commit(self, records: Sequence[Record]) -> None:
        """Called right after the transaction holding ``records`` committed."""
        names: set[str] = set()
        for r in records:
            names.add(r.TYPE)
            ev = getattr(r, "event", None)
            if ev:
                names.add(f"{r.TYPE}.{ev}")
        self._match("after", names)

    def before_send(self, msg: Message) -> None:
        self._match("before", {msg.TYPE})

    def after_send(self, msg: Message, bus: Any) -> None:
        flush = getattr(bus, "flush", None)
        self._match("after", {msg.TYPE}, before_fire=(lambda: flush(2.0)) if flush else None)

    def _match(self, when: str, names: set[str],
               before_fire: Callable[[], Any] | None = None) -> None:
        todo: list[_Spec] = []
        with self._lock:
            self._refresh()
            for s in self._specs():
                if s.fired or s.when != when or s.point not in names:
                    continue
                s.seen += 1
                if s.seen >= s.n:
                    s.fired = True
                    todo.append(s)
        for s in todo:
            if before_fire is not None:
                with contextlib.suppress(Exception):
                    before_fire()
            self._fire(s)

    def _fire(self, s: _Spec) -> None:
        self.fired.append(s.text)
        msg = f"evsim fault: {s.text} fired in pid {os.getpid()}"
        with contextlib.suppress(Exception):
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
        if self.path is not None:
            with contextlib.suppress(OSError):
                (self.path.parent / (self.path.name + ".fired")).write_text(
                    json.dumps({"spec": s.text, "pid": os.getpid(), "t": time.time()})
                )
        if s.action == "crash":
            if self.path is not None:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self._crash(s.text)
        elif s.action == "pause":
            self._pause(s.text)
        else:  # cut
            with self._lock:
                self._cut = True
