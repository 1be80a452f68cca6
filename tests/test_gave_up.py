"""A vehicle that leaves a station without charging does not go straight back to it.

Its patience ran out in the queue (or the station turned it away): the rest of its trip
avoids that station (:func:`evsim.planning.choose_station`'s ``avoid``), unless no other
station is reachable, even dipping into the reserve. The simulation keeps the list in
:attr:`evsim.model.vehicle.Drive.gave_up`, the live one in ``VehicleRun.gave_up``, both by
:func:`~evsim.planning.avoid_after`; the live vehicle agent sends it as the
``exclude`` of ``POST /recommendations`` (in :func:`~evsim.planning.fallback_requests`'
order) and the ``avoid`` of ``POST /plans``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import evsim.model.booking
import evsim.model.vehicle
from evsim.model import Simulation
from evsim.planning import avoid_after, choose_station, fallback_requests
from evsim.policies import resolve
from evsim.scenario import load_scenario
from evsim.snapshot import ChargeRequest, NetworkSnapshot

DATA = Path(__file__).resolve().parents[1] / "data"
BAHIA = load_scenario(DATA / "bahia.toml")


def impatient(booking: str = "on_arrival", max_wait_min: float = 10.0):
    ch = BAHIA.charging.model_dump()
    ch["max_wait_min"] = max_wait_min
    b = BAHIA.booking.model_dump()
    b["mode"] = booking
    return BAHIA.with_overrides(charging=ch, booking=b)


def test_snapshot_without_takes_stations_offline_and_shares_the_rest() -> None:
    sim = Simulation(BAHIA)
    snap = sim.snapshot
    assert snap.without(()) is snap and snap.without([]) is snap
    less = snap.without([3, 1, 3])
    assert not less.online[1] and not less.online[3] and not less.online.flags.writeable
    assert less.online.sum() == snap.online.sum() - 2
    assert snap.online[1] and snap.online[3]  # the original is untouched
    assert less.dist_km is snap.dist_km and less.busy is snap.busy
    assert less.node_index() is snap.node_index()  # same road tables: same node index


@settings(max_examples=60, deadline=None)
@given(
    node=st.integers(0, len(BAHIA.geography.cities) - 1),
    soc=st.floats(0.02, 0.6),
    reserve=st.sampled_from([0.0, 0.08, 0.2]),
    avoid=st.lists(st.integers(0, len(BAHIA.stations) - 1), max_size=6, unique=True),
    policy=st.sampled_from(["nearest", "least_wait", "balanced"]),
)
def test_choose_station_is_its_fallback_asks_in_order(
    node: int, soc: float, reserve: float, avoid: list[int], policy: str
) -> None:
    """What the live agent asks (fallback_requests) is what the simulation decides."""
    sim = Simulation(BAHIA)
    snap: NetworkSnapshot = sim.snapshot
    roads = sim.world.roads
    fn = resolve(policy)
    request = ChargeRequest("v1", node, float(roads.lat[node]), float(roads.lon[node]), 0, soc,
                            60.0, 0.18, 150.0, 11.0, reserve)
    want = None
    for req, leave_out in fallback_requests(request, avoid):
        want = fn(req, snap.without(leave_out), 0.0)
        if want is not None:
            break
    got = choose_station(fn, request, snap, 0.0, avoid)
    assert got == want
    if got is not None and got.station_index in avoid:  # back only with nowhere else to go
        for req, leave_out in fallback_requests(request, avoid):
            if leave_out:
                assert fn(req, snap.without(leave_out), 0.0) is None


def test_choose_station_goes_back_only_with_nowhere_else() -> None:
    sim = Simulation(BAHIA)
    snap, roads = sim.snapshot, sim.world.roads
    fn = resolve("nearest")
    node = int(sim.world.stations.node[0])
    request = ChargeRequest("v1", node, float(roads.lat[node]), float(roads.lon[node]), node,
                            0.5, 60.0, 0.18)
    first = choose_station(fn, request, snap, 0.0)
    assert first is not None
    other = choose_station(fn, request, snap, 0.0, [first.station_index])
    assert other is not None and other.station_index != first.station_index
    # every other station offline: back to the one it gave up on rather than run dry
    rest = [i for i in range(len(BAHIA.stations)) if i != first.station_index]
    alone = snap.without(rest)
    assert choose_station(fn, request, alone, 0.0, [first.station_index]) == first


@pytest.mark.parametrize("booking", ["on_arrival", "trip", "stop"])
def test_simulated_vehicles_avoid_stations_they_gave_up_on(
    booking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every charging decision after an abandon leaves the station out (or finds nothing
    else); the trace's abandons are exactly what the decisions avoided."""
    asked: list[tuple[ChargeRequest, tuple[int, ...], int | None, int | None]] = []
    real = choose_station

    def spy(policy, request, snapshot, now, avoid=()):  # type: ignore[no-untyped-def]
        got = real(policy, request, snapshot, now, avoid)
        bare = real(policy, request, snapshot, now)
        asked.append((request, tuple(avoid), None if got is None else got.station_index,
                      None if bare is None else bare.station_index))
        return got

    # every decision on the way asks through vehicle.ask_policy (drive, and the trip and
    # stop modes' driver apps)
    monkeypatch.setattr(evsim.model.vehicle, "choose_station", spy)
    sim = Simulation(impatient(booking))
    df = sim.run().trace
    ids = sim.world.stations.ids
    abandons = df[df["kind"] == "abandon"]
    assert len(abandons) > 10  # the scenario does exercise it
    avoided = [(r, a, got, bare) for r, a, got, bare in asked if a]
    assert avoided, "no decision came after an abandon"
    changed = [x for x in avoided if x[2] != x[3]]
    assert changed, "avoiding never changed a choice"
    for _, avoid, got, bare in avoided:
        if got is not None and got in avoid:
            assert bare == got  # it went back: only when nothing else was reachable
    # each vehicle's avoid list is the stations it abandoned before that decision
    by_vehicle: dict[str, set[str]] = {}
    for vid, sid in zip(abandons["vehicle_id"], abandons["station_id"], strict=True):
        by_vehicle.setdefault(vid, set()).add(sid)
    for request, avoid, _, _ in avoided:
        assert {ids[i] for i in avoid} <= by_vehicle[request.vehicle_id]


