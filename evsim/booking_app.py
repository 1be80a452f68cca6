"""The trip-booking driver app, sans-IO: its rules and its booking round.

The rules are plain functions over a plan (:class:`~evsim.planning.PlannedStop` s): which
stops to book now on the rolling horizon (:func:`stops_to_book`, :func:`next_booking_min`),
the window to ask for one (:func:`booking_window`), how to rebook a refused one
(:func:`rebook_choice`) and which reservations a re-plan keeps (:func:`kept_stop`).

One round books some stops of a vehicle's plan in one trip request and, when the request is
REJECTED, rebooks the refused stop up to ``booking.max_attempts`` times: a later window on
the same connector class at most ``booking.max_shift_min`` away
(:func:`rebook_choice`), else another station for that stop's decision (the
refused ones excluded). Stops left without a reservation are walked in at.

:func:`booking_round` is that loop as a generator in the style of h11: it does no I/O and
knows no clock. It yields effect requests and receives their results:

* :class:`Send` -- send one trip request for these stops and windows; the result is an
  :class:`Answer`, or None when no answer came;
* :class:`Choose` -- pick another station for plan stop ``index`` with ``excluded``
  stations off (:func:`evsim.planning.choose_again`); the result is the new
  :class:`~evsim.planning.PlannedStop` or None;
* :class:`Cancel` -- cancel the trip of an answer the vehicle no longer wants; result None.

The vehicle's state (its plan, the stops being booked and those left to walk in) is the
:class:`TripHost`'s; the round reads it and updates it between effects. A driver runs the
generator and performs the effects: the SimPy process of :mod:`evsim.model.booking` and the
asyncio agent of :mod:`live.vehicle_agent`. A driver that abandons a round (an interrupt, a
canceled task) closes the generator, which releases the stops it marked busy.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Collection, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

from evsim.planning import PlannedStop
from evsim.protocol import Alternative

__all__ = [
    "Answer",
    "Cancel",
    "Choose",
    "Effect",
    "Send",
    "TripHost",
    "Window",
    "booking_round",
    "booking_window",
    "home_company",
    "kept_stop",
    "next_booking_min",
    "rebook_choice",
    "still_next",
    "stops_to_book",
]


# ---------------------------------------------------------------------------------------------
# the app's rules: which plan stops to book when, how to rebook one, what survives a re-plan
# ---------------------------------------------------------------------------------------------


class ArrivingStop(Protocol):
    @property
    def arrive_min(self) -> float: ...


class Offer(Protocol):
    @property
    def connector_id(self) -> str: ...

    @property
    def start_min(self) -> float: ...


OfferT = TypeVar("OfferT", bound=Offer)


def stops_to_book(
    stops: Sequence[ArrivingStop],
    now: float,
    max_advance_min: float,
    *,
    first: int = 0,
    offset: float = 0.0,
    held: Collection[int] = (),
    blocked: Collection[int] = (),
) -> list[int]:
    """Indices of the plan stops to book now: from ``first`` on, those whose window starts
    within the horizon (``now + max_advance_min``) and are not ``held`` already; stops after a
    ``blocked`` one (being booked, or left to walk in: the times after it are unknown) wait."""
    horizon = now + max_advance_min
    out = []
    for i in range(first, len(stops)):
        if stops[i].arrive_min + offset > horizon:
            break
        if i in held:
            continue
        if i in blocked:
            break
        out.append(i)
    return out


def next_booking_min(
    stops: Sequence[ArrivingStop],
    max_advance_min: float,
    *,
    first: int = 0,
    offset: float = 0.0,
    held: Collection[int] = (),
    blocked: Collection[int] = (),
) -> float | None:
    """When the next stop to book enters the horizon (None: nothing left to book)."""
    for i in range(first, len(stops)):
        if i in held:
            continue
        if i in blocked:
            return None
        return stops[i].arrive_min + offset - max_advance_min
    return None


def booking_window(stop: PlannedStop, slot_min: float, offset: float = 0.0) -> tuple[float, float]:
    """The window to book for a plan stop: expected arrival to arrival + estimated charging
    time + ``slot_min``."""
    start = stop.arrive_min + offset
    return start, start + stop.charge_min + slot_min


def rebook_choice(
    start_min: float, alternatives: Iterable[OfferT], max_shift_min: float
) -> tuple[Literal["shift", "other"], OfferT | None, float]:
    """After a REJECTED stop wanted from ``start_min``: ``("shift", offer, delay)`` to take the
    earliest offered window on the same class starting at most ``max_shift_min`` later, else
    ``("other", earliest offer or None, delay)``: ask the policy for another station
    (:func:`~evsim.planning.choose_again`); if there is none, give up (walk in)."""
    later = [a for a in alternatives if a.start_min >= start_min]
    shift = min(later, key=lambda a: (a.start_min, a.connector_id)) if later else None
    delay = math.inf if shift is None else shift.start_min - start_min
    if shift is not None and delay <= max_shift_min:
        return "shift", shift, delay
    return "other", shift, delay


def kept_stop(
    old: PlannedStop,
    booked_start_min: float,
    stops: Sequence[PlannedStop],
    slot_min: float,
    grace_min: float,
    *,
    offset: float = 0.0,
    taken: Collection[int] = (),
) -> int | None:
    """After a re-plan: the index in ``stops`` where a reservation made for plan stop ``old``
    (its window starting at ``booked_start_min``) is kept -- the first stop with the same
    decision node, station and connector class, not ``taken`` by another reservation, whose
    expected arrival is at most ``slot_min`` before the window's start or ``grace_min / 2``
    after it; None: cancel it."""
    cls = (old.connector_power_kw, old.connector_type)
    k = next(
        (
            k
            for k, s in enumerate(stops)
            if s.decision_node == old.decision_node
            and s.station_index == old.station_index
            and (s.connector_power_kw, s.connector_type) == cls
        ),
        None,
    )
    if k is None or k in taken:
        return None
    late = stops[k].arrive_min + offset - booked_start_min
    return k if -slot_min <= late <= grace_min / 2 else None


def home_company(vehicle_id: str, companies: Sequence[str]) -> str:
    """A vehicle's home company (the server it registers with, whose coordinator books its
    trips): a stable hash of its id over ``companies``, the same in every run and process
    (``zlib.crc32``, not the salted ``hash``). Raises ``ValueError`` for no companies."""
    if not companies:
        raise ValueError("no companies to choose a vehicle's home company from")
    return companies[zlib.crc32(vehicle_id.encode()) % len(companies)]


class Window(NamedTuple):
    """The booking window asked for one stop."""

    start_min: float
    end_min: float
    connector_id: str | None  # None: any connector of the class
    asked_min: float  # the start first asked for (the expected arrival)


@dataclass(frozen=True, slots=True)
class Answer:
    """A trip request's answer, as far as the round needs it."""

    outcome: str  # BOOKED / REJECTED / FAILED (live: PENDING when it gave up waiting)
    trip_id: str
    failed_stop: int | None = None  # REJECTED: the index of the refused stop in the request
    alternatives: Sequence[Alternative] = ()  # REJECTED: the windows offered instead
    bookings: Sequence[Any] = ()  # BOOKED: one per stop, the driver's own representation


