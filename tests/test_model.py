"""Domain properties of the model and the policies.

* policies only ever choose a reachable online station, and say None only when there is none
  (hypothesis: random requests and random network status against the Bahia snapshot);
* the k-d tree pre-filter returns exactly the great-circle brute-force set;
* whole runs (tiny and Bahia, several seeds and policies) conserve energy, price sessions by
  their tariff, never double-book a connector or over-fill a station, keep SoC in [0, 1] and
  end every trip exactly once;
* policies are pure and see read-only arrays; user policies resolve by ``module:function``;
* ``balanced`` spreads load; the status board lags the stations by the configured delay.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evsim.battery import MAX_TARGET_SOC, MIN_SESSION_SOC, ChargeCurve, session_power_kw
from evsim.geo import haversine_km
from evsim.metrics import compute_metrics
from evsim.model import Simulation
from evsim.model.station import SessionPlan
from evsim.model.world import World
from evsim.policies import POLICIES, resolve
from evsim.scenario import DATA_DIR, load_scenario
from evsim.snapshot import ChargeRequest, NetworkSnapshot, StationTable, StatusBoard
from evsim.tariff import price_session
from evsim.trace import Kind

BUILTINS = ("nearest", "least_wait", "balanced")
TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def bahia():
    return load_scenario()


@pytest.fixture(scope="module")
def tiny():
    return load_scenario(DATA_DIR / "tiny.toml")


@pytest.fixture(scope="module")
def bahia_world() -> World:
    return _BAHIA_WORLD


def test_builtins_are_registered() -> None:
    assert set(BUILTINS) <= set(POLICIES)


# --------------------------------------------------------------------------------------------
# reachability (hypothesis)
# --------------------------------------------------------------------------------------------


def random_board(n: int, seed: int, n_conn: np.ndarray) -> StatusBoard:
    rng = np.random.default_rng(seed)
    board = StatusBoard(n)
    for i in range(n):
        board.update(
            i,
            busy=int(rng.integers(0, n_conn[i] + 1)),
            queued=int(rng.integers(0, 4)) * int(rng.random() < 0.3),
            online=bool(rng.random() > 0.15),
            t_min=float(rng.uniform(0, 60)),
            mean_session_min=float(rng.uniform(10, 90)),
        )
    return board


@st.composite
def requests(draw: st.DrawFn, n_nodes: int, lat: np.ndarray, lon: np.ndarray) -> ChargeRequest:
    node = draw(st.integers(0, n_nodes - 1))
    return ChargeRequest(
        vehicle_id="v",
        node=node,
        lat=float(lat[node]),
        lon=float(lon[node]),
        dest_node=draw(st.integers(0, n_nodes - 1)),
        soc=draw(st.floats(0.0, 1.0)),
        battery_kwh=draw(st.floats(10.0, 150.0)),
        consumption_kwh_per_km=draw(st.floats(0.08, 0.4)),
        max_dc_kw=draw(st.floats(20.0, 350.0)),
        max_ac_kw=draw(st.floats(3.0, 22.0)),
        reserve_soc=draw(st.sampled_from([0.0, 0.05, 0.08, 0.2])),
        target_soc=draw(st.floats(0.5, 0.99)),
    )


# module level rather than a fixture: hypothesis needs the node count to build strategies,
# and a fixture argument would be printed (100 kB) with every falsifying example
_BAHIA_WORLD = World.build(load_scenario())
_BAHIA_ROADS = _BAHIA_WORLD.roads


@settings(max_examples=150, deadline=None)
@given(
    request=requests(len(_BAHIA_ROADS.node_ids), _BAHIA_ROADS.lat, _BAHIA_ROADS.lon),
    board_seed=st.integers(0, 2**32 - 1),
    now=st.floats(0.0, 2880.0),
)
def test_chosen_station_is_reachable_and_none_only_when_nothing_is(
    request: ChargeRequest, board_seed: int, now: float
) -> None:
    w = _BAHIA_WORLD
    stt = w.stations
    snap = NetworkSnapshot.of(stt, w.roads, random_board(len(stt), board_seed, stt.n_connectors))
    road_km = w.roads.dist_km[request.node, stt.node] + stt.access_km
    reachable = snap.online & (road_km <= request.range_km)
    for name in BUILTINS:
        choice = resolve(name)(request, snap, now)
        if choice is None:
            # also with a range of exactly 0 km (soc == reserve_soc): a station at distance 0
            # is reachable and must be found
            assert not reachable.any(), (name, np.flatnonzero(reachable))
            continue
        i = choice.station_index
        assert stt.ids[i] == choice.station_id
        assert reachable[i], (name, i, road_km[i], request.range_km, bool(snap.online[i]))
        assert choice.distance_km == pytest.approx(road_km[i], rel=1e-12, abs=1e-12)
        if name == "nearest":
            assert choice.distance_km == pytest.approx(road_km[reachable].min(), abs=1e-9)


# --------------------------------------------------------------------------------------------
# the k-d tree pre-filter
# --------------------------------------------------------------------------------------------


def random_table(n: int, seed: int, lat_lo: float, lat_hi: float, lon_lo: float, lon_hi: float):
    rng = np.random.default_rng(seed)
    lat = rng.uniform(lat_lo, lat_hi, n)
    lon = rng.uniform(lon_lo, lon_hi, n)
    return StationTable.build(
        [f"s{i}" for i in range(n)],
        ["co"] * n,
        lat,
        lon,
        np.zeros(n, int),
        np.zeros(n),
        np.ones(n, int),
        np.full(n, 50.0),
    )


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 400),
    region=st.sampled_from(
        [(-18.5, -8.5, -46.5, -37.0), (-90.0, 90.0, -180.0, 180.0), (60.0, 90.0, 170.0, 180.0)]
    ),
    q_lat=st.floats(-90.0, 90.0),
    q_lon=st.floats(-180.0, 180.0),
    radius=st.one_of(st.floats(1e-3, 2000.0), st.floats(2000.0, 25_000.0)),
    near_station=st.booleans(),
)
def test_within_km_is_the_brute_force_set(
    seed: int,
    n: int,
    region: tuple[float, float, float, float],
    q_lat: float,
    q_lon: float,
    radius: float,
    near_station: bool,
) -> None:
    table = random_table(n, seed, *region)
    if near_station:  # query from a station's own position (the common case in policies)
        q_lat, q_lon = float(table.lat[seed % n]), float(table.lon[seed % n])
    got = set(table.within_km(q_lat, q_lon, radius).tolist())
    d = haversine_km(q_lat, q_lon, table.lat, table.lon)
    edge = np.abs(d - radius) <= 1e-7 * max(radius, 1.0)  # floating-point ties either way
    inside = set(np.flatnonzero((d <= radius) & ~edge).tolist())
    outside = set(np.flatnonzero((d > radius) & ~edge).tolist())
    assert inside <= got
    assert not (got & outside)
    # radius 0 finds only what stands at the query point (a station's own position), and
    # a negative radius finds nothing
    at_point = set(table.within_km(q_lat, q_lon, 0.0).tolist())
    assert at_point <= set(np.flatnonzero(d <= 1e-6).tolist())
    if near_station:
        assert seed % n in at_point
    assert table.within_km(q_lat, q_lon, -1.0).size == 0


def test_within_km_returns_sorted_int_indices() -> None:
    table = random_table(500, 1, -18.5, -8.5, -46.5, -37.0)
    idx = table.within_km(-12.97, -38.5, 300.0)
    assert idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0)


# --------------------------------------------------------------------------------------------
# whole runs
# --------------------------------------------------------------------------------------------

RUNS = [
    ("tiny", "least_wait", None),
    ("tiny", "nearest", 3),
    ("tiny", "balanced", 11),
    ("bahia", "least_wait", None),
    ("bahia", "balanced", 2),
    ("bahia", "nearest", 9),
]


@pytest.fixture(scope="module", params=RUNS, ids=lambda r: f"{r[0]}-{r[1]}-{r[2]}")
def run(request, tiny, bahia) -> SimpleNamespace:
    name, policy, seed = request.param
    scenario = tiny if name == "tiny" else bahia
    sim = Simulation(scenario, policy=policy, seed=seed)
    res = sim.run()
    df = res.trace
    # keep the same simulation going until every vehicle is done, to see what was on the road
    sim.env.run()
    full = sim.trace.to_frame()
    return SimpleNamespace(sim=sim, res=res, df=df, full=full, scenario=scenario)


def _sessions(r: SimpleNamespace) -> pd.DataFrame:
    """session_start joined with session_end on session_id (completed sessions), with the
    vehicle's model and the station index."""
    df = r.df
    cols = ["session_id", "vehicle_id", "station_id", "connector_id", "t_min", "soc"]
    starts = df.loc[df["kind"] == Kind.SESSION_START, cols]
    ends = df.loc[
        df["kind"] == Kind.SESSION_END,
        [*cols, "energy_kwh", "price", "power_kw"],
    ]
    assert starts["session_id"].is_unique
    assert ends["session_id"].is_unique
    s = starts.merge(ends, on="session_id", how="right", suffixes=("_start", "_end"))
    assert s["t_min_start"].notna().all(), "a session ended that never started"
    assert (s["vehicle_id_start"] == s["vehicle_id_end"]).all()
    assert (s["connector_id_start"] == s["connector_id_end"]).all()
    w = r.sim.world
    k = s["vehicle_id_start"].str.slice(1).astype(int).to_numpy()
    model = np.asarray(r.sim.trips.model)[k]
    s["battery_kwh"] = [w.vehicle_models[m].battery_kwh for m in model]
    s["model"] = model
    s["station_index"] = [w.stations.index[x] for x in s["station_id_start"]]
    return s


