"""Trips released a block at a time: every first stretch walked at once, as arrays.

In the ``on_arrival`` and ``stop`` modes the run's source releases trips in departure order.
About half of them reach their destination (or run dry) with no charging decision on the way:
they meet nothing and nobody, so their TRIP_START and TRIP_END (or STRANDED) rows are written
to the trace ahead of time and they get no process (see :mod:`evsim.model.vehicle`). Done one
trip at a time that still cost a Python walk, two rows of Python objects and their conversion
to columns: a fifth of a run.

Here the source takes the trips a block at a time (:func:`release_block`):

* :class:`RouteTable` holds every route the run's trips take from their origin, padded to one
  width (a row per route: legs, distances to the end, running sums, nodes);
* :func:`walk_first` walks the first stretch of every trip of the block together:
  :func:`~evsim.planning.walk_rules` over NumPy arrays, one leg index at a time over the trips
  still on the road, with the same float operations in the same order on each element, so the
  same numbers to the last bit (a test checks them against ``walk_rules`` trip by trip);
* the trips with no decision get their rows written ahead as columns
  (:meth:`~evsim.trace.TraceWriter.write_ahead`); the others get their :class:`Drive` and
  first :class:`~evsim.planning.Walk`, for :func:`~evsim.model.vehicle.depart` at their time.

The trace is row for row what walking and writing one trip at a time wrote (the pinned
digests of ``tests/test_sim_fast_paths.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evsim.model.vehicle import Drive
from evsim.planning import RouteLegs, Walk
from evsim.scenario import ChargingBehaviour
from evsim.trace import Kind, TraceWriter

if TYPE_CHECKING:
    from evsim.model.simulation import Simulation
    from evsim.model.vehicle import DriveKit

__all__ = ["BLOCK_TRIPS", "FirstWalks", "RouteTable", "release_block", "walk_first"]

BLOCK_TRIPS = 4096  # trips the source releases per block (rows ahead wait at most a block)


class RouteTable:
    """The routes of a run's trips from their origins, by route number, as padded arrays.

    Row ``r`` holds route ``r``'s legs (``km``, ``minutes``: leg ``j`` goes from node ``j`` to
    node ``j + 1``), ``to_dest_km``, the running sums ``t_at`` and ``km_at`` and the ``nodes``
    (the :class:`~evsim.planning.RouteLegs` the kit looks up), zero past its end; ``last`` is
    its number of legs (``len(nodes) - 1``; -1 for no route). Grown as blocks bring new
    origin-destination pairs."""

    def __init__(self, kit: DriveKit) -> None:
        self.kit = kit
        self.n_nodes = len(kit.node_ids)
        self.number: dict[int, int] = {}  # origin * n_nodes + destination -> route number
        self.legs: list[RouteLegs] = []
        self._details: list[str] = []
        self._detail_array = pa.array([], pa.string())
        self.node_ids = pa.array(kit.node_ids, pa.string())  # (where a trip runs dry)
        models = kit.vehicle_models  # kWh per km and battery kWh, by vehicle model
        self.use_kwh_per_km = np.array([vm.consumption_kwh_per_km for vm in models], np.float64)
        self.battery_kwh = np.array([vm.battery_kwh for vm in models], np.float64)
        self._width = 0
        self.km = self.minutes = self.to_dest = self.t_at = self.km_at = np.zeros((0, 0))
        self.nodes = np.zeros((0, 0), np.int64)
        self.last = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.legs)

    def numbers(self, origin: np.ndarray, dest: np.ndarray) -> np.ndarray:
        """The route number of each (origin, destination), adding the routes not seen yet."""
        codes = origin.astype(np.int64) * self.n_nodes + dest
        unique, inverse = np.unique(codes, return_inverse=True)
        known = self.number
        found = [known.get(c) for c in unique.tolist()]
        new = [c for c, r in zip(unique.tolist(), found, strict=True) if r is None]
        if new:
            self._add([divmod(c, self.n_nodes) for c in new])
            found = [known[c] for c in unique.tolist()]
        return np.asarray(found, np.int64)[inverse.reshape(-1)]

    def detail(self, routes: np.ndarray) -> pa.Array:
        """Each route's TRIP_START detail, ``"origin->destination"``."""
        if len(self._detail_array) < len(self._details):
            self._detail_array = pa.array(self._details, pa.string())
        return self._detail_array.take(pa.array(routes))

    def _add(self, pairs: list[tuple[int, int]]) -> None:
        kit = self.kit
        first = len(self.legs)
        for origin, dest in pairs:
            self.number[origin * self.n_nodes + dest] = len(self.legs)
            self.legs.append(kit.legs(origin, dest))
            self._details.append(kit.od_detail(origin, dest))
        added = self.legs[first:]
        width = max(self._width, *(len(legs.nodes) for legs in added), 1)
        rows = len(self.legs)
        self.km = _grown(self.km, rows, width)
        self.minutes = _grown(self.minutes, rows, width)
        self.to_dest = _grown(self.to_dest, rows, width)
        self.t_at = _grown(self.t_at, rows, width)
        self.km_at = _grown(self.km_at, rows, width)
        self.nodes = _grown(self.nodes, rows, width)
        self.last = np.concatenate([self.last, [len(legs.nodes) - 1 for legs in added]])
        self._width = width
        for r, legs in enumerate(added, first):
            n_legs = len(legs.km)
            self.km[r, :n_legs] = legs.km
            self.minutes[r, :n_legs] = legs.minutes
            self.to_dest[r, : len(legs.to_dest_km)] = legs.to_dest_km
            self.t_at[r, : len(legs.t_at)] = legs.t_at
            self.km_at[r, : len(legs.km_at)] = legs.km_at
            self.nodes[r, : len(legs.nodes)] = legs.nodes