@dataclass(frozen=True, slots=True)
class Send:
    """Send one trip request; answer with an :class:`Answer`, or None if none came."""

    stops: tuple[PlannedStop, ...]
    windows: tuple[Window, ...]
    attempt: int  # 1, 2, ... within the round
    how: str  # attempt > 1: how the previous request was changed


@dataclass(frozen=True, slots=True)
class Choose:
    """Pick another station for plan stop ``index``; answer with the stop or None."""

    index: int
    stop: PlannedStop
    excluded: frozenset[int]  # station indices


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel the trip of ``answer``; answer with None."""

    answer: Answer
    reason: str  # "superseded": booked after the plan moved on; "unanswered": still PENDING


Effect = Send | Choose | Cancel


class TripHost(Protocol):
    """The driver app's state a booking round reads and updates."""

    active: bool
    plan: tuple[PlannedStop, ...]
    next: int  # index in plan of the next stop to come
    busy: dict[int, PlannedStop]  # id -> stop being booked now
    tried: dict[int, PlannedStop]  # id -> stop left to walk in

    def window(self, stop: PlannedStop) -> Window:
        """The first window to ask for ``stop``."""
        ...

    def beyond_horizon(self, stop: PlannedStop) -> bool:
        """Is ``stop`` too far ahead to book now?"""
        ...

    def replace(self, i: int, new: PlannedStop) -> None:
        """Plan stop ``i`` becomes ``new``; the stops after it are unknown until then."""
        ...

    def hold(self, idx: Sequence[int], windows: Sequence[Window], answer: Answer) -> None:
        """Keep the reservations of a BOOKED ``answer`` for plan stops ``idx``."""
        ...


