"""The SimPy model's fast paths do what the plain code did, to the last bit.

* whole ``on_arrival`` traces are pinned (digests taken from the code before the fast paths);
* the trace writer's row appenders and rows written ahead give the rows ``emit`` gives;
* :func:`evsim.planning.walk_rules` (what the simulation, the planner and the live agent walk
  with) is the reference walk below, one node at a time, with the driving rules;
* parsed tariffs price exactly as the original per-call parsing did;
* the plain FIFO station hands out connectors and gives up waiting as the store did;
* trips with no charging decision on the way get no SimPy process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import simpy
from hypothesis import example, given, settings
from hypothesis import strategies as st

from evsim.geo import RoadNetwork
from evsim.model import Simulation
from evsim.model.station import SessionPlan, SimStation
from evsim.model.world import ConnectorSpec, World
from evsim.planning import Walk, route_legs, route_of, walk_rules
from evsim.scenario import ChargingBehaviour, TariffConfig, TariffElement, load_scenario
from evsim.tariff import DAY_MIN, PriceBreakdown, price_session
from evsim.trace import Kind, TraceWriter

DATA = Path(__file__).resolve().parents[1] / "data"


def digest(df: pd.DataFrame) -> tuple[str, int]:
    h = hashlib.sha256(pd.util.hash_pandas_object(df, index=True).values.tobytes())
    return h.hexdigest(), len(df)


# ------------------------------------------------------------------------------ whole traces


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        (None, ("9075b95c45dc6dea29315b219265361eaefa93caf29bd676dc774a506389cd5d", 9026)),
        (3, ("9138645a6c583c8566d76ff38808bbb33eba2069b24baaf58779a5e063060d3e", 9377)),
    ],
)
def test_bahia_on_arrival_traces_unchanged(seed: int | None, expected: tuple[str, int]) -> None:
    """Hashes from the code before the fast paths (one process and one child process per
    trip and visit, a store per station, one timeout per status report); update them only
    when the on_arrival model changes on purpose (last: road lengths from coordinates
    rounded up to the millimetre, :func:`evsim.geo.road_km`, which moved every time and
    SoC by about 1e-6 and no decision; before that the digests held on AVX-512 machines
    only)."""
    sim = Simulation(load_scenario(DATA / "bahia.toml"), seed=seed)
    assert digest(sim.run().trace) == expected


def test_trips_without_a_stop_get_no_process() -> None:
    sim = Simulation(load_scenario(DATA / "bahia.toml"))
    made = []
    process = sim.env.process

    def counted(gen):  # type: ignore[no-untyped-def]
        made.append(gen)
        return process(gen)

    sim.env.process = counted  # type: ignore[method-assign]
    res = sim.run()
    df = res.trace
    assert (df["kind"] == Kind.TRIP_START).sum() == res.trips  # every trip is in the trace
    assert df["t_min"].is_monotonic_increasing
    assert (df["t_min"] < res.horizon_min).all()
    sim.env.run()  # until every vehicle has arrived
    full = sim.trace.to_frame()
    assert full["t_min"].is_monotonic_increasing
    ended = full[full["kind"].isin([Kind.TRIP_END, Kind.STRANDED])]
    assert ended["vehicle_id"].is_unique and len(ended) == res.trips
    deciding = full.loc[full["kind"].isin([Kind.STATION_CHOSEN, Kind.NO_STATION]), "vehicle_id"]
    assert 0 < deciding.nunique() < res.trips
    assert len(made) == 1 + deciding.nunique()  # the source, and the trips that stop


def test_a_trip_process_ends_at_its_last_decision() -> None:
    """The stretch after a trip's last decision (its last session, or a city with no
    station) meets nobody: its TRIP_END row is written ahead and the process ends there,
    with no timeout for the rest of the way (the digests above pin the rows themselves)."""
    sim = Simulation(load_scenario(DATA / "bahia.toml"))
    ended: dict[str, float] = {}
    process = sim.env.process

    def timed(gen):  # type: ignore[no-untyped-def]
        vid = gen.gi_frame.f_locals["d"].vid if "d" in gen.gi_frame.f_locals else None

        def run():  # type: ignore[no-untyped-def]
            result = yield from gen
            if vid is not None:
                ended[vid] = sim.env.now
            return result

        return process(run())

    sim.env.process = timed  # type: ignore[method-assign]
    sim.run()
    sim.env.run()  # until every vehicle has arrived
    full = sim.trace.to_frame()
    last = full.groupby("vehicle_id").tail(1).set_index("vehicle_id")
    decided = full[full["kind"].isin([Kind.SESSION_END, Kind.ABANDON, Kind.NO_STATION])]
    decided = decided.groupby("vehicle_id")["t_min"].max()
    arrived = last.index[last["kind"] == Kind.TRIP_END].intersection(decided.index)
    assert len(arrived) > 500 and set(arrived) <= set(ended)
    assert all(ended[v] == decided[v] for v in arrived)  # not at the trip's end
    assert (last.loc[arrived, "t_min"] > decided[arrived]).mean() > 0.9


# ------------------------------------------------------------------------------ trace writer


def test_row_writer_writes_what_emit_writes() -> None:
    a, b = TraceWriter(batch_rows=3), TraceWriter(batch_rows=2)
    cols = ("vehicle_id", "soc", "queue_len", "detail")
    put = b.row_writer(Kind.ARRIVE, *cols)
    assert b.row_writer(Kind.ARRIVE, *cols) is put  # made once
    for i in range(7):
        vals = (f"v{i}", i / 10, i, None if i % 2 else "x")
        a.emit(float(i), Kind.ARRIVE, **dict(zip(cols, vals, strict=True)))
        put(float(i), *vals)
    a.emit(8, "trip_end", distance_km=3)
    b.row_writer("trip_end", "distance_km")(8.0, 3.0)
    pd.testing.assert_frame_equal(a.to_frame(), b.to_frame())
    with pytest.raises(TypeError, match="unknown"):
        b.row_writer(Kind.ARRIVE, "nope")


def test_rows_written_ahead_join_in_time_order() -> None:
    w = TraceWriter(batch_rows=2)
    now = w.row_writer(Kind.ARRIVE, "vehicle_id")
    later = w.row_writer(Kind.TRIP_END, "vehicle_id", ahead=True)
    later(5.0, "a5")
    later(2.0, "a2")
    later(2.0, "a2b")  # same time: in the order written
    later(9.0, "a9")
    now(1.0, "n1")
    now(2.0, "n2")  # at the same time the regular row goes first
    now(3.0, "n3")
    w.emit(7.0, Kind.ARRIVE, vehicle_id="e7")
    w.release(9.0)  # before 9: nothing left but a9
    assert list(w.to_frame(ahead=False)["vehicle_id"]) == [
        "n1",
        "n2",
        "a2",
        "a2b",
        "n3",
        "a5",
        "e7",
    ]
    assert list(w.to_frame()["vehicle_id"])[-1] == "a9"  # the run has ended: all of them


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["now", "ahead", "release"]),
            st.integers(0, 3),  # the clock moves on by this much (0: the same instant)
            st.integers(0, 4),  # a row ahead lies this far past the clock
        ),
        max_size=60,
    ),
    st.integers(1, 5),
)
def test_rows_ahead_match_a_heap_across_batches(ops: list, batch_rows: int) -> None:
    """The batch-wise placement of rows written ahead gives what one heap of them, popped
    before each later row, gives, whatever the batch size and wherever release is called."""
    import heapq

    w = TraceWriter(batch_rows=batch_rows)
    now = w.row_writer(Kind.ARRIVE, "vehicle_id")
    later = w.row_writer(Kind.TRIP_END, "vehicle_id", ahead=True)
    heap: list[tuple[float, int, str]] = []
    want: list[str] = []
    clock = 0.0
    for k, (op, step, lead) in enumerate(ops):
        clock += step
        name = f"{op}{k}"
        if op == "now":
            while heap and heap[0][0] < clock:
                want.append(heapq.heappop(heap)[2])
            want.append(name)
            now(clock, name)
        elif op == "ahead":
            heapq.heappush(heap, (clock + lead, k, name))
            later(clock + lead, name)
        else:
            until = clock + lead
            while heap and heap[0][0] < until:
                want.append(heapq.heappop(heap)[2])
            w.release(until)
    got = w.to_frame(ahead=False)
    assert list(got["vehicle_id"]) == want
    assert got["t_min"].is_monotonic_increasing or any(op == "release" for op, _, _ in ops)
    rest = [heapq.heappop(heap)[2] for _ in range(len(heap))]
    assert list(w.to_frame()["vehicle_id"]) == want + rest  # the run has ended: all of them
    assert w.rows_written == len(want) + len(rest)


def test_rows_ahead_not_due_are_not_written(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    w = TraceWriter(path)
    w.row_writer(Kind.TRIP_START, "vehicle_id", ahead=True)(10.0, "v")
    w.row_writer(Kind.TRIP_START, "vehicle_id", ahead=True)(20.0, "w")
    w.release(20.0)
    w.close()
    assert list(pd.read_parquet(path)["vehicle_id"]) == ["v"]
    assert w.rows_written == 1


# ------------------------------------------------------------------------------ driving rules

_WORLD = World.build(load_scenario(DATA / "bahia.toml"))
_ROADS = _WORLD.roads
_N = len(_ROADS.node_ids)


def needs_charge(
    roads: RoadNetwork,
    ch: ChargingBehaviour,
    per_km: float,
    dest: int,
    skip_at: set[int],
    node: int,
    s: float,
    nxt: int | None,
) -> bool:
    """The driving rules, one node at a time (the reference :func:`walk_rules` must
    match): charge here? Only if the rest of the trip is out of reach, and either SoC is
    at or below the threshold or the next leg would end below reserve + safety margin."""
    dist = roads.dist_km
    if s - dist.item(node, dest) * per_km >= ch.reserve_soc:
        return False
    if node in skip_at:
        return False
    if s <= ch.threshold_soc:
        return True
    margin = ch.reserve_soc + ch.safety_margin_soc
    return nxt is not None and s - dist.item(node, nxt) * per_km < margin


def walk_route(
    roads: RoadNetwork,
    route: Sequence[int],
    soc: float,
    per_km: float,
    decide: Callable[[int, float, int | None], bool],
) -> Walk:
    """The reference walk: along ``route`` node by node, looking every leg up in the road
    tables, until ``decide`` says charge, the battery runs out, or the trip ends."""
    j, s, t, km = 0, soc, 0.0, 0.0
    stop_here = False
    stranded_km = None
    dist, time_min = roads.dist_km, roads.time_min
    while j < len(route) - 1:
        node, nxt = route[j], route[j + 1]
        if decide(node, s, nxt):
            stop_here = True
            break
        leg = dist.item(node, nxt)
        if s - leg * per_km < 0:
            stranded_km = s / per_km
            t += time_min.item(node, nxt) * stranded_km / leg
            km += stranded_km
            s = 0.0
            break
        s -= leg * per_km
        t += time_min.item(node, nxt)
        km += leg
        j += 1
    return Walk(j, s, t, km, stop_here, stranded_km)


@settings(max_examples=300, deadline=None)
@given(
    src=st.integers(0, _N - 1),
    dst=st.integers(0, _N - 1),
    soc=st.floats(0.0, 1.0),
    per_km=st.floats(1e-4, 0.02),
    skip=st.sets(st.integers(0, _N - 1), max_size=20),
    threshold=st.floats(0.05, 0.5),
    reserve=st.floats(0.0, 0.2),
    margin=st.floats(0.0, 0.2),
)
def test_walk_rules_is_walk_route_with_the_driving_rules(
    src: int,
    dst: int,
    soc: float,
    per_km: float,
    skip: set[int],
    threshold: float,
    reserve: float,
    margin: float,
) -> None:
    ch = ChargingBehaviour(
        threshold_soc=threshold, reserve_soc=reserve, safety_margin_soc=margin, target_soc=0.9
    )

    def decide(node: int, s: float, nxt: int | None) -> bool:
        return needs_charge(_ROADS, ch, per_km, dst, skip, node, s, nxt)

    route = route_of(_ROADS, src, dst)
    want = walk_route(_ROADS, route, soc, per_km, decide)
    got = walk_rules(ch, route_legs(_ROADS, src, dst), soc, per_km, skip)
    assert got == want  # floats compared exactly


# ------------------------------------------------------------------------------ tariffs


def _hhmm(s: str) -> float:
    h, m = s.split(":")
    return int(h) * 60.0 + int(m)


def _reference_element(tariff: TariffConfig, t: float, power: float) -> TariffElement | None:
    mod = t % DAY_MIN
    for el in tariff.elements:
        if el.min_power_kw is not None and power < el.min_power_kw:
            continue
        if el.max_power_kw is not None and power >= el.max_power_kw:
            continue
        if el.start_time is None or el.end_time is None:
            return el
        a, b = _hhmm(el.start_time), _hhmm(el.end_time)
        if (a <= mod < b) if a <= b else (mod >= a or mod < b):
            return el
    return None


def _reference_price(
    tariff: TariffConfig,
    start: float,
    charge: float,
    energy_at: Callable[[float], float],
    power: float,
    parking: float,
) -> PriceBreakdown:
    """``price_session`` as it was: every window parsed on every call."""
    bounds = sorted({_hhmm(x) for el in tariff.elements for x in (el.start_time, el.end_time) if x})
    end = start + charge + parking
    cuts = {start, end, start + charge}
    if bounds:
        day = int(start // DAY_MIN)
        while day * DAY_MIN < end:
            for b in bounds:
                t = day * DAY_MIN + b
                if start < t < end:
                    cuts.add(t)
            day += 1
    energy = time_ = park = 0.0
    for a, b in pairwise(sorted(cuts)):
        el = _reference_element(tariff, a, power)
        if el is None or b <= a:
            continue
        if b <= start + charge:
            energy += (energy_at(b - start) - energy_at(a - start)) * el.energy_per_kwh
            time_ += (b - a) / 60.0 * el.time_per_hour
        else:
            park += (b - a) / 60.0 * el.parking_per_hour
    first = _reference_element(tariff, start, power)
    return PriceBreakdown(
        energy, time_, park, first.flat if first is not None else 0.0, tariff.currency
    )


_times = st.sampled_from(["00:00", "06:00", "08:30", "18:00", "21:00", "22:00", "23:59"])


@st.composite
def _elements(draw: st.DrawFn) -> TariffElement:
    window = draw(st.booleans())
    return TariffElement(
        energy_per_kwh=draw(st.floats(0.0, 5.0)),
        time_per_hour=draw(st.floats(0.0, 10.0)),
        parking_per_hour=draw(st.floats(0.0, 30.0)),
        flat=draw(st.floats(0.0, 5.0)),
        start_time=draw(_times) if window else None,
        end_time=draw(_times) if window else None,
        min_power_kw=draw(st.none() | st.sampled_from([22.0, 50.0, 100.0])),
        max_power_kw=draw(st.none() | st.sampled_from([50.0, 150.0])),
    )


@settings(max_examples=400, deadline=None)
@given(
    elements=st.lists(_elements(), min_size=1, max_size=4),
    start=st.floats(0.0, 5 * DAY_MIN),
    charge=st.floats(0.0, 600.0) | st.just(0.0),
    parking=st.just(0.0) | st.floats(0.0, 300.0),
    power=st.sampled_from([7.0, 22.0, 50.0, 100.0, 150.0]),
)
def test_parsed_tariffs_price_as_before(
    elements: list[TariffElement], start: float, charge: float, parking: float, power: float
) -> None:
    tariff = TariffConfig(id="t", currency="BRL", elements=elements)

    def energy_at(m: float) -> float:
        return power * m / 60.0 * (1.0 - m / 2000.0)  # not linear, so every cut counts

    want = _reference_price(tariff, start, charge, energy_at, power, parking)
    assert price_session(tariff, start, charge, energy_at, power, parking) == want
    # and the parse is remembered, not repeated, for the same tariff object
    assert price_session(tariff, start, charge, energy_at, power, parking) == want


# ------------------------------------------------------------------------------ FIFO station


def test_fifo_station_most_powerful_first_in_arrival_order_with_patience() -> None:
    env = simpy.Environment()
    specs = (
        ConnectorSpec("s/1", 0, 22.0, "AC"),
        ConnectorSpec("s/2", 0, 50.0, "DC"),
        ConnectorSpec("s/3", 0, 50.0, "DC"),
    )
    trace = TraceWriter()
    station = SimStation(env, 0, "s", "co", specs, trace)
    got: dict[str, tuple[str | None, float, float]] = {}

    def plan(spec: ConnectorSpec, t: float) -> SessionPlan:
        return SessionPlan(10.0, 1.0, 0.0, 0.8, spec.power_kw)

    def vehicle(vid: str, at: float, patience: float):  # type: ignore[no-untyped-def]
        yield env.timeout(at)
        r = yield from station.visit(vid, vid, 0.2, plan, patience)
        got[vid] = (None if r.connector is None else r.connector.connector_id, r.wait_min, env.now)

    for vid, at, patience in [
        ("a", 0.0, np.inf),
        ("b", 0.0, np.inf),
        ("c", 0.0, np.inf),
        ("d", 1.0, np.inf),  # waits for the first connector to free (a's, at 10)
        ("e", 2.0, 5.0),  # gives up at 7
        ("f", 3.0, 8.5),  # gets b's connector at 10, before its patience runs out
        ("g", 4.0, 30.0),  # then c's, the slow one
    ]:
        env.process(vehicle(vid, at, patience))
    env.run()
    assert got == {
        "a": ("s/2", 0.0, 10.0),
        "b": ("s/3", 0.0, 10.0),
        "c": ("s/1", 0.0, 10.0),
        "d": ("s/2", 9.0, 20.0),
        "e": (None, 5.0, 7.0),
        "f": ("s/3", 7.0, 20.0),
        "g": ("s/1", 6.0, 20.0),
    }
    df = trace.to_frame()
    assert list(df.loc[df["kind"] == Kind.ABANDON, "vehicle_id"]) == ["e"]
    assert station.busy == 0 and station.waiting == 0


def test_traces_do_not_depend_on_the_last_bits_of_trig(monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy's sin/cos/arcsin differ in the last bits between CPUs (AVX-512 and AVX2 loops),
    so the pinned digests above hold on every machine only because road lengths from
    coordinates are rounded (:func:`evsim.geo.road_km`): with every great-circle distance
    moved by one ulp, up or down, the trace is the same to the last bit (it was not before
    the rounding)."""
    import evsim.geo
    import evsim.snapshot

    sc = load_scenario(DATA / "bahia.toml")
    plain = Simulation(sc).run().trace
    exact = evsim.geo.haversine_km
    for direction in (np.inf, -np.inf):

        def nudged(*args, _to=direction):  # type: ignore[no-untyped-def]
            d = exact(*args)  # (0 stays 0: every CPU's sin(0) and arcsin(0) are exactly 0)
            return np.where(d == 0.0, d, np.nextafter(d, _to))

        monkeypatch.setattr(evsim.geo, "haversine_km", nudged)
        monkeypatch.setattr(evsim.snapshot, "haversine_km", nudged)
        assert digest(Simulation(sc).run().trace) == digest(plain), direction