def _grown(a: np.ndarray, rows: int, width: int) -> np.ndarray:
    """``a`` zero-padded to ``rows`` x ``width`` (a copy when it has to grow)."""
    if a.shape[0] >= rows and a.shape[1] >= width:
        return a
    out = np.zeros((max(rows, 2 * a.shape[0]), max(width, a.shape[1])), a.dtype)
    out[: a.shape[0], : a.shape[1]] = a
    return out


class FirstWalks:
    """The first stretch of each trip of a block, as :class:`~evsim.planning.Walk` fields
    by column: where it stopped (``j``), the SoC there, minutes and km from the origin, a
    charging decision due there (``stop_here``), ran dry (``stranded``, after
    ``stranded_km`` of its last leg's start)."""

    __slots__ = ("j", "km", "minutes", "soc", "stop_here", "stranded", "stranded_km")

    def __init__(self, j: np.ndarray, soc: np.ndarray) -> None:
        n = len(j)
        self.j, self.soc = j, soc
        self.minutes = np.zeros(n)
        self.km = np.zeros(n)
        self.stop_here = np.zeros(n, bool)
        self.stranded = np.zeros(n, bool)
        self.stranded_km = np.full(n, np.nan)


def walk_first(
    ch: ChargingBehaviour,
    table: RouteTable,
    routes: np.ndarray,
    soc: np.ndarray,
    per_km: np.ndarray,
) -> FirstWalks:
    """:func:`~evsim.planning.walk_rules` from each trip's origin with nowhere to skip, for
    many trips at once: trip ``i`` walks route ``routes[i]`` from ``soc[i]`` draining
    ``per_km[i]`` SoC per km. The rules and the operations are ``walk_rules``'s, element by
    element: a decision is due at node ``j`` when the rest of the route is out of reach with
    the reserve left and either SoC is at or below the threshold or the next leg would end
    below reserve + safety margin; else a leg that needs more than is left strands the
    vehicle; else the leg is driven (``s -= leg * per_km``, the same subtraction)."""
    reserve, threshold = ch.reserve_soc, ch.threshold_soc
    margin = ch.reserve_soc + ch.safety_margin_soc
    last = table.last[routes]
    # j: where a walk that reaches the end stops (max(last, 0)), until a decision or running
    # dry says otherwise; s: each trip's SoC as it goes (the walks' SoC at the end)
    out = FirstWalks(np.maximum(last, 0), np.array(soc, np.float64))
    s = out.soc
    on = np.flatnonzero(last > 0)  # trips still on the road, at leg j
    j = 0
    while on.size:
        r, s_on, pk = routes[on], s[on], per_km[on]
        leg = table.km[r, j]
        used = leg * pk
        due = (s_on - table.to_dest[r, j] * pk < reserve) & (
            (s_on <= threshold) | (s_on - used < margin)
        )
        dry = ~due & (s_on - used < 0)
        if due.any():
            hit = on[due]
            out.stop_here[hit] = True
            out.j[hit] = j
        if dry.any():
            gone, s_dry, pk_dry, leg_dry = on[dry], s_on[dry], pk[dry], leg[dry]
            stranded_km = s_dry / pk_dry
            r_dry = r[dry]
            out.stranded[gone] = True
            out.j[gone] = j
            out.stranded_km[gone] = stranded_km
            t_leg = table.minutes[r_dry, j] * stranded_km / leg_dry
            out.minutes[gone] = table.t_at[r_dry, j] + t_leg
            out.km[gone] = table.km_at[r_dry, j] + stranded_km
            s[gone] = 0.0
        go = ~(due | dry)
        on, s_on = on[go], s_on[go] - used[go]
        s[on] = s_on
        j += 1
        on = on[last[on] > j]
    ended = ~out.stranded
    r_end, j_end = routes[ended], out.j[ended]
    out.minutes[ended] = table.t_at[r_end, j_end]
    out.km[ended] = table.km_at[r_end, j_end]
    return out


