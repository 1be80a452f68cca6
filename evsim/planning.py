"""Trip planning: where a vehicle will charge on its way, worked out before it leaves.

Pure functions (no SimPy, no I/O, no clock reads). The driving rules are the ones the
charge-on-arrival vehicle follows (:mod:`evsim.model.vehicle` calls the same helpers), so a
plan predicts exactly what the vehicle will do on a deterministic road: it walks the shortest
route, decides to charge where :func:`walk_rules` says so, asks the configured policy for a
station (a :class:`~evsim.snapshot.ChargeRequest` at the planned node, SoC and time), drives
there, charges to :func:`charge_target` and carries on from the station.

What a plan cannot know: the policy is asked with *today's* snapshot for a decision that
lies in the future (nobody knows the queues of tomorrow), and every booked stop's charging
time is estimated on the connector class the vehicle will book (:func:`booking_class`: the
station's connectors with the highest power this vehicle can draw).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol, TypeVar

import numpy as np

from evsim.battery import MAX_TARGET_SOC, ChargeCurve, session_power_kw, session_soc_out
from evsim.geo import RoadNetwork
from evsim.scenario import ChargingBehaviour
from evsim.slots import slot_constructor
from evsim.snapshot import ACCESS_SPEED_KMH, ChargeRequest, Choice, NetworkSnapshot, StationTable

__all__ = [
    "TOPUP_SLACK_SOC",
    "ConnectorLike",
    "PlannedStop",
    "RouteLegs",
    "TripPlan",
    "VehicleParams",
    "access_min",
    "avoid_after",
    "back_to_city",
    "booking_class",
    "charge_request",
    "charge_target",
    "charge_target_on",
    "choose_again",
    "choose_station",
    "class_connectors",
    "connector_class",
    "connector_pools",
    "dry_on_the_way",
    "plan_stop",
    "plan_trip",
    "route_legs",
    "route_of",
    "stop_at",
    "to_station",
    "walk_rules",
]

TOPUP_SLACK_SOC = 0.15  # charge past the target by up to this much to finish without a stop


class ConnectorLike(Protocol):
    @property
    def connector_id(self) -> str: ...

    @property
    def power_kw(self) -> float: ...

    @property
    def type(self) -> str: ...


@dataclass(frozen=True, slots=True)
class VehicleParams:
    vehicle_id: str
    battery_kwh: float
    per_km: float  # SoC per km (model consumption x drain profile / battery)
    max_dc_kw: float
    max_ac_kw: float


@dataclass(frozen=True, slots=True)
class PlannedStop:
    """One charging stop of a plan; times are absolute minutes."""

    decision_node: int  # road node where the vehicle decides to charge
    station_index: int
    station_id: str
    arrive_min: float  # at the station
    soc_in: float
    soc_out: float
    charge_min: float  # estimated on the booked connector class
    power_kw: float  # session power on that class
    connector_power_kw: float  # the class: rated power ...
    connector_type: str  # ... and type
    detour_km: float
    decide_min: float = math.nan  # when the vehicle is at decision_node ...
    decide_soc: float = math.nan  # ... and its SoC there (to choose again: plan_stop)


@dataclass(frozen=True, slots=True)
class TripPlan:
    stops: tuple[PlannedStop, ...]
    feasible: bool  # False: the plan runs dry on the way (book nothing, drive on arrival)
    end_min: float
    end_soc: float


def access_min(access_km: float) -> float:
    return access_km / ACCESS_SPEED_KMH * 60.0


def to_station(roads: RoadNetwork, pos: int, st_node: int, access_km: float) -> tuple[float, float]:
    """Road km and minutes from node ``pos`` to a station off node ``st_node`` at the end of
    an access road of ``access_km``."""
    return (
        roads.dist_km.item(pos, st_node) + access_km,
        roads.time_min.item(pos, st_node) + access_min(access_km),
    )


def back_to_city(soc: float, per_km: float, access_km: float) -> tuple[float, float]:
    """The drive back from a station to its city on its access road, as every run and plan
    makes it on leaving: its minutes and the SoC after it (no road: 0 and ``soc``)."""
    if access_km > 0:
        return access_min(access_km), max(soc - access_km * per_km, 0.0)
    return 0.0, soc


def dry_on_the_way(
    soc: float, per_km: float, go_km: float, go_min: float
) -> tuple[float, float] | None:
    """A vehicle with ``soc`` (``per_km`` SoC per km) setting off on a drive of ``go_km`` /
    ``go_min`` to a station (a stale or optimistic choice can be out of reach): None if it
    gets there, else the minutes and km it drives before its battery is empty (it is
    stranded there). The one rule of both runs and of the planner."""
    if soc - go_km * per_km < 0:
        return go_min * (soc / per_km) / go_km, soc / per_km
    return None


_ROUTES: weakref.WeakKeyDictionary[RoadNetwork, dict[tuple[int, int], list[int]]] = (
    weakref.WeakKeyDictionary()
)


def route_of(roads: RoadNetwork, src: int, dst: int) -> list[int]:
    """``roads.route(src, dst)``, remembered per road network (the tables never change).
    The list is shared: do not modify it."""
    cache = _ROUTES.get(roads)
    if cache is None:
        cache = _ROUTES[roads] = {}
    route = cache.get((src, dst))
    if route is None:
        route = cache[(src, dst)] = _route(roads, src, dst)
    return route


def _route(roads: RoadNetwork, src: int, dst: int) -> list[int]:
    """``roads.route(src, dst)``, from the next hops towards ``dst`` as a Python list."""
    if src == dst:
        return [src]
    hop, _, _, to_dest = _toward(roads, dst)
    if not math.isfinite(to_dest[src]):
        return []
    path = [src]
    node = src
    while node != dst:
        node = hop[node]
        path.append(node)
    return path


@dataclass(frozen=True, slots=True)
class RouteLegs:
    """A route with its legs looked up once: what :func:`walk_rules` walks."""

    # (tuples of numbers: the cyclic garbage collector stops looking at them, where it would
    # go through thousands of these lists in each full collection of a run)
    nodes: tuple[int, ...]  # the route (route_of)
    km: tuple[float, ...]  # leg j: nodes[j] -> nodes[j + 1]
    minutes: tuple[float, ...]
    to_dest_km: tuple[float, ...]  # road distance from nodes[j] to the route's end (the table's)
    # minutes and km driven from nodes[0] to nodes[j]: the legs added up in order from 0.0,
    # what walk_rules adds up on its way (one entry, 0.0, for an empty route)
    t_at: tuple[float, ...] = (0.0,)
    km_at: tuple[float, ...] = (0.0,)


_LEGS: weakref.WeakKeyDictionary[RoadNetwork, dict[tuple[int, int], RouteLegs]] = (
    weakref.WeakKeyDictionary()
)


def route_legs(roads: RoadNetwork, src: int, dst: int) -> RouteLegs:
    """:func:`route_of` with its legs, remembered per road network. Shared: do not modify."""
    cache = _LEGS.get(roads)
    if cache is None:
        cache = _LEGS[roads] = {}
    legs = cache.get((src, dst))
    if legs is None:
        nodes = route_of(roads, src, dst)
        # the legs from every node's own leg towards dst (leg j goes nodes[j] -> its next
        # hop towards dst, nodes[j + 1]): the same numbers as looked up pair by pair
        _, leg_km, leg_min, to_dest = _toward(roads, dst)
        on = nodes[:-1]
        km = tuple([leg_km[a] for a in on])
        minutes = tuple([leg_min[a] for a in on])
        legs = cache[(src, dst)] = RouteLegs(
            tuple(nodes),
            km,
            minutes,
            tuple([to_dest[a] for a in nodes]),
            _added_up(minutes),
            _added_up(km),
        )
    return legs


def _added_up(values: tuple[float, ...]) -> tuple[float, ...]:
    """``(0.0, 0.0 + v0, (0.0 + v0) + v1, ...)``: running sums, in order."""
    total = 0.0
    out = [total]
    for v in values:
        total += v
        out.append(total)
    return tuple(out)


# per road network and destination: see _toward
_TOWARD: weakref.WeakKeyDictionary[
    RoadNetwork, dict[int, tuple[list[int], list[float], list[float], list[float]]]
] = weakref.WeakKeyDictionary()


def _toward(
    roads: RoadNetwork, dst: int
) -> tuple[list[int], list[float], list[float], list[float]]:
    """For every node ``a``: its next hop towards ``dst`` (``next_hop[a, dst]``), the road
    km and minutes of that leg (``dist_km[a, next_hop[a, dst]]``, ``time_min[...]``;
    anything where there is no next hop) and ``dist_km[a, dst]``, as Python lists,
    remembered per road network and ``dst`` (the tables never change)."""
    cache = _TOWARD.get(roads)
    if cache is None:
        cache = _TOWARD[roads] = {}
    hit = cache.get(dst)
    if hit is None:
        hop = roads.next_hop[:, dst]
        here = np.arange(len(hop))
        nxt = np.where(hop >= 0, hop, here)
        hit = cache[dst] = (
            hop.tolist(),
            roads.dist_km[here, nxt].tolist(),
            roads.time_min[here, nxt].tolist(),
            roads.dist_km[:, dst].tolist(),
        )
    return hit


class Walk(NamedTuple):  # (a tuple: made for every stretch driven, at a third of the cost)
    j: int  # index in the route where the walk stopped
    soc: float
    minutes: float
    km: float
    stop_here: bool  # a charging decision is due at route[j]
    stranded_km: float | None  # ran dry after this many km of the last leg's start


def walk_rules(
    ch: ChargingBehaviour, legs: RouteLegs, soc: float, per_km: float, skip_at: Collection[int]
) -> Walk:
    """Walk the route ``legs`` from ``soc`` until a charging decision is due, the battery
    runs out, or the trip ends. The driving rules: charge at a node only if the rest of the
    route is out of reach with ``ch.reserve_soc`` left, the node is not in ``skip_at``
    (where the vehicle charged, or asked, on this trip), and either SoC is at or below
    ``ch.threshold_soc`` or the next leg would end below reserve + safety margin. The
    simulation, the trip planner and the live vehicle agent all walk with this function
    (the readable reference, one call per node, is in ``tests/test_sim_fast_paths.py``)."""
    nodes, km_of, to_dest = legs.nodes, legs.km, legs.to_dest_km
    reserve, threshold = ch.reserve_soc, ch.threshold_soc
    margin = ch.reserve_soc + ch.safety_margin_soc
    s = soc
    last = len(nodes) - 1
    # (the minutes and km driven up to node j are the route's own running sums, legs.t_at
    # and legs.km_at: the same additions in the same order as adding up along the way)
    for j in range(last):
        leg = km_of[j]
        used = leg * per_km  # (one product, the same number each time)
        if (
            s - to_dest[j] * per_km < reserve
            and nodes[j] not in skip_at
            and (s <= threshold or s - used < margin)
        ):
            return Walk(j, s, legs.t_at[j], legs.km_at[j], True, None)
        if s - used < 0:
            stranded_km = s / per_km
            t = legs.t_at[j] + legs.minutes[j] * stranded_km / leg
            return Walk(j, 0.0, t, legs.km_at[j] + stranded_km, False, stranded_km)
        s -= used
    j = max(last, 0)
    return Walk(j, s, legs.t_at[j], legs.km_at[j], False, None)


def charge_request(
    roads: RoadNetwork,
    ch: ChargingBehaviour,
    v: VehicleParams,
    pos: int,
    dest: int,
    soc: float,
) -> ChargeRequest:
    return _new_request(
        v.vehicle_id,
        pos,
        roads.lat.item(pos),
        roads.lon.item(pos),
        dest,
        soc,
        v.battery_kwh,
        v.per_km * v.battery_kwh,
        v.max_dc_kw,
        v.max_ac_kw,
        ch.reserve_soc,
        ch.target_soc,
    )


# ChargeRequest(vehicle_id, node, lat, lon, dest_node, soc, battery_kwh,
# consumption_kwh_per_km, max_dc_kw, max_ac_kw, reserve_soc, target_soc) without the frozen
# __init__, then its checks (__post_init__): one per charging decision
_new_request = slot_constructor(ChargeRequest, post_init=True)


def choose_station(
    policy: Callable[[ChargeRequest, NetworkSnapshot, float], Choice | None],
    request: ChargeRequest,
    snapshot: NetworkSnapshot,
    now: float,
    avoid: Collection[int] = (),
) -> Choice | None:
    """The policy's choice; if none, an emergency choice that dips into the reserve: the
    asks of :func:`fallback_requests`, in their order, each built only when needed.

    ``avoid``: stations the vehicle gave up on during this trip (it left without charging:
    its patience ran out in the queue, or the station turned it away). The policy sees
    them offline, so it does not send the vehicle back to a queue it just left; only when
    no other station is reachable, even dipping into the reserve, is it asked again with
    them (going back beats running dry). Both runs keep that list by :func:`avoid_after`."""
    snap = snapshot.without(avoid) if avoid else snapshot
    choice = policy(request, snap, now)
    if choice is not None:
        return choice
    relaxed = replace(request, reserve_soc=0.0) if request.reserve_soc > 0 else None
    if relaxed is not None:
        choice = policy(relaxed, snap, now)
    if choice is not None or snap is snapshot:
        return choice
    choice = policy(request, snapshot, now)  # nowhere else: back to one it gave up on
    if choice is None and relaxed is not None:
        choice = policy(relaxed, snapshot, now)
    return choice


T = TypeVar("T")


def avoid_after(avoid: tuple[T, ...], station: T, charged: bool) -> tuple[T, ...]:
    """The stations a vehicle avoids for the rest of its trip (``choose_station``'s
    ``avoid``) once it leaves ``station``: that one added if it left without charging (its
    patience ran out in the queue, or the station turned it away). Station indices in the
    simulation, ids in the live vehicle agent."""
    return avoid if charged or station in avoid else (*avoid, station)


def fallback_requests(
    request: ChargeRequest, avoid: Collection[int] = ()
) -> list[tuple[ChargeRequest, frozenset[int]]]:
    """:func:`choose_station`'s asks in order, each a request and the stations it leaves
    out: as asked, then (emergency) with no reserve kept; with ``avoid``, the same two
    again without leaving those out."""
    asks = [request] if request.reserve_soc <= 0 else [request, replace(request, reserve_soc=0.0)]
    out = [(r, frozenset(avoid)) for r in asks]
    if avoid:
        out += [(r, frozenset()) for r in asks]
    return out


def charge_target(
    roads: RoadNetwork, ch: ChargingBehaviour, per_km: float, pos: int, dest: int, access: float
) -> float:
    """SoC to charge to at a station hanging off node ``pos``: the configured target, raised
    to reach the next city, or to the destination if that costs at most TOPUP_SLACK_SOC more."""
    route_on = route_of(roads, pos, dest)
    next_leg = roads.dist_km.item(pos, route_on[1]) if len(route_on) > 1 else 0.0
    return _target(ch, per_km, next_leg, roads.dist_km.item(pos, dest), access)


def charge_target_on(ch: ChargingBehaviour, legs: RouteLegs, per_km: float, access: float) -> float:
    """:func:`charge_target` at the first node of ``legs`` (a route that exists: its nodes
    not empty), from the distances ``legs`` looked up already: the same number."""
    next_leg = legs.km[0] if len(legs.nodes) > 1 else 0.0
    return _target(ch, per_km, next_leg, legs.to_dest_km[0], access)


def _target(
    ch: ChargingBehaviour, per_km: float, next_leg_km: float, to_dest_km: float, access: float
) -> float:
    finish = (to_dest_km + access) * per_km + ch.reserve_soc + 0.01
    target = max(ch.target_soc, (next_leg_km + access) * per_km + ch.reserve_soc + 0.01)
    if target < finish <= min(target + TOPUP_SLACK_SOC, MAX_TARGET_SOC):
        target = finish
    return target


def booking_class(
    connectors: Sequence[ConnectorLike], max_dc_kw: float, max_ac_kw: float
) -> tuple[float, str, float]:
    """The connector class a vehicle books at a station: ``(rated kW, type, session kW)``
    with the highest session power for this vehicle; ties: more connectors, then the lower
    rating (leave the fastest connectors to the vehicles that can use them)."""
    counts: dict[tuple[float, str], int] = {}
    for c in connectors:
        counts[(c.power_kw, c.type)] = counts.get((c.power_kw, c.type), 0) + 1
    best = max(
        counts,
        key=lambda k: (session_power_kw(k[0], k[1], max_dc_kw, max_ac_kw), counts[k], -k[0], k[1]),
    )
    return best[0], best[1], session_power_kw(best[0], best[1], max_dc_kw, max_ac_kw)


def connector_class(power_kw: float, ctype: str) -> str:
    """A connector class's name, e.g. ``"150DC"``: the pool a participant keeps its walk-in
    share in (``Participant(pools=...)``), in the simulation and the live servers alike."""
    return f"{power_kw:g}{ctype}"


def connector_pools(connectors: Iterable[ConnectorLike]) -> dict[str, str]:
    """``{connector id: its class}`` (:func:`connector_class`) for a participant's
    ``pools``: the walk-in share kept per connector class of a station."""
    return {c.connector_id: connector_class(c.power_kw, c.type) for c in connectors}


def class_connectors(
    connectors: Sequence[ConnectorLike], power_kw: float, ctype: str
) -> tuple[str, ...]:
    """The ids of a station's connectors of one class (rated kW and type, as
    :func:`booking_class` gives and a :class:`PlannedStop` keeps): what a stop planned on
    that class asks to hold (``StopRequest.connector_ids``)."""
    return tuple(
        c.connector_id for c in connectors if c.power_kw == power_kw and c.type == ctype
    )


def plan_stop(
    roads: RoadNetwork,
    snapshot: NetworkSnapshot,
    connectors: Sequence[Sequence[ConnectorLike]],
    policy: Callable[[ChargeRequest, NetworkSnapshot, float], Choice | None],
    ch: ChargingBehaviour,
    vehicle: VehicleParams,
    pos: int,
    dest: int,
    soc: float,
    t: float,
    avoid: Collection[int] = (),
) -> tuple[PlannedStop | None, bool]:
    """The stop a vehicle at decision node ``pos`` (time ``t``, SoC ``soc``) would make:
    ``(stop, True)``; ``(None, True)`` if the policy has no station; ``(None, False)`` if the
    chosen station is out of reach (the vehicle would run dry on the way). ``avoid``: as
    :func:`choose_station`'s."""
    request = charge_request(roads, ch, vehicle, pos, dest, soc)
    choice = choose_station(policy, request, snapshot, t, avoid)
    if choice is None:
        return None, True
    stop = stop_at(
        roads, snapshot.stations, connectors, ch, vehicle, choice.station_index,
        choice.detour_km, pos, dest, soc, t,
    )
    return stop, stop is not None


