"""Replicated station status of the whole network, fed by retained MQTT status messages.

Every company server subscribes to ``evsim/+/stations/+/status`` and keeps one
:class:`evsim.snapshot.StatusBoard` over all stations of the scenario, so policies see the
same kind of snapshot as in the simulation.  A station agent's last will
(``{station_id, company_id, online: false}``) marks the station offline; offline stations
are never recommended (the candidate filter of every policy drops them) nor booked.

Listeners (:attr:`StatusReplica.listeners`) hear every applied status with the station's
previous and new ``online`` flag; the company service uses them to handle the bookings of its
own stations that go offline and to reconcile a station that comes back.

Heartbeats: a station agent re-publishes its status every ``heartbeat_s`` wall seconds and
says so in the payload (``heartbeat_s``).  The broker needs up to ~4x its keep-alive to
publish the last will of a silent (frozen) client, so :meth:`StatusReplica.start_watchdog`
marks a station offline itself when no status arrived for ``HEARTBEAT_MISSES`` (1.5) x its
``heartbeat_s`` -- through the same listeners as a last will, so the service handles the
bookings of its own stations exactly as for a crashed agent -- and the next status brings it
back online.  The watchdog holds off while this server's own bus is disconnected and after
this process was frozen itself (a gap in its own loop): then nothing could be heard from
anyone, which says nothing about the stations.

Stations that have not reported yet count as online (as in the simulation, whose board starts
online); ``reported`` tells them apart for the API.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evsim.snapshot import NetworkSnapshot, StatusBoard
from live import topics
from live.bus import BadPayload, decode_json
from live.server.periodic import Periodic
from live.server.world import LiveWorld

log = logging.getLogger(__name__)

HEARTBEAT_MISSES = 1.5  # a station is offline after this many heartbeat periods of silence


@dataclass(frozen=True, slots=True)
class StationStatus:
    station_id: str
    company_id: str
    online: bool
    reported: bool
    t_min: float | None
    busy: int
    queued: int
    connectors: tuple[dict[str, Any], ...]


def _num(d: dict[str, Any], key: str, default: float | None = None) -> float | None:
    v = d.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise BadPayload(f"{key!r} must be a finite number, got {v!r}")
    return float(v)


class StatusReplica:
    """Thread-safe StatusBoard over every station, updated from status payloads."""

    def __init__(self, world: LiveWorld) -> None:
        self.world = world
        self.board = StatusBoard(len(world.table))
        self.lock = threading.Lock()
        self.reported: dict[str, bool] = {}
        self.connectors: dict[str, tuple[dict[str, Any], ...]] = {}
        self.rejected = 0
        # listener(station_id, was_online, online, t_min): after every applied status (on the
        # bus worker, outside the lock); the service reacts to its own stations going
        # offline and coming back
        self.listeners: list[Callable[[str, bool, bool, float], None]] = []
        # heartbeats: station -> (period s, monotonic time of its last status)
        self.heartbeat_s: dict[str, float] = {}
        self.last_seen: dict[str, float] = {}
        self.expired = 0  # stations marked offline by the watchdog
        self._watchdog: Periodic | None = None

    def on_status(self, topic: str, payload: bytes) -> None:
        """Bus handler for ``evsim/+/stations/+/status``; never raises."""
        try:
            self.apply(topic, payload)
        except BadPayload as exc:
            self.rejected += 1
            log.warning("status on %s ignored: %s", topic, exc)

    def apply(self, topic: str, payload: bytes) -> None:
        info = topics.parse(topic)
        if info is None or info.kind != "status":
            raise BadPayload("not a status topic")
        if not payload:  # a cleared retained message
            return
        d = decode_json(payload)
        sid = info.station_id or ""
        i = self.world.table.index.get(sid)
        if i is None:
            raise BadPayload(f"unknown station {sid!r}")
        if d.get("station_id", sid) != sid:
            raise BadPayload(f"station_id {d.get('station_id')!r} does not match the topic")
        owner = self.world.table.company_ids[i]
        if info.company != owner or d.get("company_id", owner) != owner:
            raise BadPayload(f"station {sid!r} belongs to {owner!r}")
        if "station_id" not in d or "online" not in d:  # every status and will carries both
            raise BadPayload("a status needs 'station_id' and 'online'")
        online = d.get("online", True)
        if not isinstance(online, bool):
            raise BadPayload("'online' must be a boolean")
        with self.lock:
            was_online = bool(self.board.online[i])
            busy = _num(d, "busy", float(self.board.busy[i]))
            queued = _num(d, "queued", float(self.board.queued[i]))
            t = _num(d, "t_min", float(self.board.observed_t_min[i]))
            if busy is None or queued is None or busy < 0 or queued < 0:
                raise BadPayload("'busy' and 'queued' must be non-negative")
            conns = d.get("connectors")
            if conns is not None:
                if not isinstance(conns, list) or not all(isinstance(c, dict) for c in conns):
                    raise BadPayload("'connectors' must be a list of objects")
                self.connectors[sid] = tuple(conns)
            mean = d.get("mean_session_min")
            if mean is not None and (isinstance(mean, bool) or not isinstance(mean, int | float)
                                     or not math.isfinite(mean) or mean < 0):
                raise BadPayload("'mean_session_min' must be a non-negative number")
            hb = d.get("heartbeat_s")
            if online and isinstance(hb, int | float) and not isinstance(hb, bool) \
                    and math.isfinite(hb) and hb > 0:
                self.heartbeat_s[sid] = float(hb)
                self.last_seen[sid] = time.monotonic()
            else:  # a last will / clean shutdown / agent without heartbeats
                self.heartbeat_s.pop(sid, None)
                self.last_seen.pop(sid, None)
            self.board.update(
                i, busy=int(busy), queued=int(queued), online=online, t_min=t or 0.0,
                mean_session_min=None if mean is None else float(mean),
            )
            self.reported[sid] = True
        for listener in list(self.listeners):
            try:
                listener(sid, was_online, online, t or 0.0)
            except Exception:
                log.exception("status listener %r failed", listener)

    # ------------------------------------------------------------------ heartbeats

    def expire(self, now: float | None = None) -> list[str]:
        """Mark offline every online station silent for more than ``HEARTBEAT_MISSES`` x its
        heartbeat period (listeners hear ``online: False``); returns their ids."""
        now = time.monotonic() if now is None else now
        out: list[tuple[str, float]] = []
        with self.lock:
            for sid, hb in list(self.heartbeat_s.items()):
                if now - self.last_seen.get(sid, now) <= HEARTBEAT_MISSES * hb:
                    continue
                i = self.world.table.index[sid]
                del self.heartbeat_s[sid]
                self.last_seen.pop(sid, None)
                if self.board.online[i]:
                    self.board.online[i] = False
                    out.append((sid, float(self.board.observed_t_min[i])))
        for sid, t in out:
            self.expired += 1
            log.warning("station %s: no heartbeat for %.1fx its period: offline", sid,
                        HEARTBEAT_MISSES)
            for listener in list(self.listeners):
                try:
                    listener(sid, True, False, t)
                except Exception:
                    log.exception("status listener %r failed", listener)
        return [sid for sid, _ in out]

    def _hold_off(self, now: float) -> None:
        """Restart every station's silence clock (we could not hear anyone meanwhile)."""
        with self.lock:
            for sid in self.last_seen:
                self.last_seen[sid] = now

    def start_watchdog(self, connected: Callable[[], bool] | None = None,
                       period_s: float = 0.1) -> None:
        """Run :meth:`expire` every ``period_s`` on a thread; ``connected()`` says whether
        this server's own bus is up (no expiry while it is not, nor just after)."""
        if self._watchdog is not None:
            return
        last = time.monotonic()

        def check() -> None:
            nonlocal last
            now = time.monotonic()
            up = connected() if connected is not None else True
            try:
                if not up or now - last > max(1.0, 10 * period_s):  # bus down / we froze
                    self._hold_off(now)
                else:
                    self.expire(now)
            finally:
                last = now

        self._watchdog = Periodic("status-watchdog", period_s, check)
        self._watchdog.start()

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop(2.0)
            self._watchdog = None

    def set_online(self, station_id: str, online: bool) -> None:
        with self.lock:
            i = self.world.table.index[station_id]
            self.board.online[i] = online

    def is_online(self, station_id: str) -> bool:
        with self.lock:
            return bool(self.board.online[self.world.table.index[station_id]])

    def status(self, station_id: str) -> StationStatus:
        i = self.world.table.index[station_id]
        with self.lock:
            b = self.board
            return StationStatus(
                station_id,
                self.world.table.company_ids[i],
                bool(b.online[i]),
                self.reported.get(station_id, False),
                float(b.observed_t_min[i]) if self.reported.get(station_id) else None,
                int(b.busy[i]),
                int(b.queued[i]),
                self.connectors.get(station_id, ()),
            )

    def snapshot(self, exclude: set[int] | None = None) -> NetworkSnapshot:
        """A frozen copy for a policy (``exclude``: station indices to treat as offline)."""
        with self.lock:
            b = self.board
            copy = StatusBoard(len(self.world.table))
            copy.busy[:] = b.busy
            copy.queued[:] = b.queued
            copy.online[:] = b.online
            copy.mean_session_min[:] = b.mean_session_min
            copy.observed_t_min[:] = b.observed_t_min
        return NetworkSnapshot.of(self.world.table, self.world.roads, copy).without(exclude or ())
