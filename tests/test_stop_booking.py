"""The ``stop`` booking mode in the SimPy model (the live network's default, simulated): each
stop is booked through the reservation protocol when the vehicle decides to make it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from test_sim_booking import (
    assert_every_trip_answered_and_finished,
    assert_no_double_booking,
    run,
    trip_outcomes,
    trip_vehicles,
    windows,
)

from evsim.api import simulate
from evsim.booking_app import booking_window
from evsim.model import Simulation
from evsim.model.world import World
from evsim.planning import VehicleParams, class_connectors, stop_at
from evsim.scenario import Scenario, load_scenario
from live.twin import LIVE_BOOKING

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def tiny() -> Scenario:
    return load_scenario(DATA / "tiny.toml").with_overrides(duration_min=1440.0)


@pytest.fixture(scope="module")
def bahia_stop() -> tuple[Simulation, pd.DataFrame]:
    return run(load_scenario(DATA / "bahia.toml"), "stop")


def test_each_stop_is_booked_at_its_decision(bahia_stop: tuple[Simulation, pd.DataFrame]) -> None:
    _, df = bahia_stop
    assert_every_trip_answered_and_finished_by_horizon(df)
    outcomes = trip_outcomes(df)
    vehicle = trip_vehicles(df)
    assert sum("BOOKED" in s for s in outcomes.values()) > 500
    assert sum("REJECTED" in s for s in outcomes.values()) > 10  # a busy day: some refused
    tb = df[df["kind"] == "trip_booking"]
    pending = tb[tb["status"] == "PENDING"]
    assert (pending["detail"] == "1 stop(s)").all()
    chosen = df[df["kind"] == "station_chosen"]
    decisions = set(zip(chosen["vehicle_id"], chosen["t_min"], strict=True))
    # every request leaves at a decision, one request per decision (none ahead, no retry)
    asked = list(zip(pending["vehicle_id"], pending["t_min"], strict=True))
    assert set(asked) <= decisions and len(set(asked)) == len(asked)
    # ... for the station chosen there, from the vehicle's arrival (its window's start); it
    # arrives then, or when the answer came if that was later (it waits for it there)
    w = windows(df)
    first = w.groupby("booking_id").first()
    arrive = df[df["kind"] == "arrive"]
    arrivals = {(v, s): t for v, s, t in zip(arrive["vehicle_id"], arrive["station_id"],
                                            arrive["t_min"], strict=True)}
    chosen_at = {(v, t): s for v, t, s in zip(chosen["vehicle_id"], chosen["t_min"],
                                              chosen["station_id"], strict=True)}
    asked_at = dict(zip(pending["booking_id"], pending["t_min"], strict=True))
    answers = tb[tb["status"] != "PENDING"]
    answered_at = dict(zip(answers["booking_id"], answers["t_min"], strict=True))
    n_arrived = n_waited = 0
    for bid, row in first.iterrows():
        tid = str(bid).rsplit("/", 1)[0]
        v = vehicle[tid]
        assert row["station_id"] == chosen_at[(v, asked_at[tid])], bid
        if (v, row["station_id"]) in arrivals:
            expected = max(row["start"], answered_at[tid])
            assert arrivals[(v, row["station_id"])] == pytest.approx(expected, abs=0.006), bid
            n_arrived += 1
            n_waited += answered_at[tid] > row["start"] + 0.006
    assert n_arrived > 0.9 * len(first) and 0 < n_waited < n_arrived


def test_booked_stops_charge_on_their_booking_and_refused_ones_walk_in(
    bahia_stop: tuple[Simulation, pd.DataFrame],
) -> None:
    sim, df = bahia_stop
    b = df[df["kind"] == "booking"]
    final = b.groupby("booking_id")["status"].last()
    starts = df[df["kind"] == "session_start"]
    booked = starts[starts["booking_id"].notna()]
    assert len(booked) > 500
    # a booked session is a FULFILLED booking, on its connector
    ful = b[b["status"] == "FULFILLED"].set_index("booking_id")
    assert set(booked["booking_id"]) == set(ful.index)
    for _, s in booked.iterrows():
        assert ful.loc[s["booking_id"], "connector_id"] == s["connector_id"]
    # an unused reservation expires (NO_SHOW) or is still ahead at the horizon; none is
    # canceled: the vehicle keeps what it booked, as the live agent does in this mode
    assert not (final == "CANCELED").any()
    # a refused request: the vehicle queues at that station as a walk-in
    tb = df[df["kind"] == "trip_booking"]
    refused = tb[tb["status"] == "REJECTED"]
    walkins = starts[starts["booking_id"].isna()]
    walked = set(zip(walkins["vehicle_id"], walkins["station_id"], strict=True))
    ab = df[df["kind"] == "abandon"]
    walked |= set(zip(ab["vehicle_id"], ab["station_id"], strict=True))
    chosen = df[df["kind"] == "station_chosen"]
    chosen_at = {(v, t): s for v, t, s in zip(chosen["vehicle_id"], chosen["t_min"],
                                              chosen["station_id"], strict=True)}
    pending_at = tb[tb["status"] == "PENDING"].set_index("booking_id")["t_min"]
    ended = set(df.loc[df["kind"].isin(["trip_end", "stranded"]), "vehicle_id"])
    n = 0
    for tid, v in zip(refused["booking_id"], refused["vehicle_id"], strict=True):
        station = chosen_at[(v, pending_at[tid])]
        if v in ended:
            assert (v, station) in walked, (tid, station)
            n += 1
    assert n > 10
    assert_no_double_booking(sim, df)


def assert_every_trip_answered_and_finished_by_horizon(df: pd.DataFrame) -> None:
    """As :func:`assert_every_trip_answered_and_finished`, for the trips that ended by the
    horizon (a Bahia day cuts some short)."""
    ended = set(df.loc[df["kind"].isin(["trip_end", "stranded"]), "vehicle_id"])
    for trip, statuses in trip_outcomes(df).items():
        if trip.partition(".")[0] in ended:
            assert statuses[0] == "PENDING" and statuses[1] in {"BOOKED", "REJECTED"}, trip


def test_stop_mode_on_tiny_is_deterministic_and_complete(tiny: Scenario) -> None:
    sim, df = run(tiny, "stop")
    assert_every_trip_answered_and_finished(df)
    assert_no_double_booking(sim, df)
    _, again = run(tiny, "stop")
    pd.testing.assert_frame_equal(df, again)
    # the same trips as the other modes (the same seed)
    _, walk = run(tiny, "on_arrival")
    cols = ["vehicle_id", "soc", "detail"]
    pd.testing.assert_frame_equal(
        walk[walk["kind"] == "trip_start"][cols].reset_index(drop=True),
        df[df["kind"] == "trip_start"][cols].reset_index(drop=True),
    )


def test_the_window_is_the_live_agents(tiny: Scenario) -> None:
    """The live vehicle agent books a stop with the same two functions (``stop_at``,
    ``booking_window``) on the same world; the simulated request carries exactly that."""
    sim, df = run(tiny, "stop")
    world = World.build(tiny)
    b = windows(df).groupby("booking_id").first()
    tb = df[df["kind"] == "trip_booking"]
    chosen = df[df["kind"] == "station_chosen"].set_index(["vehicle_id", "t_min"])
    pending = tb[tb["status"] == "PENDING"]
    reserved = df[(df["kind"] == "booking") & (df["status"] == "RESERVED")]
    checked = n_held = 0
    for tid, v, t in zip(pending["booking_id"], pending["vehicle_id"], pending["t_min"],
                         strict=True):
        k = int(v[1:])
        row = chosen.loc[(v, t)]
        if not (b.index.str.rsplit("/", n=1).str[0] == tid).any():
            continue
        if "v" + str(k) != tid:  # the vehicle's first request: it left from its origin
            continue
        trips = sim.trips
        vm = world.vehicle_models[int(trips.model[k])]
        per_km = vm.consumption_kwh_per_km * float(trips.drain[k]) / vm.battery_kwh
        params = VehicleParams(v, vm.battery_kwh, per_km, vm.max_charge_kw, vm.max_ac_kw)
        i = world.stations.ids.index(row["station_id"])
        node = _decision_node(sim, df, v, t)
        stop = stop_at(world.roads, world.stations, world.connectors, tiny.charging, params,
                       i, float(row["distance_km"]), node, int(trips.destination[k]),
                       float(row["soc"]), t)
        assert stop is not None
        start, end = booking_window(stop, tiny.booking.slot_min)
        got = b[b.index.str.rsplit("/", n=1).str[0] == tid].iloc[0]
        assert (got["start"], got["end"]) == (pytest.approx(start, abs=0.006),
                                              pytest.approx(end, abs=0.006))
        held = reserved[reserved["booking_id"].str.rsplit("/", n=1).str[0] == tid]
        for c in held["connector_id"]:  # on the class the charge was sized for
            assert c in class_connectors(
                world.connectors[i], stop.connector_power_kw, stop.connector_type
            )
            n_held += 1
        checked += 1
    assert checked >= 5 and n_held >= 5


def _decision_node(sim: Simulation, df: pd.DataFrame, vid: str, t: float) -> int:
    """Where vehicle ``vid`` decided at ``t``: the node its first stretch stopped at (a
    first decision: the route from its origin walked by the driving rules)."""
    from evsim.model.vehicle import DriveKit
    from evsim.planning import walk_rules

    kit = DriveKit.of(sim)
    k = int(vid[1:])
    model, drain, origin, dest, soc0 = kit.trip_columns
    vm = kit.vehicle_models[model[k]]
    per_km = vm.consumption_kwh_per_km * drain[k] / vm.battery_kwh
    legs = kit.legs(origin[k], dest[k])
    w = walk_rules(kit.ch, legs, soc0[k], per_km, frozenset())
    assert w.stop_here
    return legs.nodes[w.j]


def test_stop_mode_everywhere() -> None:
    """The mode is a scenario value, a ``simulate`` argument, a policy label suffix and a
    twin mapping (to the live agent's mode of the same name)."""
    sc = load_scenario(DATA / "tiny.toml")
    assert sc.with_overrides(booking={"mode": "stop"}).booking.mode == "stop"
    res = simulate(sc, policy="least_wait+stop")
    assert res.booking == "stop"
    assert (res.trace["kind"] == "trip_booking").any()
    assert LIVE_BOOKING["stop"] == "stop"
