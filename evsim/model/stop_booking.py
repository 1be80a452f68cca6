"""The ``stop`` booking mode: a vehicle books each charging stop when it decides to make it.

The live network's default (``evsim live run --booking stop``), simulated. A vehicle drives
as in ``on_arrival``: at a decision node the policy picks a station (the same
:func:`~evsim.planning.choose_station`, with its reserve fallback and ``avoid``). Then,
instead of just driving there, the vehicle books that stop through the reservation protocol,
as a one-stop trip request to its home company's coordinator: the window from its arrival
to arrival + the estimated charge on the connector class it can use best + ``booking.
slot_min`` (:func:`evsim.planning.stop_at`, :func:`evsim.booking_app.booking_window`),
NO_SHOW ``booking.grace_min`` after its start. The request runs while the vehicle drives;
at the station it waits for the answer if it has not come yet (at most
``booking.answer_timeout_min`` from the request). BOOKED: it charges on the booked connector
(:meth:`SimStation.visit_booked`, which falls back to the station's walk-in line when the
booking cannot be used); REJECTED, FAILED or no answer: it queues there as a walk-in. No
stop is booked ahead, nothing is re-planned and nothing is rebooked: what the live vehicle
agent does in this mode, step for step.

Requests are traced as in the ``trip`` mode (:mod:`evsim.model.booking`): ``trip_booking``
rows with ``booking_id`` = the request's trip id (``<vehicle id>``, then ``<vehicle
id>.<n>``), PENDING then BOOKED / REJECTED / FAILED.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import simpy

from evsim.booking_app import Window, booking_window
from evsim.model.booking import VehicleLink, trip_request
from evsim.model.station import SessionResult, SimStation
from evsim.model.vehicle import Drive, SessionPlanner, TakenStop, ask_policy, unplanned_stop
from evsim.planning import PlannedStop, stop_at
from evsim.protocol import BookedStop

if TYPE_CHECKING:
    from evsim.model.simulation import Simulation

__all__ = ["StopBooking"]


class StopBooking:
    """The driver app of one vehicle in the ``stop`` mode (the hooks :func:`~evsim.model.
    vehicle.drive` calls: :meth:`take`, :meth:`visit`, :meth:`finish`)."""

    def __init__(self, sim: Simulation, d: Drive, home: str) -> None:
        self.sim, self.d, self.env, self.cfg = sim, d, sim.env, sim.scenario.booking
        self.link = VehicleLink(sim, d.vid, home)  # to the home company's coordinator
        self._requests = 0
        self._answer: simpy.Process | None = None  # the booking of the stop under way

    def take(self, pos: int) -> TakenStop | None:
        """At decision node ``pos``: the policy's station, its booking requested (answered
        at the station, :meth:`visit`); None if the policy has none."""
        sim, d, env = self.sim, self.d, self.env
        choice = ask_policy(sim, d, pos)
        if choice is None:
            return None
        world = sim.world
        stop = stop_at(
            world.roads,
            world.stations,
            world.connectors,
            world.scenario.charging,
            d.params,
            choice.station_index,
            choice.detour_km,
            pos,
            d.dest,
            d.soc,
            env.now,
        )
        if stop is None:  # it runs dry on the way (drive() strands it): nothing to book
            return unplanned_stop(pos, choice, d.soc, env.now), None
        self._answer = env.process(self._book(stop))
        return stop, None

    def _book(self, stop: PlannedStop) -> Generator[simpy.Event, Any, BookedStop | None]:
        """Request ``stop``'s window (traced); the booked stop, or None."""
        vid = self.d.vid
        self._requests += 1
        tid = vid if self._requests == 1 else f"{vid}.{self._requests}"
        start, end = booking_window(stop, self.cfg.slot_min)
        req = trip_request(self.sim, vid, tid, [stop], [Window(start, end, None, start)])
        self.link.trace(tid, "PENDING", "1 stop(s)")
        result = yield from self.link.request(req)
        if result is None:
            self.link.trace(tid, "FAILED", "no_answer")
            return None
        self.link.trace(tid, result.outcome, result.reason or None)
        return result.bookings[0] if result.outcome == "BOOKED" and result.bookings else None

    def visit(
        self, station: SimStation, stop: TakenStop, session_id: str, soc: float,
        plan: SessionPlanner, patience_min: float,
    ) -> Generator[simpy.Event, Any, SessionResult]:
        """Charge at ``station``: against the booking if it came, else as a walk-in."""
        answer, self._answer = self._answer, None
        booked: BookedStop | None = None
        if answer is not None:
            booked = answer.value if answer.triggered else (yield answer)
        vid = self.d.vid
        if booked is None:
            return (yield from station.visit(vid, session_id, soc, plan, patience_min))
        result, _why = yield from station.visit_booked(
            vid,
            session_id,
            soc,
            plan,
            booked.booking_id,
            booked.connector_id,
            booked.start_min,
            patience_min,
        )
        return result

    def finish(self, reason: str) -> None:
        """The trip is over. A booking it did not reach is left to expire (NO_SHOW), as the
        live vehicle agent leaves it in this mode."""
