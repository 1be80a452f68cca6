"""A company server's own stations going offline and coming back.

A station whose agent stops reporting (its MQTT last will, or 1.5 silent heartbeat periods)
is offline at every server (:class:`live.server.status.StatusReplica`). Its owner then
decides, per reservation there, with the pure rule :func:`evsim.policies.outage.
offline_decisions`: cancel it (the participant tells a trip's coordinator with
``StopCanceled``) and notify the vehicle with ranked alternatives, or keep it while the
outage may still end in time. Offline stations are looked at again every tick until they are
back (a kept reservation is cancelled once its deadline comes within reach). When the
agent is back, the sessions it reported before it went away and no longer reports are closed
(:func:`evsim.policies.outage.stale_sessions`), so no connector stays busy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from evsim.policies.outage import (
    AffectedBooking,
    offline_decisions,
    request_at_station,
    stale_sessions,
)
from evsim.protocol import BookingState
from live.server.periodic import Periodic
from live.server.service import owner_of

if TYPE_CHECKING:
    from live.server.service import CompanyService

log = logging.getLogger(__name__)

__all__ = ["StationOutages"]


class StationOutages:
    """The outage handling of one company server (:class:`~live.server.service.
    CompanyService`): a status listener, and a thread that handles offline stations."""

    def __init__(self, svc: CompanyService) -> None:
        self.svc = svc
        self.outage_min = svc.settings.outage_min  # how long an outage is assumed to last
        # own stations that went offline (station_id -> t_min), handled by _loop
        self.offline_since: dict[str, float] = {}
        # own station -> the session ids its last status named before it went away
        self._known_before: dict[str, set[str] | None] = {}
        self._lock = threading.Lock()
        self._rounds = Periodic(f"outages-{svc.company}", max(svc.settings.tick_s, 0.05),
                                self._handle_all)

    def start(self) -> None:
        self._rounds.start()

    def close(self) -> None:
        self._rounds.stop(5.0)

    def on_station_status(self, station_id: str, was_online: bool, online: bool,
                          t_min: float) -> None:
        """StatusReplica listener (bus worker): track own stations going offline / back."""
        if self.svc.world.company_of(station_id) != self.svc.company or was_online == online:
            return
        if not online:
            # the sessions its last status named (None: its agent names none)
            conns = self.svc.status.status(station_id).connectors
            named = {str(c["session_id"]) for c in conns if c.get("session_id")}
            known = named if any("session_id" in c for c in conns) else None
            with self._lock:
                self.offline_since.setdefault(station_id, self.svc.now())
                self._known_before[station_id] = known
            self._rounds.wake()  # handle its bookings now, not at the next period
        else:
            with self._lock:
                self.offline_since.pop(station_id, None)
                known = self._known_before.pop(station_id, None)
            self.station_returned(station_id, known)

    def _handle_all(self) -> None:
        with self._lock:
            offline = list(self.offline_since)
        for sid in offline:
            try:
                self.handle_offline(sid)
            except Exception:
                log.exception("handling the outage of %s failed", sid)

    def request_for(self, snap: Any, booking: AffectedBooking) -> Any:
        """Alternatives are ranked for the fleet's most common vehicle model, standing at the
        offline station with the SoC at which drivers look for a charger (or
        ``EVSIM_OUTAGE_SOC``): the server does not know the vehicle's real state."""
        vm = max(self.svc.world.scenario.vehicle_models, key=lambda v: v.share)
        soc = self.svc.settings.outage_soc
        if soc is None:
            soc = self.svc.world.scenario.charging.threshold_soc
        return request_at_station(
            snap, self.svc.world.table.index[booking.station_id], booking.vehicle_id, soc=soc,
            battery_kwh=vm.battery_kwh, consumption_kwh_per_km=vm.consumption_kwh_per_km,
            max_dc_kw=vm.max_charge_kw, max_ac_kw=vm.max_ac_kw,
        )

    def handle_offline(self, station_id: str) -> list[str]:
        """Apply :func:`evsim.policies.outage.offline_decisions` to the reservations at an
        offline own station: cancel (participant) and notify the vehicle with alternatives.
        Returns the booking ids cancelled now (idempotent: cancelled ones are not redone)."""
        if self.svc.status.is_online(station_id):
            return []
        with self.svc.host.lock:
            views = [v for v in self.svc.host.participant.bookings()
                     if v.station_id == station_id and v.state is BookingState.RESERVED
                     and not v.charging]
        if not views:
            return []
        affected = [AffectedBooking(v.booking_id, owner_of(v.booking_id), v.station_id,
                                    v.connector_id, v.start_min, v.end_min, v.grace_min)
                    for v in views]
        snap = self.svc.status.snapshot()
        decisions = offline_decisions(
            affected, snap, self.svc.now(), self.svc.policy, lambda b: self.request_for(snap, b),
            outage_min=self.outage_min,
        )
        cancel = {d.booking_id: d for d in decisions if d.action == "cancel"}
        if not cancel:
            return []
        done: list[str] = []

        def op(now: float) -> tuple[None, list]:
            p = self.svc.host.participant
            for bid in cancel:
                v = p.booking(bid)
                if v is not None and v.state is BookingState.RESERVED and not v.charging:
                    p.cancel(bid, now, "station_offline")
                    done.append(bid)
            # a cancelled trip stop tells its coordinator (StopCanceled, due at once)
            return None, p.tick(now) if done else []

        # (the CANCELED rows are the participant's changes: _trace_rows)
        self.svc.host.execute(op, pipelined=True)
        t = self.svc.now()
        by_id = {a.booking_id: a for a in affected}
        for bid in done:
            b, d = by_id[bid], cancel[bid]
            self.svc.notify(
                b.vehicle_id, "booking_cancelled", booking_id=bid, trip_id=bid.split("/", 1)[0],
                station_id=station_id, connector_id=b.connector_id, reason="station_offline",
                t_min=t, alternatives=[{
                    "rank": k + 1, "station_id": c.station_id,
                    "company_id": self.svc.world.table.company_ids[c.station_index],
                    "score": c.score, "distance_km": c.distance_km, "eta_min": c.eta_min,
                    "expected_wait_min": c.expected_wait_min,
                } for k, c in enumerate(d.alternatives)],
            )
        if done:
            log.info("station %s offline: cancelled %d booking(s)", station_id, len(done))
        return done

    def station_returned(self, station_id: str,
                         known_before: Collection[str] | None = None) -> list[str]:
        """The station's agent is back: close the sessions it reported before it went away
        (``known_before``; None: all) and no longer reports
        (:func:`evsim.policies.outage.stale_sessions`), so no connector stays busy."""
        active = self.svc.storage.sessions_where(station_id=station_id, status="ACTIVE")
        if not active:
            return []
        reported = {str(c.get("connector_id")): str(c.get("status"))
                    for c in self.svc.status.status(station_id).connectors}
        stale = stale_sessions([(r["session_id"], r["connector_id"]) for r in active], reported,
                               known_before)
        for sid in stale:
            log.warning("station %s came back without session %s: closing it", station_id, sid)
            self.svc.sessions.stop(sid)
        return stale

