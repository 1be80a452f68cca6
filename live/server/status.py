"""Replicated station status of the whole network, fed by retained MQTT status messages.

Every company server subscribes to ``evsim/+/stations/+/status`` and keeps one
:class:`evsim.snapshot.StatusBoard` over all stations of the scenario, so policies see the
same kind of snapshot as in the simulation.  A station agent's last will
(``{station_id, company_id, online: false}``) marks the station offline; offline stations
are never recommended (the candidate filter of every policy drops them) nor booked.

Listeners (:attr:`StatusReplica.listeners`) hear every applied status with the station's
previous and new ``online`` flag; the company service uses them to handle the bookings of its
own stations that go offline and to reconcile a station that comes back.

Stations that have not reported yet count as online (as in the simulation, whose board starts
online); ``reported`` tells them apart for the API.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from evsim.snapshot import NetworkSnapshot, StatusBoard
from live import topics
from live.bus import BadPayload, decode_json
from live.server.world import LiveWorld

log = logging.getLogger(__name__)


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
            self.board.update(
                i, busy=int(busy), queued=int(queued), online=online, t_min=t or 0.0
            )
            self.reported[sid] = True
        for listener in list(self.listeners):
            try:
                listener(sid, was_online, online, t or 0.0)
            except Exception:
                log.exception("status listener %r failed", listener)

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
        if exclude:
            copy.online[np.fromiter(exclude, dtype=np.int64)] = False
        return NetworkSnapshot.of(self.world.table, self.world.roads, copy)
