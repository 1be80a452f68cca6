"""Participant: a company server that owns stations and connectors.

Sans-IO (like h11): no clocks, no sockets.  Feed it messages with
``handle(msg, now_min)``, advance its timers with ``tick(now_min)``, and send
the returned :class:`~evsim.protocol.messages.Outgoing` list; persist
``new_records()`` before sending (write-ahead, see :mod:`evsim.protocol.log`).

What it does
------------
* Single-stop bookings (``book`` / ``BookRequest``): a window
  ``[start_min, end_min)`` on one connector, or on any free connector of a
  station (lowest id first).  Overlapping windows on one connector are never
  both active (PENDING / RESERVED / FULFILLED-charging).
* Charging sessions against a booking (``start_charging`` / ``stop_charging``)
  and no-show expiry: a RESERVED booking whose ``start_min + grace_min`` passed
  without a session becomes NO_SHOW in ``tick`` and frees its connector.
* Trip holds (two-phase commit, see :mod:`evsim.protocol.coordinator`):
  ``Prepare`` places a PENDING hold with a lease and votes; ``Commit`` turns a
  live hold into a reservation (refused with ``CommitFailed`` once the lease
  has run out); ``Abort`` / ``CancelRequest`` release it; ``tick`` releases
  holds whose lease ended and, while a hold waits for its decision, asks the
  coordinator with ``QueryDecision`` every ``retry_min``.
* Walk-ins (``walkin_share``): in every pool of connectors at most
  ``connectors - floor(walkin_share x connectors)`` bookings are active at any
  instant, so that share of the pool stays free for vehicles that turn up
  without a booking; a request that would break it is refused with reason
  ``walkin_reserve`` (alternatives are windows that keep it).  A pool is a
  station, or with ``pools`` (connector -> class, e.g. ``"150DC"``) each class of
  a station's connectors, so a booking of one class never takes the share of
  another.  0 (the default) keeps nothing back.
* Contention between trips (no-wait / wound-wait, nobody ever blocks): a
  ``Prepare`` that conflicts with a *hold* of another trip compares
  ``(priority_start_min, trip_id)``; the lower wins.  If the newcomer wins the
  old hold is wounded (FAILED, reason ``preempted``) and its coordinator gets
  a NO vote; otherwise the newcomer gets NO ``conflict`` with alternatives.
  Reservations (committed) always win.

Every handler is idempotent by booking id: a duplicate or replayed message
changes nothing and is answered from the booking's current state.  An Abort
or Cancel for an unknown booking leaves a tombstone so that a PREPARE
overtaken by its own ABORT can never create an orphan hold.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evsim.protocol.calendar import BookingCalendar
from evsim.protocol.log import (
    BookingChanged,
    BookingCreated,
    EventSourced,
    OwnerCanceled,
    Record,
    Tombstone,
)
from evsim.protocol.messages import (
    Abort,
    AbortAck,
    Alternative,
    BookReply,
    BookRequest,
    CancelReply,
    CancelRequest,
    Commit,
    CommitAck,
    CommitFailed,
    Message,
    Outgoing,
    Prepare,
    QueryDecision,
    StopCanceled,
    Vote,
    msg_id,
)
from evsim.protocol.states import (
    BOOKING_RELEASED,
    BookingEvent,
    BookingState,
    ConnectorStatus,
    ProtocolError,
    booking_next,
)

_PENDING = BookingState.PENDING
_RESERVED = BookingState.RESERVED
_FULFILLED = BookingState.FULFILLED

# refusals of Participant.start_charging that waiting cures: the vehicle is early for its
# window, or the session before it still holds the connector (a driver waits at the
# station for either, up to its patience; the simulation's SimStation.visit_booked)
START_LATER_REASONS = frozenset({"too_early", "connector_busy"})


@dataclass(slots=True)
class _Booking:
    booking_id: str
    station_id: str
    connector_id: str
    start_min: float
    end_min: float
    grace_min: float
    trip_id: str
    coordinator: str
    lease_until_min: float | None
    priority_start_min: float
    created_min: float
    state: BookingState = _PENDING
    charging: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True)
class BookingView:
    """Read-only snapshot of one booking."""

    booking_id: str
    state: BookingState
    station_id: str
    connector_id: str
    start_min: float
    end_min: float
    grace_min: float
    charging: bool
    reason: str
    trip_id: str
    lease_until_min: float | None


class Participant(BookingCalendar, EventSourced):
    """State machine of one station-owning company server."""

    def __init__(
        self,
        node_id: str,
        stations: Mapping[str, Sequence[str]],
        *,
        retry_min: float = 1.0,
        query_after_min: float = 2.0,
        max_lease_min: float = 60.0,
        max_alternatives: int = 3,
        walkin_share: float = 0.0,
        pools: Mapping[str, str] | None = None,
    ) -> None:
        if not 0.0 <= walkin_share < 1.0:
            raise ValueError(f"walkin_share must be in [0, 1), got {walkin_share!r}")
        self.node_id = node_id
        self.stations: dict[str, tuple[str, ...]] = {s: tuple(c) for s, c in stations.items()}
        self._station_of: dict[str, str] = {}
        for sid, cids in self.stations.items():
            for cid in cids:
                if cid in self._station_of:
                    raise ValueError(f"connector {cid!r} listed twice")
                self._station_of[cid] = sid
        unknown = sorted(set(pools or {}) - set(self._station_of))
        if unknown:
            raise ValueError(f"pools name unknown connector(s) {unknown}")
        # walk-in pools: (station, class) per connector, the class "" without ``pools``;
        # per pool, how many bookings may be active at any instant: all its connectors but
        # floor(walkin_share x connectors), which stay free for vehicles that just turn up
        self.walkin_share = walkin_share
        self._pool_of: dict[str, tuple[str, str]] = {
            cid: (sid, (pools or {}).get(cid, "")) for cid, sid in self._station_of.items()
        }
        self._pools: dict[tuple[str, str], tuple[str, ...]] = {}
        for cid, pool in self._pool_of.items():
            self._pools[pool] = (*self._pools.get(pool, ()), cid)
        self._reservable: dict[tuple[str, str], int] = {
            pool: len(c) - math.floor(walkin_share * len(c) + 1e-9)
            for pool, c in self._pools.items()
        }
        self.retry_min = retry_min
        self.query_after_min = query_after_min
        self.max_lease_min = max_lease_min
        self.max_alternatives = max_alternatives
        self._init_log()
        self._bookings: dict[str, _Booking] = {}
        self._tombstones: set[str] = set()
        # per connector, active bookings sorted by start (they never overlap)
        self._starts: dict[str, list[float]] = {c: [] for c in self._station_of}
        self._ids: dict[str, list[str]] = {c: [] for c in self._station_of}
        self._timers: list[tuple[float, str]] = []  # (due_min, booking_id), lazy
        self._query_at: dict[str, float] = {}  # open holds -> next QueryDecision
        # owner-canceled trip stops -> next StopCanceled to their coordinator (until it
        # answers with a CancelRequest / Abort; rebuilt from OwnerCanceled after a restart)
        self._notice_at: dict[str, float] = {}
        self._handlers: dict[type, Any] = {
            Prepare: self._on_prepare,
            Commit: self._on_commit,
            Abort: self._on_abort,
            CancelRequest: self._on_cancel,
            BookRequest: self._on_book,
        }

    # ------------------------------------------------------------------ log

    @classmethod
    def from_log(
        cls,
        node_id: str,
        stations: Mapping[str, Sequence[str]],
        records: Iterable[Record],
        **config: Any,
    ) -> Participant:
        """Rebuild a participant from its persisted records (after a crash)."""
        node = cls(node_id, stations, **config)
        node._replay(records)
        return node

    def _apply(self, rec: Record) -> None:
        if isinstance(rec, BookingChanged):
            b = self._bookings[rec.booking_id]
            event = BookingEvent(rec.event)
            new = booking_next(b.state, event)
            if event is BookingEvent.START:
                b.charging = True
            elif event is BookingEvent.STOP:
                b.charging = False
                self._unindex(b)
            b.state = new
            if rec.reason:
                b.reason = rec.reason
            if new is _RESERVED:
                heapq.heappush(self._timers, (b.start_min + b.grace_min, b.booking_id))
            if new is not _PENDING:
                self._query_at.pop(b.booking_id, None)
            if new in BOOKING_RELEASED:
                self._unindex(b)
        elif isinstance(rec, BookingCreated):
            if rec.booking_id in self._bookings:
                raise ProtocolError(f"record: booking {rec.booking_id!r} created twice")
            b = _Booking(
                rec.booking_id,
                rec.station_id,
                rec.connector_id,
                rec.start_min,
                rec.end_min,
                rec.grace_min,
                rec.trip_id,
                rec.coordinator,
                rec.lease_until_min,
                rec.priority_start_min,
                rec.t_min,
            )
            self._bookings[b.booking_id] = b
            if b.connector_id in self._starts:
                self._index(b)
            if b.lease_until_min is not None:
                heapq.heappush(self._timers, (b.lease_until_min, b.booking_id))
            if b.coordinator:
                self._query_at[b.booking_id] = rec.t_min + self.query_after_min
        elif isinstance(rec, Tombstone):
            self._tombstones.add(rec.booking_id)
        elif isinstance(rec, OwnerCanceled):
            owned = self._bookings.get(rec.booking_id)
            if owned is not None and owned.coordinator:
                self._notice_at[rec.booking_id] = rec.t_min
        else:
            raise ProtocolError(f"record: participant cannot apply {type(rec).__name__}")

    def _change(self, b: _Booking, event: BookingEvent, now_min: float, reason: str = "") -> None:
        booking_next(b.state, event)  # validate before logging
        self._emit(BookingChanged(b.booking_id, event.value, now_min, reason))

    # ------------------------------------------------------------------ requests

    def _check_request(
        self,
        station_id: str,
        connector_id: str | None,
        start_min: float,
        end_min: float,
        grace_min: float,
        connector_ids: tuple[str, ...] = (),
    ) -> str:
        if station_id not in self.stations:
            return "unknown_station"
        if connector_id is not None and self._station_of.get(connector_id) != station_id:
            return "unknown_connector"
        if any(self._station_of.get(c) != station_id for c in connector_ids):
            return "unknown_connector"
        if not end_min > start_min or grace_min < 0:
            return "invalid_window"
        return ""

    # ------------------------------------------------------------------ messages

    def handle(self, msg: Message, now_min: float) -> list[Outgoing]:
        """Process one incoming message; return the messages to send."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            return []  # not for a participant: ignore (never crash on network input)
        return handler(msg, now_min)

    def _vote(self, b: _Booking, m: Prepare | None = None) -> Vote:
        bid = b.booking_id
        if b.state in (_PENDING, _RESERVED, _FULFILLED):
            return Vote(
                msg_id(self.node_id, "VOTE", bid + ":yes"),
                self.node_id,
                b.trip_id,
                bid,
                True,
                "",
                b.connector_id,
                b.lease_until_min,
            )
        alts: tuple[Alternative, ...] = ()
        if m is not None and b.state is BookingState.REJECTED:
            alts = self._alternatives(
                m.station_id, m.connector_id, m.start_min, m.end_min, m.connector_ids
            )
        return Vote(
            msg_id(self.node_id, "VOTE", bid + ":no"),
            self.node_id,
            b.trip_id,
            bid,
            False,
            b.reason or b.state.value.lower(),
            "",
            None,
            alts,
        )

    def _on_prepare(self, m: Prepare, now_min: float) -> list[Outgoing]:
        b = self._bookings.get(m.booking_id)
        if b is None:
            if m.booking_id in self._tombstones:
                vote = Vote(
                    msg_id(self.node_id, "VOTE", m.booking_id + ":no"),
                    self.node_id,
                    m.trip_id,
                    m.booking_id,
                    False,
                    "aborted",
                )
                return [Outgoing(m.src, vote)]
            return self._prepare_new(m, now_min)
        return [Outgoing(m.src, self._vote(b, m))]

    def _prepare_new(self, m: Prepare, now_min: float) -> list[Outgoing]:
        reason = self._check_request(
            m.station_id, m.connector_id, m.start_min, m.end_min, m.grace_min, m.connector_ids
        )
        if not reason and not 0 < m.lease_min <= self.max_lease_min:
            reason = "lease_too_long"
        out: list[Outgoing] = []
        cid: str | None = None
        if not reason:
            cid, wounded = self._choose(
                m.station_id,
                m.connector_id,
                m.start_min,
                m.end_min,
                (m.priority_start_min, m.trip_id),
                m.connector_ids,
            )
            if cid is None:
                reason = "conflict"
            elif not self._walkins_keep(cid, m.start_min, m.end_min, wounded):
                cid, wounded, reason = None, [], "walkin_reserve"
            for w in wounded:
                self._change(w, BookingEvent.WOUND, now_min, "preempted")
                out.append(Outgoing(w.coordinator, self._vote(w)))
        self._emit(
            BookingCreated(
                m.booking_id,
                m.station_id,
                cid or m.connector_id or "",
                m.start_min,
                m.end_min,
                m.grace_min,
                now_min,
                m.trip_id,
                m.src,
                now_min + m.lease_min if cid else None,
                m.priority_start_min,
            )
        )
        b = self._bookings[m.booking_id]
        if reason:
            self._change(b, BookingEvent.REJECT, now_min, reason)
        out.append(Outgoing(m.src, self._vote(b, m)))
        return out

    def _expire_if_due(self, b: _Booking, now_min: float) -> bool:
        if b.state is _PENDING and b.lease_until_min is not None and now_min >= b.lease_until_min:
            self._change(b, BookingEvent.LEASE_EXPIRE, now_min, "lease_expired")
            return True
        return False

    def _on_commit(self, m: Commit, now_min: float) -> list[Outgoing]:
        bid = m.booking_id
        b = self._bookings.get(bid)
        if b is not None:
            self._expire_if_due(b, now_min)
            if b.state is _PENDING:
                self._change(b, BookingEvent.CONFIRM, now_min)
            if b.state in (_RESERVED, _FULFILLED):
                ack = CommitAck(
                    msg_id(self.node_id, "COMMIT_ACK", bid),
                    self.node_id,
                    m.trip_id,
                    bid,
                    b.connector_id,
                )
                return [Outgoing(m.src, ack)]
            reason = b.reason or b.state.value.lower()
        else:
            reason = "unknown_booking"
        nack = CommitFailed(
            msg_id(self.node_id, "COMMIT_FAILED", bid), self.node_id, m.trip_id, bid, reason
        )
        return [Outgoing(m.src, nack)]

    def _release(self, bid: str, now_min: float, reason: str) -> _Booking | None:
        """Release a hold or cancel a reservation; tombstone unknown ids."""
        b = self._bookings.get(bid)
        if b is None:
            if bid not in self._tombstones:
                self._emit(Tombstone(bid, now_min, reason))
            return None
        self._expire_if_due(b, now_min)
        if b.state is _PENDING:
            self._change(b, BookingEvent.ABORT, now_min, reason)
        elif b.state is _RESERVED:
            self._change(b, BookingEvent.CANCEL, now_min, reason)
        return b

    def _on_abort(self, m: Abort, now_min: float) -> list[Outgoing]:
        self._notice_at.pop(m.booking_id, None)
        self._release(m.booking_id, now_min, m.reason or "aborted")
        ack = AbortAck(
            msg_id(self.node_id, "ABORT_ACK", m.booking_id), self.node_id, m.trip_id, m.booking_id
        )
        return [Outgoing(m.src, ack)]

    def _on_cancel(self, m: CancelRequest, now_min: float) -> list[Outgoing]:
        self._notice_at.pop(m.booking_id, None)  # the coordinator knows
        b = self._release(m.booking_id, now_min, m.reason or "canceled")
        state = b.state.value if b is not None else "UNKNOWN"
        reply = CancelReply(
            msg_id(self.node_id, "CANCEL_REPLY", m.booking_id),
            self.node_id,
            m.booking_id,
            m.trip_id,
            state,
        )
        return [Outgoing(m.src, reply)]

    def _on_book(self, m: BookRequest, now_min: float) -> list[Outgoing]:
        reply = self.book(
            m.booking_id,
            m.station_id,
            m.start_min,
            m.end_min,
            now_min,
            connector_id=m.connector_id,
            grace_min=m.grace_min,
            _src=m.src,
        )
        return [Outgoing(m.src, reply)]

    # ------------------------------------------------------------------ timers

    def tick(self, now_min: float) -> list[Outgoing]:
        """Expire leases and no-shows due by ``now_min``; query pending decisions."""
        out: list[Outgoing] = []
        timers = self._timers
        while timers and timers[0][0] <= now_min:
            _, bid = heapq.heappop(timers)
            b = self._bookings[bid]
            if self._expire_if_due(b, now_min):
                if b.coordinator:
                    out.append(Outgoing(b.coordinator, self._vote(b)))
            elif b.state is _RESERVED and b.start_min + b.grace_min <= now_min:
                self._change(b, BookingEvent.NO_SHOW_EXPIRE, now_min, "no_show")
        if self._query_at:
            for bid, due in self._query_at.items():
                if due <= now_min:
                    b = self._bookings[bid]
                    q = QueryDecision(
                        msg_id(self.node_id, "QUERY_DECISION", bid), self.node_id, b.trip_id, bid
                    )
                    out.append(Outgoing(b.coordinator, q))
                    self._query_at[bid] = now_min + self.retry_min
        if self._notice_at:
            for bid, due in self._notice_at.items():
                if due <= now_min:
                    b = self._bookings[bid]
                    n = StopCanceled(msg_id(self.node_id, "STOP_CANCELED", bid), self.node_id,
                                     b.trip_id, bid, b.reason)
                    out.append(Outgoing(b.coordinator, n))
                    self._notice_at[bid] = now_min + self.retry_min
        return out

    def next_timer_min(self) -> float | None:
        """Earliest time at which ``tick`` has something to do (None if nothing)."""
        cands = [t for t in self._query_at.values()] + list(self._notice_at.values())
        if self._timers:
            cands.append(self._timers[0][0])
        return min(cands) if cands else None

    # ------------------------------------------------------------------ local commands

    def book(
        self,
        booking_id: str,
        station_id: str,
        start_min: float,
        end_min: float,
        now_min: float,
        *,
        connector_id: str | None = None,
        grace_min: float = 10.0,
        connector_ids: tuple[str, ...] = (),
        _src: str = "",
    ) -> BookReply:
        """Book one window directly; idempotent by ``booking_id``.  ``connector_id`` /
        ``connector_ids``: on that connector / on one of those (as in :class:`StopRequest`)."""
        b = self._bookings.get(booking_id)
        if b is None:
            reason = self._check_request(
                station_id, connector_id, start_min, end_min, grace_min, connector_ids
            )
            if booking_id in self._tombstones:
                reason = "canceled"
            cid: str | None = None
            if not reason:
                cid, _ = self._choose(
                    station_id, connector_id, start_min, end_min, None, connector_ids
                )
                if cid is None:
                    reason = "conflict"
                elif not self._walkins_keep(cid, start_min, end_min):
                    cid, reason = None, "walkin_reserve"
            self._emit(
                BookingCreated(
                    booking_id,
                    station_id,
                    cid or connector_id or "",
                    start_min,
                    end_min,
                    grace_min,
                    now_min,
                )
            )
            b = self._bookings[booking_id]
            self._change(
                b, BookingEvent.REJECT if reason else BookingEvent.CONFIRM, now_min, reason
            )
        alts: tuple[Alternative, ...] = ()
        if b.state is BookingState.REJECTED:
            alts = self._alternatives(station_id, connector_id, start_min, end_min, connector_ids)
        return BookReply(
            msg_id(self.node_id, "BOOK_REPLY", booking_id),
            self.node_id,
            booking_id,
            b.state.value,
            b.connector_id if b.state is not BookingState.REJECTED else "",
            b.reason,
            alts,
        )

    def _get(self, booking_id: str) -> _Booking:
        b = self._bookings.get(booking_id)
        if b is None:
            raise ProtocolError(f"unknown booking {booking_id!r}")
        return b

    def cancel(self, booking_id: str, now_min: float, reason: str = "canceled") -> BookingView:
        """Cancel a reservation or release a hold (no-op on a finished booking).

        The station owner's own decision: a reserved stop of a trip is cancelled and its
        coordinator is told with ``StopCanceled`` (sent by ``tick``, due at once, re-sent
        every ``retry_min`` until the coordinator answers with a CancelRequest)."""
        b = self._get(booking_id)
        self._expire_if_due(b, now_min)
        if b.state is _RESERVED and b.coordinator:
            self._emit(OwnerCanceled(booking_id, now_min, reason))
        b2 = self._release(booking_id, now_min, reason)
        assert b2 is not None
        return self._view(b2)

    def start_charging(self, booking_id: str, now_min: float) -> BookingView:
        """Start a session against a RESERVED booking (FULFILLED, connector CHARGING).

        Refusals leave the booking unchanged and say why in ``reason``:
        ``too_early`` (before ``start_min``), ``connector_busy`` (another
        session still charging), ``not_reserved``; the first two pass with time
        (:data:`START_LATER_REASONS`).  Arriving after ``start_min + grace_min``
        turns the booking into NO_SHOW.
        """
        b = self._get(booking_id)
        if b.state is _FULFILLED and b.charging:
            return self._view(b)
        if b.state is _RESERVED and now_min >= b.start_min + b.grace_min:
            self._change(b, BookingEvent.NO_SHOW_EXPIRE, now_min, "no_show")
        if b.state is not _RESERVED:
            return self._view(b, "not_reserved")
        if now_min < b.start_min:
            return self._view(b, "too_early")
        for other_id in self._ids[b.connector_id]:
            if self._bookings[other_id].charging:
                return self._view(b, "connector_busy")
        self._change(b, BookingEvent.START, now_min)
        return self._view(b)

    def stop_charging(self, booking_id: str, now_min: float) -> BookingView:
        """End the session of a FULFILLED booking and free the connector (idempotent)."""
        b = self._get(booking_id)
        if b.state is not _FULFILLED:
            raise ProtocolError(f"booking {booking_id!r} has no session ({b.state.value})")
        if b.charging:
            self._change(b, BookingEvent.STOP, now_min)
        return self._view(b)

    # ------------------------------------------------------------------ queries

    def _view(self, b: _Booking, reason: str | None = None) -> BookingView:
        return BookingView(
            b.booking_id,
            b.state,
            b.station_id,
            b.connector_id,
            b.start_min,
            b.end_min,
            b.grace_min,
            b.charging,
            b.reason if reason is None else reason,
            b.trip_id,
            b.lease_until_min,
        )

    def booking(self, booking_id: str) -> BookingView | None:
        """The booking's current view, or None if unknown."""
        b = self._bookings.get(booking_id)
        return None if b is None else self._view(b)

    def bookings(self) -> list[BookingView]:
        """All bookings ever created here, in creation order."""
        return [self._view(b) for b in self._bookings.values()]

    def active_bookings(self, connector_id: str) -> list[BookingView]:
        """Bookings occupying the connector (PENDING, RESERVED, charging), by start."""
        return [self._view(self._bookings[i]) for i in self._ids[connector_id]]

    def connector_status(self, connector_id: str, now_min: float) -> ConnectorStatus:
        """CHARGING if a session runs; RESERVED if a reservation covers ``now_min``.

        A reservation covers ``[start_min, max(end_min, start_min + grace_min))``;
        after its no-show expiry (``tick``) it no longer exists, so the connector
        goes back to AVAILABLE.
        """
        if connector_id not in self._ids:
            raise ProtocolError(f"unknown connector {connector_id!r}")
        bs = [self._bookings[i] for i in self._ids[connector_id]]
        if any(b.charging for b in bs):
            return ConnectorStatus.CHARGING
        for b in bs:
            if b.state is _RESERVED and b.start_min <= now_min < max(
                b.end_min, b.start_min + b.grace_min
            ):
                return ConnectorStatus.RESERVED
        return ConnectorStatus.AVAILABLE

    def durable_state(self) -> dict[str, Any]:
        """Everything the log determines, for restart-equality checks."""
        return {
            "bookings": {
                bid: (
                    b.state,
                    b.charging,
                    b.connector_id,
                    b.start_min,
                    b.end_min,
                    b.lease_until_min,
                    b.reason,
                    b.trip_id,
                )
                for bid, b in self._bookings.items()
            },
            "tombstones": frozenset(self._tombstones),
            "index": {c: tuple(ids) for c, ids in self._ids.items()},
        }
