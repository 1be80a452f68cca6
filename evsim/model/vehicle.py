"""The vehicle process: drive a trip, decide when and where to charge, charge, carry on.

A trip follows the shortest road route. Energy drains per km (model consumption x drain
profile). At each city on the way the driver checks whether to charge: only when the rest of
the trip is not reachable with the reserve SoC, and either SoC is at or below the threshold or
the next leg would end below the reserve. Then the policy picks a station from the (stale)
snapshot; the vehicle drives there (the detour is recorded), queues, charges with the CC-CV
curve, pays the tariff and continues from the station. A battery that hits 0 strands the car.
Stretches with no decision are driven in one timeout, so a trip costs a handful of events.

The driving rules live in :mod:`evsim.planning` (shared with the trip planner). In the
``trip`` booking mode :mod:`evsim.model.booking` runs the same :func:`drive` loop with a
:class:`~evsim.model.booking.BookedTrip`: at a decision node where a stop is booked the
vehicle goes to the booked station instead of asking the policy.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import simpy

from evsim.battery import MAX_TARGET_SOC, ChargeCurve, session_power_kw
from evsim.model.station import SessionPlan
from evsim.model.world import ConnectorSpec
from evsim.planning import (
    TOPUP_SLACK_SOC,
    VehicleParams,
    access_min,
    charge_request,
    charge_target,
    choose_station,
    needs_charge,
    route_of,
    walk_route,
)
from evsim.scenario import VehicleModelConfig
from evsim.tariff import price_session
from evsim.trace import Kind

if TYPE_CHECKING:
    from evsim.model.booking import BookedTrip
    from evsim.model.simulation import Simulation

__all__ = ["TOPUP_SLACK_SOC", "Drive", "drive", "start_trip", "trip_process"]


@dataclass
class Drive:
    """A vehicle's state along its trip."""

    k: int
    vid: str
    vm: VehicleModelConfig
    per_km: float  # SoC per km
    pos: int
    dest: int
    soc: float
    driven_km: float = 0.0
    n_sessions: int = 0
    skip_at: set[int] = field(default_factory=set)  # nodes where asking again would not help

    @property
    def params(self) -> VehicleParams:
        return VehicleParams(
            self.vid, self.vm.battery_kwh, self.per_km, self.vm.max_charge_kw, self.vm.max_ac_kw
        )


def start_trip(sim: Simulation, k: int) -> Drive:
    """The vehicle of trip ``k`` at its origin; emits TRIP_START."""
    env, world, trace, trips = sim.env, sim.world, sim.trace, sim.trips
    roads = world.roads
    vm = world.vehicle_models[int(trips.model[k])]
    per_km = vm.consumption_kwh_per_km * float(trips.drain[k]) / vm.battery_kwh
    d = Drive(
        k,
        f"v{k}",
        vm,
        per_km,
        int(trips.origin[k]),
        int(trips.destination[k]),
        float(trips.soc0[k]),
    )
    trace.emit(
        env.now,
        Kind.TRIP_START,
        vehicle_id=d.vid,
        booking_id=d.vid,
        soc=d.soc,
        detail=f"{roads.node_ids[d.pos]}->{roads.node_ids[d.dest]}",
    )
    return d


def trip_process(sim: Simulation, k: int) -> Generator[simpy.Event, Any, None]:
    yield from drive(sim, start_trip(sim, k))


