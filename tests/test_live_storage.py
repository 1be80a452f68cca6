"""Company server storage: WAL SQLite, restart keeps sessions, bookings and protocol state."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient
from sqlalchemy import text
from test_live_api import TRIP, Net, book_trip, charge_first_stop

from evsim.protocol import BookingState, TripState
from live.bus import InMemoryBus
from live.storage import Storage, StorageError


def test_sqlite_is_wal_and_fsyncs(tmp_path: Path) -> None:
    st = Storage(f"sqlite:///{tmp_path / 'x.db'}")
    assert st.journal_mode() == "wal"
    with st.engine.connect() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    st.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    st = Storage(url)
    with st.begin() as conn:
        conn.execute(text("UPDATE schema_meta SET value='99' WHERE key='schema_version'"))
    st.close()
    with pytest.raises(StorageError, match="newer"):
        Storage(url)


def test_restart_keeps_trips_bookings_sessions_and_protocol_state(tmp_path: Path) -> None:
    net = Net(tmp_path)
    vid, h = net.register()
    trip = book_trip(net, h)
    s, cdr = charge_first_stop(net, h, trip)
    walk = net.c["acme"].post("/sessions", headers=h, json={
        "station_id": "acme_charlie", "soc": 0.2, "battery_kwh": 60}).json()
    durable = {c: (net.svc(c).host.participant.durable_state(),
                   net.svc(c).host.coordinator.durable_state()) for c in ("acme", "zap")}
    for c in ("acme", "zap"):
        net.svc(c).storage.close()

    # both servers restart on the same files, on a fresh bus
    bus = InMemoryBus()
    apps = {c: net.make(c, bus) for c in ("acme", "zap")}
    for c, app in apps.items():
        host = app.state.service.host
        assert (host.participant.durable_state(), host.coordinator.durable_state()) == durable[c]
    ca = TestClient(apps["acme"])
    got = ca.get(f"/bookings/{trip['trip_id']}", headers=h)  # the token survived too
    assert got.status_code == 200
    assert got.json()["outcome"] == "BOOKED" and got.json()["state"] == "BOOKED"
    assert got.json()["bookings"] == trip["bookings"]
    zb = apps["zap"].state.service.host.participant.booking(trip["bookings"][1]["booking_id"])
    assert zb.state is BookingState.RESERVED
    hist = ca.get(f"/vehicles/{vid}/sessions", headers=h).json()
    assert [x["session_id"] for x in hist] == [s["session_id"], walk["session_id"]]
    assert hist[0] == cdr
    assert hist[1]["status"] == "ACTIVE"
    # the connector of the running walk-in session is still CHARGING, and it can be stopped
    conns = {c["connector_id"]: c["status"] for c in ca.get("/stations").json()[1]["connectors"]}
    assert conns[walk["connector_id"]] == "CHARGING"
    net.clock.t = 150.0
    done = ca.post(f"/sessions/{walk['session_id']}/stop", headers=h)
    assert done.status_code == 200 and done.json()["status"] == "COMPLETED"
    # cancel after restart runs the protocol with the restarted zap
    r = ca.delete(f"/bookings/{trip['trip_id']}", headers=h)
    assert r.json()["outcome"] == "CANCELED"
    assert apps["zap"].state.service.host.participant.booking(
        trip["bookings"][1]["booking_id"]).state is BookingState.CANCELED
    # the trace kept everything, including both server starts
    rows = ca.get("/trace").json()["rows"]
    assert sum(r["kind"] == "server_status" for r in rows) == 2
    assert sum(r["kind"] == "session_end" for r in rows) == 2


def test_restart_mid_trip_resumes_from_the_log(tmp_path: Path) -> None:
    """acme crashes after PREPARE went out but before any vote came back."""
    net = Net(tmp_path, wait_s=0.0)
    lonely = InMemoryBus()  # zap is not reachable
    acme = net.make("acme", lonely)
    ca = TestClient(acme)
    r = ca.post("/vehicles", json={})
    h = {"Authorization": f"Bearer {r.json()['token']}"}
    trip_id = ca.post("/bookings", json=TRIP, headers=h).json()["trip_id"]
    assert acme.state.service.host.coordinator.trip_state(trip_id) is TripState.PREPARING
    acme.state.service.storage.close()

    bus = InMemoryBus()
    acme2 = net.make("acme", bus)
    net.make("zap", bus)
    host = acme2.state.service.host
    assert host.coordinator.trip_state(trip_id) is TripState.PREPARING
    net.clock.t = 100.5
    host.tick()  # re-sends the current phase to every stop
    assert host.coordinator.trip_state(trip_id) is TripState.BOOKED
    got = TestClient(acme2).get(f"/bookings/{trip_id}", headers=h).json()
    assert got["outcome"] == "BOOKED"


def test_lifespan_runs_the_ticker(tmp_path: Path) -> None:
    net = Net(tmp_path)
    app = net.make("acme", InMemoryBus())
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        assert app.state.service.host._ticker is not None
    assert app.state.service.host._ticker is None
