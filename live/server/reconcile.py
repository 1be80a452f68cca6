"""Reconcile a company server's charging sessions with what its stations report.

The server commits a session before it tells the station to start it, and ends it in the
database before it tells the station to stop (the write-ahead rule of every step).  A crash
between the commit and the command, or a command lost while the station was away, leaves the
two sides disagreeing: an ACTIVE session the station never started, or a station still
holding a session the server has COMPLETED.  Every status of a station names the session on
each connector (``session_id``), so the server compares it with the station's ACTIVE rows and
re-sends what is missing, the way an OCPP central system reconciles after a reboot:

* ACTIVE here but not on its connector there, and the status is not older than the session:
  ``start`` again.  The agent treats a start it runs or ran as a duplicate and answers with
  the session's latest event.
* ACTIVE here and ``Finishing`` there (charging ended, still plugged in): the server never
  heard the ``session_finished`` (it completes a session when it does), so ``start`` again
  too: the agent repeats that event and the session is priced with the metered energy.
* On a connector there but not ACTIVE here: ``stop`` (a COMPLETED session with its end
  time; a session this server does not know, with a warning, at the current time).

Every command is idempotent at the agent, so the check is cheap to repeat: it runs on the
first status of each own station after the server starts, then at most every
``interval_s`` wall seconds per station.  A status without session ids (an agent that does
not report them) is not compared.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from live import topics

if TYPE_CHECKING:
    from live.server.service import CompanyService

log = logging.getLogger(__name__)

__all__ = ["Reconciler", "start_command"]


def start_command(row: dict[str, Any], max_dc_kw: float | None = None,
                  max_ac_kw: float | None = None) -> dict[str, Any]:
    """The ``start`` command of a session row.  Without the vehicle's limits the session's
    own power caps both: the agent's ``min(connector, cap)`` then gives that same power."""
    cap = float(row["power_kw"])
    return {
        "cmd": topics.CMD_START, "session_id": row["session_id"],
        "connector_id": row["connector_id"], "vehicle_id": row["vehicle_id"],
        "soc": row["soc_start"], "battery_kwh": row["battery_kwh"],
        "target_soc": row["target_soc"],
        "max_dc_kw": cap if max_dc_kw is None else max_dc_kw,
        "max_ac_kw": cap if max_ac_kw is None else max_ac_kw,
        "t_min": row["start_t_min"],
    }


class Reconciler:
    """Status listener of a :class:`~live.server.service.CompanyService` (see the module
    docstring); ``reconcile(station_id)`` also runs it on demand."""

    def __init__(self, svc: CompanyService, interval_s: float = 10.0) -> None:
        self.svc = svc
        self.interval_s = interval_s
        self._last: dict[str, float] = {}  # station id -> monotonic time of the last check
        self._lock = threading.Lock()
        self.resent_starts = 0
        self.resent_stops = 0
        svc.status.listeners.append(self.on_status)

    def on_status(self, station_id: str, was_online: bool, online: bool, t_min: float) -> None:
        """StatusReplica listener (bus worker); never raises."""
        cfg = self.svc.world.stations.get(station_id)
        if not online or cfg is None or cfg.company != self.svc.company:
            return
        now = time.monotonic()
        with self._lock:
            last = self._last.get(station_id)
            if last is not None and now - last < self.interval_s:
                return
            self._last[station_id] = now
        try:
            self.reconcile(station_id, t_min)
        except Exception:
            log.exception("reconciling the sessions of %s failed", station_id)

    def reconcile(self, station_id: str, status_t_min: float | None = None
                  ) -> tuple[list[str], list[str]]:
        """Compare the station's last status with its ACTIVE sessions and re-send what is
        missing; returns the session ids (re-started, stopped)."""
        svc = self.svc
        conns = [c for c in svc.status.connectors.get(station_id, ()) if isinstance(c, dict)]
        if not any("session_id" in c for c in conns):
            return [], []
        reported = {c.get("connector_id"): c.get("session_id") for c in conns}
        finishing = {c.get("session_id") for c in conns if c.get("status") == "Finishing"}
        t_status = svc.now() if status_t_min is None else status_t_min
        topic = topics.cmd_topic(svc.company, station_id)
        active = svc.storage.sessions_where(status="ACTIVE", station_id=station_id)
        starts: list[str] = []
        for row in active:
            if reported.get(row["connector_id"]) == row["session_id"] \
                    and row["session_id"] not in finishing:
                continue
            if row["start_t_min"] > t_status:  # the status predates the session
                continue
            log.info("session %s is not on %s %s: start command sent again",
                     row["session_id"], station_id, row["connector_id"])
            svc.publish(topic, start_command(row))
            starts.append(row["session_id"])
        stops: list[str] = []
        ids = {row["session_id"] for row in active}
        for cid, sid in reported.items():
            if not isinstance(sid, str) or not isinstance(cid, str) or sid in ids:
                continue
            known = svc.storage.session(sid)
            if known is None:
                log.warning("station %s runs session %s that %s does not know: stopping it",
                            station_id, sid, svc.company)
            end = known["end_t_min"] if known is not None and known["end_t_min"] is not None \
                else svc.now()
            svc.publish(topic, {"cmd": topics.CMD_STOP, "session_id": sid,
                                "connector_id": cid, "t_min": end})
            stops.append(sid)
        self.resent_starts += len(starts)
        self.resent_stops += len(stops)
        return starts, stops