def drive(
    sim: Simulation, d: Drive, booked: BookedTrip | None = None
) -> Generator[simpy.Event, Any, None]:
    """Drive to the destination, charging where needed (at booked stations when given)."""
    env, world, trace = sim.env, sim.world, sim.trace
    roads = world.roads
    ch = world.scenario.charging
    vm, vid, per_km, dest = d.vm, d.vid, d.per_km, d.dest
    battery = vm.battery_kwh

    def decide(node: int, s: float, nxt: int | None) -> bool:
        return needs_charge(roads, ch, per_km, dest, d.skip_at, node, s, nxt)

    while True:
        route = route_of(roads, d.pos, dest)
        w = walk_route(roads, route, d.soc, per_km, decide)
        if w.minutes > 0:
            yield env.timeout(w.minutes)
        d.soc, d.driven_km, d.pos = w.soc, d.driven_km + w.km, route[w.j]
        pos = d.pos
        if w.stranded_km is not None:
            trace.emit(
                env.now,
                Kind.STRANDED,
                vehicle_id=vid,
                booking_id=vid,
                soc=0.0,
                distance_km=d.driven_km,
                detail=roads.node_ids[pos],
            )
            if booked is not None:
                booked.finish("stranded")
            return
        if not w.stop_here:
            trace.emit(
                env.now,
                Kind.TRIP_END,
                vehicle_id=vid,
                booking_id=vid,
                soc=d.soc,
                distance_km=d.driven_km,
            )
            if booked is not None:
                booked.finish("trip_ended")
            return
        stop = booked.take(pos) if booked is not None else None
        if stop is not None:
            index, detour_km = stop[0].station_index, stop[0].detour_km
        else:
            request = charge_request(roads, ch, d.params, pos, dest, d.soc)
            choice = choose_station(sim.policy, request, sim.snapshot, env.now)
            d.skip_at.add(pos)
            if choice is None:
                trace.emit(
                    env.now, Kind.NO_STATION, vehicle_id=vid, soc=d.soc, detail=roads.node_ids[pos]
                )
                continue
            index, detour_km = choice.station_index, choice.detour_km
        d.skip_at.add(pos)
        station = sim.stations[index]
        trace.emit(
            env.now,
            Kind.STATION_CHOSEN,
            vehicle_id=vid,
            station_id=station.station_id,
            company_id=station.company_id,
            soc=d.soc,
            distance_km=detour_km,
            detail=sim.policy_name,
        )
        st_node = world.stations.node_list[index]
        access = world.stations.access_km_list[index]
        go_km = roads.dist_km.item(pos, st_node) + access
        go_min = roads.time_min.item(pos, st_node) + access_min(access)
        soc = d.soc
        if soc - go_km * per_km < 0:  # a stale or optimistic choice: run dry on the way
            yield env.timeout(go_min * (soc / per_km) / go_km)
            trace.emit(
                env.now,
                Kind.STRANDED,
                vehicle_id=vid,
                booking_id=vid,
                soc=0.0,
                distance_km=d.driven_km + soc / per_km,
                detail=station.station_id,
            )
            if booked is not None:
                booked.finish("stranded")
            return
        yield env.timeout(go_min)
        soc -= go_km * per_km
        d.driven_km += go_km
        d.pos = pos = st_node
        target = charge_target(roads, ch, per_km, pos, dest, access)
        tariff = world.tariffs[index]
        soc_in = soc

        def plan(
            spec: ConnectorSpec,
            t_start: float,
            soc_in: float = soc_in,
            target: float = target,
            tariff: Any = tariff,
        ) -> SessionPlan:
            power = session_power_kw(spec.power_kw, spec.type, vm.max_charge_kw, vm.max_ac_kw)
            curve = ChargeCurve(battery, power, ch.taper_soc, ch.efficiency)
            soc_out = max(min(target, MAX_TARGET_SOC), soc_in)
            minutes = curve.minutes_to(soc_in, soc_out)
            price = price_session(
                tariff,
                t_start,
                minutes,
                lambda e: curve.energy_kwh(soc_in, curve.soc_after(soc_in, e)),
                power,
            ).total
            return SessionPlan(minutes, curve.energy_kwh(soc_in, soc_out), price, soc_out, power)

        d.n_sessions += 1
        session_id = f"{vid}-{d.n_sessions}"
        if stop is not None:
            assert booked is not None
            visit = booked.visit(station, stop, session_id, soc, plan, ch.max_wait_min)
        else:
            visit = station.visit(vid, session_id, soc, plan, ch.max_wait_min)
        result = yield env.process(visit)
        if result.plan is not None and result.plan.soc_after is not None:
            soc = result.plan.soc_after  # pos stays in skip_at: one charge per city per trip
        d.soc = soc
        # back from the station to its city (access road)
        if access > 0:
            yield env.timeout(access_min(access))
            d.soc = max(d.soc - access * per_km, 0.0)
            d.driven_km += access
