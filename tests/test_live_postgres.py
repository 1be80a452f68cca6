"""The company server on PostgreSQL instead of SQLite: same storage code, same guarantees.

``live.storage`` promises that a ``postgresql://`` URL replaces the SQLite file.  These tests
run two company servers (acme, zap of tiny.toml, an in-memory bus between them) on two fresh
databases of the machine's PostgreSQL (``EVSIM_TEST_PG``, default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``; skipped with the reason when it
cannot be reached): a two-company trip, a charging session with its CDR, a restart on the
same databases that rebuilds both protocol nodes exactly, and a cancel after the restart.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("fastapi")
pytest.importorskip("psycopg")

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from test_live_api import TINY, Net, book_trip, charge_first_stop

from evsim.protocol import BookingState
from live.bus import InMemoryBus
from live.settings import Settings
from live.storage import Storage, protocol_log, trace

ADMIN_URL = os.environ.get("EVSIM_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _admin():
    try:
        engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # no server, no role, no driver: say which
        pytest.skip(f"PostgreSQL not reachable at {ADMIN_URL}: {type(exc).__name__}: {exc}")
    return engine


@pytest.fixture
def pg_urls() -> Iterator[dict[str, str]]:
    """One fresh database per company, dropped afterwards."""
    admin = _admin()
    names = {c: f"evsim_test_{c}_{uuid.uuid4().hex[:10]}" for c in ("acme", "zap")}
    with admin.connect() as conn:
        for name in names.values():
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = make_url(ADMIN_URL)
    try:
        yield {c: base.set(database=n).render_as_string(hide_password=False)
               for c, n in names.items()}
    finally:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class PgNet(Net):
    def __init__(self, tmp: Path, urls: dict[str, str]) -> None:
        self.urls = urls
        super().__init__(tmp)

    def settings(self, company: str) -> Settings:
        return Settings(company=company, scenario=TINY, booking_wait_s=self.wait_s,
                        db_url=self.urls[company])


def test_storage_appends_on_postgres(pg_urls: dict[str, str]) -> None:
    st = Storage(pg_urls["acme"])
    try:
        assert st.journal_mode() == "postgresql"
        with st.begin() as conn:  # one row and several rows: both driver paths
            Storage.add_trace(conn, [{"t_min": 1.0, "kind": "arrive", "vehicle_id": "v1"}])
            Storage.add_trace(conn, [{"t_min": 2.0 + i, "kind": "arrive", "soc": 0.5}
                                     for i in range(3)])
        rows = st.trace_rows()
        assert [(r["t_min"], r["kind"]) for r in rows] == [
            (1.0, "arrive"), (2.0, "arrive"), (3.0, "arrive"), (4.0, "arrive")]
        assert rows[0]["vehicle_id"] == "v1" and rows[1]["soc"] == 0.5
        with pytest.raises(ValueError, match="unknown trace columns"), st.begin() as conn:
            Storage.add_trace(conn, [{"t_min": 5.0, "kind": "arrive", "colour": "red"}])
        assert len(st.trace_rows()) == 4  # the failed transaction left nothing behind
    finally:
        st.close()


def test_trip_session_restart_and_cancel_on_postgres(tmp_path: Path,
                                                     pg_urls: dict[str, str]) -> None:
    net = PgNet(tmp_path, pg_urls)
    vid, h = net.register()
    trip = book_trip(net, h)
    assert trip["outcome"] == "BOOKED"
    _, cdr = charge_first_stop(net, h, trip)
    assert cdr["status"] == "COMPLETED" and cdr["price"]["total"] > 0
    durable = {c: (net.svc(c).host.participant.durable_state(),
                   net.svc(c).host.coordinator.durable_state()) for c in ("acme", "zap")}
    logged = {}
    for c in ("acme", "zap"):
        with net.svc(c).storage.engine.connect() as conn:
            logged[c] = conn.execute(select(func.count()).select_from(protocol_log)).scalar()
        net.svc(c).storage.close()
    assert min(logged.values()) > 0

    bus = InMemoryBus()  # both servers restart on the same databases
    apps = {c: net.make(c, bus) for c in ("acme", "zap")}
    for c, app in apps.items():
        host = app.state.service.host
        assert (host.participant.durable_state(), host.coordinator.durable_state()) == durable[c]
    ca = TestClient(apps["acme"])
    got = ca.get(f"/bookings/{trip['trip_id']}", headers=h).json()
    assert got["outcome"] == "BOOKED" and got["bookings"] == trip["bookings"]
    assert ca.get(f"/vehicles/{vid}/sessions", headers=h).json() == [cdr]
    r = ca.delete(f"/bookings/{trip['trip_id']}", headers=h)
    assert r.json()["outcome"] == "CANCELED"
    zb = apps["zap"].state.service.host.participant.booking(trip["bookings"][1]["booking_id"])
    assert zb.state is BookingState.CANCELED
    with apps["acme"].state.service.storage.engine.connect() as conn:
        kinds = {k for (k,) in conn.execute(select(trace.c.kind))}
    assert {"trip_booking", "booking", "session_start", "session_end", "server_status"} <= kinds
    for app in apps.values():
        app.state.service.storage.close()