def test_soc_in_unit_interval(run: SimpleNamespace) -> None:
    soc = run.full["soc"].dropna()
    assert len(soc) > 0
    assert soc.between(0.0, 1.0).all(), soc[~soc.between(0.0, 1.0)]


def test_soc_only_rises_by_charging(run: SimpleNamespace) -> None:
    rows = run.full[run.full["vehicle_id"].notna() & run.full["soc"].notna()]
    rise = rows.groupby("vehicle_id", sort=False)["soc"].diff() > 1e-12
    assert (rows.loc[rise, "kind"] == Kind.SESSION_END).all()


def test_energy_conservation_per_session(run: SimpleNamespace) -> None:
    s = _sessions(run)
    assert len(s) > 0
    eff = run.scenario.charging.efficiency
    gained = s["battery_kwh"] * (s["soc_end"] - s["soc_start"])
    np.testing.assert_allclose(s["energy_kwh"] * eff, gained, rtol=1e-9, atol=1e-9)
    # a connector cannot deliver more than its power for the session's duration
    minutes = s["t_min_end"] - s["t_min_start"]
    assert (s["energy_kwh"] <= s["power_kw"] * minutes / 60.0 * (1 + 1e-9) + 1e-9).all()
    assert (s["energy_kwh"] >= 0).all()