def release_block(
    sim: Simulation, first: int, clocks: list[float]
) -> list[tuple[int, Drive, Walk]]:
    """Trips ``first``, ``first + 1``, ... leaving at ``clocks`` (where the run's source
    puts SimPy's clock for each): the rows of those with no charging decision on the way
    are written ahead (TRIP_START at its time, TRIP_END or STRANDED where its stretch ends,
    as :meth:`~evsim.model.vehicle.DriveKit.end_ahead` writes a last stretch's); the others
    are returned as ``(trip, vehicle, first stretch)`` in departure order, for
    :func:`~evsim.model.vehicle.depart`."""
    kit = sim.drive_kit
    table = kit.route_table
    if table is None:
        table = kit.route_table = RouteTable(kit)
    n = len(clocks)
    block = slice(first, first + n)
    trips = sim.trips
    model, drain = trips.model[block], trips.drain[block]
    origin, dest, soc0 = trips.origin[block], trips.destination[block], trips.soc0[block]
    models = kit.vehicle_models
    # (vm.consumption_kwh_per_km * drain[k] / vm.battery_kwh, element by element)
    per_km = table.use_kwh_per_km[model] * drain / table.battery_kwh[model]
    routes = table.numbers(origin, dest)
    w = walk_first(kit.ch, table, routes, soc0, per_km)
    t0 = np.array(clocks, np.float64)
    idle = np.flatnonzero(~w.stop_here)
    if idle.size:
        _write_idle(sim.trace, kit, table, w, idle, first, t0, soc0, routes)
    leaving: list[tuple[int, Drive, Walk]] = []
    stops = np.flatnonzero(w.stop_here)
    if stops.size:
        cols = (
            stops.tolist(),
            model[stops].tolist(),
            per_km[stops].tolist(),
            origin[stops].tolist(),
            dest[stops].tolist(),
            soc0[stops].tolist(),
            w.j[stops].tolist(),
            w.soc[stops].tolist(),
            w.minutes[stops].tolist(),
            w.km[stops].tolist(),
        )
        for i, m, pk, o, d, s0, j, s, t, km in zip(*cols, strict=True):
            k = first + i
            vid = f"v{k}"
            leaving.append(
                (k, Drive(k, vid, models[m], pk, o, d, s0), Walk(j, s, t, km, True, None))
            )
    return leaving


def _write_idle(
    trace: TraceWriter,
    kit: DriveKit,
    table: RouteTable,
    w: FirstWalks,
    idle: np.ndarray,
    first: int,
    t0: np.ndarray,
    soc0: np.ndarray,
    routes: np.ndarray,
) -> None:
    """The rows ahead of the trips ``idle`` (block positions) with no decision on the way:
    per trip, TRIP_START then its TRIP_END or STRANDED, trips in departure order."""
    m = idle.size
    t_start = t0[idle]
    minutes = w.minutes[idle]
    t_end = np.where(minutes > 0, t_start + minutes, t_start)
    km = 0.0 + w.km[idle]  # (the distance a Drive adds up from 0.0)
    stranded = w.stranded[idle]
    vid = pc.binary_join_element_wise(
        "v", pc.cast(pa.array(idle + first), pa.string()), ""
    )
    r = routes[idle]
    where_dry = table.node_ids.take(pa.array(table.nodes[r, w.j[idle]]))
    end_kind = pc.if_else(pa.array(stranded), str(Kind.STRANDED), str(Kind.TRIP_END))
    # the two rows of each trip next to each other: start i at 2i, its end at 2i + 1
    order = pa.array(np.arange(2 * m).reshape(2, m).T.reshape(-1))

    def pairs(start: pa.Array, end: pa.Array) -> pa.Array:
        return pa.concat_arrays([start, end]).take(order)

    nan_km = pa.nulls(m, pa.float64())
    trace.write_ahead(
        2 * m,
        t_min=pairs(pa.array(t_start), pa.array(t_end)),
        kind=pairs(pa.array([str(Kind.TRIP_START)] * m, pa.string()), end_kind),
        vehicle_id=pairs(vid, vid),
        booking_id=pairs(vid, vid),
        soc=pairs(pa.array(soc0[idle]), pa.array(w.soc[idle])),  # (0.0 where it ran dry)
        distance_km=pairs(nan_km, pa.array(km)),
        detail=pairs(
            table.detail(r),
            pc.if_else(pa.array(stranded), where_dry, pa.nulls(m, pa.string())),
        ),
    )
