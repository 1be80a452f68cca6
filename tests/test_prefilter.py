"""The range pre-filter and the policies' shortcuts give exactly what a scan gives.

* the node index (stations sorted by road distance per road node) returns exactly the
  stations whose road distance is within range, nearest first, ties by station index, and
  declines (None) where the k-d tree must answer: a request off its node's position, a node
  with a road shorter than the great circle, writeable road tables, no node positions;
* on random networks (ties, offline stations, full stations, odd mean session times,
  targets below the SoC, roads shorter than the great circle, requests off their node) the
  built-in policies pick the very station, with the very numbers, that a plain scan of all
  stations scores with the documented formulas and ranks with ``np.lexsort`` (ties by
  station index, NaN last);
* the public arrays of :class:`~evsim.policies.base.Candidates` are those of the scan, and
  ``choose`` picks the same station whatever their order.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evsim.geo import haversine_km
from evsim.model.world import World
from evsim.policies import resolve
from evsim.policies.base import _new_choice, candidates, choose
from evsim.scenario import DATA_DIR, load_scenario
from evsim.snapshot import (
    ACCESS_SPEED_KMH,
    ChargeRequest,
    Choice,
    NetworkSnapshot,
    StationTable,
    StatusBoard,
)

# --------------------------------------------------------------------------------------------
# random networks
# --------------------------------------------------------------------------------------------


def network(
    seed: int,
    n_stations: int,
    n_nodes: int,
    *,
    shorter_roads: bool = False,
    odd_means: bool = False,
    read_only: bool = True,
) -> tuple[NetworkSnapshot, SimpleNamespace]:
    """Stations around a few nodes, many of them sharing a node, an access distance and a
    power (so that scores tie). Road distance great-circle x circuity (>= 1) unless
    ``shorter_roads``; times at a random speed per node pair (not proportional to km)."""
    rng = np.random.default_rng(seed)
    nlat = rng.uniform(-14.0, -12.0, n_nodes)
    nlon = rng.uniform(-40.0, -38.0, n_nodes)
    gc = haversine_km(nlat[:, None], nlon[:, None], nlat[None, :], nlon[None, :])
    dist = gc * rng.uniform(1.0, 1.6, (n_nodes, n_nodes))
    if shorter_roads:
        dist *= np.where(rng.random((n_nodes, n_nodes)) < 0.1, 0.5, 1.0)
    np.fill_diagonal(dist, 0.0)
    time = dist / rng.uniform(40.0, 110.0, (n_nodes, n_nodes)) * 60.0
    node = rng.integers(0, n_nodes, n_stations)
    at_node = rng.random(n_stations) < 0.4  # exactly at the node: access 0, equal scores
    slat = np.where(at_node, nlat[node], nlat[node] + rng.normal(0, 0.05, n_stations))
    slon = np.where(at_node, nlon[node], nlon[node] + rng.normal(0, 0.05, n_stations))
    access = haversine_km(slat, slon, nlat[node], nlon[node]) * rng.choice([1.0, 1.3], n_stations)
    n_conn = rng.integers(0, 5, n_stations)
    prices = rng.choice([0.0, 1.5, 2.5], (n_stations, 1))
    table = StationTable.build(
        [f"s{i}" for i in range(n_stations)],
        [f"co{i % 3}" for i in range(n_stations)],
        slat,
        slon,
        node,
        access,
        n_conn,
        rng.choice([7.0, 22.0, 50.0, 150.0], n_stations),
        rng.random(n_stations) < 0.7,
        np.repeat(prices, 24, axis=1),
        np.repeat(rng.choice([0.0, 3.0], (n_stations, 1)), 24, axis=1),
        np.repeat(rng.choice([0.0, 1.0], (n_stations, 1)), 24, axis=1),
    )
    board = StatusBoard(n_stations)
    for i in range(n_stations):
        busy = int(rng.integers(0, n_conn[i] + 1))
        mean = float(rng.choice([20.0, 45.0, 60.0]))
        if odd_means and rng.random() < 0.2:
            mean = float(rng.choice([-5.0, -0.0, 0.0, math.nan, math.inf]))
        board.update(
            i,
            busy=busy,
            queued=int(rng.integers(0, 3)) if busy == n_conn[i] else 0,
            online=bool(rng.random() > 0.2),
            t_min=0.0,
            mean_session_min=mean,
        )
    if read_only:
        for a in (dist, time):
            a.flags.writeable = False
    roads = SimpleNamespace(dist_km=dist, time_min=time, lat=nlat, lon=nlon)
    return NetworkSnapshot.of(table, roads, board), roads  # type: ignore[arg-type]


def request(rng: np.random.Generator, roads: SimpleNamespace, off_node: bool) -> ChargeRequest:
    n = len(roads.lat)
    node = int(rng.integers(0, n))
    lat, lon = float(roads.lat[node]), float(roads.lon[node])
    if off_node:
        lat, lon = lat + float(rng.normal(0, 0.02)), lon + float(rng.normal(0, 0.02))
    soc = float(rng.choice([rng.uniform(0.0, 1.0), 0.8, 0.79999, 0.95]))
    return ChargeRequest(
        vehicle_id="v",
        node=node,
        lat=lat,
        lon=lon,
        dest_node=int(rng.integers(0, n)),
        soc=soc,
        battery_kwh=float(rng.choice([40.0, 60.0, 77.4])),
        consumption_kwh_per_km=float(rng.uniform(0.12, 0.25)),
        max_dc_kw=float(rng.choice([50.0, 150.0])),
        max_ac_kw=float(rng.choice([7.4, 11.0])),
        reserve_soc=float(rng.choice([0.0, 0.08])),
        target_soc=float(rng.choice([0.8, 0.6, rng.uniform(0.5, 1.0)])),
    )


# --------------------------------------------------------------------------------------------
# the reference: a scan of all stations, the documented formulas in station order
# --------------------------------------------------------------------------------------------


def scan(req: ChargeRequest, snap: NetworkSnapshot, now: float) -> dict[str, np.ndarray]:
    """Every estimate of every reachable online station, by station index. Reachable: road
    distance within range, and within range by great circle (the k-d tree pre-filter,
    exact for on-node requests where roads are never shorter than the great circle)."""
    t = snap.stations
    d = snap.dist_km[req.node, t.node] + t.access_km
    in_tree = np.zeros(len(t), bool)
    in_tree[t.within_km(req.lat, req.lon, req.range_km)] = True
    idx = np.flatnonzero(snap.online & (d <= req.range_km) & in_tree)
    nodes = t.node[idx]
    acc = t.access_km[idx]
    acc_min = acc / ACCESS_SPEED_KMH * 60.0
    dist = d[idx]
    eta = snap.time_min[req.node, nodes] + acc_min
    onward = snap.time_min[nodes, req.dest_node] + acc_min
    direct = snap.dist_km[req.node, req.dest_node]
    detour = dist + (snap.dist_km[nodes, req.dest_node] + acc) - direct
    n, busy, queued = t.n_connectors[idx], snap.busy[idx], snap.queued[idx]
    with np.errstate(invalid="ignore"):
        wait = np.where(
            busy + queued < n,
            0.0,
            np.maximum(queued + busy - n + 1, 0) * snap.mean_session_min[idx] / np.maximum(n, 1),
        )
    arrival = req.soc - dist * req.consumption_kwh_per_km / req.battery_kwh
    need = np.maximum(req.target_soc - arrival, 0.0) * req.battery_kwh
    cap = np.where(t.has_dc[idx], req.max_dc_kw, req.max_ac_kw)
    charge = need / np.maximum(np.minimum(t.max_power_kw[idx], cap), 1e-9) * 60.0
    hour = int((now + eta.mean() if len(eta) else now) // 60) % 24
    price = (
        need * t.energy_price_by_hour[idx, hour]
        + charge / 60.0 * t.time_price_by_hour[idx, hour]
        + t.flat_by_hour[idx, hour]
    )
    return {
        "index": idx,
        "distance_km": dist,
        "eta_min": eta,
        "onward_min": onward,
        "detour_km": detour,
        "expected_wait_min": wait,
        "charge_min": charge,
        "price": price,
    }


def scan_pick(snap: NetworkSnapshot, c: dict[str, np.ndarray], score: np.ndarray) -> Choice | None:
    if not len(c["index"]):
        return None
    k = int(np.lexsort((c["index"], score))[0])  # lowest score, then station index; NaN last
    i = int(c["index"][k])
    return Choice(
        i,
        snap.stations.ids[i],
        float(score[k]),
        float(c["distance_km"][k]),
        float(c["detour_km"][k]),
        float(c["eta_min"][k]),
        float(c["expected_wait_min"][k]),
    )


def scan_policy(name: str, req: ChargeRequest, snap: NetworkSnapshot, now: float, **kw: float):
    c = scan(req, snap, now)
    if name == "nearest":
        return scan_pick(snap, c, c["distance_km"])
    if name == "least_wait":
        w = kw.get("w_charge", 1.0)
        score = c["eta_min"] + c["expected_wait_min"] + w * c["charge_min"] + c["onward_min"]
        return scan_pick(snap, c, score)
    assert name == "balanced"
    t, idx = snap.stations, c["index"]
    load = snap.busy + snap.queued
    n_div = np.maximum(t.n_connectors, 1).astype(float)
    company_conn = np.bincount(
        t.company_index, weights=t.n_connectors.astype(float), minlength=len(t.companies)
    )
    load_comp = np.bincount(t.company_index, weights=load, minlength=len(t.companies))
    load_comp /= np.maximum(company_conn, 1.0)
    mean_load = float(load.sum() / max(float(t.n_connectors.astype(float).sum()), 1.0))
    detour_min = c["eta_min"] + c["onward_min"] - snap.time_min[req.node, req.dest_node]
    score = (
        1.0 * detour_min
        + 1.0 * c["expected_wait_min"]
        + 0.5 * c["price"]
        + 20.0 * (load[idx] / n_div[idx])
        + 20.0 * (load_comp[t.company_index[idx]] - mean_load)
    )
    return scan_pick(snap, c, score)


def same(a: Choice | None, b: Choice | None) -> bool:
    """Equal, NaN equal to NaN and 0.0 told from -0.0 (repr compares bits that matter)."""
    return repr(a) == repr(b)


POLICIES = [
    ("nearest", {}),
    ("least_wait", {}),
    ("least_wait", {"w_charge": 0.3}),
    ("least_wait", {"w_charge": 2.5}),
    ("least_wait", {"w_charge": 0.0}),
    ("least_wait", {"w_charge": -1.0}),
    ("balanced", {}),
]


@settings(max_examples=120, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_stations=st.sampled_from([5, 40, 200]),
    n_nodes=st.integers(2, 12),
    shorter_roads=st.booleans(),
    odd_means=st.booleans(),
)
def test_policies_pick_what_a_scan_picks(
    seed: int, n_stations: int, n_nodes: int, shorter_roads: bool, odd_means: bool
) -> None:
    snap, roads = network(
        seed, n_stations, n_nodes, shorter_roads=shorter_roads, odd_means=odd_means
    )
    rng = np.random.default_rng(seed + 1)
    with np.errstate(invalid="ignore"):  # 0 * inf waits (odd means) in both
        for k in range(12):
            req = request(rng, roads, off_node=k % 4 == 3)
            now = float(rng.uniform(0.0, 2880.0))
            for name, kw in POLICIES:
                got = resolve(name, kw)(req, snap, now)
                want = scan_policy(name, req, snap, now, **kw)
                assert same(got, want), (name, kw, req, got, want)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_nodes=st.integers(2, 8))
def test_candidate_arrays_are_the_scan_arrays(seed: int, n_nodes: int) -> None:
    snap, roads = network(seed, 120, n_nodes, odd_means=True)
    rng = np.random.default_rng(seed)
    with np.errstate(invalid="ignore"):
        for k in range(8):
            req = request(rng, roads, off_node=k % 3 == 2)
            now = float(rng.uniform(0.0, 2880.0))
            c = candidates(req, snap, now)
            want = scan(req, snap, now)
            order = np.argsort(c.index)
            assert len(c) == len(want["index"])
            for name, arr in want.items():
                got = np.asarray(getattr(c, name))[order]
                assert got.tobytes() == np.asarray(arr, got.dtype).tobytes(), name
            # choose ranks by score, then station index, in whatever order it is given
            score = np.round(c.charge_min, 0)  # many ties
            assert same(choose(c, snap, score), scan_pick(snap, want, score[order]))


def random_board(rng: np.random.Generator, t: StationTable, offline_p: float) -> StatusBoard:
    """Random status: some connectors busy, queues only where all are, ``offline_p`` of the
    stations offline, mean sessions of 20-60 min."""
    board = StatusBoard(len(t))
    for i in range(len(t)):
        n = int(t.n_connectors[i])
        busy = int(rng.integers(0, n + 1))
        board.update(
            i,
            busy=busy,
            queued=int(rng.integers(0, 3)) if busy == n else 0,
            online=bool(rng.random() > offline_p),
            t_min=0.0,
            mean_session_min=float(rng.uniform(20.0, 60.0)),
        )
    return board


@pytest.mark.parametrize("path", [DATA_DIR / "bahia.toml", DATA_DIR / "tiny.toml"])
def test_policies_pick_what_a_scan_picks_on_the_scenarios(path) -> None:
    """The shipped road networks (tiny's roads have given lengths), random status."""
    w = World.build(load_scenario(path))
    roads, t = w.roads, w.stations
    rng = np.random.default_rng(7)
    for _ in range(15):
        snap = NetworkSnapshot.of(t, roads, random_board(rng, t, offline_p=0.1))
        for k in range(20):
            req = request(rng, roads, off_node=k % 5 == 4)
            now = float(rng.uniform(0.0, 2880.0))
            for name, kw in POLICIES:
                got = resolve(name, kw)(req, snap, now)
                assert same(got, scan_policy(name, req, snap, now, **kw)), (name, kw, req)


def test_the_node_index_of_a_road_network_is_found_again() -> None:
    w = World.build(load_scenario(DATA_DIR / "tiny.toml"))
    a = NetworkSnapshot.of(w.stations, w.roads, StatusBoard(len(w.stations)))
    b = NetworkSnapshot.of(w.stations, w.roads, StatusBoard(len(w.stations)))
    assert a.node_index() is not None
    assert a.node_index() is b.node_index()
    for arr in (a.node_lat, a.node_lon):  # the snapshot's views are read-only
        assert arr is not None
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = arr[0]


# --------------------------------------------------------------------------------------------
# the node index
# --------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_stations=st.sampled_from([1, 30, 300]),
    n_nodes=st.integers(1, 10),
    radius=st.one_of(st.floats(0.0, 400.0), st.sampled_from([0.0, math.inf, -1.0, math.nan])),
)
def test_node_index_is_the_road_distance_filter(
    seed: int, n_stations: int, n_nodes: int, radius: float
) -> None:
    snap, roads = network(seed, n_stations, n_nodes)
    t = snap.stations
    ix = snap.node_index()
    assert ix is not None
    for node in range(n_nodes):
        got = ix.within(node, radius)
        assert got is not None  # roads never undercut the great circle here
        d = snap.dist_km[node, t.node] + t.access_km
        want = np.flatnonzero(d <= radius)  # NaN and negative radii: nothing
        assert sorted(got.tolist()) == want.tolist()
        # nearest first, ties by station index
        keys = list(zip(d[got].tolist(), got.tolist(), strict=True))
        assert keys == sorted(keys)
        # and a row is read-only
        row = ix.row(node, float(roads.lat[node]), float(roads.lon[node]))
        assert row is not None
        assert not any(a.flags.writeable for a in row)