def test_every_session_charges_what_the_shared_rule_says(run: SimpleNamespace) -> None:
    """No zero-length sessions: a vehicle that stopped to charge gains at least
    MIN_SESSION_SOC (session_soc_out, the live vehicle agent's rule too)."""
    s = _sessions(run)
    below_cap = s["soc_start"] + MIN_SESSION_SOC <= MAX_TARGET_SOC
    assert below_cap.all()
    gain = s["soc_end"] - s["soc_start"]
    assert (gain >= MIN_SESSION_SOC * (1 - 1e-9)).all(), s.loc[gain < MIN_SESSION_SOC]


def test_connector_energy_adds_up(run: SimpleNamespace) -> None:
    s = _sessions(run)
    per_connector = s.groupby("connector_id_end")["energy_kwh"].sum()
    total = float(s["energy_kwh"].sum())
    assert per_connector.sum() == pytest.approx(total, rel=1e-12)
    # every connector belongs to the station the session was at, and exists in the world
    known = {c.connector_id: c.station_index for cs in run.sim.world.connectors for c in cs}
    assert all(
        known[c] == i for c, i in zip(s["connector_id_end"], s["station_index"], strict=True)
    )
    per_station = s.groupby("station_id_end")["energy_kwh"].sum()
    from_connectors = per_connector.groupby(
        [run.sim.world.stations.ids[known[c]] for c in per_connector.index]
    ).sum()
    pd.testing.assert_series_equal(
        per_station.sort_index(), from_connectors.sort_index(), check_names=False
    )
    assert compute_metrics(run.df)["energy_kwh"] == pytest.approx(total, rel=1e-12)


