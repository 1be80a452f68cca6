"""State enums and transition tables for bookings, trips and connectors.

The tables below are the single source of truth for the protocol's lifecycles,
in the style of h11's ``_state.py``: a dict ``{(State, Event): NewState}``.
The participant and coordinator call :func:`booking_next` / :func:`trip_next`
for every change, so an illegal transition raises :class:`ProtocolError`
instead of silently corrupting state, and ``docs/make_diagrams.py`` renders
the same tables as state diagrams.

Booking states use the OCPI 2.3 Bookings vocabulary::

    PENDING -> RESERVED | REJECTED | FAILED | CANCELED
    RESERVED -> FULFILLED | CANCELED | NO_SHOW

A trip-level PREPARE creates a PENDING booking ("hold") with a lease; a
single-stop booking is created PENDING and confirmed or rejected in the same
step.  FULFILLED means a charging session started against the booking; the
session's end (``STOP``) is a self-loop that frees the connector.
"""

from __future__ import annotations

from enum import StrEnum


class ProtocolError(Exception):
    """Raised for malformed messages/records and for illegal state transitions."""


class BookingState(StrEnum):
    """OCPI 2.3 booking states (one booking = one window on one connector)."""

    PENDING = "PENDING"
    RESERVED = "RESERVED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    FULFILLED = "FULFILLED"
    CANCELED = "CANCELED"
    NO_SHOW = "NO_SHOW"


class BookingEvent(StrEnum):
    """Things that happen to a booking at its owning participant."""

    CONFIRM = "CONFIRM"  # direct booking accepted, or COMMIT of a hold
    REJECT = "REJECT"  # direct booking refused, or PREPARE voted NO
    ABORT = "ABORT"  # coordinator ABORT (or compensating cancel) of a hold
    LEASE_EXPIRE = "LEASE_EXPIRE"  # hold's lease ran out before a decision
    WOUND = "WOUND"  # hold preempted by a higher-priority trip
    CANCEL = "CANCEL"  # reservation canceled (by its owner or compensation)
    START = "START"  # charging session started against the reservation
    STOP = "STOP"  # charging session ended, connector released
    NO_SHOW_EXPIRE = "NO_SHOW_EXPIRE"  # start + grace passed without a session


B, BE = BookingState, BookingEvent

BOOKING_TRANSITIONS: dict[tuple[BookingState, BookingEvent], BookingState] = {
    (B.PENDING, BE.CONFIRM): B.RESERVED,
    (B.PENDING, BE.REJECT): B.REJECTED,
    (B.PENDING, BE.ABORT): B.CANCELED,
    (B.PENDING, BE.LEASE_EXPIRE): B.FAILED,
    (B.PENDING, BE.WOUND): B.FAILED,
    (B.RESERVED, BE.CANCEL): B.CANCELED,
    (B.RESERVED, BE.START): B.FULFILLED,
    (B.RESERVED, BE.NO_SHOW_EXPIRE): B.NO_SHOW,
    (B.FULFILLED, BE.STOP): B.FULFILLED,
}

BOOKING_TERMINAL: frozenset[BookingState] = frozenset({B.REJECTED, B.FAILED, B.CANCELED, B.NO_SHOW})
"""States from which no event is accepted (FULFILLED still accepts STOP)."""

BOOKING_RELEASED: frozenset[BookingState] = BOOKING_TERMINAL
"""States in which a booking no longer occupies its connector window."""


class TripState(StrEnum):
    """Coordinator-side state of one multi-stop trip (two-phase commit)."""

    PREPARING = "PREPARING"  # PREPAREs sent, collecting votes
    COMMITTING = "COMMITTING"  # decided COMMIT, waiting for every ACK
    ABORTING = "ABORTING"  # decided ABORT, waiting for every ABORT_ACK
    COMPENSATING = "COMPENSATING"  # a commit failed: canceling every stop
    BOOKED = "BOOKED"  # every stop RESERVED (terminal unless canceled)
    CANCELING = "CANCELING"  # the vehicle (or a station owner) canceled a booked trip
    ABORTED = "ABORTED"  # every hold released after ABORT (closed)
    FAILED = "FAILED"  # every stop released after compensation (closed)
    CANCELED = "CANCELED"  # every stop released after a vehicle cancel (closed)