def still_next(app: TripHost, idx: Sequence[int], stops: Sequence[PlannedStop]) -> bool:
    """Are ``stops`` (at plan indices ``idx``) still the next stops of the current plan?"""
    return app.active and all(
        app.next <= i < len(app.plan) and app.plan[i] is s for i, s in zip(idx, stops, strict=True)
    )


def booking_round(
    app: TripHost, idx: list[int], max_attempts: int, max_shift_min: float
) -> Generator[Effect, Any, None]:
    """Book plan stops ``idx`` of ``app`` in one request; on REJECTED rebook (shift the
    refused stop's window or choose another station for it) up to ``max_attempts`` times.
    ``idx`` is consumed."""
    stops = [app.plan[i] for i in idx]
    mine = list(stops)  # every stop this round marked busy
    for s in stops:
        app.busy[id(s)] = s
    windows = [app.window(s) for s in stops]
    excluded: set[int] = set()
    how = ""
    try:
        for attempt in range(1, max_attempts + 1):
            answer: Answer | None = yield Send(tuple(stops), tuple(windows), attempt, how)
            ok = answer is not None and answer.outcome == "BOOKED"
            if not still_next(app, idx, stops):  # the vehicle moved on, or a new plan
                if ok and answer is not None:
                    yield Cancel(answer, "superseded")
                return
            if ok and answer is not None:
                app.hold(idx, windows, answer)
                return
            if answer is None or answer.outcome != "REJECTED":
                if answer is not None and answer.outcome == "PENDING":
                    yield Cancel(answer, "unanswered")  # a late BOOKED is canceled
                break  # FAILED / no answer: a retry would most likely fail the same way
            j = answer.failed_stop
            if j is None or not 0 <= j < len(stops):
                j = 0
            start = windows[j].start_min
            action, shift, delay = rebook_choice(start, answer.alternatives, max_shift_min)
            del idx[j + 1 :], stops[j + 1 :], windows[j + 1 :]
            other = None
            if action == "other":  # try another station for that decision
                excluded.add(stops[j].station_index)
                other = yield Choose(idx[j], stops[j], frozenset(excluded))
                if not still_next(app, idx, stops):
                    return
            if other is not None:
                app.replace(idx[j], other)
                how = f"{other.station_id} instead of {stops[j].station_id}"
                if app.beyond_horizon(other):
                    # a farther station, beyond the horizon: book it once it is due
                    del idx[j:], stops[j:], windows[j:]
                    if not stops:
                        return
                    continue
                app.busy[id(other)] = other
                mine.append(other)
                stops[j] = other
                windows[j] = app.window(other)
            elif action == "shift" and shift is not None:
                end = shift.start_min + windows[j].end_min - start
                windows[j] = Window(shift.start_min, end, shift.connector_id, windows[j].asked_min)
                how = f"shift {delay:.1f} min"
            else:
                break
        if still_next(app, idx, stops):  # no booking: walk in at these stops
            for s in stops:
                app.tried[id(s)] = s
    finally:
        for s in mine:
            app.busy.pop(id(s), None)
