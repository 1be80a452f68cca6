"""Station agent: the charging stations of one company, as MQTT clients.

One process drives every station of a company (``python -m live station-agent --company
acme``). MQTT has one last will per *connection*, and each station must go offline on its own
retained status topic when the agent dies, so the agent opens **one paho client per station**
(each with the will ``{station_id, company_id, online: false}``) and runs all their handlers
on **one shared worker** (:class:`live.mqtt.Dispatcher`). All station state is touched only on
that worker thread, so no locks are needed: MQTT handlers run there, and the timer thread
(:class:`Scheduler`) only submits work to it.

Per station the agent

* publishes the retained status (``online``, connectors with OCPP-like states ``Available``,
  ``Charging``, ``Finishing``, ``Faulted``) on every change and after every (re)connect (a
  restarted broker without persistence has forgotten it);
* executes ``start``/``stop`` commands from its company server (``.../cmd``): a session
  charges with the simulation's CC-CV model (:class:`evsim.battery.ChargeCurve` at
  :func:`evsim.battery.session_power_kw`) on the scaled clock, publishes cumulative ``meter``
  readings, then ``session_finished`` with the energy when the target SoC is reached. The
  connector stays ``Finishing`` (plugged in) until ``stop``; a ``stop`` while charging ends the
  session early (``session_finished`` with ``reason: "stopped"``);
* re-publishes every station's status every ``heartbeat_s`` wall seconds (an application
  heartbeat, announced in the status as ``heartbeat_s``): servers mark a station offline after
  1.5 silent periods (:mod:`live.server.status`), much sooner than the broker publishes the
  last will of a frozen (SIGSTOPped) client, which takes up to ~4x the keep-alive;
* reports ``fault`` events: a command it cannot execute (unknown or busy connector, missing
  fields) and injected connector faults (:meth:`StationAgent.inject_fault`), which also end a
  running session.

Garbage commands (not JSON, wrong types) are logged and ignored. Duplicate ``start`` commands
(QoS 1 redelivery, or a company server re-sending after its restart) re-publish the
session's latest event (``session_started``, or ``session_finished`` once it ended) instead
of starting twice. Each connector in the status names the session occupying it
(``session_id``), so its server can reconcile (:mod:`live.server.reconcile`).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evsim.battery import ChargeCurve, session_power_kw, session_soc_out
from evsim.model.world import ConnectorSpec, World
from evsim.scenario import Scenario, load_scenario
from evsim.snapshot import DEFAULT_SESSION_MIN, mean_session_after
from live.acl import station_password, station_user
from live.bus import BadPayload, Bus, decode_json, encode_json
from live.mqtt import Dispatcher, MqttBus, Will
from live.topics import (
    CMD_QUEUE,
    CMD_START,
    CMD_STOP,
    EV_FAULT,
    EV_SESSION_FINISHED,
    EV_SESSION_STARTED,
    cmd_topic,
    events_topic,
    meter_topic,
    status_topic,
)

__all__ = ["ScaledClock", "Scheduler", "StationAgent", "StationState", "main"]


log = logging.getLogger(__name__)


class ScaledClock:
    """Scenario minutes on a wall clock: ``t = start_min + (now - epoch) * time_scale / 60``.

    ``epoch`` is a Unix time shared by every process of a run (``EVSIM_EPOCH``, set by the
    launcher) so all components agree on ``t_min``; without it the clock starts now.
    """

    def __init__(
        self, time_scale: float = 60.0, start_min: float = 0.0, epoch: float | None = None
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.time_scale = float(time_scale)
        self.start_min = float(start_min)
        self.epoch = time.time() if epoch is None else float(epoch)

    @classmethod
    def from_env(cls, time_scale: float, start_min: float = 0.0) -> ScaledClock:
        raw = os.environ.get("EVSIM_EPOCH")
        return cls(time_scale, start_min, float(raw) if raw else None)

    def __call__(self) -> float:
        return self.now()

    def now(self) -> float:
        return self.start_min + (time.time() - self.epoch) * self.time_scale / 60.0

    def wall_s(self, minutes: float) -> float:
        """Wall seconds that ``minutes`` scenario minutes take."""
        return max(minutes, 0.0) * 60.0 / self.time_scale

    def wall_at(self, t_min: float) -> float:
        """Unix time at which the clock shows ``t_min``."""
        return self.epoch + (t_min - self.start_min) * 60.0 / self.time_scale


class Scheduler:
    """A timer thread: ``call_at(unix_time, fn)`` runs ``fn`` via ``submit`` when due."""

    def __init__(self, submit: Callable[..., None], name: str = "scheduler") -> None:
        self._submit = submit
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), fn))
            self._cond.notify()

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        self.call_at(time.time() + max(delay_s, 0.0), fn)

    def _run(self) -> None:
        with self._cond:
            while not self._stop:
                if not self._heap:
                    self._cond.wait()
                    continue
                due = self._heap[0][0] - time.time()
                if due > 0:
                    self._cond.wait(min(due, 1.0))
                    continue
                _, _, fn = heapq.heappop(self._heap)
                self._submit(fn)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(2.0)


@dataclass
class Session:
    session_id: str
    vehicle_id: str
    connector: ConnectorSpec
    t_start: float  # scenario minutes
    soc0: float
    soc_target: float
    power_kw: float
    curve: ChargeCurve
    charge_min: float
    finished: bool = False
    end: dict[str, Any] | None = None  # the session_finished event, once finished

    def soc_at(self, t_min: float) -> float:
        return self.curve.soc_after(self.soc0, min(max(t_min - self.t_start, 0.0), self.charge_min))

    def energy_at(self, t_min: float) -> float:
        return self.curve.energy_kwh(self.soc0, self.soc_at(t_min))


@dataclass
class StationState:
    """One station: its connectors and what runs on them (worker thread only)."""

    station_id: str
    company_id: str
    connectors: tuple[ConnectorSpec, ...]
    bus: Bus | None = None
    sessions: dict[str, Session] = field(default_factory=dict)  # connector_id -> session
    faulted: set[str] = field(default_factory=set)
    by_id: dict[str, ConnectorSpec] = field(default_factory=dict)
    queued: int = 0  # walk-ins waiting in the company server's queue (``queue`` command)
    # EWMA of charge minutes per session, as the simulation's station keeps it
    mean_session_min: float = DEFAULT_SESSION_MIN

    def __post_init__(self) -> None:
        self.by_id = {c.connector_id: c for c in self.connectors}

    def connector_status(self, cid: str) -> str:
        if cid in self.faulted:
            return "Faulted"
        s = self.sessions.get(cid)
        if s is None:
            return "Available"
        return "Finishing" if s.finished else "Charging"

    def _session_id(self, cid: str) -> str | None:
        s = self.sessions.get(cid)
        return None if s is None else s.session_id

    def status(self, t_min: float, online: bool = True,
               heartbeat_s: float | None = None) -> dict[str, Any]:
        out = {
            "station_id": self.station_id,
            "company_id": self.company_id,
            "online": online,
            "t_min": t_min,
            "busy": len(self.sessions),
            "queued": self.queued,
            "mean_session_min": self.mean_session_min,
            "connectors": [
                {
                    "connector_id": c.connector_id,
                    "power_kw": c.power_kw,
                    "type": c.type,
                    "status": self.connector_status(c.connector_id),
                    "session_id": self._session_id(c.connector_id),
                }
                for c in self.connectors
            ],
        }
        if online and heartbeat_s:
            out["heartbeat_s"] = heartbeat_s
        return out


def _num(d: dict[str, Any], key: str, default: float | None = None) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise BadPayload(f"{key!r} must be a finite number, got {v!r}")
    return float(v)


def _str(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v:
        raise BadPayload(f"{key!r} must be a non-empty string, got {v!r}")
    return v


class StationAgent:
    """All stations of ``company`` in ``scenario``, each on its own MQTT connection.

    ``bus_factory(station_id, will)`` makes a station's bus (tests pass in-memory buses);
    by default it is an :class:`MqttBus` to ``mqtt_url`` sharing this agent's dispatcher.
    ``meter_period_s`` is the wall interval between meter readings of a running session.
    ``station_key`` (the company's station key, :mod:`live.acl`): each station connects as
    user ``station-{station_id}`` with its derived password instead of ``username``.
    ``keepalive`` (s): the broker publishes a silent station's last will after 1.5x this.
    ``heartbeat_s``: wall seconds between status re-publications (None: no heartbeat).
    """

    def __init__(
        self,
        scenario: Scenario,
        company: str,
        mqtt_url: str = "mqtt://127.0.0.1:1883",
        *,
        clock: ScaledClock | None = None,
        username: str | None = None,
        password: str | None = None,
        meter_period_s: float = 1.0,
        stations: list[str] | None = None,
        bus_factory: Callable[[str, Will], Bus] | None = None,
        station_key: str | None = None,
        keepalive: int = 10,
        heartbeat_s: float | None = 2.0,
    ) -> None:
        self.scenario = scenario
        self.company = company
        self.clock = clock or ScaledClock()
        self.meter_period_s = meter_period_s
        if heartbeat_s is not None and not heartbeat_s > 0:
            raise ValueError("heartbeat_s must be positive")
        self.heartbeat_s = heartbeat_s
        ch = scenario.charging
        self._taper, self._eff = ch.taper_soc, ch.efficiency
        world = World.build(scenario)
        self.stations: dict[str, StationState] = {}
        for i, sc in enumerate(scenario.stations):
            if sc.company != company or (stations is not None and sc.id not in stations):
                continue
            self.stations[sc.id] = StationState(sc.id, company, world.connectors[i])
        if not self.stations:
            raise ValueError(f"company {company!r} has no stations in scenario {scenario.name!r}")
        self.dispatcher = Dispatcher(f"stations-{company}")
        self.scheduler = Scheduler(self.dispatcher.submit, f"stations-{company}-timer")
        self._closed = False
        for st in self.stations.values():
            will = Will(
                status_topic(company, st.station_id),
                encode_json({"station_id": st.station_id, "company_id": company, "online": False}),
                qos=1,
                retain=True,
            )
            if bus_factory is not None:
                st.bus = bus_factory(st.station_id, will)
            else:
                user, pw = username, password
                if station_key is not None:  # each station is its own MQTT user (live.acl)
                    user = station_user(st.station_id)
                    pw = station_password(station_key, st.station_id)
                st.bus = MqttBus(
                    mqtt_url,
                    client_id=f"evsim-station-{company}-{st.station_id}-{os.getpid()}",
                    username=user,
                    password=pw,
                    will=will,
                    keepalive=keepalive,
                    connect_timeout=None,
                    dispatcher=self.dispatcher,
                )
            st.bus.subscribe(cmd_topic(company, st.station_id), self._cmd_handler(st))
            if isinstance(st.bus, MqttBus):

                def publish(st: StationState = st) -> None:
                    self._publish_status(st)

                st.bus.on_connected(publish)
            else:
                self.dispatcher.submit(self._publish_status, st)
        self.scheduler.call_later(self.meter_period_s, self._meter_tick)
        if self.heartbeat_s is not None:
            self.scheduler.call_later(self.heartbeat_s, self._heartbeat)

    # -- publishing (worker thread) ----------------------------------------------------------

    def _pub(self, st: StationState, topic: str, obj: dict[str, Any], retain: bool = False) -> None:
        if st.bus is not None and not self._closed:
            st.bus.publish(topic, encode_json(obj), qos=1, retain=retain)

    def _publish_status(self, st: StationState) -> None:
        self._pub(st, status_topic(self.company, st.station_id),
                  st.status(self.clock(), heartbeat_s=self.heartbeat_s), True)

    def _heartbeat(self) -> None:
        """Re-publish every station's status (worker thread), then again in ``heartbeat_s``."""
        if self._closed or self.heartbeat_s is None:
            return
        for st in self.stations.values():
            if not isinstance(st.bus, MqttBus) or st.bus.connected:
                self._publish_status(st)
        self.scheduler.call_later(self.heartbeat_s, self._heartbeat)

    def _event(self, st: StationState, event: str, **fields: Any) -> None:
        body: dict[str, Any] = {"event": event, "station_id": st.station_id,
                                "company_id": self.company}
        body.update(fields)
        body.setdefault("t_min", self.clock())
        self._pub(st, events_topic(self.company, st.station_id), body)

    # -- commands (worker thread) ------------------------------------------------------------

    def _cmd_handler(self, st: StationState) -> Callable[[str, bytes], None]:
        def handle(topic: str, payload: bytes) -> None:
            try:
                cmd = decode_json(payload)
                kind = cmd.get("cmd")
                if kind == CMD_START:
                    self._start(st, cmd)
                elif kind == CMD_STOP:
                    self._stop(st, cmd)
                elif kind == CMD_QUEUE:
                    n = _num(cmd, "queued")
                    if n < 0:
                        raise BadPayload("'queued' must be non-negative")
                    st.queued = int(n)
                    self._publish_status(st)
                else:
                    raise BadPayload(f"unknown cmd {kind!r}")
            except BadPayload as exc:
                log.warning("station %s: ignoring bad command on %s: %s", st.station_id, topic, exc)

        return handle

    def _start(self, st: StationState, cmd: dict[str, Any]) -> None:
        sid, cid = _str(cmd, "session_id"), _str(cmd, "connector_id")
        soc = _num(cmd, "soc")
        battery = _num(cmd, "battery_kwh")
        target = _num(cmd, "target_soc", 0.8)
        max_dc, max_ac = _num(cmd, "max_dc_kw", 1e9), _num(cmd, "max_ac_kw", 1e9)
        t0 = _num(cmd, "t_min", self.clock())
        vid = str(cmd.get("vehicle_id", ""))
        spec = st.by_id.get(cid)
        running = st.sessions.get(cid)
        if running is not None and running.session_id == sid:  # QoS 1 redelivery, or the
            if running.end is not None:  # server re-sending after a restart: say where it is
                self._event(st, EV_SESSION_FINISHED, **running.end)
            else:
                self._started_event(st, running)
            return
        reason = None
        if spec is None:
            reason = f"unknown connector {cid!r}"
        elif cid in st.faulted:
            reason = "connector faulted"
        elif running is not None:
            reason = f"connector busy with session {running.session_id}"
        elif not (0.0 <= soc <= 1.0) or battery <= 0 or max_dc <= 0 or max_ac <= 0:
            reason = "soc, battery_kwh or vehicle limits out of range"
        if reason is not None or spec is None:
            log.warning("station %s: cannot start %s: %s", st.station_id, sid, reason)
            self._event(st, EV_FAULT, session_id=sid, connector_id=cid, reason=reason,
                        energy_kwh=0.0, soc=soc, vehicle_id=vid)
            return
        power = session_power_kw(spec.power_kw, spec.type, max_dc, max_ac)
        curve = ChargeCurve(battery, power, self._taper, self._eff)
        soc_out = session_soc_out(soc, target)
        minutes = curve.minutes_to(soc, soc_out)
        s = Session(sid, vid, spec, t0, soc, soc_out, power, curve, minutes)
        st.sessions[cid] = s
        self._started_event(st, s)
        self._publish_status(st)
        self.scheduler.call_at(self.clock.wall_at(t0 + minutes), lambda: self._finish(st, s))

    def _started_event(self, st: StationState, s: Session) -> None:
        self._event(st, EV_SESSION_STARTED, session_id=s.session_id,
                    connector_id=s.connector.connector_id, vehicle_id=s.vehicle_id,
                    energy_kwh=0.0, soc=s.soc0, power_kw=s.power_kw, t_min=s.t_start,
                    expected_charge_min=s.charge_min, target_soc=s.soc_target)

    def _finish(self, st: StationState, s: Session, reason: str = "complete",
                t_end: float | None = None) -> None:
        """Charging ended (target reached, stopped or faulted): report the energy."""
        if s.finished or st.sessions.get(s.connector.connector_id) is not s:
            return
        s.finished = True
        t = s.t_start + s.charge_min if t_end is None else min(t_end, s.t_start + s.charge_min)
        t = max(t, s.t_start)
        st.mean_session_min = mean_session_after(st.mean_session_min, t - s.t_start)
        s.end = {"session_id": s.session_id, "connector_id": s.connector.connector_id,
                 "vehicle_id": s.vehicle_id, "energy_kwh": s.energy_at(t), "soc": s.soc_at(t),
                 "power_kw": s.power_kw, "charge_min": t - s.t_start, "t_min": t,
                 "reason": reason}
        self._event(st, EV_SESSION_FINISHED, **s.end)
        self._publish_status(st)

    def _stop(self, st: StationState, cmd: dict[str, Any]) -> None:
        sid = _str(cmd, "session_id")
        cid = cmd.get("connector_id")
        s = st.sessions.get(cid) if isinstance(cid, str) else None
        if s is None or s.session_id != sid:  # find it by session id
            s = next((x for x in st.sessions.values() if x.session_id == sid), None)
        if s is None:
            log.info("station %s: stop for unknown/ended session %s ignored", st.station_id, sid)
            return
        t = _num(cmd, "t_min", self.clock())
        if not s.finished:
            self._finish(st, s, "stopped", t)
        del st.sessions[s.connector.connector_id]
        self._publish_status(st)

    def _meter_tick(self) -> None:
        if self._closed:
            return
        t = self.clock()
        for st in self.stations.values():
            for s in st.sessions.values():
                if not s.finished:
                    self._pub(st, meter_topic(self.company, st.station_id), {
                        "station_id": st.station_id, "connector_id": s.connector.connector_id,
                        "session_id": s.session_id, "energy_kwh": s.energy_at(t),
                        "power_kw": s.power_kw, "soc": s.soc_at(t), "t_min": t,
                    })
        self.scheduler.call_later(self.meter_period_s, self._meter_tick)

    # -- faults and control ------------------------------------------------------------------

    def inject_fault(self, station_id: str, connector_id: str, reason: str = "injected") -> None:
        """Mark a connector faulted (ends its session) -- thread-safe, runs on the worker."""
        def do() -> None:
            st = self.stations[station_id]
            st.faulted.add(connector_id)
            s = st.sessions.get(connector_id)
            if s is not None and not s.finished:
                self._finish(st, s, "fault", self.clock())
            self._event(st, EV_FAULT, connector_id=connector_id, reason=reason,
                        session_id=s.session_id if s else None)
            self._publish_status(st)

        self.dispatcher.submit(do)

    def clear_fault(self, station_id: str, connector_id: str) -> None:
        def do() -> None:
            st = self.stations[station_id]
            st.faulted.discard(connector_id)
            self._publish_status(st)

        self.dispatcher.submit(do)

    def wait_connected(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        for st in self.stations.values():
            if isinstance(st.bus, MqttBus) and not st.bus.wait_connected(
                max(deadline - time.monotonic(), 0.0)
            ):
                return False
        return self.dispatcher.drain(max(deadline - time.monotonic(), 0.1))

    def crash(self) -> None:
        """Drop every connection without DISCONNECT (the broker publishes the last wills)."""
        self._closed = True
        self.scheduler.close()
        for st in self.stations.values():
            if isinstance(st.bus, MqttBus):
                st.bus.drop_connection()
        self.dispatcher.close()

    def close(self) -> None:
        """Go offline cleanly: retained ``online: false`` per station, then disconnect."""
        if self._closed:
            return
        self.scheduler.close()
        done = threading.Event()

        def offline() -> None:
            for st in self.stations.values():
                self._pub(st, status_topic(self.company, st.station_id),
                          st.status(self.clock(), online=False), True)
            done.set()

        self.dispatcher.submit(offline)
        done.wait(5.0)
        self._closed = True
        for st in self.stations.values():
            if st.bus is not None:
                st.bus.close()
        self.dispatcher.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m live station-agent``: run one company's stations until SIGTERM/SIGINT."""
    import argparse

    from live.settings import Settings

    p = argparse.ArgumentParser(prog="live station-agent", description=__doc__.split("\n")[0])
    p.add_argument("--company", help="company id (default EVSIM_COMPANY)")
    p.add_argument("--scenario", help="scenario TOML (default EVSIM_SCENARIO)")
    p.add_argument("--mqtt", help="broker URL (default EVSIM_MQTT_URL)")
    p.add_argument("--time-scale", type=float, help="sim s per wall s (EVSIM_TIME_SCALE)")
    p.add_argument("--meter-period", type=float, default=1.0, help="wall s between meter msgs")
    p.add_argument("--keepalive", type=int, help="MQTT keep-alive s (EVSIM_MQTT_KEEPALIVE)")
    p.add_argument("--heartbeat", type=float,
                   default=float(os.environ.get("EVSIM_HEARTBEAT_S", "2.0")),
                   help="wall s between status heartbeats, 0: none (EVSIM_HEARTBEAT_S)")
    a = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("EVSIM_LOG", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {k: v for k, v in {"company": a.company, "scenario": a.scenario,
                                   "mqtt_url": a.mqtt, "time_scale": a.time_scale,
                                   "mqtt_keepalive": a.keepalive}.items()
                 if v is not None}
    s = Settings.from_env(**overrides)
    if not s.company:
        p.error("--company or EVSIM_COMPANY is required")
    clock = ScaledClock(s.time_scale, s.start_min, s.epoch)
    agent = StationAgent(load_scenario(s.scenario), s.company, s.mqtt_url, clock=clock,
                         username=s.mqtt_user, password=s.mqtt_password,
                         meter_period_s=a.meter_period, station_key=s.mqtt_station_key,
                         keepalive=s.mqtt_keepalive, heartbeat_s=a.heartbeat or None)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("station agent %s: %d stations on %s", s.company, len(agent.stations), s.mqtt_url)
    stop.wait()
    agent.close()
    return 0