class TripEvent(StrEnum):
    """Things that happen to a trip at its coordinator."""

    ALL_YES = "ALL_YES"  # every stop voted YES with enough lease left
    VOTE_NO = "VOTE_NO"  # some stop voted NO (conflict, preempted, expired...)
    VOTE_TIMEOUT = "VOTE_TIMEOUT"  # votes missing at the vote deadline
    LEASE_TOO_SHORT = "LEASE_TOO_SHORT"  # all YES but too little lease left
    COMMIT_REFUSED = "COMMIT_REFUSED"  # a participant answered COMMIT_FAILED
    ACK_TIMEOUT = "ACK_TIMEOUT"  # commit ACKs missing at the ack deadline
    ALL_ACKED = "ALL_ACKED"  # every participant acknowledged the decision
    CANCEL = "CANCEL"  # the vehicle canceled the booked trip
    STOP_CANCELED = "STOP_CANCELED"  # a station owner canceled a reserved stop


T, TE = TripState, TripEvent

TRIP_TRANSITIONS: dict[tuple[TripState, TripEvent], TripState] = {
    (T.PREPARING, TE.ALL_YES): T.COMMITTING,
    (T.PREPARING, TE.VOTE_NO): T.ABORTING,
    (T.PREPARING, TE.VOTE_TIMEOUT): T.ABORTING,
    (T.PREPARING, TE.LEASE_TOO_SHORT): T.ABORTING,
    (T.COMMITTING, TE.ALL_ACKED): T.BOOKED,
    (T.COMMITTING, TE.COMMIT_REFUSED): T.COMPENSATING,
    (T.COMMITTING, TE.ACK_TIMEOUT): T.COMPENSATING,
    (T.ABORTING, TE.ALL_ACKED): T.ABORTED,
    (T.COMPENSATING, TE.ALL_ACKED): T.FAILED,
    (T.BOOKED, TE.CANCEL): T.CANCELING,
    (T.BOOKED, TE.STOP_CANCELED): T.CANCELING,
    (T.CANCELING, TE.ALL_ACKED): T.CANCELED,
}

TRIP_CLOSED: frozenset[TripState] = frozenset({T.BOOKED, T.ABORTED, T.FAILED, T.CANCELED})
"""States with nothing left to send (BOOKED can still be canceled by the vehicle)."""


class TripOutcome(StrEnum):
    """The definitive answer a vehicle gets for a trip request."""

    BOOKED = "BOOKED"
    REJECTED = "REJECTED"  # aborted before anything was reserved
    FAILED = "FAILED"  # a commit failed; every stop is being canceled
    CANCELED = "CANCELED"  # the vehicle canceled the booked trip


TRIP_OUTCOME_ON_ENTRY: dict[TripState, TripOutcome] = {
    T.BOOKED: TripOutcome.BOOKED,
    T.ABORTING: TripOutcome.REJECTED,
    T.COMPENSATING: TripOutcome.FAILED,
    T.CANCELING: TripOutcome.CANCELED,
}
"""Entering these states sends the vehicle its answer (once per entry)."""


class ConnectorStatus(StrEnum):
    """OCPI-style connector status derived from the bookings on a connector."""

    AVAILABLE = "AVAILABLE"
    RESERVED = "RESERVED"
    CHARGING = "CHARGING"


def booking_next(state: BookingState, event: BookingEvent) -> BookingState:
    """Return the state after ``event``; raise :class:`ProtocolError` if illegal."""
    try:
        return BOOKING_TRANSITIONS[(state, event)]
    except KeyError:
        msg = f"illegal booking transition: {state.value} --{event.value}-->"
        raise ProtocolError(msg) from None


def trip_next(state: TripState, event: TripEvent) -> TripState:
    """Return the trip state after ``event``; raise :class:`ProtocolError` if illegal."""
    try:
        return TRIP_TRANSITIONS[(state, event)]
    except KeyError:
        raise ProtocolError(f"illegal trip transition: {state.value} --{event.value}-->") from None
