"""The vehicle process: drive a trip, decide when and where to charge, charge, carry on.

A trip follows the shortest road route. Energy drains per km (model consumption x drain
profile). At each city on the way the driver checks whether to charge: only when the rest of
the trip is not reachable with the reserve SoC, and either SoC is at or below the threshold
or the next leg would end below the reserve. Then the policy picks a station from the
(stale) snapshot; the vehicle drives there (the detour is recorded), queues, charges with
the CC-CV curve, pays the tariff and continues from the station. A battery that hits 0
strands the car. Stretches with no decision are driven in one timeout, so a trip costs a
handful of events.

The driving rules live in :mod:`evsim.planning` (shared with the trip planner). Since they
depend on the route and the SoC only, never on the clock, a trip's first stretch is walked
before it leaves (:mod:`evsim.model.departures`, a block of trips at a time): one that
reaches its destination (or runs dry) without a charging decision on the way meets nothing
and nobody, so it needs no process and no event: its TRIP_START and TRIP_END (or STRANDED)
rows are written to the trace ahead of time, and join it in time order. The others leave at
their time as a :func:`drive` process (:func:`depart`), which likewise ends at the trip's
last decision: the stretch after it (from the last station, or on from a city where no
station was found) gets its TRIP_END or STRANDED row written ahead instead of a timeout.
In the ``trip`` booking mode :mod:`evsim.model.booking` runs the same :func:`drive` loop
with a :class:`~evsim.model.booking.BookedTrip`: at a decision node where a stop is booked
the vehicle goes to the booked station instead of asking the policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

import simpy

from evsim.battery import ChargeCurve, session_power_kw, session_soc_out
from evsim.model.station import SessionPlan, new_plan
from evsim.model.world import ConnectorSpec
from evsim.planning import (
    TOPUP_SLACK_SOC,
    PlannedStop,
    RouteLegs,
    VehicleParams,
    Walk,
    avoid_after,
    back_to_city,
    charge_request,
    charge_target,
    charge_target_on,
    choose_station,
    dry_on_the_way,
    route_legs,
    to_station,
    walk_rules,
)
from evsim.protocol import BookedStop
from evsim.scenario import VehicleModelConfig
from evsim.slots import slot_constructor
from evsim.tariff import CompiledTariff, compiled
from evsim.trace import Kind

if TYPE_CHECKING:
    from evsim.model.departures import RouteTable
    from evsim.model.simulation import Simulation
    from evsim.model.station import SessionResult, SimStation
    from evsim.snapshot import Choice

__all__ = [
    "TOPUP_SLACK_SOC",
    "Drive",
    "DriveKit",
    "DriverApp",
    "SessionPlanner",
    "TakenStop",
    "ask_policy",
    "depart",
    "drive",
    "start_trip",
    "trip_process",
    "unplanned_stop",
]

_NOWHERE: frozenset[int] = frozenset()  # a trip's skip_at when it leaves


# a stop a driver app takes (and the booking it holds there, if any); what sizes a session
TakenStop = tuple[PlannedStop, BookedStop | None]
SessionPlanner = Callable[[ConnectorSpec, float], SessionPlan]


def ask_policy(sim: Simulation, d: Drive, pos: int) -> Choice | None:
    """The policy's station for ``d`` deciding to charge at node ``pos`` now, as on arrival
    (:func:`~evsim.planning.choose_station`: the reserve fallback, ``d.gave_up`` avoided)."""
    world = sim.world
    request = charge_request(world.roads, world.scenario.charging, d.params, pos, d.dest, d.soc)
    return choose_station(sim.policy, request, sim.snapshot, sim.env.now, d.gave_up)


def unplanned_stop(pos: int, choice: Choice, soc: float, t: float) -> PlannedStop:
    """A stop the policy picked at ``pos`` just now, not planned ahead: its station and
    detour are known, its arrival and charge are not (NaN)."""
    nan = math.nan
    return PlannedStop(
        pos, choice.station_index, choice.station_id, t, soc, nan, nan, nan, nan, "",
        choice.detour_km,
    )


class DriverApp(Protocol):
    """What :func:`drive` asks of a booking mode's driver app (:class:`~evsim.model.booking.
    BookedTrip` for ``trip``, :class:`~evsim.model.stop_booking.StopBooking` for ``stop``)."""

    def take(self, pos: int) -> TakenStop | None:
        """Where to charge at decision node ``pos``; None: the policy has no station."""
        ...

    def visit(
        self, station: SimStation, stop: TakenStop, session_id: str, soc: float,
        plan: SessionPlanner, patience_min: float,
    ) -> Generator[simpy.Event, Any, SessionResult]:
        """Charge at ``station`` (the stop :meth:`take` gave)."""
        ...

    def finish(self, reason: str) -> None:
        """The trip is over (``"trip_ended"`` or ``"stranded"``)."""
        ...


@dataclass(slots=True)
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
    gave_up: tuple[int, ...] = ()  # stations it left without charging (avoid_after)
    _params: VehicleParams | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def params(self) -> VehicleParams:
        """The vehicle as the planner sees it (made on first use)."""
        p = self._params
        if p is None:
            vm = self.vm
            p = self._params = _vehicle_params(
                self.vid, vm.battery_kwh, self.per_km, vm.max_charge_kw, vm.max_ac_kw
            )
        return p


# VehicleParams(vehicle_id, battery_kwh, per_km, max_dc_kw, max_ac_kw) without the frozen
# __init__
_vehicle_params = slot_constructor(VehicleParams)


class DriveKit:
    """What every vehicle of a run shares, looked up once per run: the trace's row
    appenders, the stations' static columns as Python lists, tariffs parsed, charging
    curves by vehicle model and connector class."""

    def __init__(self, sim: Simulation) -> None:
        world, trace = sim.world, sim.trace
        self.roads = world.roads
        self.ch = world.scenario.charging
        self.node_ids = world.roads.node_ids
        self.station_node = world.stations.node_list
        self.station_access = world.stations.access_km_list
        self.tariffs: tuple[CompiledTariff | None, ...] = tuple(
            None if t is None else compiled(t) for t in world.tariffs
        )
        # (battery, max DC, max AC, connector kW, type) -> (session kW, its curve)
        self._curves: dict[tuple[float, float, float, float, str], tuple[float, ChargeCurve]] = {}
        # the same by the ids of the model and the connector (both kept alive in _kept)
        self._curve_ids: dict[tuple[int, int], tuple[float, ChargeCurve]] = {}
        self._kept: list[tuple[VehicleModelConfig, ConnectorSpec]] = []
        self._od: dict[tuple[int, int], str] = {}
        self._legs: dict[tuple[int, int], RouteLegs] = {}
        self.route_table: RouteTable | None = None  # made by the run's first block of trips
        self.trips = sim.trips
        self.vehicle_models = world.vehicle_models
        row = trace.row_writer
        self.trip_start = row(Kind.TRIP_START, "vehicle_id", "booking_id", "soc", "detail")
        self.trip_end = row(Kind.TRIP_END, "vehicle_id", "booking_id", "soc", "distance_km")
        self.stranded = row(
            Kind.STRANDED, "vehicle_id", "booking_id", "soc", "distance_km", "detail"
        )
        self.no_station = row(Kind.NO_STATION, "vehicle_id", "soc", "detail")
        # the rows of a trip's last stretch, written ahead (see end_ahead)
        self.trip_end_ahead = row(
            Kind.TRIP_END, "vehicle_id", "booking_id", "soc", "distance_km", ahead=True
        )
        self.stranded_ahead = row(
            Kind.STRANDED, "vehicle_id", "booking_id", "soc", "distance_km", "detail", ahead=True
        )
        self.chosen = row(
            Kind.STATION_CHOSEN,
            "vehicle_id",
            "station_id",
            "company_id",
            "soc",
            "distance_km",
            "detail",
        )

    @cached_property
    def trip_columns(
        self,
    ) -> tuple[list[int], list[float], list[int], list[int], list[float]]:
        """The trips' vehicle model, drain, origin, destination and initial SoC as Python
        lists (what ``.item(k)`` gives, made once when the run first asks)."""
        t = self.trips
        return (
            t.model.tolist(),
            t.drain.tolist(),
            t.origin.tolist(),
            t.destination.tolist(),
            t.soc0.tolist(),
        )

    @staticmethod
    def of(sim: Simulation) -> DriveKit:
        """The run's kit (the simulation builds it; made here for a bare one)."""
        kit: DriveKit | None = getattr(sim, "drive_kit", None)
        if kit is None:
            kit = DriveKit(sim)
            sim.drive_kit = kit
        return kit

    def od_detail(self, origin: int, dest: int) -> str:
        text = self._od.get((origin, dest))
        if text is None:
            text = self._od[(origin, dest)] = f"{self.node_ids[origin]}->{self.node_ids[dest]}"
        return text

    def curve(self, vm: VehicleModelConfig, spec: ConnectorSpec) -> tuple[float, ChargeCurve]:
        """The session power of model ``vm`` on ``spec`` and its charging curve."""
        ids = (id(vm), id(spec))
        hit = self._curve_ids.get(ids)
        if hit is None:
            hit = self._curve_ids[ids] = self._curve(vm, spec)
            self._kept.append((vm, spec))  # (their ids stay theirs while the kit lives)
        return hit

    def _curve(self, vm: VehicleModelConfig, spec: ConnectorSpec) -> tuple[float, ChargeCurve]:
        key = (vm.battery_kwh, vm.max_charge_kw, vm.max_ac_kw, spec.power_kw, spec.type)
        hit = self._curves.get(key)
        if hit is None:
            power = session_power_kw(spec.power_kw, spec.type, vm.max_charge_kw, vm.max_ac_kw)
            ch = self.ch
            hit = self._curves[key] = (
                power,
                ChargeCurve(vm.battery_kwh, power, ch.taper_soc, ch.efficiency),
            )
        return hit

    def legs(self, src: int, dst: int) -> RouteLegs:
        """:func:`~evsim.planning.route_legs`, with this run's own dictionary in front."""
        legs = self._legs.get((src, dst))
        if legs is None:
            legs = self._legs[(src, dst)] = route_legs(self.roads, src, dst)
        return legs

    def end(self, d: Drive, w: Walk, t_min: float) -> None:
        """The trip ends after walk ``w``, at ``t_min``: its TRIP_END or STRANDED row."""
        if w.stranded_km is not None:
            self.stranded(t_min, d.vid, d.vid, 0.0, d.driven_km, self.node_ids[d.pos])
        else:
            self.trip_end(t_min, d.vid, d.vid, d.soc, d.driven_km)

    def end_ahead(self, d: Drive, legs: RouteLegs, w: Walk, t_min: float) -> None:
        """:meth:`end`'s row, written ahead for ``t_min``: ``w``, the trip's last stretch
        (along ``legs`` from where ``d`` is now), has no decision on it, so nothing met on
        the way can change it (what :mod:`evsim.model.departures` does for a whole trip)."""
        km = d.driven_km + w.km
        if w.stranded_km is not None:
            self.stranded_ahead(t_min, d.vid, d.vid, 0.0, km, self.node_ids[legs.nodes[w.j]])
        else:
            self.trip_end_ahead(t_min, d.vid, d.vid, w.soc, km)


def start_trip(sim: Simulation, k: int) -> Drive:
    """The vehicle of trip ``k`` at its origin; emits TRIP_START."""
    kit = DriveKit.of(sim)
    model, drain, origin, dest, soc0 = kit.trip_columns
    vm = kit.vehicle_models[model[k]]
    per_km = vm.consumption_kwh_per_km * drain[k] / vm.battery_kwh
    vid = f"v{k}"
    d = Drive(k, vid, vm, per_km, origin[k], dest[k], soc0[k])
    kit.trip_start(sim.env.now, vid, vid, d.soc, kit.od_detail(d.pos, d.dest))
    return d


def trip_process(sim: Simulation, k: int) -> Generator[simpy.Event, Any, None]:
    yield from drive(sim, start_trip(sim, k))


def depart(
    sim: Simulation,
    d: Drive,
    first: Walk,
    app: Callable[[Simulation, Drive, str], DriverApp] | None = None,
) -> None:
    """A vehicle whose first stretch was walked before it left (:func:`~evsim.model.
    departures.release_block`) leaves now: TRIP_START, then its :func:`drive`; with
    ``app`` (the ``stop`` mode's :class:`~evsim.model.stop_booking.StopBooking`), driven by
    ``app(sim, d, home company)``."""
    kit = getattr(sim, "drive_kit", None) or DriveKit.of(sim)  # (DriveKit.of, inline)
    kit.trip_start(sim.env.now, d.vid, d.vid, d.soc, kit.od_detail(d.pos, d.dest))
    if app is None:
        sim.env.process(drive(sim, d, first=first))
    else:
        assert sim.bus is not None
        sim.env.process(drive(sim, d, app(sim, d, sim.bus.home_company(d.vid)), first=first))


def drive(
    sim: Simulation, d: Drive, booked: DriverApp | None = None, first: Walk | None = None
) -> Generator[simpy.Event, Any, None]:
    """Drive to the destination, charging where needed (at booked stations when given).
    ``first``: the first stretch, already walked from where ``d`` is (:func:`depart`)."""
    env, world = sim.env, sim.world
    kit = DriveKit.of(sim)
    roads = world.roads
    ch = world.scenario.charging
    vm, vid, per_km, dest = d.vm, d.vid, d.per_km, d.dest
    w = first  # the next stretch, when already walked
    legs = kit.legs(d.pos, dest)  # the route on from where the vehicle is
    while True:
        if w is None:
            w = walk_rules(ch, legs, d.soc, per_km, d.skip_at)
        if booked is None and not w.stop_here and w.minutes > 0:
            # the last stretch: its row is written ahead, with no event (one that takes no
            # time ends the trip now, below, between the rows of this instant as before)
            kit.end_ahead(d, legs, w, env.now + w.minutes)
            return
        if w.minutes > 0:
            yield simpy.Timeout(env, w.minutes)
        d.soc, d.driven_km = w.soc, d.driven_km + w.km  # where the stretch ends
        d.pos = pos = legs.nodes[w.j]
        if not w.stop_here:
            kit.end(d, w, env.now)
            if booked is not None:
                booked.finish("stranded" if w.stranded_km is not None else "trip_ended")
            return
        w = None
        stop = booked.take(pos) if booked is not None else None
        if stop is not None:
            index, detour_km = stop[0].station_index, stop[0].detour_km
        else:
            choice = ask_policy(sim, d, pos)
            d.skip_at.add(pos)
            if choice is None:
                kit.no_station(env.now, vid, d.soc, kit.node_ids[pos])
                legs = kit.legs(pos, dest)  # on from here
                continue
            index, detour_km = choice.station_index, choice.detour_km
            del choice  # freed now, not kept alive (and promoted by the GC) for hours
        d.skip_at.add(pos)
        station = sim.stations[index]
        kit.chosen(
            env.now,
            vid,
            station.station_id,
            station.company_id,
            d.soc,
            detour_km,
            sim.policy_name,
        )
        st_node = kit.station_node[index]
        access = kit.station_access[index]
        go_km, go_min = to_station(roads, pos, st_node, access)
        soc = d.soc
        dry = dry_on_the_way(soc, per_km, go_km, go_min)
        if dry is not None:  # a stale or optimistic choice: run dry on the way
            yield simpy.Timeout(env, dry[0])
            kit.stranded(env.now, vid, vid, 0.0, d.driven_km + dry[1], station.station_id)
            if booked is not None:
                booked.finish("stranded")
            return
        yield simpy.Timeout(env, go_min)
        soc -= go_km * per_km
        d.driven_km += go_km
        d.pos = pos = st_node
        legs = kit.legs(pos, dest)
        if legs.nodes:
            target = charge_target_on(ch, legs, per_km, access)
        else:  # no road on to the destination
            target = charge_target(roads, ch, per_km, pos, dest, access)
        plan = _Planner(kit, vm, kit.tariffs[index], soc, session_soc_out(soc, target))
        d.n_sessions += 1
        session_id = f"{vid}-{d.n_sessions}"
        if booked is None:
            # in this process: no child process to start and join
            result = yield from station.visit(vid, session_id, soc, plan, ch.max_wait_min)
        else:  # the trip mode's visit stays a process of its own (its traces depend on it)
            visit = (
                booked.visit(station, stop, session_id, soc, plan, ch.max_wait_min)
                if stop is not None
                else station.visit(vid, session_id, soc, plan, ch.max_wait_min)
            )
            result = yield env.process(visit)
        d.gave_up = avoid_after(d.gave_up, index, result.connector is not None)
        if result.plan is not None and result.plan.soc_after is not None:
            soc = result.plan.soc_after  # pos stays in skip_at: one charge per city per trip
        d.soc = soc
        del plan, result  # (likewise)
        # back from the station to its city (access road)
        if access > 0:
            back_min, d.soc = back_to_city(d.soc, per_km, access)
            d.driven_km += access
            if booked is None:  # the stretch from the city, walked now (no clock involved)
                w = walk_rules(ch, legs, d.soc, per_km, d.skip_at)
                if not w.stop_here:  # the last one: the trip ends with no event more
                    t = env.now + back_min  # (where the timeout would put the clock)
                    kit.end_ahead(d, legs, w, t + w.minutes if w.minutes > 0 else t)
                    return
            yield simpy.Timeout(env, back_min)


class _Planner:
    """The session a vehicle arriving with ``soc_in`` charges on a given connector, starting
    at a given time: to ``soc_out``, priced by the tariff (:data:`SessionPlanner`). One
    object rather than a closure (a function and a cell per value, all of them for the
    cyclic GC to look at)."""

    __slots__ = ("kit", "soc_in", "soc_out", "tariff", "vm")

    def __init__(
        self,
        kit: DriveKit,
        vm: VehicleModelConfig,
        tariff: CompiledTariff | None,
        soc_in: float,
        soc_out: float,
    ) -> None:
        self.kit, self.vm, self.tariff, self.soc_in, self.soc_out = kit, vm, tariff, soc_in, soc_out

    def __call__(self, spec: ConnectorSpec, t_start: float) -> SessionPlan:
        soc_in, soc_out, tariff = self.soc_in, self.soc_out, self.tariff
        power, curve = self.kit.curve(self.vm, spec)
        minutes = curve.minutes_to(soc_in, soc_out)
        if tariff is None:
            price = 0.0
        else:
            price = tariff.charge_total(
                t_start,
                minutes,
                lambda e: curve.energy_kwh(soc_in, curve.soc_after(soc_in, e)),
                power,
            )
        return new_plan(minutes, curve.energy_kwh(soc_in, soc_out), price, soc_out, power)
