"""The model's newer shortcuts give exactly what the code they stand in for gives.

* :func:`evsim.planning.charge_target_on` (from a route's legs) is :func:`charge_target`;
* :func:`evsim.planning.charge_request` makes the request the dataclass makes, checks too;
* ``Candidates._least_few`` (``least_wait`` over a few stations in Python floats) picks the
  station, with the very numbers, that the array arithmetic picks (``choose`` on the
  documented score), on the shipped networks with random status, and in corner cases
  (ties, offline stations, full stations, negative or NaN mean session times), where it may
  also decline (None) and leave the pick to the arrays;
* ``CompiledTariff.charge_total`` is ``price(...).total`` without parking, bit for bit;
* ``new_plan`` and ``_new_result`` make the dataclasses their constructors make;
* :func:`evsim.planning.route_legs` and :func:`route_of` (from next hops towards the
  destination, as Python lists) are the legs looked up pair by pair and ``roads.route``,
  and the legs' running sums (``t_at``, ``km_at``) are the legs added up one by one;
* ``_time_to`` (a snapshot's road time to a destination, as a list) is the table's column;
* ``StationTable.session_power_kw_list`` is ``session_power_kw(...).tolist()``;
* ``DriveKit.curve`` (by the ids of model and connector) is the curve by their values;
* ``_vehicle_params`` makes the :class:`VehicleParams` its constructor makes.
"""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from test_prefilter import _line, random_board

from evsim.model.world import World
from evsim.planning import (
    VehicleParams,
    charge_request,
    charge_target,
    charge_target_on,
    route_legs,
)
from evsim.policies.base import SMALL, Candidates, candidates, choose
from evsim.scenario import ChargingBehaviour, load_scenario
from evsim.snapshot import ChargeRequest, Choice, NetworkSnapshot

DATA = Path(__file__).resolve().parents[1] / "data"


def same(a: Choice | None, b: Choice | None) -> bool:
    """Equal, NaN equal to NaN and 0.0 told from -0.0."""
    return repr(a) == repr(b)


def array_pick(c: Candidates, snap: NetworkSnapshot, w_charge: float) -> Choice | None:
    """``least_wait`` as the arrays compute it: the documented score, ``choose``."""
    score = c.eta_min + c.expected_wait_min
    score += c.charge_min if w_charge == 1.0 else w_charge * c.charge_min
    score += c.onward_min
    return choose(c, snap, score)


@pytest.mark.parametrize("path", [DATA / "bahia.toml", DATA / "tiny.toml"])
def test_charge_target_on_is_charge_target(path: Path) -> None:
    w = World.build(load_scenario(path))
    roads, n = w.roads, len(w.roads.node_ids)
    rng = np.random.default_rng(3)
    chs = [
        w.scenario.charging,
        ChargingBehaviour(target_soc=0.5, reserve_soc=0.2),
        ChargingBehaviour(target_soc=0.95, reserve_soc=0.0),
    ]
    for _ in range(400):
        pos, dest = int(rng.integers(0, n)), int(rng.integers(0, n))
        legs = route_legs(roads, pos, dest)
        if not legs.nodes:
            continue
        per_km = float(rng.uniform(5e-4, 5e-3))
        access = float(rng.choice([0.0, rng.uniform(0.0, 5.0)]))
        for ch in chs:
            want = charge_target(roads, ch, per_km, pos, dest, access)
            assert charge_target_on(ch, legs, per_km, access) == want


def test_charge_request_is_the_dataclass() -> None:
    w = World.build(load_scenario(DATA / "tiny.toml"))
    roads, ch = w.roads, w.scenario.charging
    v = VehicleParams("v7", 60.0, 0.0025, 150.0, 11.0)
    got = charge_request(roads, ch, v, 1, 3, 0.25)
    want = ChargeRequest(
        vehicle_id="v7",
        node=1,
        lat=float(roads.lat[1]),
        lon=float(roads.lon[1]),
        dest_node=3,
        soc=0.25,
        battery_kwh=60.0,
        consumption_kwh_per_km=0.0025 * 60.0,
        max_dc_kw=150.0,
        max_ac_kw=11.0,
        reserve_soc=ch.reserve_soc,
        target_soc=ch.target_soc,
    )
    assert got == want and repr(got) == repr(want) and hash(got) == hash(want)
    with pytest.raises(ValueError, match="soc must be in"):
        charge_request(roads, ch, v, 1, 3, 1.5)
    with pytest.raises(ValueError, match="must be positive"):
        charge_request(roads, ch, VehicleParams("v", 60.0, 0.0, 150.0, 11.0), 1, 3, 0.5)


