"""The ``trip`` booking mode: a vehicle books every charging stop before it leaves.

:func:`booked_trip_process` replaces :func:`evsim.model.vehicle.trip_process`:

1. plan the stops (:func:`evsim.planning.plan_trip`: the configured policy asked at each
   planned decision node, with the snapshot as it is at departure);
2. no stop needed: drive as usual. Otherwise send a ``TripRequest`` to the vehicle's home
   company coordinator (one window per stop: planned arrival to arrival + estimated charging
   time + ``booking.slot_min``, with ``booking.grace_min`` before it turns NO_SHOW) and wait
   for the definitive answer, at most ``booking.answer_timeout_min`` (re-sending the request
   every ``booking.request_retry_min``: requests and answers can be lost);
3. BOOKED: drive the same route; at each planned decision node go to the booked station and
   charge on the booked connector (:meth:`SimStation.visit_booked`);
4. REJECTED / FAILED / no answer: drive charging on arrival, exactly as the ``on_arrival``
   mode does.

Falling back mid-trip: when a booked stop cannot be used (``no_show`` because the vehicle
came too late, ``server_down`` because the owner is in an outage, the connector still busy
past the vehicle's patience) the vehicle charges as a walk-in at that station, cancels the
rest of its trip (``TripCancel``) and charges on arrival from then on. The same happens if
the vehicle reaches a decision node the plan did not predict, and the trip's unused stops
are canceled when it ends (or strands) early. A BOOKED answer that arrives after the vehicle
gave up waiting is canceled at once.

Simplifications: a vehicle's home company is a hash of its id; the plan is not revised on
the way; the booked vehicle drives exactly the planned route, so its arrivals are late only
by the time it waited for the answer and at earlier stops.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import simpy

from evsim.model.protocol_bus import class_key, vehicle_node
from evsim.model.station import SessionPlan, SessionResult, SimStation
from evsim.model.vehicle import Drive, drive, start_trip
from evsim.model.world import ConnectorSpec
from evsim.planning import PlannedStop, TripPlan, plan_trip
from evsim.protocol import BookedStop, StopRequest, TripRequest
from evsim.protocol.messages import msg_id
from evsim.trace import Kind

if TYPE_CHECKING:
    from evsim.model.simulation import Simulation

__all__ = ["BookedTrip", "booked_trip_process", "trip_request"]


def trip_request(sim: Simulation, vehicle_id: str, plan: TripPlan) -> TripRequest:
    """The trip request for a plan's stops (trip id = vehicle id)."""
    cfg = sim.scenario.booking
    stops = []
    for s in plan.stops:
        station = sim.stations[s.station_index]
        stops.append(
            StopRequest(
                station.company_id,
                class_key(station.station_id, s.connector_power_kw, s.connector_type),
                s.arrive_min,
                s.arrive_min + s.charge_min + cfg.slot_min,
                cfg.grace_min,
            )
        )
    vnode = vehicle_node(vehicle_id)
    return TripRequest(
        msg_id(vnode, "TRIP_REQUEST", vehicle_id), vnode, vehicle_id, vehicle_id, tuple(stops)
    )


class BookedTrip:
    """A BOOKED trip being driven: which stop is next, and falling back when it fails."""

    def __init__(
        self,
        sim: Simulation,
        d: Drive,
        home: str,
        plan: TripPlan,
        bookings: tuple[BookedStop, ...],
    ) -> None:
        self.sim = sim
        self.d = d
        self.home = home
        self.plan = plan
        self.bookings = bookings
        self.next = 0
        self.active = True

    def take(self, pos: int) -> tuple[PlannedStop, BookedStop] | None:
        """The booked stop for a decision at node ``pos``, or None (then fall back)."""
        if not self.active or self.next >= len(self.plan.stops):
            return None  # nothing (left) booked: charge on arrival
        if self.plan.stops[self.next].decision_node == pos:
            i = self.next
            self.next += 1
            return self.plan.stops[i], self.bookings[i]
        self.cancel("diverged")
        return None

    def visit(
        self,
        station: SimStation,
        stop: tuple[PlannedStop, BookedStop],
        session_id: str,
        soc: float,
        plan: Callable[[ConnectorSpec, float], SessionPlan],
        patience_min: float,
    ) -> Generator[simpy.Event, Any, SessionResult]:
        _, b = stop
        result, why = yield from station.visit_booked(
            self.d.vid,
            session_id,
            soc,
            plan,
            b.booking_id,
            b.connector_id,
            b.start_min,
            patience_min,
        )
        if why:
            self.cancel(why)
        return result

    def finish(self, reason: str) -> None:
        """The trip is over: cancel the stops it did not use."""
        if self.active and self.next < len(self.plan.stops):
            self.cancel(reason)

    def cancel(self, reason: str) -> None:
        if not self.active:
            return
        self.active = False
        sim = self.sim
        sim.trace.emit(
            sim.env.now,
            Kind.TRIP_BOOKING,
            vehicle_id=self.d.vid,
            booking_id=self.d.vid,
            status="CANCELED",
            detail=reason,
        )
        assert sim.bus is not None
        sim.bus.cancel_trip(self.d.vid, self.home, self.d.vid)


def booked_trip_process(sim: Simulation, k: int) -> Generator[simpy.Event, Any, None]:
    env, world, trace, bus = sim.env, sim.world, sim.trace, sim.bus
    assert bus is not None
    d = start_trip(sim, k)
    ch = world.scenario.charging
    plan = plan_trip(
        world.roads,
        sim.snapshot,
        world.connectors,
        sim.policy,
        ch,
        d.params,
        d.pos,
        d.dest,
        d.soc,
        env.now,
    )
    if not plan.stops:
        yield from drive(sim, d)
        return
    req = trip_request(sim, d.vid, plan)
    home = bus.home_company(d.vid)
    trace.emit(
        env.now,
        Kind.TRIP_BOOKING,
        vehicle_id=d.vid,
        booking_id=d.vid,
        company_id=home,
        status="PENDING",
        detail=f"{len(plan.stops)} stop(s)",
    )
    result = yield from bus.request_trip(d.vid, home, req, sim.scenario.booking.answer_timeout_min)
    if result is None:
        status, reason = "FAILED", "no_answer"
    else:
        status, reason = result.outcome, result.reason
    trace.emit(
        env.now,
        Kind.TRIP_BOOKING,
        vehicle_id=d.vid,
        booking_id=d.vid,
        company_id=home,
        status=status,
        detail=reason or None,
    )
    if result is not None and result.outcome == "BOOKED":
        yield from drive(sim, d, BookedTrip(sim, d, home, plan, result.bookings))
    else:
        yield from drive(sim, d)
