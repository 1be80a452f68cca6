"""A company server and its station agent agree again after a lost command or event.

In-process (two servers of tiny.toml and acme's station agent on one in-memory bus): the
server commits a session before it commands the station, so a crash in between (here: the
command published while no agent listens, or dropped on its way) leaves the two sides
disagreeing.  Every station status names the session on each connector and the server's
reconciler (:mod:`live.server.reconcile`) re-sends what is missing:

* a session ACTIVE at the server that the station never started gets its ``start`` again;
* a session the server COMPLETED that the station still holds gets its ``stop`` again;
* a session that finished at the station while its ``session_finished`` was lost is asked
  for again (a duplicate ``start``), and the server then completes and prices it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from test_live_api import TINY, Net
from waiting import wait_for

from evsim.scenario import load_scenario
from live import topics
from live.bus import BadPayload
from live.settings import Settings
from live.station_agent import ScaledClock, StationAgent


class ReconcileNet(Net):
    def settings(self, company: str) -> Settings:
        return Settings(company=company, scenario=TINY, booking_wait_s=self.wait_s,
                        db_url=f"sqlite:///{self.tmp / f'{company}.db'}", reconcile_s=0.0)


@pytest.fixture
def net(tmp_path: Path) -> ReconcileNet:
    return ReconcileNet(tmp_path)


@pytest.fixture
def agent_of(net: ReconcileNet) -> Iterator[Any]:
    agents: list[StationAgent] = []

    def start(company: str = "acme") -> StationAgent:
        # scenario clock of the agent: the servers' (manual) clock, then 1 min per wall s
        clock = ScaledClock(60.0, start_min=net.clock.t)
        a = StationAgent(load_scenario(TINY), company, clock=clock, meter_period_s=60.0,
                         bus_factory=lambda _sid, _will: net.bus, heartbeat_s=0.1)
        agents.append(a)
        return a

    yield start
    for a in agents:
        a.close()


def _walk_in(net: ReconcileNet, h: dict[str, str], target: float = 0.8) -> dict[str, Any]:
    r = net.c["acme"].post("/sessions", headers=h, json={
        "station_id": "acme_charlie", "soc": 0.5, "battery_kwh": 60, "target_soc": target})
    assert r.status_code == 201, r.text
    return r.json()


def test_lost_start_command_is_sent_again(net: ReconcileNet, agent_of: Any) -> None:
    _, h = net.register()
    s = _walk_in(net, h)  # committed and commanded while no agent listens: the command is lost
    rec = net.svc("acme").reconciler
    assert rec.resent_starts == 0
    agent = agent_of()
    st = agent.stations["acme_charlie"]
    wait_for(lambda: s["connector_id"] in st.sessions, 5.0, "the station never started it")
    assert st.sessions[s["connector_id"]].session_id == s["session_id"]
    assert rec.resent_starts >= 1
    # the status now names the session on its connector: nothing more to re-send
    n = rec.resent_starts
    wait_for(lambda: any(c.get("session_id") == s["session_id"]
                         for c in net.svc("acme").status.connectors["acme_charlie"]), 5.0,
             "the status does not name the session")
    assert net.svc("acme").reconciler.reconcile("acme_charlie") == ([], [])
    assert rec.resent_starts == n


def test_lost_stop_command_is_sent_again(net: ReconcileNet, agent_of: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _, h = net.register()
    agent = agent_of()
    s = _walk_in(net, h)
    st = agent.stations["acme_charlie"]
    wait_for(lambda: s["connector_id"] in st.sessions, 5.0, "not started")
    svc = net.svc("acme")
    real = svc.publish
    lost: list[str] = []

    def lossy(topic: str, obj: dict[str, Any]) -> None:
        if obj.get("cmd") == topics.CMD_STOP:
            lost.append(obj["session_id"])  # the stop command never reaches the station
            return
        real(topic, obj)

    monkeypatch.setattr(svc, "publish", lossy)
    r = net.c["acme"].post(f"/sessions/{s['session_id']}/stop", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "COMPLETED"
    assert lost == [s["session_id"]] and s["connector_id"] in st.sessions
    monkeypatch.setattr(svc, "publish", real)
    wait_for(lambda: s["connector_id"] not in st.sessions, 5.0, "the station still holds it")
    assert svc.reconciler.resent_stops >= 1
    assert st.connector_status(s["connector_id"]) == "Available"


def test_lost_session_finished_is_asked_for_again(net: ReconcileNet, agent_of: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    vid, h = net.register()
    agent = agent_of()
    svc = net.svc("acme")
    # the server misses every station event for a while (as if it were down)
    real = svc.station_feed._event_session
    missed: list[bytes] = []

    def deaf(topic: str, payload: bytes) -> Any:
        missed.append(payload)
        raise BadPayload("server away")

    monkeypatch.setattr(svc.station_feed, "_event_session", deaf)
    s = _walk_in(net, h, target=0.52)  # a short top-up: charging ends within a second
    st = agent.stations["acme_charlie"]
    wait_for(lambda: st.connector_status(s["connector_id"]) == "Finishing", 10.0,
             "charging did not end")
    assert any(b'"session_finished"' in p for p in missed)
    assert svc.storage.session(s["session_id"])["status"] == "ACTIVE"
    monkeypatch.setattr(svc.station_feed, "_event_session", real)
    wait_for(lambda: svc.storage.session(s["session_id"])["status"] == "COMPLETED", 5.0,
             "the finished session was never completed")
    row = svc.storage.session(s["session_id"])
    end = st.sessions.get(s["connector_id"])
    assert end is None or end.end is not None  # stopped at the station, or about to be
    assert row["energy_source"] == "meter" and row["energy_kwh"] > 0
    assert row["price_total"] > 0
    hist = net.c["acme"].get(f"/vehicles/{vid}/sessions", headers=h).json()
    assert hist[0]["status"] == "COMPLETED"