def test_node_index_declines_where_the_tree_must_answer() -> None:
    snap, roads = network(3, 200, 6, shorter_roads=True)
    ix = snap.node_index()
    assert ix is not None
    t = snap.stations
    declined = 0
    for node in range(6):
        lat, lon = float(roads.lat[node]), float(roads.lon[node])
        assert ix.row(node, lat + 1e-9, lon) is None  # off the node's position
        if ix.row(node, lat, lon) is None:
            declined += 1
            continue
        # where it answers, no station is nearer by road than by great circle
        gc = haversine_km(lat, lon, t.lat, t.lon)
        d = snap.dist_km[node, t.node] + t.access_km
        assert np.all(gc <= d * (1 + 1e-9))
    assert declined > 0  # with roads at half the great circle, some node declines
    # no positions, or writeable road tables: no index at all
    board = StatusBoard(len(t))
    no_pos = SimpleNamespace(dist_km=snap.dist_km, time_min=snap.time_min)
    assert NetworkSnapshot.of(t, no_pos, board).node_index() is None  # type: ignore[arg-type]
    writeable = SimpleNamespace(
        dist_km=snap.dist_km.copy(), time_min=snap.time_min, lat=roads.lat, lon=roads.lon
    )
    assert NetworkSnapshot.of(t, writeable, board).node_index() is None  # type: ignore[arg-type]


