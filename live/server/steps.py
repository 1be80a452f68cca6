"""One protocol step of a company server, as the group commit queues and writes it.

:class:`Effects` is what a step of :class:`live.server.node.ProtocolHost` produced (trip
results, both nodes' new log records, the messages sent, trace rows), handed to the
post-commit hooks; :class:`QueuedStep` is a step waiting for the next group commit
(:meth:`QueuedStep.write_all` writes a commit's steps: their records, trace rows and the
callers' own rows, one statement per table);
:class:`CommitError` is what every step of a failed commit raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

    @staticmethod
    def write_all(conn: Connection, steps: Sequence[QueuedStep], pid: str, cid: str) -> None:
        """Write ``steps`` (one group commit) in ``conn``'s transaction: one INSERT of many
        rows per table (the participant's records then the coordinator's, the trace rows),
        each in step order, then each step's ``extra`` writes in step order.  A batch of many
        steps costs as many statements as one."""
        Storage.append_records(
            conn,
            (pid, [r for st in steps for r in st.fx.participant_records]),
            (cid, [r for st in steps for r in st.fx.coordinator_records]),
        )
        rows = [row for st in steps for row in st.fx.trace_rows]
        if rows:
            Storage.add_trace(conn, rows)
        for st in steps:
            if st.extra is not None:
                st.extra(conn, st.value, st.fx)


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