def test_price_is_the_tariff_applied_to_the_session(run: SimpleNamespace) -> None:
    s = _sessions(run)
    w, ch = run.sim.world, run.scenario.charging
    sample = s.sample(n=min(len(s), 60), random_state=0)
    for row in sample.itertuples():
        i = row.station_index
        spec = next(c for c in w.connectors[i] if c.connector_id == row.connector_id_end)
        vm = w.vehicle_models[row.model]
        power = session_power_kw(spec.power_kw, spec.type, vm.max_charge_kw, vm.max_ac_kw)
        assert row.power_kw == power
        curve = ChargeCurve(vm.battery_kwh, power, ch.taper_soc, ch.efficiency)
        soc0, soc1, t0 = row.soc_start, row.soc_end, row.t_min_start
        minutes = curve.minutes_to(soc0, soc1)
        assert row.t_min_end - t0 == pytest.approx(minutes, rel=1e-9, abs=1e-9)
        assert row.energy_kwh == pytest.approx(curve.energy_kwh(soc0, soc1), rel=1e-9, abs=1e-12)
        price = price_session(
            w.tariffs[i],
            t0,
            minutes,
            lambda e, c=curve, s0=soc0: c.energy_kwh(s0, c.soc_after(s0, e)),
            power,
        ).total
        assert row.price == pytest.approx(price, rel=1e-9, abs=1e-9)


def test_tiny_prices_by_hand(tiny) -> None:
    """Independent of price_session: acme charges 2.0/kWh + 2.0 per session; zap 6.0/h plus
    1.8/kWh (2.6 between 08:00 and 10:00), checked on sessions inside one window."""
    df = Simulation(tiny, seed=5).run().trace
    st_ = df[df["kind"] == Kind.SESSION_START].set_index("session_id")["t_min"]
    ends = df[df["kind"] == Kind.SESSION_END].set_index("session_id")
    checked = 0
    for sid, row in ends.iterrows():
        t0, t1, e = st_[sid], row["t_min"], row["energy_kwh"]
        if row["company_id"] == "acme":
            assert row["price"] == pytest.approx(2.0 * e + 2.0, rel=1e-9)
            checked += 1
        else:
            tod0, tod1 = t0 % 1440, t1 % 1440
            if tod1 < tod0:
                continue
            if tod0 >= 480 and tod1 <= 600:
                rate = 2.6
            elif tod1 <= 480 or tod0 >= 600:
                rate = 1.8
            else:
                continue  # crosses a window boundary
            assert row["price"] == pytest.approx(rate * e + 6.0 * (t1 - t0) / 60.0, rel=1e-9)
            checked += 1
    assert checked >= 10


def test_no_connector_has_overlapping_sessions(run: SimpleNamespace) -> None:
    df = run.full  # including the sessions that ran past the horizon
    starts = df[df["kind"] == Kind.SESSION_START].set_index("session_id")
    ends = df[df["kind"] == Kind.SESSION_END].set_index("session_id")["t_min"]
    s = starts[["connector_id", "t_min"]].rename(columns={"t_min": "t_start"})
    s["t_end"] = ends.reindex(s.index)
    assert s["t_end"].notna().all()  # the drained run finishes every session
    for _, g in s.sort_values(["connector_id", "t_start"]).groupby("connector_id"):
        assert (g["t_start"].to_numpy()[1:] >= g["t_end"].to_numpy()[:-1]).all()


def test_station_never_charges_more_vehicles_than_connectors(run: SimpleNamespace) -> None:
    df = run.full
    rows = df[df["kind"].isin([Kind.SESSION_START, Kind.SESSION_END])]
    step = np.where(rows["kind"] == Kind.SESSION_START, 1, -1)
    # in trace (= event) order: a connector freed and taken at the same instant counts once
    charging = pd.Series(step, index=rows.index).groupby(rows["station_id"].to_numpy()).cumsum()
    by_station = charging.groupby(rows["station_id"].to_numpy()).max()
    stt = run.sim.world.stations
    for sid, peak in by_station.items():
        assert peak <= stt.n_connectors[stt.index[sid]], sid
    assert charging.min() >= 0


def test_every_trip_ends_exactly_once(run: SimpleNamespace) -> None:
    df, full, horizon = run.df, run.full, run.res.horizon_min
    started = df.loc[df["kind"] == Kind.TRIP_START, "vehicle_id"]
    assert started.is_unique
    assert len(started) == run.res.trips
    end_kinds = [Kind.TRIP_END, Kind.STRANDED]
    ends_h = df[df["kind"].isin(end_kinds)]
    assert ends_h["vehicle_id"].is_unique  # at most once by the horizon
    ends = full[full["kind"].isin(end_kinds)].set_index("vehicle_id")
    assert ends.index.is_unique  # exactly once after the drain
    assert set(ends.index) == set(started)
    # those with no end by the horizon were still on the road: they end after it
    on_road = set(started) - set(ends_h["vehicle_id"])
    assert (ends.loc[sorted(on_road), "t_min"] > horizon).all()
    # nothing happens to a vehicle after its trip ended
    veh = full[full["vehicle_id"].notna()]
    last_kind = veh.groupby("vehicle_id", sort=False)["kind"].last()
    assert last_kind.isin(end_kinds).all()


