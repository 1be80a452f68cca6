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
    # Same arithmetic as the plain version below, element for element (so choices, ties
    # included, do not change), with fewer temporaries: static per-station arrays come
    # precomputed from the StationTable, rows of the road tables are taken once.
    #
    #   dist      = dist_km[node, st_node] + access_km            (then dist <= range)
    #   onward_km = dist_km[st_node, dest] + access_km
    #   eta       = time_min[node, st_node] + access_km / 50 * 60
    #   onward    = time_min[st_node, dest] + access_km / 50 * 60
    #   wait      = expected_wait_min(n, busy, queued, mean_session_min)
    #   need_kwh  = max(target_soc - (soc - dist * kwh_per_km / battery), 0) * battery
    #   charge    = need_kwh / max(min(max_power, dc or ac cap), 1e-9) * 60
    #   price     = need_kwh * energy[hour] + charge / 60 * time[hour] + flat[hour]
    #               (hour: of now + mean eta)
    st = snap.stations
    range_km = request.range_km
    near = st.within_km(request.lat, request.lon, range_km)
    if len(near) <= SMALL:
        return _candidates_few(request, snap, now, near.tolist(), range_km)
    near = near[snap.online[near]]
    here, dest = request.node, request.dest_node
    dist_km, time_min = snap.dist_km, snap.time_min
    nodes = st.node[near]
    dist = dist_km[here].take(nodes)
    dist += st.access_km[near]
    ok = dist <= range_km
    idx, nodes, dist = near[ok], nodes[ok], dist[ok]
    acc_min = st.access_min[idx]
    onward_km = dist_km[:, dest].take(nodes)
    onward_km += st.access_km[idx]
    eta = time_min[here].take(nodes)
    eta += acc_min
    onward = time_min[:, dest].take(nodes)
    onward += acc_min
    n = st.n_connectors[idx]
    occ = snap.busy[idx] + snap.queued[idx]
    ahead = occ - n
    ahead += 1
    wait = np.maximum(ahead, 0) * snap.mean_session_min[idx]
    wait /= st.n_connectors_div[idx]
    wait[occ < n] = 0.0  # np.where(busy + queued < n, 0.0, wait), in place
    # energy needed on arrival to reach the target SoC; power capped by the vehicle
    need_kwh = dist * request.consumption_kwh_per_km
    need_kwh /= request.battery_kwh
    np.subtract(request.soc, need_kwh, out=need_kwh)  # SoC on arrival
    np.subtract(request.target_soc, need_kwh, out=need_kwh)
    np.maximum(need_kwh, 0.0, out=need_kwh)
    need_kwh *= request.battery_kwh
    charge = need_kwh / st.session_power_kw(request.max_dc_kw, request.max_ac_kw)[idx]
    charge *= 60.0
    # the mean arrival time (sum / count is what ndarray.mean computes, bit for bit)
    hour = int((now + np.add.reduce(eta) / len(eta) if len(eta) else now) // 60) % 24
    price = (
        need_kwh * st.energy_price_by_hour_t[hour].take(idx)
        + charge / 60.0 * st.time_price_by_hour_t[hour].take(idx)
        + st.flat_by_hour_t[hour].take(idx)
    )
    detour = dist + onward_km
    detour -= dist_km[here, dest]
    return Candidates(idx, dist, eta, onward, detour, wait, charge, price)


SMALL = 16  # up to this many stations in range, a plain loop beats numpy's per-call overhead


def _candidates_few(
    request: ChargeRequest, snap: NetworkSnapshot, now: float, near: list[int], range_km: float
) -> Candidates:
    """:func:`candidates` for a few stations, one at a time in Python floats: the same IEEE
    operations in the same order as the numpy version, so the same numbers bit for bit."""
    st = snap.stations
    here, dest = request.node, request.dest_node
    online, busy, queued, mean = snap.online, snap.busy, snap.queued, snap.mean_session_min
    drow, dcol = snap.dist_km[here], snap.dist_km[:, dest]
    trow, tcol = snap.time_min[here], snap.time_min[:, dest]
    node_l, acc_l, accm_l = st.node_list, st.access_km_list, st.access_min_list
    n_l, ndiv_l = st.n_connectors_list, st.n_connectors_div_list
    power = st.session_power_kw(request.max_dc_kw, request.max_ac_kw)
    soc, target = request.soc, request.target_soc
    per_km, battery = request.consumption_kwh_per_km, request.battery_kwh
    direct = snap.dist_km.item(here, dest)
    idx: list[int] = []
    dist: list[float] = []
    eta: list[float] = []
    onward: list[float] = []
    detour: list[float] = []
    wait: list[float] = []
    need: list[float] = []
    charge: list[float] = []
    for i in near:
        if not online.item(i):
            continue
        nd = node_l[i]
        acc = acc_l[i]
        d = drow.item(nd) + acc
        if not d <= range_km:
            continue
        accm = accm_l[i]
        idx.append(i)
        dist.append(d)
        eta.append(trow.item(nd) + accm)
        onward.append(tcol.item(nd) + accm)
        detour.append(d + (dcol.item(nd) + acc) - direct)
        n = n_l[i]
        occ = busy.item(i) + queued.item(i)
        wait.append(0.0 if occ < n else max(occ - n + 1, 0) * mean.item(i) / ndiv_l[i])
        x = target - (soc - d * per_km / battery)
        if not x > 0.0 and x == x:  # np.maximum(x, 0.0): NaN stays NaN, -0.0 -> 0.0
            x = 0.0
        x *= battery
        need.append(x)
        charge.append(x / power.item(i) * 60.0)
    eta_a = np.array(eta, dtype=float)
    hour = int((now + eta_a.sum() / len(eta_a) if len(eta_a) else now) // 60) % 24
    e_h = st.energy_price_by_hour_t[hour]
    t_h = st.time_price_by_hour_t[hour]
    f_h = st.flat_by_hour_t[hour]
    price = [
        x * e_h.item(i) + c / 60.0 * t_h.item(i) + f_h.item(i)
        for i, x, c in zip(idx, need, charge, strict=True)
    ]
    return Candidates(
        np.array(idx, dtype=np.int64),
        np.array(dist, dtype=float),
        eta_a,
        np.array(onward, dtype=float),
        np.array(detour, dtype=float),
        np.array(wait, dtype=float),
        np.array(charge, dtype=float),
        np.array(price, dtype=float),
    )


def choose(c: Candidates, snap: NetworkSnapshot, score: np.ndarray) -> Choice | None:
    """The lowest-score candidate (ties broken by station index, so choices are deterministic)."""
    if len(c) == 0:
        return None
    score = np.asarray(score)
    k = int(score.argmin())  # the first minimum; the first NaN if there is any
    best = score[k]
    if best != best:  # NaN scores: sort as lexsort does (NaN last)
        k = int(np.lexsort((c.index, score))[0])
    elif len(score) <= SMALL:
        s = score.tolist()
        if s.count(s[k]) > 1:  # equal scores: the lowest station index
            at = c.index.tolist()
            k = min((j for j, v in enumerate(s) if v == s[k]), key=at.__getitem__)
    else:
        tie = score == best
        if np.count_nonzero(tie) > 1:
            ties = np.flatnonzero(tie)
            k = int(ties[c.index[ties].argmin()])
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