def test_a_vehicle_no_longer_rejoins_the_queue_it_left() -> None:
    """The symptom: before, about a third of the abandons at max_wait_min = 10 were followed
    by the same vehicle choosing the same station again at once."""
    df = Simulation(impatient()).run().trace
    ev = df[df["kind"].isin(["abandon", "station_chosen"])].sort_values(
        ["vehicle_id", "t_min"], kind="stable")
    again = total = 0
    for _, g in ev.groupby("vehicle_id"):
        rows = list(zip(g["kind"], g["station_id"], strict=True))
        for k, (kind, sid) in enumerate(rows):
            if kind == "abandon":
                total += 1
                again += k + 1 < len(rows) and rows[k + 1] == ("station_chosen", sid)
    assert total > 50
    assert again < 0.25 * total  # before: 30 of 103


def test_fallback_requests_order() -> None:
    r = ChargeRequest("v1", 0, 0.0, 0.0, 0, 0.5, 60.0, 0.18, reserve_soc=0.1)
    no_reserve = replace(r, reserve_soc=0.0)
    assert fallback_requests(r) == [(r, frozenset()), (no_reserve, frozenset())]
    assert fallback_requests(r, [4, 2]) == [
        (r, frozenset({2, 4})), (no_reserve, frozenset({2, 4})),
        (r, frozenset()), (no_reserve, frozenset()),
    ]
    assert fallback_requests(no_reserve, [1]) == [(no_reserve, frozenset({1})),
                                                  (no_reserve, frozenset())]


def test_avoid_after_adds_a_station_left_without_charging_once() -> None:
    assert avoid_after((), 4, True) == ()
    assert avoid_after((), 4, False) == (4,)
    assert avoid_after((4,), 4, False) == (4,)
    assert avoid_after((4,), 2, False) == (4, 2)
    assert avoid_after(("a",), "b", True) == ("a",)
