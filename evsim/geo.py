"""Geography: great-circle distances, the road graph and all-pairs shortest paths.

The road graph is a networkx graph of cities. It is either given explicitly in the scenario
(roads with distance and speed) or generated from coordinates: each city is joined to its
``k`` nearest neighbours with great-circle distance x a circuity factor, and the components
that leaves apart are joined by their closest pair of cities. Shortest paths (by distance) for
all pairs are computed once with scipy's Dijkstra, so routing in the model is a table lookup.

Road lengths derived from coordinates are rounded up to the millimetre (:func:`road_km`):
numpy's sin/cos/arcsin differ in the last bits between CPUs (its AVX-512 loops are not its
AVX2 ones), and without the rounding a scenario's road tables, and every trace after them,
would differ in the last bits, and now and then in a decision, from one machine to another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
from scipy.sparse.csgraph import shortest_path
from scipy.spatial import cKDTree

from evsim.scenario import Scenario

__all__ = ["EARTH_RADIUS_KM", "RoadNetwork", "haversine_km", "road_km", "to_unit_xyz"]

EARTH_RADIUS_KM = 6371.0088
_PER_KM = 1_000_000  # road lengths from coordinates: whole millimetres (module docstring)


def haversine_km(lat1, lon1, lat2, lon2):
    """Great-circle distance in km; works on scalars and numpy arrays."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dphi = p2 - p1
    dlmb = np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def road_km(great_circle_km: float, circuity: float) -> float:
    """A road's length from its great-circle distance: x ``circuity``, rounded up to the
    millimetre, so the same on every CPU (see the module docstring) and never shorter than
    the great circle (the k-d tree pre-filter's bound, :meth:`~evsim.snapshot.StationTable.
    within_km`)."""
    km = float(great_circle_km) * circuity
    # (on the grid already, the division can land an ulp under the product: keep that)
    return max(math.ceil(km * _PER_KM) / _PER_KM, km)


