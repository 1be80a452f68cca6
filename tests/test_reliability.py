"""All-or-nothing trips under faults (issue 7, promise 2).

* the fault injector (:class:`live.faults.FaultInjector`): spec parsing, counting, the
  spec file (arming, one-shot crash, healing a cut);
* the invariant checker (:func:`live.fault_matrix.check`, :func:`live.fault_matrix.lost`) on real
  databases of in-process servers, and on tampered copies of them;
* in-process: a coordinator "crashes" right after logging its COMMIT decision and is rebuilt
  from its database: the trip still ends BOOKED at both companies;
* live (mosquitto, subprocess servers, ``os._exit(137)`` at the protocol step): the
  coordinator killed after its decision and the participant killed after its YES vote,
  restarted on the same database; the full matrix (every step, SIGKILL at random moments,
  broker drop, partition, SIGSTOP for longer than the lease) is ``@pytest.mark.slow`` and
  ``make reliability``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient
from test_live_api import TRIP, Net, book_trip

from evsim.protocol import BookingCreated, BookingState, TripState, encode_record
from live.broker import find_mosquitto
from live.bus import InMemoryBus
from live.fault_matrix import CASES, FAST_CASES, check, lost, read_db
from live.faults import FaultInjector, parse_specs
from live.server.world import LiveWorld

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny.toml"


class Crash(Exception):
    pass


def _raise(spec: str) -> None:
    raise Crash(spec)


def _stations() -> dict[str, dict[str, list[str]]]:
    from evsim.scenario import load_scenario

    w = LiveWorld.build(load_scenario(TINY))
    return {c: w.protocol_stations(c) for c in ("acme", "zap")}


# ---------------------------------------------------------------------------- injector


def test_parse_specs() -> None:
    specs, part = parse_specs("crash_after:TRIP_CHANGED.ALL_YES:2, pause_before:vote:1\npartition")
    assert part
    assert [(s.action, s.when, s.point, s.n) for s in specs] == [
        ("crash", "after", "TRIP_CHANGED.ALL_YES", 2), ("pause", "before", "VOTE", 1)]
    for bad in ("crash:X:1", "boom_after:X:1", "crash_during:X:1", "crash_after:X:0",
                "crash_after:X"):
        with pytest.raises(ValueError):
            parse_specs(bad)


def test_injector_counts_and_fires_once() -> None:
    from evsim.protocol import BookingChanged, Commit, TripChanged

    fired: list[str] = []
    inj = FaultInjector("crash_after:TRIP_CHANGED.ALL_YES:2,crash_before:COMMIT:1",
                        crash=fired.append)
    other = TripChanged("t", "VOTE_NO", 1.0)
    yes = TripChanged("t", "ALL_YES", 1.0)
    inj.after_commit([other, BookingChanged("b", "CONFIRM", 1.0)])
    inj.after_commit([yes])
    assert fired == []
    inj.after_commit([yes])
    assert fired == ["crash_after:TRIP_CHANGED.ALL_YES:2"]
    inj.after_commit([yes])  # one shot
    inj.before_send(Commit("m", "acme.coord", "t", "t/0"))
    assert fired == ["crash_after:TRIP_CHANGED.ALL_YES:2", "crash_before:COMMIT:1"]
    assert FaultInjector.from_env({}) is None


def test_fault_file_arms_crashes_once_and_heals_a_cut(tmp_path: Path) -> None:
    from evsim.protocol import Vote

    path = tmp_path / "acme"
    fired: list[str] = []
    inj = FaultInjector(path=path, crash=fired.append)
    vote = Vote("m", "zap", "t", "t/0", True)
    inj.after_send(vote, None)
    assert fired == [] and not inj.partitioned()
    path.write_text("crash_after:VOTE:1\n")
    inj.after_send(vote, None)
    assert fired == ["crash_after:VOTE:1"]
    assert not path.exists()  # the restarted server must not crash again
    assert json.loads((tmp_path / "acme.fired").read_text())["spec"] == "crash_after:VOTE:1"
    path.write_text("cut_after:VOTE:1\n")
    inj.after_send(vote, None)
    assert inj.partitioned()  # cut off from now on ...
    path.unlink()
    assert not inj.partitioned()  # ... until the file changes
    path.write_text("partition")
    assert inj.partitioned()


# ---------------------------------------------------------------------------- checker


def test_checker_on_real_databases_and_tampered_copies(tmp_path: Path) -> None:
    net = Net(tmp_path)
    _, h = net.register()
    trip = book_trip(net, h)
    for c in ("acme", "zap"):  # quiescent servers: the deferred ALL_ACKED is written too
        net.svc(c).host.barrier()
    snaps = {c: read_db(tmp_path / f"{c}.db", c) for c in ("acme", "zap")}
    stations = _stations()
    ok = check(snaps, stations, net.clock.t)
    assert ok.ok, ok.problems
    assert ok.trips[trip["trip_id"]].outcome == "booked"
    assert lost(snaps, snaps) == []

    # zap "forgot" its commit: the trip is BOOKED but one stop is only a hold
    z = snaps["zap"]
    forgot = dict(snaps, zap=type(z)("zap", [r for r in z.participant_log if "CONFIRM" not in r],
                                     z.coordinator_log, z.trips, z.sessions))
    bad = check(forgot, stations, net.clock.t + 100)
    assert any("BOOKED but stops" in p for p in bad.problems)
    assert any("after its lease ended" in p for p in bad.problems)  # a stale hold too
    assert any("participant log records lost" in p for p in lost(snaps, forgot))

    # a hold for a trip acme never logged: presumed abort broken
    orphan = encode_record(BookingCreated("acme-x.1/0", "zap_bravo", "zap_bravo-1", 500.0, 560.0,
                                          10.0, net.clock.t, "acme-x.1", "acme.coord",
                                          net.clock.t + 10.0, 500.0))
    conn = next(iter(stations["zap"]["zap_bravo"]))
    orphan = orphan.replace("zap_bravo-1", conn)
    with_orphan = dict(snaps, zap=type(z)("zap", [*z.participant_log, orphan],
                                          z.coordinator_log, z.trips, z.sessions))
    bad = check(with_orphan, stations, net.clock.t)
    assert any("never logged" in p for p in bad.problems)


def test_coordinator_crash_after_decision_in_process(tmp_path: Path) -> None:
    """acme dies right after logging ALL_YES (COMMIT decided, not sent); rebuilt from its
    database it re-sends COMMIT and the trip ends BOOKED at both companies."""
    net = Net(tmp_path, wait_s=0.0)
    acme = net.svc("acme")
    acme.host.faults = FaultInjector("crash_after:TRIP_CHANGED.ALL_YES:1", crash=_raise)
    _, h = net.register()
    r = net.c["acme"].post("/bookings", json=TRIP, headers=h)
    trip_id = r.json()["trip_id"]
    assert acme.host.faults.fired == ["crash_after:TRIP_CHANGED.ALL_YES:1"]
    zap = net.svc("zap").host.participant
    assert {zap.booking(f"{trip_id}/1").state} == {BookingState.PENDING}  # no COMMIT went out
    acme.storage.close()

    bus = InMemoryBus()  # the old acme is gone; zap keeps its state and database
    net.svc("zap").attach(bus)
    acme2 = net.make("acme", bus)
    host = acme2.state.service.host
    assert host.coordinator.trip_state(trip_id) is TripState.COMMITTING
    net.clock.t += 1.0
    host.tick()  # re-sends COMMIT
    assert host.coordinator.trip_state(trip_id) is TripState.BOOKED
    assert TestClient(acme2).get(f"/bookings/{trip_id}", headers=h).json()["outcome"] == "BOOKED"
    snaps = {c: read_db(tmp_path / f"{c}.db", c) for c in ("acme", "zap")}
    chk = check(snaps, _stations(), net.clock.t)
    assert chk.ok, chk.problems
    assert chk.trips[trip_id].outcome == "booked"


# ---------------------------------------------------------------------------- live

def _assert_all_or_nothing(results: list) -> None:
    for r in results:
        where = f"{r.case} run {r.run}"
        assert r.fired, f"{where}: the fault never fired"
        assert not r.problems, f"{where}: {r.problems}"
        assert not r.lost, f"{where}: {r.lost}"
        assert r.outcomes and r.failed == 0, f"{where}: {r.outcomes}"


@pytest.mark.broker
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not found")
def test_kill_coordinator_after_decision_and_participant_after_vote(tmp_path: Path) -> None:
    from live.fault_matrix import run_matrix

    results = run_matrix(tmp_path, [c for c in CASES if c.name in FAST_CASES])
    assert [r.case for r in results] == list(FAST_CASES)
    _assert_all_or_nothing(results)


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not found")
def test_full_fault_matrix(tmp_path: Path) -> None:
    from live.fault_matrix import run_matrix, table

    results = run_matrix(tmp_path, CASES)
    print(table(results))
    _assert_all_or_nothing(results)
