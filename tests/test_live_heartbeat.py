"""Application heartbeats of station agents (a frozen agent is offline within 1.5 periods).

mosquitto 2.0.11 takes up to ~4x the keep-alive to publish the last will of a silent
(SIGSTOPped) client, so station agents re-publish their status every ``heartbeat_s``
(``EVSIM_HEARTBEAT_S``) and every server's :class:`live.server.status.StatusReplica` marks a
station offline after 1.5 silent periods -- through the same listeners as a last will -- and
online again with the next status.  Here the keep-alive is long (30 s): only the heartbeat
can explain a quick offline.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from waiting import wait_for as _wait_for

from live.broker import find_mosquitto
from live.bus import InMemoryBus, encode_json
from live.server.status import HEARTBEAT_MISSES, StatusReplica
from live.server.world import LiveWorld

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny.toml"
HEARTBEAT_S = 0.5
SLACK_S = 1.0  # watchdog period, HTTP polling, scheduling on a loaded 2-core machine



def wait_for(cond: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    return _wait_for(cond, timeout, what, step=0.02)  # finer polling: timings measured


def _status(sid: str, company: str, online: bool = True, hb: float | None = HEARTBEAT_S
            ) -> bytes:
    d: dict[str, Any] = {"station_id": sid, "company_id": company, "online": online,
                         "t_min": 1.0, "busy": 0, "queued": 0}
    if hb is not None:
        d["heartbeat_s"] = hb
    return encode_json(d)


def test_replica_expires_silent_stations_and_revives_them() -> None:
    from evsim.scenario import load_scenario

    rep = StatusReplica(LiveWorld.build(load_scenario(TINY)))
    heard: list[tuple[str, bool, bool]] = []
    rep.listeners.append(lambda sid, was, now, _t: heard.append((sid, was, now)))
    topic = "evsim/zap/stations/zap_bravo/status"
    rep.apply(topic, _status("zap_bravo", "zap"))
    rep.apply("evsim/zap/stations/zap_delta/status", _status("zap_delta", "zap", hb=None))
    t0 = rep.last_seen["zap_bravo"]
    assert rep.expire(t0 + HEARTBEAT_MISSES * HEARTBEAT_S - 0.01) == []
    assert rep.expire(t0 + HEARTBEAT_MISSES * HEARTBEAT_S + 0.01) == ["zap_bravo"]
    assert not rep.is_online("zap_bravo") and rep.is_online("zap_delta")  # no heartbeat: kept
    assert heard[-1] == ("zap_bravo", True, False)
    assert rep.expire(t0 + 100) == []  # once
    rep.apply(topic, _status("zap_bravo", "zap"))  # the next heartbeat brings it back
    assert rep.is_online("zap_bravo") and heard[-1] == ("zap_bravo", False, True)
    rep.apply(topic, _status("zap_bravo", "zap", online=False))  # a last will: not watched
    assert "zap_bravo" not in rep.heartbeat_s


def test_watchdog_holds_off_while_the_bus_is_down() -> None:
    from evsim.scenario import load_scenario

    rep = StatusReplica(LiveWorld.build(load_scenario(TINY)))
    up = [False]
    rep.start_watchdog(lambda: up[0], period_s=0.02)
    try:
        rep.apply("evsim/zap/stations/zap_bravo/status", _status("zap_bravo", "zap", hb=0.1))
        time.sleep(0.5)  # silent for 5 periods, but we could not have heard it
        assert rep.is_online("zap_bravo")
        up[0] = True
        wait_for(lambda: not rep.is_online("zap_bravo"), timeout=2.0, what="expiry")
    finally:
        rep.close()


def test_service_handles_a_heartbeat_offline_like_a_last_will(tmp_path: Path) -> None:
    from test_live_api import Net

    net = Net(tmp_path)
    svc = net.svc("zap")
    seen: list[str] = []
    svc.status.listeners.append(lambda sid, was, now, _t: seen.append(sid) if not now else None)
    net.bus.publish("evsim/zap/stations/zap_bravo/status", _status("zap_bravo", "zap", hb=0.1))
    wait_for(lambda: "zap_bravo" in svc.outages.offline_since, timeout=3.0, what="offline at zap")
    # every replica watches, each on its own watchdog's timer (acme's may fire a moment later)
    wait_for(lambda: not net.svc("acme").status.is_online("zap_bravo"), timeout=3.0,
             what="offline at acme")
    net.bus.publish("evsim/zap/stations/zap_bravo/status", _status("zap_bravo", "zap", hb=None))
    assert "zap_bravo" not in svc.outages.offline_since and svc.status.is_online("zap_bravo")
    for s in net.apps.values():
        s.state.service.close()
    assert isinstance(net.bus, InMemoryBus)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found")
    from live.launcher import LiveNetwork

    mp = pytest.MonkeyPatch()
    mp.setenv("EVSIM_MQTT_KEEPALIVE", "30")  # the broker alone would take 45-120 s
    mp.setenv("EVSIM_HEARTBEAT_S", str(HEARTBEAT_S))
    n = LiveNetwork(TINY, tmp_path_factory.mktemp("heartbeat"), time_scale=60.0)
    try:
        n.start()
        wait_for(lambda: all(s["reported"] for s in
                             httpx.get(f"{n.servers['acme']}/network/stations").json()),
                 what="every station reported")
        yield n
    finally:
        n.stop()
        mp.undo()


def _online(net: Any, company: str, sid: str) -> bool:
    return next(s for s in httpx.get(net.servers[company] + "/network/stations").json()
                if s["station_id"] == sid)["online"]


@pytest.mark.broker
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not found")
def test_frozen_agent_offline_within_one_and_a_half_heartbeats(net: Any) -> None:
    agent = next(p for p in net.procs if p.name == "stations-acme")
    wait_for(lambda: _online(net, "acme", "acme_alpha"), what="acme_alpha online")
    t0 = time.monotonic()
    os.killpg(agent.popen.pid, signal.SIGSTOP)  # alive, sockets open, silent
    try:
        wait_for(lambda: not _online(net, "acme", "acme_alpha"), timeout=10.0,
                 what="acme_alpha offline")
        dt = time.monotonic() - t0
        print(f"\nSIGSTOP -> offline by heartbeat: {dt:.2f} s (heartbeat {HEARTBEAT_S} s, "
              "keep-alive 30 s)")
        assert dt <= HEARTBEAT_MISSES * HEARTBEAT_S + SLACK_S
        wait_for(lambda: not _online(net, "zap", "acme_alpha"), timeout=SLACK_S,
                 what="zap sees it offline too")
        assert _online(net, "acme", "zap_bravo")  # zap's agent still beats: no false alarm
    finally:
        os.killpg(agent.popen.pid, signal.SIGCONT)
    t1 = time.monotonic()
    wait_for(lambda: _online(net, "acme", "acme_alpha"), timeout=5.0, what="acme_alpha back")
    assert time.monotonic() - t1 <= HEARTBEAT_S + SLACK_S
    wait_for(lambda: _online(net, "zap", "acme_alpha"), timeout=5.0, what="back at zap")
