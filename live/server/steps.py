"""One protocol step of a company server, as the group commit queues and writes it.

:class:`Effects` is what a step of :class:`live.server.node.ProtocolHost` produced (trip
results, both nodes' new log records, the messages sent, trace rows), handed to the
post-commit hooks; :class:`QueuedStep` is a step waiting for the next group commit, and
writes its records, trace rows and the caller's own rows in that commit's transaction;
:class:`CommitError` is what every step of a failed commit raises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from evsim.protocol import BookingChanged, BookingEvent, Outgoing, Record, TripResult
from live.storage import Storage

__all__ = ["CommitError", "Effects", "QueuedStep", "node_ids"]


class CommitError(RuntimeError):
    """A step's records could not be committed (the database failed): nothing of the step
    was sent, and the protocol nodes are rebuilt from the log before the next step."""


def node_ids(company: str) -> tuple[str, str, str]:
    """(participant, coordinator, api) node ids of a company."""
    return company, f"{company}.coord", f"{company}.api"


@dataclass(slots=True)
class QueuedStep:
    """One step queued for the next group commit."""

    seq: int
    fx: Effects
    value: Any
    extra: Callable[[Connection, Any, Effects], None] | None
    error: BaseException | None = None

    def write(self, conn: Connection, pid: str, cid: str) -> None:
        Storage.append_records(conn, pid, self.fx.participant_records)
        Storage.append_records(conn, cid, self.fx.coordinator_records)
        if self.fx.trace_rows:
            Storage.add_trace(conn, self.fx.trace_rows)
        if self.extra is not None:
            self.extra(conn, self.value, self.fx)


@dataclass(slots=True)
class Effects:
    """What one protocol step produced, handed to post-commit hooks."""

    now: float
    results: list[TripResult] = field(default_factory=list)
    participant_records: list[Record] = field(default_factory=list)
    coordinator_records: list[Record] = field(default_factory=list)
    sent: list[Outgoing] = field(default_factory=list)
    trace_rows: list[dict[str, Any]] = field(default_factory=list)

    def booking_events(self, event: BookingEvent) -> list[BookingChanged]:
        return [
            r for r in self.participant_records
            if isinstance(r, BookingChanged) and r.event == event.value
        ]