@pytest.mark.parametrize("path", [DATA / "bahia.toml", DATA / "tiny.toml"])
def test_least_few_is_the_array_pick_on_the_scenarios(path: Path) -> None:
    w = World.build(load_scenario(path))
    roads, t = w.roads, w.stations
    n_nodes = len(roads.node_ids)
    rng = np.random.default_rng(11)
    decided = 0
    for _ in range(10):
        snap = NetworkSnapshot.of(t, roads, random_board(rng, t, offline_p=0.15))
        for _ in range(60):
            node = int(rng.integers(0, n_nodes))
            req = ChargeRequest(
                vehicle_id="v",
                node=node,
                lat=roads.lat.item(node),
                lon=roads.lon.item(node),
                dest_node=int(rng.integers(0, n_nodes)),
                soc=float(rng.choice([rng.uniform(0.0, 1.0), 0.8, 0.95])),
                battery_kwh=float(rng.choice([40.0, 60.0, 77.4])),
                consumption_kwh_per_km=float(rng.uniform(0.12, 0.25)),
                max_dc_kw=float(rng.choice([50.0, 150.0])),
                max_ac_kw=11.0,
                reserve_soc=float(rng.choice([0.0, 0.1])),
                target_soc=0.8,
            )
            now = float(rng.uniform(0.0, 2880.0))
            for w_charge in (1.0, 0.3, 2.5, 0.0, -1.0):
                c = candidates(req, snap, now)
                if not (c.nearest_first and 0 < len(c._ri) <= SMALL):
                    continue
                got = c._least_few(w_charge)
                want = array_pick(candidates(req, snap, now), snap, w_charge)
                if got is not None:
                    decided += 1
                    assert same(got, want), (req, w_charge)
                assert same(candidates(req, snap, now).least_time(w_charge), want)
    assert decided > 100


N = 8  # <= SMALL: the shortcut's size


@pytest.mark.parametrize(
    "status",
    [
        {},  # all tie: the lowest index
        {"online": [False] * 3 + [True] * 5},  # the first online one
        {"busy": [2] * 7 + [0]},  # only the last has a free connector
        {"busy": [2] * N, "queued": list(range(N, 0, -1))},  # all wait; the least queue
        {"busy": [2] * N, "mean": [30.0] * 7 + [-30.0]},  # a negative wait wins
        {"busy": [2] * N, "mean": [math.nan] * 7 + [30.0]},  # NaN: the arrays decide
        {"busy": [2] * N, "mean": [math.nan] * N},  # all NaN: the arrays decide
        {"online": [False] * N},  # nothing online: the arrays say None
    ],
)
def test_least_few_corner_cases(status: dict) -> None:
    assert N <= SMALL
    snap, roads = _line(N, **status)  # test_prefilter's line of stations
    nlat, nlon = roads.lat, roads.lon
    for node in (0, 1):
        for soc, target in [(0.3, 0.8), (0.8, 0.8), (0.9, 0.8), (0.8000000001, 0.8)]:
            req = ChargeRequest(
                "v", node, nlat.item(node), nlon.item(node), 1 - node, soc, 60.0, 0.2,
                target_soc=target,
            )  # fmt: skip
            with np.errstate(invalid="ignore"):
                for w_charge in (1.0, 0.5, 0.0):
                    c = candidates(req, snap, 0.0)
                    assert c.nearest_first and len(c._ri) in (0, N)
                    if not len(c._ri):  # out of range (node 1, low SoC)
                        continue
                    got = c._least_few(w_charge)
                    want = array_pick(candidates(req, snap, 0.0), snap, w_charge)
                    if got is not None:
                        assert same(got, want)
                    elif status.get("online") != [False] * N and "mean" not in status:
                        raise AssertionError("the shortcut should decide here")
                    assert same(candidates(req, snap, 0.0).least_time(w_charge), want)