@settings(max_examples=300, deadline=None)
@example(gc=4624.183568, circuity=1.25)  # ceil(x * 1e6) / 1e6 is an ulp under x * 1.25 here
@given(
    gc=st.floats(0.0, 5000.0, allow_nan=False) | st.integers(0, 5 * 10**9).map(lambda m: m / 1e6),
    circuity=st.sampled_from([1.0, 1.1, 1.25, 1.3]) | st.floats(1.0, 3.0, allow_nan=False),
)
def test_road_km_rounds_up_to_the_millimetre(gc: float, circuity: float) -> None:
    """Never shorter than the great circle x circuity (the k-d tree pre-filter's bound;
    great circles on the millimetre grid are where a plain ceil/1e6 fell an ulp short),
    at most a millimetre longer, and on the millimetre grid."""
    from evsim.geo import road_km

    d = road_km(gc, circuity)
    exact = gc * circuity
    assert exact <= d <= exact + 1e-6 + 1e-12 * exact
    assert abs(d * 1e6 - round(d * 1e6)) < 1e-6 * max(1.0, d)


@settings(max_examples=200, deadline=None)
@given(
    soc=st.floats(0.0, 1.0),
    per_km=st.floats(1e-4, 0.01),
    go_km=st.floats(0.1, 400.0),
    speed_kmh=st.floats(20.0, 120.0),
)
def test_dry_on_the_way(soc: float, per_km: float, go_km: float, speed_kmh: float) -> None:
    """The one 'runs dry on the way to the station' rule of the sim, the live agent and the
    planner: None when the battery lasts the drive, else the minutes and km it lasts."""
    from evsim.planning import dry_on_the_way

    go_min = go_km / speed_kmh * 60.0
    dry = dry_on_the_way(soc, per_km, go_km, go_min)
    if soc >= go_km * per_km:
        assert dry is None
    else:
        assert dry is not None
        minutes, km = dry
        assert km == pytest.approx(soc / per_km) and 0.0 <= km < go_km
        assert minutes == pytest.approx(go_min * km / go_km) and 0.0 <= minutes < go_min


def test_back_to_city() -> None:
    """Leaving a station: the access road's minutes (at ACCESS_SPEED_KMH) and the SoC after
    it, never below 0; no access road, no drive."""
    from evsim.planning import ACCESS_SPEED_KMH, back_to_city

    assert back_to_city(0.5, 0.002, 0.0) == (0.0, 0.5)
    minutes, soc = back_to_city(0.5, 0.002, 5.0)
    assert minutes == pytest.approx(5.0 / ACCESS_SPEED_KMH * 60.0)
    assert soc == pytest.approx(0.49)
    assert back_to_city(0.001, 0.002, 5.0)[1] == 0.0