def stop_at(
    roads: RoadNetwork,
    stations: StationTable,
    connectors: Sequence[Sequence[ConnectorLike]],
    ch: ChargingBehaviour,
    vehicle: VehicleParams,
    station_index: int,
    detour_km: float,
    pos: int,
    dest: int,
    soc: float,
    t: float,
) -> PlannedStop | None:
    """The stop at the station a vehicle chose (``station_index``, ``detour_km`` off its
    route) at decision node ``pos`` (on its way to ``dest``, at time ``t`` with SoC ``soc``):
    arrival, SoC in and out, and the charge on the connector class it books there
    (:func:`booking_class`); None if it would run dry on the way."""
    i = station_index
    per_km = vehicle.per_km
    st_node = stations.node_list[i]
    access = stations.access_km_list[i]
    go_km, go_min = to_station(roads, pos, st_node, access)
    if dry_on_the_way(soc, per_km, go_km, go_min) is not None:
        return None
    arrive = t + go_min
    soc_in = soc - go_km * per_km
    target = charge_target(roads, ch, per_km, st_node, dest, access)
    rated, ctype, power = booking_class(connectors[i], vehicle.max_dc_kw, vehicle.max_ac_kw)
    curve = ChargeCurve(vehicle.battery_kwh, power, ch.taper_soc, ch.efficiency)
    soc_out = session_soc_out(soc_in, target)
    minutes = curve.minutes_to(soc_in, soc_out)
    return PlannedStop(
        pos,
        i,
        stations.ids[i],
        arrive,
        soc_in,
        soc_out,
        minutes,
        power,
        rated,
        ctype,
        detour_km,
        t,
        soc,
    )