def test_charge_total_is_price_total() -> None:
    from evsim.scenario import TariffConfig, TariffElement
    from evsim.tariff import compiled

    tariffs = [
        TariffConfig(id="flat", elements=[TariffElement(energy_per_kwh=1.3, flat=2.0)]),
        # no element for low power: priced 0
        TariffConfig(id="dc", elements=[TariffElement(energy_per_kwh=1.0, min_power_kw=40.0)]),
        TariffConfig(
            id="peak",
            elements=[
                TariffElement(
                    energy_per_kwh=2.1,
                    time_per_hour=3.7,
                    start_time="18:00",
                    end_time="21:00",
                    min_power_kw=20.0,
                ),
                TariffElement(energy_per_kwh=0.9, start_time="22:00", end_time="06:00", flat=1.5),
                TariffElement(energy_per_kwh=1.1, time_per_hour=0.7, max_power_kw=100.0),
            ],
        ),
    ]
    rng = np.random.default_rng(5)
    for t in tariffs:
        c = compiled(t)
        for _ in range(3000):
            start = float(rng.uniform(0.0, 4 * 1440.0))
            minutes = float(rng.choice([0.0, rng.uniform(0.0, 90.0), rng.uniform(0.0, 2000.0)]))
            power = float(rng.choice([7.4, 22.0, 50.0, 150.0]))
            rate = float(rng.uniform(0.1, 2.0))

            def at(e: float, rate: float = rate) -> float:
                return e * rate / 3.0

            want = c.price(start, minutes, at, power).total
            got = c.charge_total(start, minutes, at, power)
            assert repr(got) == repr(want), (t.id, start, minutes, power)
        with pytest.raises(ValueError):
            c.charge_total(0.0, -1.0, lambda e: e, 22.0)


def test_plan_and_result_makers_are_the_dataclasses() -> None:
    from evsim.model.station import SessionPlan, SessionResult, _new_result, new_plan
    from evsim.model.world import ConnectorSpec

    for args in [(31.5, 22.25, 17.0, 0.8, 50.0), (0.0, 0.0, 0.0, None, 7.4)]:
        p = new_plan(*args)
        assert (
            type(p) is SessionPlan
            and p == SessionPlan(*args)
            and repr(p) == repr(SessionPlan(*args))
        )
        spec = ConnectorSpec("s/1", 0, 50.0, "DC")
        for r_args in [(spec, 3.5, p), (None, 12.0, None)]:
            r = _new_result(*r_args)
            assert type(r) is SessionResult and r == SessionResult(*r_args)


@pytest.mark.parametrize("path", [DATA / "bahia.toml", DATA / "tiny.toml"])
def test_route_legs_are_the_pairwise_lookups(path: Path) -> None:
    from evsim.planning import route_of

    roads = World.build(load_scenario(path)).roads
    n = len(roads.node_ids)
    for src in range(n):
        for dst in range(n):
            route = roads.route(src, dst)
            assert route_of(roads, src, dst) == route
            legs = route_legs(roads, src, dst)
            pairs = list(pairwise(route))
            assert legs.nodes == tuple(route)
            assert legs.km == tuple(roads.dist_km.item(a, b) for a, b in pairs)
            assert legs.minutes == tuple(roads.time_min.item(a, b) for a, b in pairs)
            assert legs.to_dest_km == tuple(roads.dist_km.item(a, dst) for a in route)
            t, km = 0.0, 0.0
            assert legs.t_at[0] == 0.0 and legs.km_at[0] == 0.0
            assert len(legs.t_at) == len(legs.km_at) == max(len(route), 1)
            for j, (a, b) in enumerate(pairs):
                t += roads.time_min.item(a, b)
                km += roads.dist_km.item(a, b)
                assert repr(legs.t_at[j + 1]) == repr(t) and repr(legs.km_at[j + 1]) == repr(km)


