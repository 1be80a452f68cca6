"""Station meter values and events (MQTT, from this company's station agents), applied to
the charging sessions they belong to.

``evsim/{company}/stations/{station}/meter`` records a session's metered energy (what its CDR
is priced on); ``.../events`` carries ``session_started``, ``session_finished`` (the session
ends with the metered energy: :meth:`live.server.sessions.SessionManager.stop`) and ``fault``
(a ``connector_status`` FAULTED trace row). A payload is checked whole before anything of it
is used: the topic is this company's, the session is known and at that station, the
connector and station ids are the session's, and every number present has the documented
type and range. Anything else is logged and dropped; a handler never raises (the bus worker
calls it).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from live import topics
from live.bus import BadPayload, decode_json

if TYPE_CHECKING:
    from live.server.service import CompanyService

log = logging.getLogger(__name__)

__all__ = ["StationFeed"]

_EVENT_NUMBERS = (("energy_kwh", 0.0, 1000.0), ("soc", 0.0, 1.0), ("t_min", 0.0, 1e7),
                  ("power_kw", 0.0, 2000.0))
_EVENTS = (topics.EV_SESSION_STARTED, topics.EV_SESSION_FINISHED, topics.EV_FAULT)


class StationFeed:
    """The bus handlers of one company server for its stations' meter values and events."""

    def __init__(self, svc: CompanyService) -> None:
        self.svc = svc

    def _event_session(self, topic: str, payload: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
        info = topics.parse(topic)
        if info is None or info.company != self.svc.company:
            raise BadPayload("not one of this company's station topics")
        d = decode_json(payload)
        sid = d.get("session_id")
        row = self.svc.storage.session(sid) if isinstance(sid, str) else None
        if row is None or row["station_id"] != info.station_id:
            raise BadPayload(f"unknown session {sid!r} at {info.station_id!r}")
        # every field present must have the documented type and range: a payload with one
        # bad field is dropped whole (it never half-applies)
        for key, lo, hi in _EVENT_NUMBERS:
            v = d.get(key)
            if v is None:
                if key in d and key != "energy_kwh":
                    raise BadPayload(f"{key} must be a number, got null")
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                    or not lo <= v <= hi:
                raise BadPayload(f"bad {key} {v!r} (a number in [{lo}, {hi}])")
        if "connector_id" in d and d["connector_id"] != row["connector_id"]:
            raise BadPayload(f"connector_id {d['connector_id']!r} is not the session's")
        if "station_id" in d and d["station_id"] != row["station_id"]:
            raise BadPayload(f"station_id {d['station_id']!r} is not the session's")
        if info.kind == "events" and d.get("event") not in _EVENTS:
            raise BadPayload(f"unknown station event {d.get('event')!r}")
        return d, row

    def on_meter(self, topic: str, payload: bytes) -> None:
        """``.../meter``: remember the session's metered energy; never raises."""
        try:
            d, row = self._event_session(topic, payload)
            if d.get("energy_kwh") is not None:
                self.svc.storage.set_metered(row["session_id"], float(d["energy_kwh"]))
        except BadPayload as exc:
            log.warning("meter on %s ignored: %s", topic, exc)

    def on_event(self, topic: str, payload: bytes) -> None:
        """``.../events``: ``session_finished`` ends the session with the metered energy."""
        try:
            d, row = self._event_session(topic, payload)
        except BadPayload as exc:
            log.warning("station event on %s ignored: %s", topic, exc)
            return
        ev = d.get("event")
        t = d.get("t_min")
        t = float(t) if isinstance(t, int | float) and math.isfinite(t) else None
        e = d.get("energy_kwh")
        if ev == topics.EV_SESSION_FINISHED:
            self.svc.sessions.stop(row["session_id"], None if e is None else float(e), t)
        elif ev == topics.EV_FAULT:
            self.svc.trace([{
                "t_min": t if t is not None else self.svc.now(), "kind": "connector_status",
                "station_id": row["station_id"], "company_id": self.svc.company,
                "connector_id": row["connector_id"], "session_id": row["session_id"],
                "status": "FAULTED", "detail": str(d.get("reason", ""))[:200] or None,
            }])
        elif ev == topics.EV_SESSION_STARTED:
            if e is not None:
                self.svc.storage.set_metered(row["session_id"], float(e))
        else:
            log.warning("unknown station event %r on %s ignored", ev, topic)