def plan_trip(
    roads: RoadNetwork,
    snapshot: NetworkSnapshot,
    connectors: Sequence[Sequence[ConnectorLike]],
    policy: Callable[[ChargeRequest, NetworkSnapshot, float], Choice | None],
    ch: ChargingBehaviour,
    vehicle: VehicleParams,
    origin: int,
    dest: int,
    soc: float,
    now: float,
    max_stops: int = 16,
    skip_at: Iterable[int] = (),
    avoid: Collection[int] = (),
) -> TripPlan:
    """Predict the charging stops of a trip leaving ``origin`` at ``now`` with ``soc``.

    ``skip_at``: decision nodes where the vehicle already charged (or asked) on this trip
    (:attr:`evsim.model.vehicle.Drive.skip_at`), to plan the rest of a trip under way;
    ``avoid``: stations it gave up on (:func:`choose_station`)."""
    st = snapshot.stations
    per_km = vehicle.per_km
    pos, t = origin, now
    skip = set(skip_at)
    stops: list[PlannedStop] = []

    for _ in range(4 * max_stops):
        legs = route_legs(roads, pos, dest)  # walked as the vehicle will (walk_rules)
        w = walk_rules(ch, legs, soc, per_km, skip)
        t += w.minutes
        soc, pos = w.soc, legs.nodes[w.j]
        if w.stranded_km is not None:
            return TripPlan(tuple(stops), False, t, 0.0)
        if not w.stop_here:
            return TripPlan(tuple(stops), True, t, soc)
        stop, reachable = plan_stop(
            roads, snapshot, connectors, policy, ch, vehicle, pos, dest, soc, t, avoid
        )
        skip.add(pos)
        if not reachable:
            return TripPlan(tuple(stops), False, t, 0.0)
        if stop is None:
            continue
        stops.append(stop)
        if len(stops) > max_stops:
            return TripPlan(tuple(stops), False, stop.arrive_min, stop.soc_in)
        back_min, soc = back_to_city(stop.soc_out, per_km, st.access_km_list[stop.station_index])
        pos = st.node_list[stop.station_index]
        t = stop.arrive_min + (stop.charge_min + back_min)
    return TripPlan(tuple(stops), False, t, soc)