def test_stranded_vehicles_have_soc_zero(run: SimpleNamespace) -> None:
    stranded = run.full[run.full["kind"] == Kind.STRANDED]
    assert (stranded["soc"] == 0.0).all()
    # a trip that ended normally still had energy
    assert (run.full.loc[run.full["kind"] == Kind.TRIP_END, "soc"] >= 0.0).all()


# --------------------------------------------------------------------------------------------
# purity, read-only snapshots, resolving policies
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    request=requests(len(_BAHIA_ROADS.node_ids), _BAHIA_ROADS.lat, _BAHIA_ROADS.lon),
    board_seed=st.integers(0, 2**32 - 1),
    now=st.floats(0.0, 2880.0),
)
def test_policies_are_pure(request: ChargeRequest, board_seed: int, now: float) -> None:
    w = _BAHIA_WORLD
    board = random_board(len(w.stations), board_seed, w.stations.n_connectors)
    snap = NetworkSnapshot.of(w.stations, w.roads, board)
    before = {k: getattr(board, k).copy() for k in ("busy", "queued", "online", "mean_session_min")}
    for name in BUILTINS:
        policy = resolve(name)
        first = policy(request, snap, now)
        second = policy(request, snap, now)
        assert first == second
        # a fresh snapshot of the same board gives the same answer too
        assert resolve(name)(request, NetworkSnapshot.of(w.stations, w.roads, board), now) == first
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(board, k), v)


SNAPSHOT_ARRAYS = (
    "dist_km",
    "time_min",
    "busy",
    "queued",
    "online",
    "mean_session_min",
    "observed_t_min",
)
TABLE_ARRAYS = (
    "company_index",
    "lat",
    "lon",
    "node",
    "access_km",
    "n_connectors",
    "max_power_kw",
    "has_dc",
    "energy_price_by_hour",
    "time_price_by_hour",
    "flat_by_hour",
)


@pytest.mark.parametrize("name", SNAPSHOT_ARRAYS)
def test_snapshot_arrays_are_read_only(bahia_world: World, name: str) -> None:
    board = StatusBoard(len(bahia_world.stations))
    snap = NetworkSnapshot.of(bahia_world.stations, bahia_world.roads, board)
    arr = getattr(snap, name)
    with pytest.raises(ValueError, match="read-only"):
        arr[0] = arr[0]
    with pytest.raises(ValueError):
        arr += 1
    # the owner still writes the board, and the snapshot sees it (a view, not a copy)
    board.update(0, busy=2, queued=1, online=False, t_min=3.0, mean_session_min=12.0)
    assert (snap.busy[0], snap.queued[0], bool(snap.online[0])) == (2, 1, False)
    assert snap.observed_t_min[0] == 3.0 and snap.mean_session_min[0] == 12.0


@pytest.mark.parametrize("name", TABLE_ARRAYS)
def test_station_table_arrays_are_read_only(bahia_world: World, name: str) -> None:
    arr = getattr(bahia_world.stations, name)
    with pytest.raises(ValueError, match="read-only"):
        arr[0] = arr[0]


def test_a_policy_that_writes_the_snapshot_fails_loudly(bahia_world: World) -> None:
    snap = NetworkSnapshot.of(
        bahia_world.stations, bahia_world.roads, StatusBoard(len(bahia_world.stations))
    )

    def sneaky(request, snapshot, now):
        snapshot.busy[:] = 0
        return None

    req = ChargeRequest(
        "v", 0, float(bahia_world.roads.lat[0]), float(bahia_world.roads.lon[0]), 1, 0.5, 60.0, 0.2
    )
    with pytest.raises(ValueError):
        sneaky(req, snap, 0.0)


@pytest.fixture
def user_module_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS_DIR))


