"""Durable log records of protocol nodes, and their JSON codec.

Each node's durable state is an append-only list of these frozen records.
Nodes are event-sourced: every state change is made by appending a record and
applying it, and ``Node.from_log(records)`` applies the same records to a
fresh node, so rebuilt state equals the state before a crash by construction.

Write-ahead rule for adapters: persist ``node.new_records()`` *before* sending
the outgoing messages returned by the same call.  Then a node never sends a
message its log does not explain (a participant never holds a slot the
coordinator has no record of, which is what makes presumed abort safe).

Participant records: :class:`BookingCreated`, :class:`BookingChanged`,
:class:`Tombstone`, :class:`OwnerCanceled`.  Coordinator records: :class:`TripStarted`,
:class:`TripChanged`.  :func:`may_defer` says which records need not be forced with
their step at all.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import ClassVar

from evsim.protocol.messages import Alternative, StopRequest, decode_tagged, encode_tagged
from evsim.protocol.states import TripEvent


class EventSourced:
    """Log mechanics shared by protocol nodes: every change is a record that is applied,
    appended to ``log`` and queued for the adapter to persist (``new_records``).

    ``log`` is the node's whole history in memory, for in-memory networks and tests. An
    adapter whose durable log lives elsewhere (the live servers' database) calls
    :meth:`forget_log`: a server that runs for weeks then holds its state, not every
    record it ever wrote (which the garbage collector would also walk again and again)."""

    log: list[Record]
    _new: list[Record]
    keep_log: bool = True

    def _init_log(self) -> None:
        self.log = []
        self._new = []

    def forget_log(self) -> None:
        """Keep no copy of the records in memory from now on (``log`` is emptied)."""
        self.keep_log = False
        self.log = []

    def _replay(self, records: typing.Iterable[Record]) -> None:
        keep = self.keep_log
        for rec in records:
            if keep:
                self.log.append(rec)
            self._apply(rec)

    def new_records(self) -> list[Record]:
        """Records appended since the last call; persist them before sending."""
        out, self._new = self._new, []
        return out

    def _emit(self, rec: Record) -> None:
        self._apply(rec)
        if self.keep_log:
            self.log.append(rec)
        self._new.append(rec)

    def _apply(self, rec: Record) -> None:  # pragma: no cover - each node defines it
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Record:
    """Base of all log records."""

    TYPE: ClassVar[str] = ""


@dataclass(frozen=True, slots=True)
class BookingCreated(Record):
    """A participant created a booking in state PENDING (a hold if ``lease_until_min``)."""

    TYPE: ClassVar[str] = "BOOKING_CREATED"
    booking_id: str
    station_id: str
    connector_id: str
    start_min: float
    end_min: float
    grace_min: float
    t_min: float
    trip_id: str = ""
    coordinator: str = ""
    lease_until_min: float | None = None
    priority_start_min: float = 0.0


@dataclass(frozen=True, slots=True)
class BookingChanged(Record):
    """A booking event (a :class:`~evsim.protocol.states.BookingEvent` value)."""

    TYPE: ClassVar[str] = "BOOKING_CHANGED"
    booking_id: str
    event: str
    t_min: float
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Tombstone(Record):
    """An ABORT/CANCEL arrived for a booking id never seen: refuse it forever."""

    TYPE: ClassVar[str] = "TOMBSTONE"
    booking_id: str
    t_min: float
    reason: str = ""


@dataclass(frozen=True, slots=True)
class OwnerCanceled(Record):
    """The station owner is canceling a reserved stop of a trip (logged just before its
    ``BookingChanged(CANCEL)``): the trip's coordinator must be told (``StopCanceled``)."""

    TYPE: ClassVar[str] = "OWNER_CANCELED"
    booking_id: str
    t_min: float
    reason: str = ""


@dataclass(frozen=True, slots=True)
class TripStarted(Record):
    """A coordinator accepted a trip request and is about to send PREPAREs."""

    TYPE: ClassVar[str] = "TRIP_STARTED"
    trip_id: str
    vehicle_id: str
    vehicle_node: str
    stops: tuple[StopRequest, ...]
    t_min: float
    vote_deadline_min: float
    lease_min: float


@dataclass(frozen=True, slots=True)
class TripChanged(Record):
    """A trip event (a :class:`~evsim.protocol.states.TripEvent` value)."""

    TYPE: ClassVar[str] = "TRIP_CHANGED"
    trip_id: str
    event: str
    t_min: float
    reason: str = ""
    failed_stop: int | None = None
    alternatives: tuple[Alternative, ...] = ()
    connectors: tuple[str, ...] = ()


_ALL_ACKED = TripEvent.ALL_ACKED.value


def may_defer(rec: Record) -> bool:
    """May ``rec`` be written after the step that made it, with whatever commit comes next
    (and be lost if the node crashes before that)?  Only a coordinator's ALL_ACKED: nothing
    sent or answered rests on it (a BOOKED answer rests on the decision and on the stops'
    commits, durable before the last COMMIT_ACK came: :func:`~evsim.protocol.messages.
    before_log`), and a coordinator restarted without it asks every stop again and gets the
    same ACKs (:mod:`evsim.protocol.coordinator`, "ALL_ACKED is not forced either").  An
    adapter may thus leave a step whose records are all of this kind queued for its next
    commit, as long as it writes them within a bounded time."""
    return isinstance(rec, TripChanged) and rec.event == _ALL_ACKED


RECORD_TYPES: dict[str, type[Record]] = {
    cls.TYPE: cls
    for cls in (BookingCreated, BookingChanged, Tombstone, OwnerCanceled, TripStarted, TripChanged)
}


def encode_record(rec: Record) -> str:
    """JSON text of a record (one line of a JSON-lines log file)."""
    return encode_tagged(rec)


def decode_record(text: str | bytes) -> Record:
    """Parse a record; raise :class:`~evsim.protocol.states.ProtocolError` if malformed."""
    return typing.cast(Record, decode_tagged(text, RECORD_TYPES, "record"))


def dump_log(records: typing.Iterable[Record]) -> str:
    """Serialise records as JSON lines."""
    return "".join(encode_record(r) + "\n" for r in records)


def load_log(text: str) -> list[Record]:
    """Parse JSON lines written by :func:`dump_log` (blank lines ignored)."""
    return [decode_record(line) for line in text.splitlines() if line.strip()]