# ---------------------------------------------------------------------------- booking rules
# The driver app's decisions in the ``trip`` booking mode (rolling horizon, rebooking,
# keeping reservations across re-plans), shared by the simulation's app
# (:class:`evsim.model.booking.BookedTrip`) and the live vehicle agent (``live.vehicle_agent``).
# ``offset``: how late the vehicle runs on the plan's times (0 when it left on time).


def choose_again(
    roads: RoadNetwork,
    snapshot: NetworkSnapshot,
    connectors: Sequence[Sequence[ConnectorLike]],
    policy: Callable[[ChargeRequest, NetworkSnapshot, float], Choice | None],
    ch: ChargingBehaviour,
    vehicle: VehicleParams,
    stop: PlannedStop,
    dest: int,
    excluded: Iterable[int],
    skip_at: Iterable[int] = (),
    avoid: Collection[int] = (),
) -> PlannedStop | None:
    """The stop the policy picks for ``stop``'s decision (at its decision node, time and SoC)
    with the ``excluded`` stations treated as offline; None if there is none, or if the rest
    of the trip would run dry from there (``skip_at``: the decision nodes already used on this
    trip, the stop's own included: a vehicle charges once per city per trip; ``avoid``: as
    :func:`choose_station`'s)."""
    args = (roads, snapshot.without(excluded), connectors, policy, ch, vehicle)
    new, _ = plan_stop(*args, stop.decision_node, dest, stop.decide_soc, stop.decide_min, avoid)
    if new is None:
        return None
    st = snapshot.stations
    back_min, soc = back_to_city(new.soc_out, vehicle.per_km, st.access_km_list[new.station_index])
    t = new.arrive_min + new.charge_min + back_min
    rest = plan_trip(
        *args, st.node_list[new.station_index], dest, soc, t, skip_at=skip_at, avoid=avoid
    )
    return new if rest.feasible else None
