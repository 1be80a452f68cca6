"""What a policy sees: a read-only snapshot of the network, the request, and the choice.

* :class:`StationTable` is the static part (ids, owners, positions, connectors, tariff prices
  by hour) with a k-d tree over station positions for range queries.
* :class:`StatusBoard` is the replicated status a company server holds (busy connectors,
  queue, online flag, observed-at time). The simulation updates it with a delay; the live
  servers update it from MQTT status messages.
* :class:`NetworkSnapshot` is what policies get: read-only numpy views of both, so the same
  policy runs on a simulated or a live network and cannot change either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from evsim.battery import session_power_kw
from evsim.geo import EARTH_RADIUS_KM, RoadNetwork, haversine_km, to_unit_xyz
from evsim.scenario import Scenario
from evsim.tariff import active_element

__all__ = ["ChargeRequest", "Choice", "NetworkSnapshot", "StationTable", "StatusBoard"]

ACCESS_SPEED_KMH = 50.0  # speed on a station's access road (evsim.planning re-exports it)
_CHORD_SLACK = 1e-12  # on the unit sphere: about 6 micrometres on the ground


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
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

    def __post_init__(self) -> None:
        derived = {
            "access_min": self.access_km / ACCESS_SPEED_KMH * 60.0,
            "n_connectors_div": np.maximum(self.n_connectors, 1).astype(float),
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
            acc.append(float(haversine_km(la, lo, roads.lat[city], roads.lon[city])) * circuity)
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


class StatusBoard:
    """Mutable replicated station status. Owners write it; policies read snapshots of it."""

    def __init__(self, n_stations: int, default_session_min: float = 45.0) -> None:
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
        )


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
