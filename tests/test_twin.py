"""Sim vs live: the shared walk-in queue rule, the company server's FIFO queue, ``evsim twin``.

* :func:`evsim.queueing.assign_walkins` (used by the simulated stations and the company
  servers alike): FIFO, most powerful free connector, overtaking only past a waiter that fits
  nowhere;
* the company server's walk-in queue over REST (in-process servers, fake clock): QUEUED, started
  on the connector that frees (head first), ``charging_started`` notified, patience -> abandon
  traced at the deadline;
* ``evsim twin`` on the tiny scenario at a high time scale (real mosquitto, subprocesses):
  report.html and agreement.csv are written and the live run drives exactly the simulation's
  trips.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pytest

from evsim.queueing import assign_walkins, connector_order, expired
from live.broker import find_mosquitto

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "tiny.toml"


@dataclass(frozen=True)
class Conn:
    power_kw: float


# --------------------------------------------------------------------------------- pure rule


def test_assign_walkins_fifo_most_powerful_first() -> None:
    free = {0: Conn(50.0), 1: Conn(150.0), 2: Conn(22.0), 3: Conn(150.0)}
    assert connector_order(free) == [1, 3, 0, 2]
    got = assign_walkins(["a", "b", "c"], free)
    assert got == [("a", 1), ("b", 3), ("c", 0)]  # head first, ties to the lower index
    assert free == {0: Conn(50.0), 1: Conn(150.0), 2: Conn(22.0), 3: Conn(150.0)}  # untouched
    assert assign_walkins(["a", "b"], {}) == []
    assert assign_walkins([], free) == []
    # more connectors than waiters: the slow ones stay free
    assert assign_walkins(["a"], {0: Conn(22.0), 5: Conn(50.0)}) == [("a", 5)]


def test_assign_walkins_overtaking_only_past_a_waiter_that_fits_nowhere() -> None:
    free = {0: Conn(150.0), 1: Conn(50.0)}
    calls: list[tuple[str, int]] = []

    def fits(w: str, k: int, c: Conn) -> bool:
        calls.append((w, k))
        return not (w == "long" and k == 0) and w != "never"

    got = assign_walkins(["never", "long", "short"], free, fits)
    # "never" fits nowhere and stays queued; "long" skips the blocked 150 kW for the 50 kW;
    # "short" gets the 150 kW nobody ahead of it could use
    assert got == [("long", 1), ("short", 0)]
    assert calls == [("never", 0), ("never", 1), ("long", 0), ("long", 1), ("short", 0)]


def test_expired_patience() -> None:
    assert expired([("a", 10.0), ("b", 20.0), ("c", 20.0001)], 20.0) == ["a", "b"]


def test_sim_station_hands_out_connectors_by_the_shared_rule() -> None:
    """The simulated plain FIFO station serves a queue in the order assign_walkins gives."""
    import simpy

    from evsim.model.station import SessionPlan, SimStation
    from evsim.model.world import ConnectorSpec
    from evsim.trace import TraceWriter

    env = simpy.Environment()
    specs = (ConnectorSpec("c0", 0, 50.0, "DC"), ConnectorSpec("c1", 0, 150.0, "DC"),
             ConnectorSpec("c2", 0, 22.0, "AC"))
    tw = TraceWriter(None)
    st = SimStation(env, 0, "s", "co", specs, tw)
    got: dict[str, str] = {}

    def visit(vid: str, minutes: float):
        res = yield from st.visit(vid, vid, 0.2, lambda c, t: SessionPlan(minutes, 0, 0, 0.8,
                                                                          c.power_kw))
        got[vid] = res.connector.connector_id

    for vid, minutes in [("a", 10), ("b", 10), ("c", 10), ("d", 10), ("e", 10)]:
        env.process(visit(vid, minutes))
    env.run()
    expect = dict(assign_walkins(["a", "b", "c"], dict(enumerate(specs))))
    assert {v: specs[k].connector_id for v, k in expect.items()} == {
        v: got[v] for v in ("a", "b", "c")}
    # d and e queued; all three free at t=10 again: d gets the 150 kW, e the 50 kW
    assert (got["d"], got["e"]) == ("c1", "c0")


# ----------------------------------------------------------------- the server's walk-in queue


def test_server_walk_in_queue(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from test_live_api import Net

    net = Net(tmp_path)
    svc = net.svc("acme")
    try:
        heads = [net.register("acme") for _ in range(6)]
        body = {"station_id": "acme_alpha", "soc": 0.2, "battery_kwh": 60.0,
                "target_soc": 0.8, "max_dc_kw": 150.0, "max_ac_kw": 22.0}

        def post(i: int, **extra: object):
            return net.c["acme"].post("/sessions", headers=heads[i][1], json={**body, **extra})

        # acme_alpha: 2 x 50 kW DC, 1 x 22 kW AC -- the fast ones first
        started = [post(i, queue=True) for i in range(3)]
        assert [r.status_code for r in started] == [201, 201, 201]
        powers = [r.json()["power_kw"] for r in started]
        assert powers == [50.0, 50.0, 22.0]
        net.clock.t = 101.0
        q1 = post(3, queue=True, max_wait_min=60.0)
        q2 = post(4, queue=True, max_wait_min=30.0)
        assert (q1.status_code, q2.status_code) == (202, 202)
        assert q1.json()["status"] == "QUEUED" and q1.json()["queue_position"] == 1
        assert q2.json()["queue_position"] == 2
        assert post(5).status_code == 409  # no queueing wanted: refused as before
        # the 50 kW session of vehicle 0 ends: the head of the queue gets that connector
        net.clock.t = 110.0
        s0 = started[0].json()
        r = net.c["acme"].post(f"/sessions/{s0['session_id']}/stop", headers=heads[0][1])
        assert r.status_code == 200
        vid3, h3 = heads[3]
        got = net.c["acme"].get(f"/sessions/{q1.json()['session_id']}", headers=h3).json()
        assert got["status"] == "ACTIVE" and got["connector_id"] == s0["connector_id"]
        assert got["start_t_min"] == 110.0
        assert any(n["event"] == "charging_started"
                   and n["session_id"] == q1.json()["session_id"] for n in net.notes(vid3))
        # the second waits past its patience (30 min from t=101): it leaves at t=131
        net.clock.t = 140.0
        svc.sessions._run_queue("acme_alpha")
        vid4, h4 = heads[4]
        left = net.c["acme"].get(f"/sessions/{q2.json()['session_id']}", headers=h4).json()
        assert left["status"] == "ABANDONED" and left["wait_min"] == pytest.approx(30.0)
        assert any(n["event"] == "queue_abandoned" for n in net.notes(vid4))
        rows = svc.storage.trace_rows(after_seq=0, limit=1000)
        by = {(r["kind"], r["vehicle_id"]): r for r in rows}
        assert by[("arrive", vid3)]["t_min"] == 101.0
        assert by[("session_start", vid3)]["wait_min"] == pytest.approx(9.0)
        assert by[("abandon", vid4)]["t_min"] == pytest.approx(131.0)
        assert by[("abandon", vid4)]["wait_min"] == pytest.approx(30.0)
        assert ("arrive", heads[5][0]) not in by  # the refused walk-in never queued
    finally:
        svc.sessions.close()


# ------------------------------------------------------------------------------ evsim twin


@pytest.mark.broker
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not found")
def test_twin_tiny(tmp_path: Path) -> None:
    from evsim.trace import read_trace
    from live.twin import run_twin

    res = run_twin(TINY, tmp_path / "twin", time_scale=1200.0, warmup_s=8.0)
    assert (res.report_dir / "report.html").exists()
    agree = res.report_dir / "agreement.csv"
    assert agree.exists()
    with agree.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == ["live"]
    assert float(rows[0]["KS D"]) >= 0.0
    sim, live = read_trace(res.sim_dir), read_trace(res.live_dir)

    def trips(df):
        return set(df.loc[df["kind"] == "trip_start", "vehicle_id"])

    assert len(trips(sim)) > 50 and trips(live) <= trips(sim)
    # the same trips, except that a trip leaving in the last scenario minutes may be cut by
    # the horizon when the agent lags the scaled clock (1 wall s = 20 scenario min here)
    missing = trips(sim) - trips(live)
    left = sim.loc[(sim["kind"] == "trip_start") & sim["vehicle_id"].isin(missing), "t_min"]
    assert (left >= 720.0 - 20.0).all(), left.tolist()
    assert live["t_min"].max() < 720.0  # cut at the horizon like the simulation
    assert (live["kind"] == "session_start").sum() > 0
    assert res.lag and res.lag["n"] > 0


def test_lag_warnings_say_when_the_live_run_fell_behind() -> None:
    """The three trip-mode twins of Bahia at x600 on this machine (2026-11-25): the one
    that passed kept up; the two that failed had stalled (93 and 7 NO_SHOWs live, 0 in
    the simulation)."""
    from live.twin import lag_warnings

    kw = {"booking": "trip", "grace_min": 15.0, "mean_wait_min": 2.73}
    passed = {"mean_s": 0.006, "p99_s": 0.063, "max_s": 1.040}
    assert lag_warnings(passed, 600.0, **kw) == []
    stalled = {"mean_s": 0.012, "p99_s": 0.073, "max_s": 2.416}  # 24 min > 15 min grace
    (w,) = lag_warnings(stalled, 600.0, **kw)
    assert "24.2 scenario min" in w and "NO_SHOW" in w
    late = {"mean_s": 0.044, "p99_s": 0.560, "max_s": 6.829}  # 0.44 min > 10% of 2.73
    ws = lag_warnings(late, 600.0, **kw)
    assert len(ws) == 2 and "0.44 scenario min late on average" in ws[1]
    # walk-ins have no reservation to lose; the same stall at x60 is 2.4 min: no warning
    assert lag_warnings(stalled, 600.0, **{**kw, "booking": "on_arrival"}) == []
    assert lag_warnings(stalled, 60.0, **kw) == []
    assert lag_warnings({}, 600.0, **kw) == []


def test_a_live_run_that_fell_behind_warns_against_its_own_waits() -> None:
    """``evsim live run`` alone has no simulation to compare with: it holds the lag against
    its own mean wait. Bahia at x600 in trip mode (2026-11-25), once with a test run hogging
    one of the two cores (1,017 sessions became 514, the mean wait 2.9 min became 42), once
    on the quiet machine."""
    from live.launcher import lag_warnings

    hogged = {"mean_s": 1.694, "p99_s": 29.455, "max_s": 53.221}
    ws = lag_warnings(hogged, 600.0, booking="trip", grace_min=15.0, mean_wait_min=42.2,
                      wait_of="this run's")
    assert len(ws) == 2 and "532.2 scenario min behind" in ws[0]
    assert "16.94 scenario min late on average" in ws[1] and "this run's mean wait" in ws[1]
    quiet = {"mean_s": 0.003, "p99_s": 0.042, "max_s": 0.248}
    assert lag_warnings(quiet, 600.0, booking="trip", grace_min=15.0, mean_wait_min=2.92) == []
    # walk-ins lose no reservation, but a mean lag of 10% of the waits still spoils them
    (w,) = lag_warnings(hogged, 600.0, booking="none", grace_min=15.0, mean_wait_min=42.2)
    assert "late on average" in w
    # a run with no session has no mean wait to hold the lag against
    assert lag_warnings(hogged, 600.0, booking="none", grace_min=15.0, mean_wait_min=None) == []
