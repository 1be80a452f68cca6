"""What a policy sees: a read-only snapshot of the network, the request, and the choice.

* :class:`StationTable` is the static part (ids, owners, positions, connectors, tariff prices
  by hour) with a k-d tree over station positions for range queries from any point, and,
  built on first use per road table, a :class:`NodeIndex`: per road node, every station
  sorted by road distance, so the stations within a range of a node are a prefix.
* :class:`StatusBoard` is the replicated status a company server holds (busy connectors,
  queue, online flag, observed-at time). The simulation updates it with a delay; the live
  servers update it from MQTT status messages.
* :class:`NetworkSnapshot` is what policies get: read-only numpy views of both, so the same
  policy runs on a simulated or a live network and cannot change either.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Final

import numpy as np
from scipy.spatial import cKDTree

from evsim.battery import session_power_kw
from evsim.geo import EARTH_RADIUS_KM, RoadNetwork, haversine_km, road_km, to_unit_xyz
from evsim.scenario import Scenario
from evsim.tariff import active_element

__all__ = [
    "ChargeRequest",
    "Choice",
    "NetworkSnapshot",
    "NodeIndex",
    "StationTable",
    "StatusBoard",
    "mean_session_after",
]

ACCESS_SPEED_KMH = 50.0  # speed on a station's access road (evsim.planning re-exports it)
# a station's reported mean session length (what policies read for expected waits): this
# before its first session, then an exponentially weighted mean of its sessions' minutes,
# updated as each ends; the simulation's stations and the live station agents alike
DEFAULT_SESSION_MIN = 45.0
SESSION_EWMA_ALPHA = 0.1


def mean_session_after(mean_min: float, session_min: float,
                       alpha: float = SESSION_EWMA_ALPHA) -> float:
    """The reported mean session length once a session of ``session_min`` has ended."""
    return mean_min + alpha * (session_min - mean_min)

_CHORD_SLACK = 1e-12  # on the unit sphere: about 6 micrometres on the ground


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


_VIEWS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _readonly_once(a: np.ndarray | None) -> np.ndarray | None:
    """A read-only view of ``a``, the same object for the same array (kept for a few
    arrays), so that what is keyed by it (a node index) is found again."""
    if a is None or not a.flags.writeable:
        return a
    hit = _VIEWS.get(id(a))
    if hit is not None and hit[0] is a:
        return hit[1]
    if len(_VIEWS) >= 16:
        _VIEWS.clear()
    v = _readonly(a)
    _VIEWS[id(a)] = (a, v)
    return v


@dataclass(frozen=True, eq=False)
class StationTable:
    """Static station data, one row per station, and a spatial index over positions."""

    ids: tuple[str, ...]
    company_ids: tuple[str, ...]
    companies: tuple[str, ...]  # distinct company ids, in order
    company_index: np.ndarray  # int, index into companies
    lat: np.ndarray
    lon: np.ndarray
    node: np.ndarray  # int, road-graph node the station hangs off
    access_km: np.ndarray  # from that node to the station
    n_connectors: np.ndarray  # int
    max_power_kw: np.ndarray
    has_dc: np.ndarray  # bool
    energy_price_by_hour: np.ndarray  # (n, 24) ENERGY price per kWh at each hour
    time_price_by_hour: np.ndarray  # (n, 24) TIME price per hour
    flat_by_hour: np.ndarray  # (n, 24) FLAT fee
    tree: cKDTree = field(repr=False)
    index: dict[str, int] = field(default_factory=dict, repr=False)
    # derived, precomputed once (read-only) so a policy decision does less work per call
    access_min: np.ndarray = field(init=False, repr=False)  # access road time, 50 km/h
    n_connectors_div: np.ndarray = field(init=False, repr=False)  # max(n, 1) as float
    n_connectors_m1: np.ndarray = field(init=False, repr=False)  # n - 1 (int32)
    node_ip: np.ndarray = field(init=False, repr=False)  # node as intp (fast gathers)
    energy_price_by_hour_t: np.ndarray = field(init=False, repr=False)  # (24, n) contiguous
    time_price_by_hour_t: np.ndarray = field(init=False, repr=False)
    flat_by_hour_t: np.ndarray = field(init=False, repr=False)
    company_connectors: np.ndarray = field(init=False, repr=False)  # float, per company
    total_connectors: float = field(init=False, repr=False)
    # the same static columns as Python lists, for per-candidate loops over a few stations
    node_list: list[int] = field(init=False, repr=False)
    access_km_list: list[float] = field(init=False, repr=False)
    access_min_list: list[float] = field(init=False, repr=False)
    n_connectors_list: list[int] = field(init=False, repr=False)
    n_connectors_div_list: list[float] = field(init=False, repr=False)
    _power: dict[tuple[float, float], np.ndarray] = field(
        init=False, repr=False, default_factory=dict
    )
    _min_per_kwh: dict[tuple[float, float], np.ndarray] = field(
        init=False, repr=False, default_factory=dict
    )
    _power_list: dict[tuple[float, float], list[float]] = field(
        init=False, repr=False, default_factory=dict
    )
    _node_indexes: list[NodeIndex] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        derived = {
            "access_min": self.access_km / ACCESS_SPEED_KMH * 60.0,
            "n_connectors_div": np.maximum(self.n_connectors, 1).astype(float),
            "n_connectors_m1": (self.n_connectors - 1).astype(np.int32),
            "node_ip": self.node.astype(np.intp),
            "energy_price_by_hour_t": np.ascontiguousarray(self.energy_price_by_hour.T),
            "time_price_by_hour_t": np.ascontiguousarray(self.time_price_by_hour.T),
            "flat_by_hour_t": np.ascontiguousarray(self.flat_by_hour.T),
            "company_connectors": np.bincount(
                self.company_index,
                weights=self.n_connectors.astype(float),
                minlength=len(self.companies),
            ),
        }
        for k, v in derived.items():
            object.__setattr__(self, k, _readonly(np.asarray(v)))
        object.__setattr__(self, "total_connectors", float(self.n_connectors.astype(float).sum()))
        for k in ("node", "access_km", "access_min", "n_connectors", "n_connectors_div"):
            object.__setattr__(self, f"{k}_list", getattr(self, k).tolist())

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(
        cls,
        ids: list[str],
        company_ids: list[str],
        lat: np.ndarray,
        lon: np.ndarray,
        node: np.ndarray,
        access_km: np.ndarray,
        n_connectors: np.ndarray,
        max_power_kw: np.ndarray,
        has_dc: np.ndarray | None = None,
        energy_price_by_hour: np.ndarray | None = None,
        time_price_by_hour: np.ndarray | None = None,
        flat_by_hour: np.ndarray | None = None,
    ) -> StationTable:
        n = len(ids)
        companies = tuple(dict.fromkeys(company_ids))
        cidx = {c: i for i, c in enumerate(companies)}
        zeros = np.zeros((n, 24))
        arrays = {
            "company_index": np.array([cidx[c] for c in company_ids], dtype=np.int32),
            "lat": np.asarray(lat, float),
            "lon": np.asarray(lon, float),
            "node": np.asarray(node, dtype=np.int32),
            "access_km": np.asarray(access_km, float),
            "n_connectors": np.asarray(n_connectors, dtype=np.int32),
            "max_power_kw": np.asarray(max_power_kw, float),
            "has_dc": np.ones(n, bool) if has_dc is None else np.asarray(has_dc, bool),
            "energy_price_by_hour": zeros if energy_price_by_hour is None else energy_price_by_hour,
            "time_price_by_hour": zeros if time_price_by_hour is None else time_price_by_hour,
            "flat_by_hour": zeros if flat_by_hour is None else flat_by_hour,
        }
        arrays = {k: _readonly(np.asarray(v)) for k, v in arrays.items()}
        tree = cKDTree(to_unit_xyz(arrays["lat"], arrays["lon"]))
        return cls(
            ids=tuple(ids),
            company_ids=tuple(company_ids),
            companies=companies,
            tree=tree,
            index={s: i for i, s in enumerate(ids)},
            **arrays,
        )

    @classmethod
    def from_scenario(cls, scenario: Scenario, roads: RoadNetwork) -> StationTable:
        ids, comps, lat, lon, node, acc, ncon, pmax, dc = [], [], [], [], [], [], [], [], []
        n = len(scenario.stations)
        e_price, t_price, flat = np.zeros((n, 24)), np.zeros((n, 24)), np.zeros((n, 24))
        circuity = scenario.geography.circuity
        for i, s in enumerate(scenario.stations):
            city = roads.index[s.city]
            la = s.lat if s.lat is not None else float(roads.lat[city])
            lo = s.lon if s.lon is not None else float(roads.lon[city])
            ids.append(s.id)
            comps.append(s.company)
            lat.append(la)
            lon.append(lo)
            node.append(city)
            acc.append(road_km(haversine_km(la, lo, roads.lat[city], roads.lon[city]), circuity))
            ncon.append(sum(c.count for c in s.connectors))
            pmax.append(max(c.power_kw for c in s.connectors))
            dc.append(any(c.type == "DC" for c in s.connectors))
            tariff = scenario.tariff_for(s)
            if tariff is not None:
                for h in range(24):
                    el = active_element(tariff, h * 60.0 + 30.0, pmax[-1])
                    if el is not None:
                        e_price[i, h], t_price[i, h], flat[i, h] = (
                            el.energy_per_kwh,
                            el.time_per_hour,
                            el.flat,
                        )
        return cls.build(
            ids,
            comps,
            np.array(lat),
            np.array(lon),
            np.array(node),
            np.array(acc),
            np.array(ncon),
            np.array(pmax),
            np.array(dc),
            e_price,
            t_price,
            flat,
        )

    def session_power_kw(self, max_dc_kw: float, max_ac_kw: float) -> np.ndarray:
        """Per station: the power a vehicle drawing at most ``max_dc_kw`` (DC) or
        ``max_ac_kw`` (AC) gets, at least 1e-9 (a divisor). Cached per vehicle class."""
        key = (max_dc_kw, max_ac_kw)
        p = self._power.get(key)
        if p is None:
            cap = np.where(self.has_dc, max_dc_kw, max_ac_kw)
            p = _readonly(np.maximum(np.minimum(self.max_power_kw, cap), 1e-9))
            if len(self._power) >= 256:  # many distinct vehicles (live requests): stay small
                self._power.clear()
            self._power[key] = p
        return p

    def session_power_kw_list(self, max_dc_kw: float, max_ac_kw: float) -> list[float]:
        """:meth:`session_power_kw` as a Python list (for loops over a few stations)."""
        key = (max_dc_kw, max_ac_kw)
        p = self._power_list.get(key)
        if p is None:
            if len(self._power_list) >= 256:  # (as session_power_kw)
                self._power_list.clear()
            p = self._power_list[key] = self.session_power_kw(max_dc_kw, max_ac_kw).tolist()
        return p

    def charge_min_per_kwh(self, max_dc_kw: float, max_ac_kw: float) -> np.ndarray:
        """``60 / session_power_kw(max_dc_kw, max_ac_kw)``: minutes to charge one kWh
        (rounded once more than ``kwh / power * 60``: for bounds, not for estimates)."""
        key = (max_dc_kw, max_ac_kw)
        m = self._min_per_kwh.get(key)
        if m is None:
            m = _readonly(60.0 / self.session_power_kw(max_dc_kw, max_ac_kw))
            if len(self._min_per_kwh) >= 256:
                self._min_per_kwh.clear()
            self._min_per_kwh[key] = m
        return m

    def within_km(self, lat: float, lon: float, radius_km: float) -> np.ndarray:
        """Indices of stations within ``radius_km`` great-circle distance (k-d tree query),
        sorted ascending. A radius of 0 still finds a station at the query point itself;
        a negative (or NaN) radius finds nothing."""
        if not radius_km >= 0:
            return np.empty(0, dtype=np.int64)
        ang = min(radius_km / EARTH_RADIUS_KM, math.pi)
        # chord length of the arc, widened a little (relative, plus an absolute ~6 um so that
        # radius 0 and last-bit differences between math and numpy trig err on the inside);
        # the pre-filter may only ever be a superset: callers filter on road distance after
        chord = 2.0 * math.sin(ang / 2.0) * (1 + 1e-9) + _CHORD_SLACK
        la, lo = math.radians(lat), math.radians(lon)
        cla = math.cos(la)
        q = np.array((cla * math.cos(lo), cla * math.sin(lo), math.sin(la)))
        idx = np.array(self.tree.query_ball_point(q, r=chord), dtype=np.int64)
        idx.sort()
        return idx

    def node_index(
        self,
        dist_km: np.ndarray,
        time_min: np.ndarray,
        node_lat: np.ndarray | None,
        node_lon: np.ndarray | None,
    ) -> NodeIndex | None:
        """The :class:`NodeIndex` of this table over the road tables ``dist_km`` and
        ``time_min`` whose nodes stand at ``node_lat``/``node_lon``, built on first use and
        kept (for the last two road tables). None without node positions or with writeable
        road tables (an index caches what it derives from them, so they must not change
        under it; a :class:`~evsim.geo.RoadNetwork`'s are read-only): callers then use
        :meth:`within_km`."""
        for ix in self._node_indexes:
            if (
                ix.dist_km is dist_km
                and ix.time_min is time_min
                and ix.node_lat is node_lat
                and ix.node_lon is node_lon
            ):
                return ix
        if (
            node_lat is None
            or node_lon is None
            or dist_km.flags.writeable
            or time_min.flags.writeable
        ):
            return None
        ix = NodeIndex(self, dist_km, time_min, node_lat, node_lon)
        self._node_indexes.insert(0, ix)
        del self._node_indexes[2:]
        return ix


def _chord_bound(radius_km: np.ndarray) -> np.ndarray:
    """:meth:`StationTable.within_km`'s widened chord for each radius (>= 0), vectorised."""
    ang = np.minimum(radius_km / EARTH_RADIUS_KM, math.pi)
    return 2.0 * np.sin(ang / 2.0) * (1 + 1e-9) + _CHORD_SLACK


Row = tuple[np.ndarray, np.ndarray, np.ndarray]


class NodeIndex:
    """Per road node, every station sorted by road distance from it, with that distance and
    the driving time: ``dist_km[node, station node] + access_km`` and ``time_min[node,
    station node] + access_min``, the very sums a policy computes (bit for bit), ties by
    station index. The stations within a range ``r`` of a node are then a prefix of its row:
    one ``searchsorted(r, "right")`` and slices (views, nearest first) instead of a k-d tree
    query (a list of indices to sort), gathers and a road-distance test.

    A policy's range query is "within ``r`` great-circle km of the vehicle (the k-d tree),
    then within ``r`` road km": the prefix is that set exactly when the vehicle stands at its
    node's position and no station is nearer by road than the tree finds it (every road at
    least the great circle: generated roads and access roads are great-circle x circuity
    >= 1). :meth:`row` checks the second once per node, in :meth:`StationTable.within_km`'s
    own chord arithmetic with a margin, and answers None for a node where it fails (a road
    given shorter than the great circle) and for a request off its node's position (live
    requests at a free lat/lon); callers then query the k-d tree, so answers never change.

    Rows are built on first use (an argsort over the stations) and kept up to
    :attr:`MAX_BYTES` (oldest dropped first): 24 bytes per station and node (index, km,
    min), 48 MB for 10,000 stations x 200 nodes. Thread-safe (live servers share a table).
    """

    MAX_BYTES: Final = 96 * 2**20
    MARGIN: Final = 1e-10  # relative, on chords: far above rounding, far below any real gap

    def __init__(
        self,
        table: StationTable,
        dist_km: np.ndarray,
        time_min: np.ndarray,
        node_lat: np.ndarray,
        node_lon: np.ndarray,
    ) -> None:
        self.table = table
        self.dist_km = dist_km
        self.time_min = time_min
        self.node_lat = node_lat
        self.node_lon = node_lon
        self._lat_list: list[float] = np.asarray(node_lat, float).tolist()
        self._lon_list: list[float] = np.asarray(node_lon, float).tolist()
        self._xyz = to_unit_xyz(table.lat, table.lon)  # what the k-d tree holds
        self._rows: dict[int, Row | None] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def row(self, node: int, lat: float, lon: float) -> Row | None:
        """``(stations, road_km, eta_min)`` for a vehicle at road node ``node`` standing at
        ``lat``/``lon``: station indices (intp) sorted by road distance, those distances and
        the driving times, all read-only; None where the k-d tree must answer instead (see
        the class docstring)."""
        if lat != self._lat_list[node] or lon != self._lon_list[node]:
            return None
        try:
            return self._rows[node]
        except KeyError:
            return self._build(node)

    def within(self, node: int, radius_km: float) -> np.ndarray | None:
        """Indices of the stations within ``radius_km`` road km of ``node``, nearest first
        (None where the k-d tree must answer; empty for a negative or NaN radius)."""
        r = self.row(node, self._lat_list[node], self._lon_list[node])
        if r is None:
            return None
        if not radius_km >= 0:
            return r[0][:0]
        return r[0][: r[1].searchsorted(radius_km, "right")]

    def _build(self, node: int) -> Row | None:
        st = self.table
        d = self.dist_km[node].take(st.node_ip)
        d += st.access_km
        la, lo = math.radians(self._lat_list[node]), math.radians(self._lon_list[node])
        cla = math.cos(la)  # the query point exactly as within_km computes it
        q = np.array((cla * math.cos(lo), cla * math.sin(lo), math.sin(la)))
        chord = np.sqrt(np.square(self._xyz - q).sum(axis=1))
        # the tree finds station s for every radius >= d[s] (NaN: never in range)
        found = chord * (1 + self.MARGIN) <= _chord_bound(np.maximum(d, 0.0))
        row: Row | None = None
        if bool(np.all(found | np.isnan(d))):
            order = np.argsort(d, kind="stable").astype(np.intp)  # ties by index; NaN last
            eta = self.time_min[node].take(st.node_ip[order])
            eta += st.access_min[order]
            row = (_readonly(order), _readonly(d[order]), _readonly(eta))
        size = 0 if row is None else sum(a.nbytes for a in row)
        with self._lock:
            if node in self._rows:
                return self._rows[node]
            while self._rows and self._bytes + size > self.MAX_BYTES:
                old = self._rows.pop(next(iter(self._rows)))
                self._bytes -= 0 if old is None else sum(a.nbytes for a in old)
            self._rows[node] = row
            self._bytes += size
        return row


class StatusBoard:
    """Mutable replicated station status. Owners write it; policies read snapshots of it."""

    def __init__(self, n_stations: int,
                 default_session_min: float = DEFAULT_SESSION_MIN) -> None:
        self.busy = np.zeros(n_stations, dtype=np.int32)
        self.queued = np.zeros(n_stations, dtype=np.int32)
        self.online = np.ones(n_stations, dtype=bool)
        self.mean_session_min = np.full(n_stations, default_session_min)
        self.observed_t_min = np.zeros(n_stations)

    def update(
        self,
        i: int,
        *,
        busy: int,
        queued: int,
        online: bool = True,
        t_min: float,
        mean_session_min: float | None = None,
    ) -> None:
        self.busy[i] = busy
        self.queued[i] = queued
        self.online[i] = online
        self.observed_t_min[i] = t_min
        if mean_session_min is not None:
            self.mean_session_min[i] = mean_session_min

    def set(
        self, i: int, busy: int, queued: int, online: bool, t_min: float, mean_session_min: float
    ) -> None:
        """:meth:`update` with every field, positionally (the simulation's hot path)."""
        self.busy[i] = busy
        self.queued[i] = queued
        self.online[i] = online
        self.observed_t_min[i] = t_min
        self.mean_session_min[i] = mean_session_min


@dataclass(frozen=True, eq=False)
class NetworkSnapshot:
    """A read-only view of stations, roads and their last known status."""

    stations: StationTable
    dist_km: np.ndarray  # road node x road node
    time_min: np.ndarray
    busy: np.ndarray
    queued: np.ndarray
    online: np.ndarray
    mean_session_min: np.ndarray
    observed_t_min: np.ndarray
    # road nodes' positions (a RoadNetwork's lat/lon): with them, and read-only road tables,
    # range queries from a node use the stations' NodeIndex instead of the k-d tree
    node_lat: np.ndarray | None = None
    node_lon: np.ndarray | None = None

    @classmethod
    def of(cls, stations: StationTable, roads: RoadNetwork, board: StatusBoard) -> NetworkSnapshot:
        return cls(
            stations=stations,
            dist_km=roads.dist_km,
            time_min=roads.time_min,
            busy=_readonly(board.busy),
            queued=_readonly(board.queued),
            online=_readonly(board.online),
            mean_session_min=_readonly(board.mean_session_min),
            observed_t_min=_readonly(board.observed_t_min),
            node_lat=_readonly_once(getattr(roads, "lat", None)),
            node_lon=_readonly_once(getattr(roads, "lon", None)),
        )

    def node_index(self) -> NodeIndex | None:
        """The stations' :class:`NodeIndex` over this snapshot's road tables (None: use the
        k-d tree, :meth:`StationTable.within_km`)."""
        return self.stations.node_index(self.dist_km, self.time_min, self.node_lat, self.node_lon)

    def without(self, stations: Iterable[int]) -> NetworkSnapshot:
        """This snapshot with the stations of index ``stations`` offline: what a policy
        sees for a vehicle that must not be sent there (stations it gave up on, picks
        already ranked, stations a re-plan leaves out). ``self`` when there are none; the
        road tables are shared, so range queries keep their node index."""
        drop = sorted(set(stations))
        if not drop:
            return self
        online = np.array(self.online, dtype=bool, copy=True)
        online[drop] = False
        online.flags.writeable = False
        return replace(self, online=online)


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    """A vehicle asking where to charge. Positions are road-graph node indices plus lat/lon."""

    vehicle_id: str
    node: int
    lat: float
    lon: float
    dest_node: int
    soc: float
    battery_kwh: float
    consumption_kwh_per_km: float
    max_dc_kw: float = 150.0
    max_ac_kw: float = 11.0
    reserve_soc: float = 0.08
    target_soc: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 <= self.soc <= 1.0:
            raise ValueError(f"soc must be in [0, 1], got {self.soc}")
        if self.battery_kwh <= 0 or self.consumption_kwh_per_km <= 0:
            raise ValueError("battery_kwh and consumption_kwh_per_km must be positive")

    @property
    def range_km(self) -> float:
        """How far the vehicle can drive before reaching its reserve SoC."""
        return (
            max(self.soc - self.reserve_soc, 0.0) * self.battery_kwh / self.consumption_kwh_per_km
        )

    def power_kw(self, connector_kw: float, has_dc: bool) -> float:
        return session_power_kw(
            connector_kw, "DC" if has_dc else "AC", self.max_dc_kw, self.max_ac_kw
        )


@dataclass(frozen=True, slots=True)
class Choice:
    """A policy's answer: a station and the estimates that led to it."""

    station_index: int
    station_id: str
    score: float
    distance_km: float  # road distance to the station
    detour_km: float  # extra distance versus driving straight to the destination
    eta_min: float
    expected_wait_min: float
