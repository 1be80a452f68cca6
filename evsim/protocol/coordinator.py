"""Coordinator: books a multi-stop trip across companies atomically (2PC + leases).

The vehicle's home company server runs the coordinator; the servers owning
the stations are participants (:mod:`evsim.protocol.participant`).  Sans-IO:
``request_trip`` / ``handle`` / ``tick`` return the messages to send, and
``new_records()`` must be persisted before sending them.

Protocol (two-phase commit, presumed abort, leases)
---------------------------------------------------
1. ``request_trip`` logs ``TripStarted`` (time ``t0``, vote deadline
   ``t0 + vote_timeout_min``) and sends ``Prepare(lease_min)`` to every stop.
2. Each participant places a hold whose lease starts when it first receives
   the PREPARE and votes YES, or NO with a reason (and alternatives).
3. All YES and ``now + commit_margin_min <= t0 + lease_min``: log ALL_YES and
   send COMMIT.  Any NO, the vote deadline, or too little lease left: log
   ABORT and send ABORT.  The vehicle is told REJECTED at once: nothing can be
   reserved any more (no COMMIT is ever sent for the trip).
4. Decisions are re-sent every ``retry_min`` until acknowledged; participants
   answer duplicates from their state.  Once every COMMIT_ACK is in, the
   vehicle is told BOOKED (with the chosen connectors).

Why a COMMIT can be late, and what happens then
-----------------------------------------------
Every hold's lease starts when its participant first receives PREPARE, which
is after the coordinator sent it at ``t0`` (re-sent PREPAREs after a
coordinator restart only start *later* leases; a duplicate never extends
one).  So, measured on the coordinator's own clock, every hold lives at least
until ``t0 + lease_min`` (minus clock *rate* drift, ``rho * lease_min``;
absolute clock offsets do not matter because only durations are compared).
Committing only while ``now <= t0 + lease_min - commit_margin_min`` therefore
means the COMMIT reaches every participant in time whenever one-way delivery
takes less than ``commit_margin_min - rho * lease_min``.

If that assumption is broken (COMMIT lost until the lease ends, a partition, a
wounded hold), the participant has already released the hold and answers a
late COMMIT with COMMIT_FAILED (it never resurrects a released hold), or has
told us with a NO vote (``lease_expired`` / ``preempted``).  The coordinator
then *compensates*: it logs COMMIT_REFUSED, tells the vehicle FAILED and sends
CancelRequest to every stop until each answers.  The same happens if commit
ACKs are still missing ``ack_timeout_min`` after the decision.  Either way
every trip ends all-RESERVED (BOOKED) or all-released, and the vehicle's
answer comes no later than ``vote_timeout_min + ack_timeout_min`` after the
request (plus one tick), whatever the network does.

Restart: ``Coordinator.from_log`` rebuilds every trip; votes and ACKs are not
logged, so the first ``tick`` re-sends the current phase's messages to every
stop (PREPARE keeps the original deadline; participants answer duplicates
from their state).  A participant unsure of a decision sends QueryDecision;
the coordinator answers from its log, and with ABORT for a trip it does not
know (presumed abort).

Presumed abort, and why TripStarted is not forced
-------------------------------------------------
Every record is written ahead of the messages of its step, with one exception:
PREPARE may leave before ``TripStarted`` is durable (``Prepare.BEFORE_LOG``), so
an adapter overlaps the coordinator's first write with the first hop.  If the
coordinator then crashes before the record is durable, it restarts knowing
nothing of the trip, and every outcome stays safe: no decision can have been
made (the decision's own write comes after TripStarted in the log), so a
participant holding for the trip either gets ABORT when it asks (unknown trip =
ABORT) or lets its lease run out; nothing was reserved and the vehicle, whose
request died with the coordinator, was told nothing.  A retry of the same trip
id then starts afresh, and its stops answer from their state (a released hold
is never resurrected: the retry is REJECTED).  The decision (ALL_YES) and the
participants' holds and commits stay forced: those are what BOOKED rests on.
An adapter need not force TripStarted at all: it may write it with the trip's
next forced record, the decision, together with the holds of a stop at the
coordinator's own company (its vote is taken in-process, and nothing that
rests on it leaves before that write); the live host does so
(``ProtocolHost.execute(..., lazy=True)``).
``tests/test_protocol_stateful.py`` crashes coordinators between the PREPAREs
and their TripStarted (rule ``request_trip_then_crash``).

ALL_ACKED is not forced either
------------------------------
The vehicle may be told BOOKED before the ALL_ACKED record is durable
(:func:`~evsim.protocol.messages.before_log`): by then the ALL_YES decision is
durable (it was written before any COMMIT left) and so is every participant's
reservation (each forces its commit before it acknowledges), so a crash can
only lose the fact that the ACKs came in.  A coordinator restarted in
COMMITTING therefore cannot know whether the vehicle was told BOOKED, and it
does not compensate when its ack deadline passes: it re-sends COMMIT until
every stop answers, COMMIT_ACK (from state: the stop is reserved) or
COMMIT_FAILED (the hold ran out first: compensate, nobody was told BOOKED).
The answer bound above (``vote_timeout_min + ack_timeout_min``) is for a
coordinator that stays up; after a restart a trip waits for its stops, as
two-phase commit does.  The stateful test crashes coordinators right after
they emit BOOKED (rule ``deliver_then_crash``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from evsim.protocol.log import EventSourced, Record, TripChanged, TripStarted
from evsim.protocol.messages import (
    Abort,
    AbortAck,
    Alternative,
    BookedStop,
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
    TripCancel,
    TripRequest,
    TripResult,
    Vote,
    msg_id,
)
from evsim.protocol.states import (
    TRIP_CLOSED,
    TRIP_OUTCOME_ON_ENTRY,
    ProtocolError,
    TripEvent,
    TripState,
    trip_next,
)

_S = TripState
_NEG_INF = float("-inf")


@dataclass(slots=True)
class _Trip:
    trip_id: str
    vehicle_id: str
    vehicle_node: str
    stops: tuple[Any, ...]
    booking_ids: tuple[str, ...]
    index: dict[str, int]
    started_min: float
    vote_deadline_min: float
    lease_min: float
    priority_start_min: float
    state: TripState = _S.PREPARING
    decided_min: float = 0.0
    reason: str = ""
    failed_stop: int | None = None
    alternatives: tuple[Alternative, ...] = ()
    connectors: tuple[str, ...] = ()
    # rebuilt from the log by a restarted coordinator (see "ALL_ACKED is not forced")
    restored: bool = False
    # volatile (rebuilt empty after a restart; re-collected by re-sending)
    votes: dict[int, Vote] = field(default_factory=dict)
    acked: dict[int, str] = field(default_factory=dict)
    next_retry_min: float = _NEG_INF


def booking_id_for(trip_id: str, stop_index: int) -> str:
    """The booking id the coordinator uses for stop ``stop_index`` of a trip."""
    return f"{trip_id}/{stop_index}"


class Coordinator(EventSourced):
    """State machine of a vehicle's home company server (trip coordinator)."""

    def __init__(
        self,
        node_id: str,
        *,
        lease_min: float = 10.0,
        vote_timeout_min: float = 3.0,
        commit_margin_min: float = 2.0,
        ack_timeout_min: float = 10.0,
        retry_min: float = 0.5,
    ) -> None:
        if vote_timeout_min + commit_margin_min > lease_min:
            raise ValueError("need vote_timeout_min + commit_margin_min <= lease_min")
        if min(lease_min, vote_timeout_min, ack_timeout_min, retry_min) <= 0:
            raise ValueError("timeouts must be positive")
        self.node_id = node_id
        self.lease_min = lease_min
        self.vote_timeout_min = vote_timeout_min
        self.commit_margin_min = commit_margin_min
        self.ack_timeout_min = ack_timeout_min
        self.retry_min = retry_min
        self._init_log()
        self._trips: dict[str, _Trip] = {}
        self._open: dict[str, _Trip] = {}  # trips with messages still to (re)send
        self._handlers: dict[type, Any] = {
            Vote: self._on_vote,
            CommitAck: self._on_commit_ack,
            CommitFailed: self._on_commit_failed,
            AbortAck: self._on_release_ack,
            CancelReply: self._on_release_ack,
            QueryDecision: self._on_query,
            TripRequest: self._on_trip_request,
            TripCancel: self._on_trip_cancel,
            StopCanceled: self._on_stop_canceled,
        }

    # ------------------------------------------------------------------ log

    @classmethod
    def from_log(cls, node_id: str, records: Iterable[Record], **config: Any) -> Coordinator:
        """Rebuild a coordinator from its persisted records (after a crash)."""
        node = cls(node_id, **config)
        node._replay(records)
        for t in node._trips.values():
            t.restored = True
        return node

    def _apply(self, rec: Record) -> None:
        if isinstance(rec, TripChanged):
            t = self._trips[rec.trip_id]
            event = TripEvent(rec.event)
            t.state = trip_next(t.state, event)
            if event is TripEvent.ALL_YES:
                t.decided_min = rec.t_min
            if rec.reason:
                t.reason = rec.reason
            if rec.failed_stop is not None:
                t.failed_stop = rec.failed_stop
            if rec.alternatives:
                t.alternatives = rec.alternatives
            if rec.connectors:
                t.connectors = rec.connectors
            t.acked = {}
            if t.state is not _S.PREPARING:
                t.votes = {}  # only PREPARING reads them; a closed trip keeps no messages
            t.next_retry_min = _NEG_INF
            if t.state in TRIP_CLOSED:
                self._open.pop(t.trip_id, None)
            else:
                self._open[t.trip_id] = t
        elif isinstance(rec, TripStarted):
            if rec.trip_id in self._trips:
                raise ProtocolError(f"record: trip {rec.trip_id!r} started twice")
            bids = tuple(booking_id_for(rec.trip_id, i) for i in range(len(rec.stops)))
            t = _Trip(
                rec.trip_id,
                rec.vehicle_id,
                rec.vehicle_node,
                rec.stops,
                bids,
                {b: i for i, b in enumerate(bids)},
                rec.t_min,
                rec.vote_deadline_min,
                rec.lease_min,
                min(s.start_min for s in rec.stops),
            )
            self._trips[t.trip_id] = t
            self._open[t.trip_id] = t
        else:
            raise ProtocolError(f"record: coordinator cannot apply {type(rec).__name__}")

    def _change(
        self,
        t: _Trip,
        event: TripEvent,
        now_min: float,
        reason: str = "",
        failed_stop: int | None = None,
        alternatives: tuple[Alternative, ...] = (),
        connectors: tuple[str, ...] = (),
    ) -> list[Outgoing]:
        """Log a trip event, then send what the new state calls for."""
        trip_next(t.state, event)  # validate before logging
        t.restored = False  # this incarnation decides (and answers) from here on
        self._emit(
            TripChanged(
                t.trip_id, event.value, now_min, reason, failed_stop, alternatives, connectors
            )
        )
        out = self._phase_messages(t, now_min)
        if t.state in TRIP_OUTCOME_ON_ENTRY:
            out.append(Outgoing(t.vehicle_node, self._result(t)))
        return out

    # ------------------------------------------------------------------ outgoing

    def _phase_messages(self, t: _Trip, now_min: float) -> list[Outgoing]:
        """(Re)send the current phase's message to every stop not yet answered."""
        st = t.state
        if st in TRIP_CLOSED:
            return []
        t.next_retry_min = now_min + self.retry_min
        me = self.node_id
        out: list[Outgoing] = []
        for i, s in enumerate(t.stops):
            bid = t.booking_ids[i]
            m: Message
            if st is _S.PREPARING:
                if i in t.votes:
                    continue
                m = Prepare(
                    msg_id(me, "PREPARE", bid),
                    me,
                    t.trip_id,
                    bid,
                    s.station_id,
                    s.connector_id,
                    s.start_min,
                    s.end_min,
                    s.grace_min,
                    t.lease_min,
                    t.priority_start_min,
                    s.connector_ids,
                )
            elif i in t.acked:
                continue
            elif st is _S.COMMITTING:
                m = Commit(msg_id(me, "COMMIT", bid), me, t.trip_id, bid)
            elif st is _S.ABORTING:
                m = Abort(msg_id(me, "ABORT", bid), me, t.trip_id, bid, t.reason)
            else:  # COMPENSATING, CANCELING
                m = CancelRequest(msg_id(me, "CANCEL", bid), me, bid, t.trip_id, t.reason)
            out.append(Outgoing(s.participant, m))
        return out

    def _result(self, t: _Trip) -> TripResult:
        outcome = TRIP_OUTCOME_ON_ENTRY.get(t.state)
        if outcome is None:
            outcome = {
                _S.ABORTED: TRIP_OUTCOME_ON_ENTRY[_S.ABORTING],
                _S.FAILED: TRIP_OUTCOME_ON_ENTRY[_S.COMPENSATING],
                _S.CANCELED: TRIP_OUTCOME_ON_ENTRY[_S.CANCELING],
            }[t.state]
        bookings: tuple[BookedStop, ...] = ()
        if t.state is _S.BOOKED:
            bookings = tuple(
                BookedStop(
                    t.booking_ids[i],
                    s.participant,
                    s.station_id,
                    t.connectors[i],
                    s.start_min,
                    s.end_min,
                )
                for i, s in enumerate(t.stops)
            )
        return TripResult(
            msg_id(self.node_id, "TRIP_RESULT", f"{t.trip_id}:{outcome.value}"),
            self.node_id,
            t.trip_id,
            outcome.value,
            t.reason,
            bookings,
            t.failed_stop,
            t.alternatives,
        )

    # ------------------------------------------------------------------ local commands

    def request_trip(
        self, req: TripRequest, now_min: float, *, vehicle_node: str | None = None
    ) -> list[Outgoing]:
        """Start booking a trip (idempotent by ``trip_id``).

        The answer (a :class:`TripResult`) is sent to ``vehicle_node``
        (default: ``req.src``) once definitive.
        """
        dst = vehicle_node if vehicle_node is not None else req.src
        t = self._trips.get(req.trip_id)
        if t is not None:
            result = self.trip_result(req.trip_id)
            return [] if result is None else [Outgoing(t.vehicle_node, result)]
        bad = self._invalid(req)
        if bad:
            res = TripResult(
                msg_id(self.node_id, "TRIP_RESULT", f"{req.trip_id}:REJECTED"),
                self.node_id,
                req.trip_id,
                TRIP_OUTCOME_ON_ENTRY[_S.ABORTING].value,
                bad,
            )
            return [Outgoing(dst, res)]
        self._emit(
            TripStarted(
                req.trip_id,
                req.vehicle_id,
                dst,
                req.stops,
                now_min,
                now_min + self.vote_timeout_min,
                self.lease_min,
            )
        )
        return self._phase_messages(self._trips[req.trip_id], now_min)

    @staticmethod
    def _invalid(req: TripRequest) -> str:
        if not req.stops:
            return "invalid_request: no stops"
        for i, s in enumerate(req.stops):
            if not s.end_min > s.start_min or s.grace_min < 0:
                return f"invalid_request: stop {i} window"
        return ""

    def cancel_trip(self, trip_id: str, now_min: float) -> list[Outgoing]:
        """Cancel a BOOKED trip (every stop); no-op unless the trip is BOOKED."""
        t = self._trips.get(trip_id)
        if t is None or t.state is not _S.BOOKED:
            return []
        return self._change(t, TripEvent.CANCEL, now_min, "vehicle_canceled")

    # ------------------------------------------------------------------ messages

    def handle(self, msg: Message, now_min: float) -> list[Outgoing]:
        """Process one incoming message; return the messages to send."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            return []  # not for a coordinator: ignore (never crash on network input)
        return handler(msg, now_min)

    def _stop_of(self, trip_id: str, booking_id: str) -> tuple[_Trip, int] | None:
        t = self._trips.get(trip_id)
        if t is None:
            return None
        i = t.index.get(booking_id)
        return None if i is None else (t, i)

    def _on_vote(self, m: Vote, now_min: float) -> list[Outgoing]:
        found = self._stop_of(m.trip_id, m.booking_id)
        if found is None:
            return []
        t, i = found
        if not m.yes:
            # NO is final at the participant (its booking is terminal), so it also
            # dooms a COMMIT in flight: compensate without waiting for COMMIT_FAILED.
            if t.state is _S.PREPARING:
                return self._change(t, TripEvent.VOTE_NO, now_min, m.reason, i, m.alternatives)
            if t.state is _S.COMMITTING and i not in t.acked:
                return self._change(t, TripEvent.COMMIT_REFUSED, now_min, m.reason, i)
            return []
        if t.state is not _S.PREPARING:
            return []
        t.votes[i] = m
        if len(t.votes) < len(t.stops):
            return []
        if now_min + self.commit_margin_min <= t.started_min + t.lease_min:
            return self._change(t, TripEvent.ALL_YES, now_min)
        return self._change(t, TripEvent.LEASE_TOO_SHORT, now_min, "lease_too_short")

    def _on_commit_ack(self, m: CommitAck, now_min: float) -> list[Outgoing]:
        found = self._stop_of(m.trip_id, m.booking_id)
        if found is None or found[0].state is not _S.COMMITTING:
            return []
        t, i = found
        t.acked[i] = m.connector_id
        if len(t.acked) < len(t.stops):
            return []
        conns = tuple(t.acked[j] for j in range(len(t.stops)))
        return self._change(t, TripEvent.ALL_ACKED, now_min, connectors=conns)

    def _on_commit_failed(self, m: CommitFailed, now_min: float) -> list[Outgoing]:
        found = self._stop_of(m.trip_id, m.booking_id)
        if found is None or found[0].state is not _S.COMMITTING:
            return []
        t, i = found
        return self._change(t, TripEvent.COMMIT_REFUSED, now_min, m.reason, i)

    def _on_release_ack(self, m: AbortAck | CancelReply, now_min: float) -> list[Outgoing]:
        found = self._stop_of(m.trip_id, m.booking_id)
        if found is None:
            return []
        t, i = found
        if t.state not in (_S.ABORTING, _S.COMPENSATING, _S.CANCELING):
            return []
        t.acked[i] = ""
        if len(t.acked) < len(t.stops):
            return []
        return self._change(t, TripEvent.ALL_ACKED, now_min)

    def _on_query(self, m: QueryDecision, now_min: float) -> list[Outgoing]:
        me, bid = self.node_id, m.booking_id
        found = self._stop_of(m.trip_id, bid)
        if found is None:  # presumed abort
            return [
                Outgoing(m.src, Abort(msg_id(me, "ABORT", bid), me, m.trip_id, bid, "unknown_trip"))
            ]
        t, _ = found
        st = t.state
        reply: Message
        if st is _S.PREPARING:
            return []
        if st in (_S.COMMITTING, _S.BOOKED):
            reply = Commit(msg_id(me, "COMMIT", bid), me, t.trip_id, bid)
        elif st in (_S.ABORTING, _S.ABORTED):
            reply = Abort(msg_id(me, "ABORT", bid), me, t.trip_id, bid, t.reason)
        else:
            reply = CancelRequest(msg_id(me, "CANCEL", bid), me, bid, t.trip_id, t.reason)
        return [Outgoing(m.src, reply)]

    def _on_stop_canceled(self, m: StopCanceled, now_min: float) -> list[Outgoing]:
        """A station owner canceled a reserved stop: cancel the whole trip (the vehicle is
        told CANCELED with the reason and ``failed_stop``); a COMMIT in flight is refused.
        Any other state (or an unknown trip) just gets the CancelRequest that stops the
        participant's re-sends."""
        me, bid = self.node_id, m.booking_id
        found = self._stop_of(m.trip_id, bid)
        if found is not None:
            t, i = found
            reason = m.reason or "stop_canceled"
            if t.state is _S.BOOKED:
                return self._change(t, TripEvent.STOP_CANCELED, now_min, reason, i)
            if t.state is _S.COMMITTING:
                return self._change(t, TripEvent.COMMIT_REFUSED, now_min, reason, i)
        reason = found[0].reason if found is not None else "unknown_trip"
        return [Outgoing(m.src, CancelRequest(msg_id(me, "CANCEL", bid), me, bid, m.trip_id,
                                              reason))]

    def _on_trip_request(self, m: TripRequest, now_min: float) -> list[Outgoing]:
        return self.request_trip(m, now_min)

    def _on_trip_cancel(self, m: TripCancel, now_min: float) -> list[Outgoing]:
        return self.cancel_trip(m.trip_id, now_min)

    # ------------------------------------------------------------------ timers

    def tick(self, now_min: float) -> list[Outgoing]:
        """Enforce deadlines and re-send unacknowledged messages."""
        out: list[Outgoing] = []
        for t in list(self._open.values()):
            if t.state is _S.PREPARING and now_min >= t.vote_deadline_min:
                out += self._change(t, TripEvent.VOTE_TIMEOUT, now_min, "vote_timeout")
            elif (t.state is _S.COMMITTING and not t.restored
                  and now_min >= t.decided_min + self.ack_timeout_min):
                out += self._change(t, TripEvent.ACK_TIMEOUT, now_min, "ack_timeout")
            elif now_min >= t.next_retry_min:
                out += self._phase_messages(t, now_min)
        return out

    def next_timer_min(self) -> float | None:
        """Earliest time at which ``tick`` has something to do (None if nothing)."""
        return min((t.next_retry_min for t in self._open.values()), default=None)

    # ------------------------------------------------------------------ queries

    def trip_state(self, trip_id: str) -> TripState | None:
        """Current state of a trip, or None if unknown."""
        t = self._trips.get(trip_id)
        return None if t is None else t.state

    def trip_result(self, trip_id: str) -> TripResult | None:
        """The vehicle's answer if it is already definitive, else None."""
        t = self._trips.get(trip_id)
        if t is None or t.state in (_S.PREPARING, _S.COMMITTING):
            return None
        return self._result(t)

    def trip_ids(self) -> list[str]:
        """Every trip this coordinator has started, in order."""
        return list(self._trips)

    def open_trip_ids(self) -> list[str]:
        """Trips with messages still to (re)send."""
        return list(self._open)

    def booking_ids(self, trip_id: str) -> tuple[str, ...]:
        """The per-stop booking ids of a trip."""
        return self._trips[trip_id].booking_ids

    def durable_state(self) -> dict[str, Any]:
        """Everything the log determines, for restart-equality checks."""
        return {
            tid: (
                t.state,
                t.reason,
                t.failed_stop,
                t.decided_min,
                t.connectors,
                t.alternatives,
                t.vote_deadline_min,
            )
            for tid, t in self._trips.items()
        }