def test_user_policy_resolves_and_runs(user_module_path: None, tiny, bahia_world: World) -> None:
    import user_policy

    policy = resolve("user_policy:fastest_charger")
    assert policy is user_policy.fastest_charger
    w = bahia_world
    snap = NetworkSnapshot.of(w.stations, w.roads, StatusBoard(len(w.stations)))
    node = w.roads.index["salvador"]
    req = ChargeRequest(
        "v", node, float(w.roads.lat[node]), float(w.roads.lon[node]), 0, 0.9, 60.0, 0.18
    )
    choice = policy(req, snap, 0.0)
    assert choice is not None
    assert w.stations.max_power_kw[choice.station_index] == max(
        w.stations.max_power_kw[i]
        for i in range(len(w.stations))
        if w.roads.dist_km[node, w.stations.node[i]] + w.stations.access_km[i] <= req.range_km
    )
    # with parameters bound, inside a whole run
    res = Simulation(
        tiny, policy="user_policy:fastest_charger", params={"min_power_kw": 100.0}
    ).run()
    chosen = res.trace.loc[res.trace["kind"] == Kind.STATION_CHOSEN]
    assert len(chosen) > 0
    assert set(chosen["station_id"]) <= {"zap_bravo", "acme_charlie"}  # the 150 kW stations
    assert (chosen["detail"] == "user_policy:fastest_charger").all()


