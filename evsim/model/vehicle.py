"""The vehicle process: drive a trip, decide when and where to charge, charge, carry on.

A trip follows the shortest road route. Energy drains per km (model consumption x drain
profile). At each city on the way the driver checks whether to charge: only when the rest of
the trip is not reachable with the reserve SoC, and either SoC is at or below the threshold or
the next leg would end below the reserve. Then the policy picks a station from the (stale)
snapshot; the vehicle drives there (the detour is recorded), queues, charges with the CC-CV
curve, pays the tariff and continues from the station. A battery that hits 0 strands the car.
Stretches with no decision are driven in one timeout, so a trip costs a handful of events.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import simpy

from evsim.battery import MAX_TARGET_SOC, ChargeCurve, session_power_kw
from evsim.model.station import SessionPlan
from evsim.model.world import ConnectorSpec
from evsim.snapshot import ChargeRequest
from evsim.tariff import price_session
from evsim.trace import Kind

if TYPE_CHECKING:
    from evsim.model.simulation import Simulation

__all__ = ["TOPUP_SLACK_SOC", "trip_process"]

TOPUP_SLACK_SOC = 0.15  # charge past the target by up to this much to finish without a stop


def trip_process(sim: Simulation, k: int) -> Generator[simpy.Event, Any, None]:
    env, world, trace = sim.env, sim.world, sim.trace
    roads, trips = world.roads, sim.trips
    ch = world.scenario.charging
    vm = world.vehicle_models[int(trips.model[k])]
    battery = vm.battery_kwh
    per_km = vm.consumption_kwh_per_km * float(trips.drain[k]) / battery  # SoC per km
    vid = f"v{k}"
    pos, dest = int(trips.origin[k]), int(trips.destination[k])
    soc = float(trips.soc0[k])
    driven_km = 0.0
    n_sessions = 0
    skip_at: set[int] = set()  # nodes where asking again would not help
    trace.emit(
        env.now,
        Kind.TRIP_START,
        vehicle_id=vid,
        booking_id=vid,
        soc=soc,
        detail=f"{roads.node_ids[pos]}->{roads.node_ids[dest]}",
    )

    def needs_charge(node: int, s: float, nxt: int | None) -> bool:
        if s - roads.dist_km[node, dest] * per_km >= ch.reserve_soc:
            return False
        if node in skip_at:
            return False
        if s <= ch.threshold_soc:
            return True
        margin = ch.reserve_soc + ch.safety_margin_soc
        return nxt is not None and s - roads.dist_km[node, nxt] * per_km < margin

    while True:
        route = roads.route(pos, dest)
        # walk the route until a decision is due, the battery runs out, or the trip ends
        j, s, t, km = 0, soc, 0.0, 0.0
        stop_here = False
        stranded_km = None
        while j < len(route) - 1:
            node, nxt = route[j], route[j + 1]
            if needs_charge(node, s, nxt):
                stop_here = True
                break
            leg = float(roads.dist_km[node, nxt])
            if s - leg * per_km < 0:
                stranded_km = s / per_km
                t += float(roads.time_min[node, nxt]) * stranded_km / leg
                km += stranded_km
                s = 0.0
                break
            s -= leg * per_km
            t += float(roads.time_min[node, nxt])
            km += leg
            j += 1
        if t > 0:
            yield env.timeout(t)
        soc, driven_km, pos = s, driven_km + km, route[j]
        if stranded_km is not None:
            trace.emit(
                env.now,
                Kind.STRANDED,
                vehicle_id=vid,
                booking_id=vid,
                soc=0.0,
                distance_km=driven_km,
                detail=roads.node_ids[pos],
            )
            return
        if not stop_here:
            trace.emit(
                env.now,
                Kind.TRIP_END,
                vehicle_id=vid,
                booking_id=vid,
                soc=soc,
                distance_km=driven_km,
            )
            return
        request = ChargeRequest(
            vehicle_id=vid,
            node=pos,
            lat=float(roads.lat[pos]),
            lon=float(roads.lon[pos]),
            dest_node=dest,
            soc=soc,
            battery_kwh=battery,
            consumption_kwh_per_km=per_km * battery,
            max_dc_kw=vm.max_charge_kw,
            max_ac_kw=vm.max_ac_kw,
            reserve_soc=ch.reserve_soc,
            target_soc=ch.target_soc,
        )
        choice = sim.policy(request, sim.snapshot, env.now)
        if choice is None and ch.reserve_soc > 0:  # emergency: dip into the reserve
            choice = sim.policy(replace(request, reserve_soc=0.0), sim.snapshot, env.now)
        skip_at.add(pos)
        if choice is None:
            trace.emit(
                env.now, Kind.NO_STATION, vehicle_id=vid, soc=soc, detail=roads.node_ids[pos]
            )
            continue
        station = sim.stations[choice.station_index]
        trace.emit(
            env.now,
            Kind.STATION_CHOSEN,
            vehicle_id=vid,
            station_id=station.station_id,
            company_id=station.company_id,
            soc=soc,
            distance_km=choice.detour_km,
            detail=sim.policy_name,
        )
        st_node = int(world.stations.node[choice.station_index])
        access = float(world.stations.access_km[choice.station_index])
        go_km = float(roads.dist_km[pos, st_node]) + access
        go_min = float(roads.time_min[pos, st_node]) + access / 50.0 * 60.0
        if soc - go_km * per_km < 0:  # a stale or optimistic choice: run dry on the way
            yield env.timeout(go_min * (soc / per_km) / go_km)
            trace.emit(
                env.now,
                Kind.STRANDED,
                vehicle_id=vid,
                booking_id=vid,
                soc=0.0,
                distance_km=driven_km + soc / per_km,
                detail=station.station_id,
            )
            return
        yield env.timeout(go_min)
        soc -= go_km * per_km
        driven_km += go_km
        pos = st_node
        route_on = roads.route(pos, dest)
        next_leg = float(roads.dist_km[pos, route_on[1]]) if len(route_on) > 1 else 0.0
        finish = (float(roads.dist_km[pos, dest]) + access) * per_km + ch.reserve_soc + 0.01
        target = max(ch.target_soc, (next_leg + access) * per_km + ch.reserve_soc + 0.01)
        if target < finish <= min(target + TOPUP_SLACK_SOC, MAX_TARGET_SOC):
            target = finish
        tariff = world.tariffs[choice.station_index]
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

        n_sessions += 1
        result = yield env.process(
            station.visit(vid, f"{vid}-{n_sessions}", soc, plan, ch.max_wait_min)
        )
        if result.plan is not None and result.plan.soc_after is not None:
            soc = result.plan.soc_after  # pos stays in skip_at: one charge per city per trip
        # back from the station to its city (access road)
        if access > 0:
            yield env.timeout(access / 50.0 * 60.0)
            soc = max(soc - access * per_km, 0.0)
            driven_km += access
