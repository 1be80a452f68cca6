"""The walk-in queue survives a server restart (``walkin_queue`` in the company database).

A walk-in that queued (202 QUEUED) is stored in the transaction that acknowledges it; a new
server on the same database rebuilds the station's FIFO queue in arrival order, abandons the
waiters whose patience ran out while it was down (``abandon`` traced at their deadline,
``queue_abandoned`` notified) and starts the head of the queue when a connector frees.  Also:
closing the service stops the queue thread, and a version-1 database is upgraded in place.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fastapi.testclient import TestClient
from sqlalchemy import text
from test_live_api import TINY, Clock, Net

from live import topics
from live.bus import InMemoryBus
from live.server import create_app
from live.settings import Settings
from live.storage import SCHEMA_VERSION, Storage

BODY = {"station_id": "acme_alpha", "soc": 0.2, "battery_kwh": 60.0, "target_soc": 0.8,
        "max_dc_kw": 150.0, "max_ac_kw": 22.0}


def notes(bus: InMemoryBus, vid: str) -> list[dict]:
    return [json.loads(p) for _, p in bus.messages(topics.vehicle_notify_topic(vid))]


def test_queue_survives_restart_fifo_kept_expired_abandoned(tmp_path: Path) -> None:
    net = Net(tmp_path)
    url = net.settings("acme").database_url
    heads = [net.register("acme") for _ in range(6)]

    def post(client: TestClient, i: int, **extra: object):
        return client.post("/sessions", headers=heads[i][1], json={**BODY, **extra})

    # acme_alpha has 3 connectors: fill them, then three walk-ins queue at t=101
    started = [post(net.c["acme"], i) for i in range(3)]
    assert [r.status_code for r in started] == [201, 201, 201]
    net.clock.t = 101.0
    qa = post(net.c["acme"], 3, queue=True, max_wait_min=10.0)  # leaves at 111: server down
    qb = post(net.c["acme"], 4, queue=True, max_wait_min=60.0)
    qc = post(net.c["acme"], 5, queue=True, max_wait_min=60.0)
    assert [r.status_code for r in (qa, qb, qc)] == [202, 202, 202]
    ids = [r.json()["session_id"] for r in (qa, qb, qc)]
    # acknowledged = committed: another connection sees the entries, in arrival order
    other = Storage(url)
    rows = other.queued()
    other.close()
    assert [r["session_id"] for r in rows] == ids
    assert [(r["arrive_t_min"], r["deadline_min"]) for r in rows] == [
        (101.0, 111.0), (101.0, 161.0), (101.0, 161.0)]
    assert json.loads(rows[0]["request"])["battery_kwh"] == 60.0
    net.svc("acme").close()  # the server goes away (queue thread included)

    # down until t=120; a new server on the same database, on a fresh bus
    net.clock.t = 120.0
    bus = InMemoryBus()
    app = net.make("acme", bus)
    svc = app.state.service
    try:
        c = TestClient(app)
        # qa's patience ran out during the downtime: abandoned at its deadline, not started
        a = c.get(f"/sessions/{ids[0]}", headers=heads[3][1]).json()
        assert a["status"] == "ABANDONED" and a["wait_min"] == pytest.approx(10.0)
        assert a["connector_id"] is None
        assert [n["event"] for n in notes(bus, heads[3][0])] == ["queue_abandoned"]
        assert notes(bus, heads[3][0])[0]["t_min"] == pytest.approx(111.0)
        b = c.get(f"/sessions/{ids[1]}", headers=heads[4][1]).json()
        assert (b["status"], b["queue_position"], b["arrive_t_min"]) == ("QUEUED", 1, 101.0)
        assert c.get(f"/sessions/{ids[2]}", headers=heads[5][1]).json()["queue_position"] == 2

        # a connector frees: the first vehicle still waiting (qb, not qc) gets it
        net.clock.t = 125.0
        s0 = started[0].json()
        r = c.post(f"/sessions/{s0['session_id']}/stop", headers=heads[0][1])
        assert r.status_code == 200 and r.json()["status"] == "COMPLETED"
        b = c.get(f"/sessions/{ids[1]}", headers=heads[4][1]).json()
        assert b["status"] == "ACTIVE" and b["connector_id"] == s0["connector_id"]
        assert b["start_t_min"] == 125.0
        assert any(n["event"] == "charging_started" and n["session_id"] == ids[1]
                   for n in notes(bus, heads[4][0]))
        q = c.get(f"/sessions/{ids[2]}", headers=heads[5][1]).json()
        assert (q["status"], q["queue_position"]) == ("QUEUED", 1)

        # nothing lost, nothing doubled: one arrive per waiter, the abandon at the deadline
        trace = svc.storage.trace_rows(after_seq=0, limit=10_000)
        arrive = [t["session_id"] for t in trace if t["kind"] == "arrive"
                  and t["session_id"] in ids]
        assert arrive == ids
        ab = [t for t in trace if t["kind"] == "abandon"]
        assert [(t["session_id"], t["t_min"]) for t in ab] == [(ids[0], pytest.approx(111.0))]
        st = [t for t in trace if t["kind"] == "session_start" and t["session_id"] == ids[1]]
        assert len(st) == 1 and st[0]["wait_min"] == pytest.approx(24.0)
        assert {r["session_id"]: r["status"] for r in (
            svc.storage.queue_entry(i) for i in ids)} == {
            ids[0]: "ABANDONED", ids[1]: "ACTIVE", ids[2]: "QUEUED"}
    finally:
        svc.close()

    # and once more: the restarted server still knows all three after another restart
    net.clock.t = 130.0
    bus2 = InMemoryBus()
    app2 = net.make("acme", bus2)
    try:
        c2 = TestClient(app2)
        got = [c2.get(f"/sessions/{i}", headers=heads[k][1]).json()["status"]
               for i, k in zip(ids, (3, 4, 5), strict=True)]
        assert got == ["ABANDONED", "ACTIVE", "QUEUED"]
        # the last one gives up waiting: stored as ABANDONED too
        r = c2.post(f"/sessions/{ids[2]}/stop", headers=heads[5][1])
        assert r.status_code == 200 and r.json()["status"] == "ABANDONED"
        assert app2.state.service.storage.queued() == []
    finally:
        app2.state.service.close()


def test_close_stops_the_queue_thread(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    settings = Settings(company="acme", scenario=TINY, db_url=f"sqlite:///{tmp_path / 'a.db'}")
    app = create_app(settings, InMemoryBus(), Clock())
    svc = app.state.service
    c = TestClient(app)
    h = {"Authorization": f"Bearer {c.post('/vehicles', json={}).json()['token']}"}
    codes = [c.post("/sessions", headers=h, json={**BODY, "queue": True}).status_code
             for _ in range(4)]
    assert codes == [201, 201, 201, 202]
    assert any(t.name == "walkin-queue-acme" for t in threading.enumerate())
    svc.close()
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert leaked == [], [t.name for t in leaked]


def test_version_1_database_is_upgraded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    st = Storage(url)
    with st.begin() as conn:
        conn.execute(text("DROP TABLE walkin_queue"))
        conn.execute(text("UPDATE schema_meta SET value='1' WHERE key='schema_version'"))
    st.close()
    st = Storage(url)
    try:
        with st.engine.connect() as conn:
            v = conn.execute(text(
                "SELECT value FROM schema_meta WHERE key='schema_version'")).scalar()
        assert v == str(SCHEMA_VERSION)
        assert st.queued() == []
    finally:
        st.close()