def to_unit_xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Points on the unit sphere (for a k-d tree whose chord distance orders like arc length)."""
    la, lo = np.radians(np.asarray(lat, float)), np.radians(np.asarray(lon, float))
    return np.column_stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)])


@dataclass(frozen=True, eq=False)
class RoadNetwork:
    """Cities, roads and the all-pairs distance/time tables.

    ``dist_km[i, j]`` is the shortest road distance between node indices i and j,
    ``time_min[i, j]`` the driving time along that route; ``next_hop[i, j]`` the node after i
    on it (-1 when none).
    """

    node_ids: tuple[str, ...]
    lat: np.ndarray
    lon: np.ndarray
    graph: nx.Graph
    dist_km: np.ndarray
    time_min: np.ndarray
    next_hop: np.ndarray
    index: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> RoadNetwork:
        geo = scenario.geography
        ids = tuple(c.id for c in geo.cities)
        lat = np.array([c.lat for c in geo.cities], float)
        lon = np.array([c.lon for c in geo.cities], float)
        g = nx.Graph()
        for i, cid in enumerate(ids):
            g.add_node(i, id=cid)
        pos = {cid: i for i, cid in enumerate(ids)}

        def gc_km(i: int, j: int) -> float:
            return float(haversine_km(lat[i], lon[i], lat[j], lon[j]))

        if geo.roads:
            for r in geo.roads:
                i, j = pos[r.a], pos[r.b]
                d = r.distance_km
                if d is None:
                    d = road_km(gc_km(i, j), geo.circuity)
                v = r.speed_kmh or geo.speed_kmh
                g.add_edge(i, j, distance_km=d, time_min=d / v * 60.0)
        elif len(ids) > 1:
            xyz = to_unit_xyz(lat, lon)
            tree = cKDTree(xyz)
            k = min(geo.k_neighbors + 1, len(ids))
            _, nbrs = tree.query(xyz, k=k)
            for i, row in enumerate(np.atleast_2d(nbrs)):
                for j in row[1:]:
                    d = road_km(gc_km(i, int(j)), geo.circuity)
                    g.add_edge(i, int(j), distance_km=d, time_min=d / geo.speed_kmh * 60.0)
            _join_components(g, lat, lon, geo.circuity, geo.speed_kmh)
        return cls._with_tables(ids, lat, lon, g)

    @classmethod
    def _with_tables(
        cls, ids: tuple[str, ...], lat: np.ndarray, lon: np.ndarray, g: nx.Graph
    ) -> RoadNetwork:
        n = len(ids)
        dist_adj = nx.to_scipy_sparse_array(g, nodelist=range(n), weight="distance_km")
        time_adj = nx.to_scipy_sparse_array(g, nodelist=range(n), weight="time_min")
        dist, pred = shortest_path(dist_adj, method="D", directed=False, return_predecessors=True)
        # time along the distance-shortest route: sum edge times walking the predecessor tree
        time = np.full((n, n), np.inf)
        next_hop = np.full((n, n), -1, dtype=np.int32)
        tdense = time_adj.toarray()
        for src in range(n):
            row_pred = pred[src]
            order = np.argsort(dist[src])
            time[src, src] = 0.0
            for node in order:
                p = row_pred[node]
                if p < 0:
                    continue
                time[src, node] = time[src, p] + tdense[p, node]
        # next hop from i towards j is the predecessor of i on the tree rooted at j
        for dst in range(n):
            next_hop[:, dst] = pred[dst]
        for a in (dist, time, next_hop):
            a.flags.writeable = False
        return cls(ids, lat, lon, g, dist, time, next_hop, {c: i for i, c in enumerate(ids)})

    def route(self, src: int, dst: int) -> list[int]:
        """Node indices from src to dst along the shortest route ([] when unreachable)."""
        if src == dst:
            return [src]
        if not np.isfinite(self.dist_km[src, dst]):
            return []
        path = [src]
        node = src
        while node != dst:
            node = int(self.next_hop[node, dst])
            path.append(node)
        return path

    def nearest_node(self, lat: float, lon: float) -> int:
        return int(np.argmin(haversine_km(lat, lon, self.lat, self.lon)))

    def connectivity_problems(self, scenario: Scenario) -> list[str]:
        """Stations and O-D pairs that no road connects, as 'path: message' strings."""
        comps = list(nx.connected_components(self.graph))
        if len(comps) <= 1:
            return []
        main = max(comps, key=len)
        problems: list[str] = []
        for i, s in enumerate(scenario.stations):
            if self.index[s.city] not in main:
                problems.append(
                    f"stations.{i} ({s.id}): unreachable, city {s.city!r} has no road to the "
                    f"rest of the network"
                )
        for i, od in enumerate(scenario.demand.od):
            a, b = self.index[od.origin], self.index[od.destination]
            if not np.isfinite(self.dist_km[a, b]):
                problems.append(f"demand.od.{i}: no road from {od.origin!r} to {od.destination!r}")
        return problems


def _join_components(
    g: nx.Graph, lat: np.ndarray, lon: np.ndarray, circuity: float, v: float
) -> None:
    """Join disconnected components by their closest city pair until the graph is connected."""
    comps = [sorted(c) for c in nx.connected_components(g)]
    while len(comps) > 1:
        base = comps[0]
        best: tuple[float, int, int] | None = None
        for other in comps[1:]:
            d = haversine_km(
                lat[base][:, None], lon[base][:, None], lat[other][None, :], lon[other][None, :]
            )
            k = int(np.argmin(d))
            i, j = np.unravel_index(k, d.shape)
            cand = (float(d[i, j]), base[i], other[j])
            if best is None or cand[0] < best[0]:
                best = cand
        assert best is not None
        dkm = road_km(best[0], circuity)
        g.add_edge(best[1], best[2], distance_km=dkm, time_min=dkm / v * 60.0)
        comps = [sorted(c) for c in nx.connected_components(g)]