def test_resolve_errors_name_the_problem(user_module_path: None) -> None:
    with pytest.raises(ValueError, match="no_such_policy"):
        resolve("no_such_policy")
    with pytest.raises(ValueError, match="least_wait"):  # lists the built-ins
        resolve("no_such_policy")
    with pytest.raises(ValueError, match="cannot import"):
        resolve("evsim_no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="cannot import"):
        resolve("user_policy:no_such_function")
    with pytest.raises(ValueError, match="not callable"):
        resolve("user_policy:NOT_CALLABLE")
    with pytest.raises(ValueError, match="w_nonsense"):
        resolve("balanced", {"w_nonsense": 1.0})
    with pytest.raises(ValueError, match="min_power"):  # the known ones are listed
        resolve("user_policy:fastest_charger", {"max_power": 1.0})
    with pytest.raises(ValueError, match="w_charge"):
        resolve("least_wait", {"w_wait": 1.0})
    # and Simulation passes the problem on
    with pytest.raises(ValueError, match="w_nonsense"):
        Simulation(
            load_scenario(DATA_DIR / "tiny.toml"), policy="balanced", params={"w_nonsense": 1.0}
        )


def test_resolve_binds_parameters() -> None:
    p = resolve("balanced", {"w_station_load": 5.0})
    assert p.keywords == {"w_station_load": 5.0}  # type: ignore[attr-defined]
    assert resolve("nearest", {}) is POLICIES["nearest"]


# --------------------------------------------------------------------------------------------
# balanced prefers idle stations
# --------------------------------------------------------------------------------------------


def _two_station_network(busy_a: int, busy_b: int) -> NetworkSnapshot:
    """Vehicle at node 0 heading to node 2 (100 km). Station A sits at node 0 (no detour),
    station B at node 1, 20 km off the route (30 min detour). Both 4 connectors, one company."""
    d = np.array([[0.0, 20.0, 100.0], [20.0, 0.0, 120.0], [100.0, 120.0, 0.0]])
    roads = SimpleNamespace(dist_km=d, time_min=d / 80.0 * 60.0)
    table = StationTable.build(
        ["A", "B"],
        ["co", "co"],
        np.array([-12.0, -12.15]),
        np.array([-38.5, -38.5]),
        np.array([0, 1]),
        np.array([0.0, 0.0]),
        np.array([4, 4]),
        np.array([50.0, 50.0]),
    )
    board = StatusBoard(2)
    board.update(0, busy=busy_a, queued=0, t_min=0.0)
    board.update(1, busy=busy_b, queued=0, t_min=0.0)
    return NetworkSnapshot.of(table, roads, board)  # type: ignore[arg-type]


def _request(soc: float) -> ChargeRequest:
    return ChargeRequest("v", 0, -12.0, -38.5, 2, soc, 60.0, 0.2)


def test_balanced_with_heavy_station_load_weight_picks_the_idle_station() -> None:
    snap = _two_station_network(busy_a=3, busy_b=0)  # A: 3 of 4 busy, still no wait
    req = _request(0.5)  # range 126 km: both reachable
    assert resolve("balanced")(req, snap, 0.0).station_id == "A"  # default: detour dominates
    assert resolve("nearest")(req, snap, 0.0).station_id == "A"
    heavy = resolve("balanced", {"w_station_load": 1e6})
    assert heavy(req, snap, 0.0).station_id == "B"
    # mirrored: the busy one is B
    assert heavy(req, _two_station_network(busy_a=0, busy_b=3), 0.0).station_id == "A"
    # but never an unreachable one: range 15 km leaves only A
    low = _request(0.08 + 15.0 * 0.2 / 60.0)
    assert low.range_km == pytest.approx(15.0)
    assert heavy(low, snap, 0.0).station_id == "A"


# --------------------------------------------------------------------------------------------
# staleness of the status board
# --------------------------------------------------------------------------------------------


def _plan(minutes: float):
    def plan(spec, t_start):
        return SessionPlan(minutes, 10.0, 0.0, 0.5, spec.power_kw)

    return plan


@pytest.mark.parametrize("delay", [0.0, 30.0])
def test_status_board_lags_by_the_status_delay(tiny, delay: float) -> None:
    """A station's change shows in what policies read (``sim.snapshot``, brought up to date
    when read) exactly ``status_delay_min`` after it happened."""
    sc = tiny.with_overrides(network={"status_delay_min": delay})
    sim = Simulation(sc)
    env, station = sim.env, sim.stations[0]
    i = station.index
    env.process(station.visit("vx", "sx", 0.2, _plan(100.0)))
    eps = 1e-6
    env.run(until=1.0)
    assert station.busy == 1
    if delay == 0:
        assert sim.board.busy[i] == 1 and sim.snapshot.busy[i] == 1
    else:
        assert sim.board.busy[i] == 0 and sim.snapshot.busy[i] == 0  # the change is in flight
        env.run(until=delay - eps)
        assert sim.snapshot.busy[i] == 0
        env.run(until=delay + eps)
        assert sim.snapshot.busy[i] == 1
        assert sim.snapshot.observed_t_min[i] == 0.0  # observed when it happened, landed later
    env.run(until=100.0 + eps)
    assert station.busy == 0
    if delay > 0:
        assert sim.snapshot.busy[i] == 1  # the board still says busy
        env.run(until=100.0 + delay - eps)
        assert sim.snapshot.busy[i] == 1
        env.run(until=100.0 + delay + eps)
    snap = sim.snapshot
    assert snap.busy[i] == 0
    assert snap.observed_t_min[i] == 100.0
    # the snapshot is one view of the board: read again, it is the same object
    assert sim.snapshot is snap and snap.busy.base is not None


def test_status_lands_in_the_order_sent_and_only_when_due(tiny) -> None:
    """The wire lands reports in the order sent, each at sent + delay (not before), keeps
    the newest of a station's reports, and nothing lands from a report never sent (a
    company that is down)."""
    sim = Simulation(tiny.with_overrides(network={"status_delay_min": 2.0}))
    wire, board = sim.status_wire, sim._board
    wire.send((0, 1, 0, True, 0.0, 40.0))
    wire.send((0, 2, 3, True, 1.0, 41.0))
    wire.send((1, 1, 0, False, 1.5, 42.0))
    wire.land(1.999)
    assert board.busy[0] == 0 and board.observed_t_min[0] == 0.0
    wire.land(2.0)  # due at 0 + 2: lands at 2 exactly
    assert board.busy[0] == 1 and board.mean_session_min[0] == 40.0
    wire.land(3.4)
    assert (board.busy[0], board.queued[0], board.observed_t_min[0]) == (2, 3, 1.0)
    assert board.online[1]  # station 1's report is due at 3.5
    wire.land(3.5)
    assert not board.online[1] and board.mean_session_min[1] == 42.0
    company = next(iter(sim.companies.values()))
    company.up = False
    company.report(company.stations[0])
    assert not wire._in_flight  # a company that is down sends nothing
    company.up = True
    company.report(company.stations[0])
    assert len(wire._in_flight) == 1


def test_board_frozen_by_an_endless_delay(tiny) -> None:
    """With a delay longer than the run nothing lands: policies decide on the initial board
    (all idle) while the stations fill up."""
    sim = Simulation(tiny.with_overrides(network={"status_delay_min": 1e6}))
    df = sim.run().trace
    assert (df["kind"] == Kind.SESSION_START).sum() > 0
    assert (sim.board.busy == 0).all() and (sim.board.queued == 0).all()
    assert (sim.board.observed_t_min == 0).all()
    # so every choice expected no wait, though some vehicles did wait
    assert (df.loc[df["kind"] == Kind.SESSION_START, "wait_min"] > 0).any()
