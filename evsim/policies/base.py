"""Shared candidate arithmetic for policies: reachable stations and their estimates.

:func:`candidates` pre-filters stations with the snapshot's k-d tree (great-circle range is a
lower bound on road distance), then computes, for the few left, road distance, detour, arrival
time, expected wait and an indicative price. Everything is vectorised numpy over candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evsim.snapshot import ChargeRequest, Choice, NetworkSnapshot

__all__ = ["Candidates", "candidates", "choose"]


@dataclass(frozen=True, eq=False)
class Candidates:
    index: np.ndarray  # station indices (reachable and online)
    distance_km: np.ndarray  # road distance from the vehicle to the station
    eta_min: np.ndarray  # driving time to the station
    onward_min: np.ndarray  # driving time from the station to the destination
    detour_km: np.ndarray
    expected_wait_min: np.ndarray
    charge_min: np.ndarray  # estimated time to charge to the target SoC
    price: np.ndarray  # estimated price of that session

    def __len__(self) -> int:
        return len(self.index)


def expected_wait_min(
    n: np.ndarray, busy: np.ndarray, queued: np.ndarray, mean_min: np.ndarray
) -> np.ndarray:
    """Mean wait for a newcomer: 0 with a free connector, else the queue ahead cleared at
    ``n / mean_min`` departures per minute (each departure frees one connector)."""
    ahead = queued + busy - n + 1  # vehicles that must leave before we plug in
    return np.where(busy + queued < n, 0.0, np.maximum(ahead, 0) * mean_min / np.maximum(n, 1))


def candidates(request: ChargeRequest, snap: NetworkSnapshot, now: float) -> Candidates:
    st = snap.stations
    range_km = request.range_km
    near = st.within_km(request.lat, request.lon, range_km)
    if len(near):
        near = near[snap.online[near]]
    nodes = st.node[near]
    dist = snap.dist_km[request.node, nodes] + st.access_km[near]
    ok = dist <= range_km
    idx, nodes, dist = near[ok], nodes[ok], dist[ok]
    direct = snap.dist_km[request.node, request.dest_node]
    onward_km = snap.dist_km[nodes, request.dest_node] + st.access_km[idx]
    eta = snap.time_min[request.node, nodes] + st.access_km[idx] / 50.0 * 60.0
    onward = snap.time_min[nodes, request.dest_node] + st.access_km[idx] / 50.0 * 60.0
    n = st.n_connectors[idx]
    wait = expected_wait_min(n, snap.busy[idx], snap.queued[idx], snap.mean_session_min[idx])
    # energy needed on arrival to reach the target SoC; power capped by the vehicle
    arrival_soc = request.soc - dist * request.consumption_kwh_per_km / request.battery_kwh
    need_kwh = np.maximum(request.target_soc - arrival_soc, 0.0) * request.battery_kwh
    cap = np.where(st.has_dc[idx], request.max_dc_kw, request.max_ac_kw)
    power = np.minimum(st.max_power_kw[idx], cap)
    charge = need_kwh / np.maximum(power, 1e-9) * 60.0
    hour = int((now + eta.mean() if len(eta) else now) // 60) % 24
    price = (
        need_kwh * st.energy_price_by_hour[idx, hour]
        + charge / 60.0 * st.time_price_by_hour[idx, hour]
        + st.flat_by_hour[idx, hour]
    )
    return Candidates(idx, dist, eta, onward, dist + onward_km - direct, wait, charge, price)


def choose(c: Candidates, snap: NetworkSnapshot, score: np.ndarray) -> Choice | None:
    """The lowest-score candidate (ties broken by station index, so choices are deterministic)."""
    if len(c) == 0:
        return None
    k = int(np.lexsort((c.index, score))[0])
    i = int(c.index[k])
    return Choice(
        station_index=i,
        station_id=snap.stations.ids[i],
        score=float(score[k]),
        distance_km=float(c.distance_km[k]),
        detour_km=float(c.detour_km[k]),
        eta_min=float(c.eta_min[k]),
        expected_wait_min=float(c.expected_wait_min[k]),
    )
