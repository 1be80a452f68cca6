"""The ``booking`` rows of the trace: one per change of a booking's state at its station owner.

A participant's durable records (:class:`~evsim.protocol.log.BookingCreated`,
:class:`~evsim.protocol.log.BookingChanged`) are what happened to each booking; this turns
them into the trace schema's ``booking`` rows (:mod:`evsim.trace`): ``status`` is the state
the booking is in after the change (PENDING, RESERVED, REJECTED, FAILED, FULFILLED,
CANCELED, NO_SHOW), ``detail`` the reason, or the window (``window <start>-<end>``) when
there is none. A simulated company server (:class:`evsim.model.protocol_bus.ProtocolBus`) and
a live one (:class:`live.server.service.CompanyService`) make their rows here, so a report
reads the same rows from either run.

Not traced: the holds a station puts on a connector for a walk-in's session (bookings with
no trip) and the end of a booked session (``STOP``: the session rows say it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evsim.protocol.log import BookingChanged, BookingCreated, Record
from evsim.protocol.participant import Participant
from evsim.protocol.states import (
    BOOKING_RELEASED,
    BookingEvent,
    BookingState,
    ProtocolError,
    booking_next,
)

__all__ = ["BookingRows"]

_STOP = BookingEvent.STOP.value


class BookingRows:
    """The ``booking`` rows of one company's participant, record by record.

    ``vehicle_of(trip_id)``: the vehicle a trip id belongs to (each run names its trips its
    own way). The state of each booking still in play is kept between records; where it is
    unknown or out of step (a restarted server's booking first seen changing, or a live
    server's nodes rebuilt from its log after a failed commit, whose records this tracer
    had already seen) the participant's own state is taken."""

    def __init__(self, company: str, vehicle_of: Callable[[str], str | None]) -> None:
        self.company = company
        self.vehicle_of = vehicle_of
        self._state: dict[str, BookingState] = {}

    def row(self, participant: Participant, rec: Record) -> dict[str, Any] | None:
        """The row for ``rec`` (just applied to ``participant``), or None: not a change of a
        traced booking. Columns besides ``t_min`` and ``kind`` (``"booking"``)."""
        if isinstance(rec, BookingCreated):
            if not rec.trip_id:
                return None  # a walk-in's hold on its connector
            state, reason = BookingState.PENDING, ""
        elif isinstance(rec, BookingChanged):
            prev = self._state.get(rec.booking_id)
            known: BookingState | None
            try:
                known = booking_next(prev, BookingEvent(rec.event)) if prev is not None else None
            except ProtocolError:
                known = None  # out of step with the participant
            if known is None:
                b = participant.booking(rec.booking_id)
                if b is None or not b.trip_id:
                    return None
                known = b.state
            state = known
            if rec.event == _STOP:
                self._state.pop(rec.booking_id, None)  # the last change a booking sees
                return None
            reason = rec.reason
        else:
            return None
        bid = rec.booking_id
        if state in BOOKING_RELEASED:
            self._state.pop(bid, None)
        else:
            self._state[bid] = state
        b = participant.booking(bid)
        assert b is not None
        return {
            "booking_id": bid,
            "vehicle_id": self.vehicle_of(b.trip_id),
            "station_id": b.station_id,
            "company_id": self.company,
            "connector_id": b.connector_id or None,
            "status": state.value,
            "detail": reason or f"window {b.start_min:.2f}-{b.end_min:.2f}",
        }