def test_session_power_list_is_the_array() -> None:
    st = World.build(load_scenario(DATA / "bahia.toml")).stations
    for dc, ac in [(150.0, 11.0), (50.0, 7.4), (350.0, 22.0)]:
        assert st.session_power_kw_list(dc, ac) == st.session_power_kw(dc, ac).tolist()
        assert st.session_power_kw_list(dc, ac) is st.session_power_kw_list(dc, ac)


def test_drive_kit_curve_by_ids_is_the_curve_by_values() -> None:
    from evsim.model import Simulation
    from evsim.model.vehicle import DriveKit

    sim = Simulation(load_scenario(DATA / "tiny.toml"))
    kit = DriveKit.of(sim)
    for vm in kit.vehicle_models:
        for specs in sim.world.connectors:
            for spec in specs:
                got = kit.curve(vm, spec)
                assert got == kit._curve(vm, spec)
                assert kit.curve(vm, spec) is got


def test_time_to_is_the_column() -> None:
    from evsim.policies.base import _time_to
    from evsim.snapshot import StatusBoard

    w = World.build(load_scenario(DATA / "bahia.toml"))
    snap = NetworkSnapshot.of(w.stations, w.roads, StatusBoard(len(w.stations)))
    for dest in range(len(w.roads.node_ids)):
        col = _time_to(snap, dest)
        assert col == [snap.time_min.item(a, dest) for a in range(len(w.roads.node_ids))]
        assert _time_to(snap, dest) is col
    other = NetworkSnapshot.of(w.stations, w.roads, StatusBoard(len(w.stations)))
    assert _time_to(other, 0) is not _time_to(snap, 0)


def test_vehicle_params_maker_is_the_dataclass() -> None:
    from evsim.model.vehicle import _vehicle_params

    args = ("v7", 60.0, 0.0031, 150.0, 11.0)
    v = _vehicle_params(*args)
    assert type(v) is VehicleParams and v == VehicleParams(*args)
    assert repr(v) == repr(VehicleParams(*args))


def test_slot_constructor_builds_what_the_dataclass_builds() -> None:
    from dataclasses import dataclass

    from evsim.slots import slot_constructor

    @dataclass(frozen=True, slots=True)
    class P:
        a: int
        b: float = 2.0

        def __post_init__(self) -> None:
            if self.a < 0:
                raise ValueError("a must be >= 0")

    make, checked = slot_constructor(P), slot_constructor(P, post_init=True)
    assert make(1, 3.5) == P(1, 3.5) and type(make(1, 3.5)) is P
    assert make(-1, 0.0).a == -1  # no __post_init__ unless asked
    with pytest.raises(ValueError, match="a must be"):
        checked(-1, 0.0)
    with pytest.raises(TypeError):
        make(1)  # every field, positionally
    with pytest.raises(AttributeError):
        make(1, 2.0).a = 5  # still frozen
    with pytest.raises(TypeError, match="slotted"):
        slot_constructor(dataclass(type("Q", (), {"__annotations__": {"x": int}})))


def test_a_run_freezes_the_heap_only_while_it_runs() -> None:
    """``Simulation.run`` keeps the long-lived heap out of the cyclic GC while it runs and
    thaws it after, also when the run fails; objects someone else froze stay frozen."""
    import gc

    from evsim.model import Simulation

    sc = load_scenario().with_overrides(duration_min=120.0)
    seen: list[int] = []

    def progress(_t: float) -> None:
        seen.append(gc.get_freeze_count())
        if len(seen) == 2:
            raise RuntimeError("stop")

    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError, match="stop"):
        Simulation(sc).run(progress=progress, steps=4)
    assert seen[0] > 0 and gc.get_freeze_count() == 0
    keep = [object() for _ in range(3)]
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        seen.clear()
        Simulation(sc).run(progress=lambda _t: seen.append(gc.get_freeze_count()), steps=2)
        # not thawed, and nothing of ours added (the run's world would be thousands more;
        # frozen objects that die leave the count)
        assert 0 < gc.get_freeze_count() <= before
        assert len(seen) == 2 and all(0 < n <= before for n in seen)
    finally:
        gc.unfreeze()
    del keep
