"""Shared candidate arithmetic for policies: reachable stations and their estimates.

:func:`candidates` finds the online stations within the vehicle's range by road and
estimates, for those, road distance, detour, arrival time, expected wait, charging time and
an indicative price, vectorised numpy over candidates. The range query is a pre-filter, never
a scan of all stations: for a vehicle at a road node (all simulated decisions, live requests
named by city) a slice of the node's row in the stations' :class:`~evsim.snapshot.NodeIndex`
(stations sorted by road distance, with distance and driving time); elsewhere the k-d tree
(great-circle range is a lower bound on road distance) and a road-distance test. Both give
the same stations and the same numbers, bit for bit. :func:`choose` picks the lowest score;
:meth:`Candidates.nearest` and :meth:`Candidates.least_time` are its shortcuts for the
built-in scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from evsim.slots import slot_constructor
from evsim.snapshot import ChargeRequest, Choice, NetworkSnapshot, NodeIndex

__all__ = ["Candidates", "candidates", "choose"]

_INF = math.inf
_SIXTY = np.array(60.0)
_F64 = np.float64


# Choice(station_index, station_id, score, distance_km, detour_km, eta_min,
# expected_wait_min) without the frozen __init__ (one per decision)
_new_choice = slot_constructor(Choice)


class _online:  # used like functools.cached_property
    """A public, online-only estimate of :class:`Candidates`: its raw counterpart (rows of
    every station in range, offline ones included) filtered by the online mask, computed on
    first access and then found in the instance dict (a non-data descriptor)."""

    def __init__(self, raw: Callable[[Candidates], np.ndarray]) -> None:
        self.raw = raw
        self.__doc__ = raw.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Candidates | None, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        v = self.raw(obj)
        on = obj._online_mask()
        if on is not None:
            v = v[on]
        obj.__dict__[self.name] = v
        return v


class Candidates:
    """The reachable online stations of one request and their estimates, as arrays aligned
    with :attr:`index`: by station index from the k-d tree, nearest first from a node index
    (:attr:`by_index` says which; :func:`choose` breaks ties by station index either way).

    Estimates are computed on first access (a policy pays only for what it reads), from the
    snapshot as it is then: read them within the policy call. With ``a = access_km`` and
    ``am = a / 50 km/h * 60``::

        distance_km       = dist_km[node, st_node] + a               (<= range_km)
        eta_min           = time_min[node, st_node] + am
        onward_min        = time_min[st_node, dest] + am
        detour_km         = distance_km + (dist_km[st_node, dest] + a) - dist_km[node, dest]
        expected_wait_min = 0 if busy + queued < n
                            else (busy + queued - n + 1) * mean_session_min / max(n, 1)
        need_kwh          = max(target_soc - (soc - distance_km * kwh_per_km / battery), 0)
                            * battery
        charge_min        = need_kwh / max(min(max_power, dc or ac cap), 1e-9) * 60
        price             = need_kwh * energy[h] + charge_min / 60 * time[h] + flat[h]
                            (h: the hour of now + mean eta_min, summed by station index)

    Inside, the arrays are "raw" rows: from a node index (:attr:`nearest_first`), every
    station in range by (distance, station index), offline ones included (a slice of the
    row is a view, a filtered copy is not), so :meth:`least_time` and :meth:`nearest` work
    on views and leave the offline stations out of the pick instead of filtering every
    array; the public arrays are the raw ones filtered by :meth:`_online_mask` (from the
    tree, raw rows are the online stations by index: no mask).
    """

    # raw estimates not computed yet are None (class attributes: a new object sets few)
    _re: np.ndarray | None = None  # eta
    _rnodes: np.ndarray | None = None  # the stations' road nodes
    _ram: np.ndarray | None = None  # access road minutes
    _ronward: np.ndarray | None = None
    _rdetour: np.ndarray | None = None
    _rwait: np.ndarray | None = None
    _rneed: np.ndarray | None = None
    _rcharge: np.ndarray | None = None
    _on: np.ndarray | None = None  # online mask of the raw rows (nearest_first only)
    _n: int | None = None  # len()

    def __init__(
        self,
        request: ChargeRequest,
        snap: NetworkSnapshot,
        now: float,
        index: np.ndarray,
        distance_km: np.ndarray,
        eta_min: np.ndarray | None = None,
        nodes: np.ndarray | None = None,
        nearest_first: bool = False,
    ) -> None:
        self._req, self._snap, self._now = request, snap, now
        self._ri, self._rd = index, distance_km
        if eta_min is not None:
            self._re = eta_min
        if nodes is not None:
            self._rnodes = nodes
        # raw rows by (distance, station index), offline stations included: from a node
        # index; else raw rows are online stations by station index
        self.nearest_first = nearest_first
        self.by_index = not nearest_first  # public arrays in ascending station index

    def _online_mask(self) -> np.ndarray | None:
        """Which raw rows are online (None: all, the raw rows are the public ones)."""
        if not self.nearest_first:
            return None
        on = self._on
        if on is None:
            on = self._on = self._snap.online[self._ri]
        return on

    def __len__(self) -> int:
        n = self._n
        if n is None:
            on = self._online_mask()
            n = self._n = len(self._ri) if on is None else int(np.count_nonzero(on))
        return n

    # ---- raw estimates (one per row, offline stations included) --------------------------

    def _raw_index(self) -> np.ndarray:
        return self._ri

    def _raw_distance(self) -> np.ndarray:
        return self._rd

    def _raw_nodes(self) -> np.ndarray:
        n = self._rnodes
        if n is None:
            n = self._rnodes = self._snap.stations.node_ip[self._ri]
        return n

    def _raw_access_min(self) -> np.ndarray:
        a = self._ram
        if a is None:
            a = self._ram = self._snap.stations.access_min[self._ri]
        return a

    def _raw_eta(self) -> np.ndarray:
        """Driving time to the station."""
        e = self._re
        if e is None:
            e = self._snap.time_min[self._req.node][self._raw_nodes()]
            e += self._raw_access_min()
            self._re = e
        return e

    def _raw_onward(self) -> np.ndarray:
        """Driving time from the station to the destination."""
        o = self._ronward
        if o is None:
            o = self._snap.time_min[:, self._req.dest_node][self._raw_nodes()]
            o += self._raw_access_min()
            self._ronward = o
        return o

    def _raw_detour(self) -> np.ndarray:
        """Extra distance versus driving straight to the destination."""
        d = self._rdetour
        if d is None:
            snap, dest = self._snap, self._req.dest_node
            onward_km = snap.dist_km[:, dest][self._raw_nodes()]
            onward_km += snap.stations.access_km[self._ri]
            d = self._rd + onward_km
            d -= snap.dist_km[self._req.node, dest]
            self._rdetour = d
        return d

    def _raw_wait(self) -> np.ndarray:
        """Mean wait for a newcomer (see :func:`expected_wait_min`)."""
        w = self._rwait
        if w is None:
            snap, idx = self._snap, self._ri
            st = snap.stations
            ahead = snap.busy[idx] + snap.queued[idx]  # then: vehicles to leave before us
            ahead -= st.n_connectors_m1[idx]
            # np.maximum(ahead, 0) is ahead wherever it counts: ahead <= 0 <=> free connector
            w = ahead * snap.mean_session_min[idx]
            w /= st.n_connectors_div[idx]
            np.putmask(w, ahead <= 0, 0.0)
            self._rwait = w
        return w

    def _raw_need(self) -> np.ndarray:
        """Energy needed on arrival to reach the target SoC."""
        x = self._rneed
        if x is None:
            r, d = self._req, self._rd
            # (0-d arrays: the same float64 arithmetic, a third cheaper per call than floats)
            f64 = np.array
            battery = f64(r.battery_kwh, _F64)
            x = d * f64(r.consumption_kwh_per_km, _F64)
            x /= battery
            np.subtract(f64(r.soc, _F64), x, out=x)  # SoC on arrival
            np.subtract(f64(r.target_soc, _F64), x, out=x)
            least = d.item(0 if self.nearest_first else d.argmin()) if len(d) else 0.0
            if not (r.target_soc > r.soc and least >= 0.0):  # (least: NaN if any is)
                # else a no-op: distance >= 0 -> SoC on arrival <= soc < target, x > 0
                np.maximum(x, 0.0, out=x)
            x *= battery
            self._rneed = x
        return x

    def _raw_charge(self) -> np.ndarray:
        """Estimated time to charge to the target SoC (power capped by the vehicle)."""
        c = self._rcharge
        if c is None:
            r = self._req
            power = self._snap.stations.session_power_kw(r.max_dc_kw, r.max_ac_kw)
            c = self._raw_need() / power[self._ri]
            c *= _SIXTY
            self._rcharge = c
        return c

    # ---- the public arrays (online stations only) ----------------------------------------

    index = _online(_raw_index)  # station indices
    distance_km = _online(_raw_distance)  # road distance from the vehicle to the station
    eta_min = _online(_raw_eta)
    onward_min = _online(_raw_onward)
    detour_km = _online(_raw_detour)
    expected_wait_min = _online(_raw_wait)
    charge_min = _online(_raw_charge)
    _need_kwh = _online(_raw_need)

    @property
    def price(self) -> np.ndarray:
        """Estimated price of that session, at the tariff of the mean arrival hour."""
        p = self.__dict__.get("_price")
        if p is None:
            eta, idx, now = self.eta_min, self.index, self._now
            if len(eta) and not self.by_index:  # the mean in station order, bit for bit
                eta = eta[np.argsort(idx)]
            # (sum / count is what ndarray.mean computes, bit for bit)
            hour = int((now + np.add.reduce(eta) / len(eta) if len(eta) else now) // 60) % 24
            st = self._snap.stations
            p = (
                self._need_kwh * st.energy_price_by_hour_t[hour][idx]
                + self.charge_min / 60.0 * st.time_price_by_hour_t[hour][idx]
                + st.flat_by_hour_t[hour][idx]
            )
            self.__dict__["_price"] = p
        return p

    # ---- picking one -----------------------------------------------------------------------

    def _choice(self, j: int, score: float, wait: float | None = None) -> Choice:
        """The :class:`Choice` of raw row ``j``; an estimate not computed as an array is
        computed for this one station (the same operations, so the same number)."""
        i = self._ri.item(j)
        snap, req = self._snap, self._req
        st = snap.stations
        d = self._rd.item(j)
        if self._rdetour is not None:
            detour = self._rdetour.item(j)
        else:
            dest = req.dest_node
            onward_km = snap.dist_km.item(st.node_list[i], dest) + st.access_km_list[i]
            detour = d + onward_km - snap.dist_km.item(req.node, dest)
        if self._re is not None:
            eta = self._re.item(j)
        else:
            eta = snap.time_min.item(req.node, st.node_list[i]) + st.access_min_list[i]
        if wait is None:
            if self._rwait is not None:
                wait = self._rwait.item(j)
            else:
                n, occ = st.n_connectors_list[i], snap.busy.item(i) + snap.queued.item(i)
                mean = snap.mean_session_min.item(i)
                wait = 0.0 if occ < n else (occ - n + 1) * mean / st.n_connectors_div_list[i]
        return _new_choice(i, st.ids[i], float(score), d, detour, eta, wait)

    def _choose_raw(self, score: np.ndarray) -> Choice | None:
        """:func:`choose` on a score over the raw rows (overwritten: offline ones -> inf)."""
        on = self._online_mask()
        if on is not None:
            np.putmask(score, ~on, _INF)
        j = int(score.argmin())  # the first minimum; the first NaN if there is any
        best = score.item(j)
        if best < _INF:  # finite: the offline stations (inf) are out of it
            if np.count_nonzero(score == best) > 1:  # equal scores: the lowest station index
                ties = np.flatnonzero(score == best)
                j = int(ties[self._ri[ties].argmin()])
            return self._choice(j, best)
        return choose(self, self._snap, score if on is None else score[on])  # NaN or inf

    def nearest(self) -> Choice | None:
        """``choose(c, snapshot, c.distance_km)``: from a node index, the first online
        station of the row (rows are by distance, ties by station index)."""
        if not self.nearest_first:
            return choose(self, self._snap, self.distance_km)
        on = self._online_mask()
        if on is None or not len(on):
            return None
        j = int(on.argmax())  # the first True
        if not on.item(j):
            return None
        return self._choice(j, self._rd.item(j))

    def least_time(self, w_charge: float = 1.0) -> Choice | None:
        """``choose(c, snapshot, score)`` for ``score = eta_min + expected_wait_min +
        w_charge * charge_min + onward_min`` (``least_wait``): the same pick and the same
        numbers, mostly from a cheaper lower bound of the score (see :meth:`_least_bounded`;
        else, or where that cannot decide, from the full score)."""
        ri = self._ri
        if not len(ri):
            return None
        if self.nearest_first and len(ri) <= SMALL and self._re is not None:
            picked = self._least_few(w_charge)
            if picked is not None:
                return picked
        eta, onward = self._raw_eta(), self._raw_onward()
        if w_charge > 0.0 and self._rwait is None:  # (every estimate given: score them)
            picked = self._least_bounded(w_charge, eta, onward)
            if picked is not None:
                return picked
        charge = self._raw_charge()
        score = eta + self._raw_wait()
        score += charge if w_charge == 1.0 else w_charge * charge  # 1.0 * x is x
        score += onward
        return self._choose_raw(score)

    def _least_few(self, w_charge: float) -> Choice | None:
        """:meth:`least_time` over the few raw rows of a node index (up to :data:`SMALL`),
        one station at a time in Python floats, cheaper than numpy calls on a few elements:
        each online station's full score with the operations of the arrays, in their order
        (see :meth:`_raw_wait`, :meth:`_raw_charge` and :meth:`_least_bounded`), so the same
        pick (ties: the lowest station index) and the same numbers. None where it cannot
        decide (a NaN score, no finite one): the arrays then."""
        snap, r = self._snap, self._req
        st = snap.stations
        online, busy, queued, mean = snap.online, snap.busy, snap.queued, snap.mean_session_min
        to_dest = _time_to(snap, r.dest_node)  # time_min[:, dest] as a list
        node_l, accm_l = st.node_list, st.access_min_list
        n_l, ndiv_l = st.n_connectors_list, st.n_connectors_div_list
        power = st.session_power_kw_list(r.max_dc_kw, r.max_ac_kw)
        soc, target, battery = r.soc, r.target_soc, r.battery_kwh
        per_km = r.consumption_kwh_per_km
        assert self._re is not None
        eta_l, d_l = self._re.tolist(), self._rd.tolist()
        best, best_i, best_j, best_w = _INF, -1, -1, 0.0
        for j, i in enumerate(self._ri.tolist()):
            if not online.item(i):
                continue
            n, occ = n_l[i], busy.item(i) + queued.item(i)
            w = 0.0 if occ < n else (occ - n + 1) * mean.item(i) / ndiv_l[i]
            x = target - (soc - d_l[j] * per_km / battery)
            if not x > 0.0 and x == x:  # np.maximum(x, 0.0): NaN stays NaN, -0.0 -> 0.0
                x = 0.0
            charge = x * battery / power[i] * 60.0
            cw = charge if w_charge == 1.0 else w_charge * charge
            score = eta_l[j] + w + cw + (to_dest[node_l[i]] + accm_l[i])
            if score < best or (score == best and i < best_i):
                best, best_i, best_j, best_w = score, i, j, w
            elif score != score:  # NaN: sorted last, as choose does
                return None
        if best_j < 0:  # nothing online, or no finite score
            return None
        return self._choice(best_j, best, best_w)

    def _charge_low(self) -> np.ndarray | None:
        """A lower bound of each raw row's charging time, ``((target - soc) * battery +
        distance * kwh_per_km - margin) * 60 / power`` (None for negative distances or
        non-finite terms): see :meth:`_least_bounded`."""
        r, d = self._req, self._rd
        if self.nearest_first:
            d_min, d_max = d.item(0), d.item(-1)
        else:
            d_min, d_max = d.item(d.argmin()), d.item(d.argmax())
        soc, target, battery = r.soc, r.target_soc, r.battery_kwh
        per_km = r.consumption_kwh_per_km
        margin = 1e-12 * ((abs(target) + abs(soc)) * battery + d_max * per_km)
        base = (target - soc) * battery - margin
        if not (d_min >= 0.0 and margin < _INF and -_INF < base < _INF):
            return None
        low = d * np.array(per_km, _F64)
        low += np.array(base, _F64)
        low *= self._snap.stations.charge_min_per_kwh(r.max_dc_kw, r.max_ac_kw)[self._ri]
        return low

    def _least_bounded(self, w_charge: float, eta: np.ndarray, onward: np.ndarray) -> Choice | None:
        """:meth:`least_time` by a lower bound, or None where it cannot decide.

        ``lb = eta + w_charge * low + onward`` bounds each score from below: the wait is
        left out (waits are >= 0 where mean session times are: checked) and ``low`` is
        ``((target - soc) * battery + distance * kwh_per_km - margin) * 60 / power``, the
        charging time in three operations instead of eight; its rounding errors (a few
        ulps of the terms' magnitude ``m``, in either) stay under the margin, ``1e-12 m``;
        rounding is monotone. Rows are then taken in order of ``lb`` (offline ones skipped)
        and scored exactly, one station at a time, with the very operations of the full
        score, until the next bound exceeds the best score so far: every station not taken
        scores above it. Ties: the lowest station index, as :func:`choose`. Undecided: a
        NaN, no finite bound, negative distances or mean session times, or more than
        :data:`_TAKE` rows taken."""
        snap, r, ri, d = self._snap, self._req, self._ri, self._rd
        mean = snap.mean_session_min[ri]
        if not mean.item(mean.argmin()) >= 0.0:  # (argmin finds a NaN first)
            return None
        low = self._charge_low()
        if low is None:
            return None
        if w_charge != 1.0:
            low *= w_charge
        lb = eta + low
        lb += onward
        st = snap.stations
        power = st.session_power_kw(r.max_dc_kw, r.max_ac_kw)
        soc, target, battery = r.soc, r.target_soc, r.battery_kwh
        per_km = r.consumption_kwh_per_km
        online, busy, queued = snap.online, snap.busy, snap.queued
        n_l, ndiv_l = st.n_connectors_list, st.n_connectors_div_list
        best, best_i, best_j, best_w = _INF, -1, -1, 0.0
        for _ in range(_TAKE):
            j = lb.argmin()  # the first minimum; the first NaN if there is any
            bound = lb.item(j)
            if bound > best:
                return self._choice(best_j, best, best_w)
            if not bound < _INF:  # NaN, or nothing finite yet
                return None
            lb[j] = _INF
            i = ri.item(j)
            if not online.item(i):
                continue
            n, occ = n_l[i], busy.item(i) + queued.item(i)
            w = 0.0 if occ < n else (occ - n + 1) * mean.item(j) / ndiv_l[i]
            # the charging time as the arrays compute it (see _raw_need, _raw_charge)
            x = target - (soc - d.item(j) * per_km / battery)
            if not x > 0.0 and x == x:  # np.maximum(x, 0.0): NaN stays NaN, -0.0 -> 0.0
                x = 0.0
            charge = x * battery / power.item(i) * 60.0
            cw = charge if w_charge == 1.0 else w_charge * charge
            score = eta.item(j) + w + cw + onward.item(j)
            if score < best or (score == best and i < best_i):
                best, best_i, best_j, best_w = score, i, j, w
            elif score != score:  # NaN: sorted last, as choose does
                return None
        return None


_TAKE = 8  # rows Candidates._least_bounded scores one by one before giving up


def expected_wait_min(
    n: np.ndarray, busy: np.ndarray, queued: np.ndarray, mean_min: np.ndarray
) -> np.ndarray:
    """Mean wait for a newcomer: 0 with a free connector, else the queue ahead cleared at
    ``n / mean_min`` departures per minute (each departure frees one connector)."""
    ahead = queued + busy - n + 1  # vehicles that must leave before we plug in
    return np.where(busy + queued < n, 0.0, np.maximum(ahead, 0) * mean_min / np.maximum(n, 1))


def candidates(
    request: ChargeRequest, snap: NetworkSnapshot, now: float, *, every_estimate: bool = False
) -> Candidates:
    """The online stations within ``request.range_km`` road km of the vehicle, with their
    estimates (see :class:`Candidates`). ``every_estimate``: the caller reads them all
    (price included); for up to :data:`SMALL` stations they are then computed up front, one
    station at a time in Python floats, cheaper than numpy calls on a few elements each (a
    few stations from the k-d tree always are). Either way the same numbers."""
    global _last_index
    st = snap.stations
    range_km = request.range_km
    last = _last_index  # (a snapshot, its node index): most calls share one snapshot
    if last[0] is snap:
        ix = last[1]
    else:
        ix = st.node_index(snap.dist_km, snap.time_min, snap.node_lat, snap.node_lon)
        _last_index = (snap, ix)
    if ix is not None:
        row = ix.row(request.node, request.lat, request.lon)
        if row is not None:  # a prefix of the node's stations by road distance: exact
            order, road_km, eta = row
            k = road_km.searchsorted(range_km, "right") if range_km >= 0 else 0
            if k > SMALL or not every_estimate:
                return Candidates(request, snap, now, order[:k], road_km[:k], eta[:k], None, True)
            near = order[:k].tolist()
            near.sort()
            return _candidates_few(request, snap, now, near, range_km)
    # anywhere else: the k-d tree (a superset), then road distance
    near = st.within_km(request.lat, request.lon, range_km)
    if len(near) <= SMALL:
        return _candidates_few(request, snap, now, near.tolist(), range_km)
    near = near[snap.online[near]]
    nodes = st.node[near]
    dist = snap.dist_km[request.node].take(nodes)
    dist += st.access_km[near]
    ok = dist <= range_km
    return Candidates(request, snap, now, near[ok], dist[ok], None, nodes[ok])


_last_index: tuple[NetworkSnapshot | None, NodeIndex | None] = (None, None)

# (a snapshot, its road time to each destination asked for, as a list per destination)
_last_time_to: tuple[NetworkSnapshot | None, dict[int, list[float]]] = (None, {})


def _time_to(snap: NetworkSnapshot, dest: int) -> list[float]:
    """``snap.time_min[:, dest]`` as a Python list, remembered for the last snapshot."""
    global _last_time_to
    last_snap, cols = _last_time_to
    if last_snap is not snap:
        cols = {}
        _last_time_to = (snap, cols)
    col = cols.get(dest)
    if col is None:
        col = cols[dest] = snap.time_min[:, dest].tolist()
    return col


SMALL = 16  # up to this many stations, a plain loop over every estimate beats numpy calls


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
    index, dist_a = np.array(idx, dtype=np.intp), np.array(dist, dtype=float)
    c = Candidates(request, snap, now, index, dist_a, eta_a)
    f = np.array
    onward_a, detour_a, wait_a, charge_a = (
        f(onward, float),
        f(detour, float),
        f(wait, float),
        f(charge, float),
    )
    c._ronward, c._rdetour, c._rwait, c._rcharge = onward_a, detour_a, wait_a, charge_a
    c._n = len(idx)
    # the public arrays are the raw ones (all online, by station index), given outright
    c.__dict__.update(
        index=index,
        distance_km=dist_a,
        eta_min=eta_a,
        onward_min=onward_a,
        detour_km=detour_a,
        expected_wait_min=wait_a,
        charge_min=charge_a,
        _price=f(price, float),
    )
    return c


def choose(c: Candidates, snap: NetworkSnapshot, score: np.ndarray) -> Choice | None:
    """The lowest-score candidate: ties broken by station index, NaN scores last (as
    ``np.lexsort((c.index, score))`` orders them), so choices are deterministic and do not
    depend on the candidates' order. ``score`` is aligned with the public arrays."""
    n = len(c)
    if n == 0:
        return None
    score = np.asarray(score)
    k = int(score.argmin())  # the first minimum; the first NaN if there is any
    best = score.item(k)
    if best != best:  # NaN scores: sort as lexsort does (NaN last)
        k = int(np.lexsort((c.index, score))[0])
        best = score.item(k)
    elif n <= SMALL:
        s = score.tolist()
        if s.count(best) > 1:  # equal scores: the lowest station index
            at = c.index.tolist()
            k = min((j for j, v in enumerate(s) if v == best), key=at.__getitem__)
    elif np.count_nonzero(score == best) > 1:
        ties = np.flatnonzero(score == best)
        k = int(ties[c.index[ties].argmin()])
    on = c._online_mask()
    return c._choice(k if on is None else int(np.flatnonzero(on)[k]), best)