def test_node_index_is_built_once_per_road_table_and_bounded() -> None:
    snap, roads = network(5, 50, 5)
    ix = snap.node_index()
    again = NetworkSnapshot.of(snap.stations, roads, StatusBoard(50))  # type: ignore[arg-type]
    assert again.node_index() is ix
    row = ix.row(0, float(roads.lat[0]), float(roads.lon[0]))
    assert ix.row(0, float(roads.lat[0]), float(roads.lon[0])) is row  # kept
    ix.MAX_BYTES = row[0].nbytes * 3 * 2  # room for two rows  # type: ignore[misc]
    for node in range(5):
        assert ix.row(node, float(roads.lat[node]), float(roads.lon[node])) is not None
    assert len(ix._rows) <= 2
    assert ix._bytes == sum(sum(a.nbytes for a in r) for r in ix._rows.values() if r)


# --------------------------------------------------------------------------------------------
# corner cases of the least_wait shortcut
# --------------------------------------------------------------------------------------------


def _line(
    n: int, access: np.ndarray | None = None, **status: list
) -> tuple[NetworkSnapshot, SimpleNamespace]:
    """``n`` stations at node 0 (access 0 unless given), equal power: equal eta, onward and
    charge; a vehicle at node 0 or 1 (67 km away)."""
    nlat, nlon = np.array([-12.0, -12.5]), np.array([-38.5, -38.5])
    d = haversine_km(nlat[:, None], nlon[:, None], nlat[None, :], nlon[None, :]) * 1.2
    t = d / 80.0 * 60.0
    for a in (d, t):
        a.flags.writeable = False
    table = StationTable.build(
        [f"s{i}" for i in range(n)],
        ["co"] * n,
        np.full(n, -12.0),
        np.full(n, -38.5),
        np.zeros(n, int),
        np.zeros(n) if access is None else access,
        np.full(n, 2),
        np.full(n, 50.0),
    )
    board = StatusBoard(n)
    for i in range(n):
        board.update(
            i,
            busy=status.get("busy", [0] * n)[i],
            queued=status.get("queued", [0] * n)[i],
            online=status.get("online", [True] * n)[i],
            t_min=0.0,
            mean_session_min=status.get("mean", [30.0] * n)[i],
        )
    roads = SimpleNamespace(dist_km=d, time_min=t, lat=nlat, lon=nlon)
    return NetworkSnapshot.of(table, roads, board), roads  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "status",
    [
        {},  # all tie: the lowest index
        {"online": [False] * 10 + [True] * 10},  # the first online one
        {"busy": [2] * 19 + [0]},  # only the last has a free connector
        {"busy": [2] * 20, "queued": list(range(20, 0, -1))},  # all wait; the least queue
        {"busy": [2] * 20, "mean": [30.0] * 19 + [-30.0]},  # a negative wait wins
        {"busy": [2] * 20, "mean": [math.nan] * 19 + [30.0]},  # NaN scores last
        {"busy": [2] * 20, "mean": [math.nan] * 20},  # all NaN: the lowest index
        {"online": [False] * 20},  # nothing online
    ],
)
def test_least_wait_shortcut_corner_cases(status: dict) -> None:
    snap, roads = _line(20, **status)
    for soc, target in [(0.3, 0.8), (0.8, 0.8), (0.9, 0.8), (0.8000000001, 0.8)]:
        req = ChargeRequest(
            "v",
            0,
            float(roads.lat[0]),
            float(roads.lon[0]),
            1,
            soc,
            60.0,
            0.2,
            target_soc=target,
        )
        with np.errstate(invalid="ignore"):
            for kw in ({}, {"w_charge": 0.5}):
                got = resolve("least_wait", kw)(req, snap, 0.0)
                assert same(got, scan_policy("least_wait", req, snap, 0.0, **kw))
            assert same(resolve("nearest")(req, snap, 0.0), scan_policy("nearest", req, snap, 0.0))


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    per_km=st.floats(0.05, 0.3),
    battery=st.floats(20.0, 200.0),
    soc=st.floats(0.6, 1.0),
    gap=st.floats(-1e-9, 1e-9),
    power=st.sampled_from([3.7, 11.0, 50.0, 350.0]),
    at_node=st.integers(0, 1),
)
def test_charge_lower_bound_is_below_the_charge(
    seed: int, per_km: float, battery: float, soc: float, gap: float, power: float, at_node: int
) -> None:
    """The shortcut's bound on charging time stays at or below the charging time, also where
    the energy needed nearly cancels (the target is the SoC on arrival at one station, to
    within ``gap``), and least_wait picks what the scan picks there."""
    rng = np.random.default_rng(seed)
    access = rng.uniform(0.0, 30.0, 40)
    snap, roads = _line(40, access, busy=list(rng.integers(0, 3, 40)))
    d = snap.dist_km[at_node, 0] + access[seed % 40]
    target = soc - d * per_km / battery + gap
    req = ChargeRequest(
        "v",
        at_node,
        float(roads.lat[at_node]),
        float(roads.lon[at_node]),
        1 - at_node,
        soc,
        battery,
        per_km,
        max_dc_kw=power,
        reserve_soc=0.0,
        target_soc=target,
    )
    c = candidates(req, snap, 0.0)
    if len(c) > 16:  # (the numpy path: fewer go one by one)
        low = c._charge_low()
        assert low is not None
        assert np.all(low <= c._raw_charge())
    assert same(resolve("least_wait")(req, snap, 0.0), scan_policy("least_wait", req, snap, 0.0))


def test_fast_choice_constructor_is_the_dataclass() -> None:
    values = (3, "s3", 1.5, 2.0, -0.0, math.nan, 0.0)
    a, b = _new_choice(*values), Choice(*values)
    assert repr(a) == repr(b)
    assert type(a) is Choice
    with pytest.raises(AttributeError):
        a.score = 1.0  # type: ignore[misc]
    assert hash(_new_choice(1, "a", 1.0, 1.0, 1.0, 1.0, 1.0)) == hash(
        Choice(1, "a", 1.0, 1.0, 1.0, 1.0, 1.0)
    )
