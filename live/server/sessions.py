"""Charging sessions at this company's stations: start, stop, pricing (OCPI CDR-like).

A session always runs against a booking of this company's Participant: either the vehicle's
reservation (``booking_id``), or a *walk-in* booking made on the spot for the window
``[now, now + estimated charge time)`` on a free connector (the Participant picks it, so
walk-ins and reservations can never overlap).  ``start_charging`` / ``stop_charging`` are the
protocol's; this module stores the session, commands the station over the bus
(``evsim/{company}/stations/{station}/cmd``) and prices the result.

Pricing: a stopped session's record is :func:`evsim.cdr.session_cdr`'s (energy, SoC,
charging and parking minutes, the tariff's price breakdown), with the station's metered
energy when it reported one (``meter`` / ``session_finished`` events, applied by
:mod:`live.server.station_feed`, or the caller's ``energy_kwh``), else the charging curve's.

Walk-in queue: a walk-in with ``queue`` set that gets no connector joins the station's FIFO
queue (202 QUEUED).  The entry (vehicle, station, the request with its plan inputs, arrival
time, patience deadline) is stored in ``walkin_queue`` in the transaction that acknowledges
the 202, and every change of it (started, abandoned, left) in the transaction that makes the
change, so a restarted server rebuilds the queues in arrival order (:meth:`SessionManager.
resume`, when the bus is attached): waiters whose patience ran out while it was down leave
(``abandon`` traced at their deadline, ``queue_abandoned`` notified), the others are served
as connectors free.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from evsim.battery import ChargeCurve, session_power_kw, session_soc_out
from evsim.cdr import session_cdr
from evsim.protocol import BookingChanged, BookingState, ProtocolError
from evsim.queueing import WALKIN_GRACE_MIN, assign_walkins, expired
from live import topics
from live.server import models as m
from live.server.reconcile import start_command
from live.server.service import ApiError, owner_of
from live.storage import Storage

if TYPE_CHECKING:
    from live.server.service import CompanyService

log = logging.getLogger(__name__)


def session_public(row: dict[str, Any], waiter: Any = None) -> m.SessionPublic:
    done = row["status"] == "COMPLETED"
    return m.SessionPublic(
        arrive_t_min=waiter.arrive_t_min if waiter is not None else None,
        wait_min=waiter.wait_min if waiter is not None else None,
        session_id=row["session_id"], vehicle_id=row["vehicle_id"], station_id=row["station_id"],
        company_id=row["company_id"], connector_id=row["connector_id"],
        booking_id=row["booking_id"], status=row["status"], start_t_min=row["start_t_min"],
        end_t_min=row["end_t_min"], soc_start=row["soc_start"], soc_end=row["soc_end"],
        target_soc=row["target_soc"], power_kw=row["power_kw"], energy_kwh=row["energy_kwh"],
        charge_min=row["charge_min"], parking_min=row["parking_min"],
        energy_source=row["energy_source"],
        price=m.PriceBreakdownPublic(
            energy=row["price_energy"], time=row["price_time"], parking=row["price_parking"],
            flat=row["price_flat"], total=row["price_total"], currency=row["currency"],
        ) if done else None,
    )


SWEEP_MIN = 5.0  # scenario minutes between re-dispatches of every non-empty queue (a backstop)
_MIN_WALKIN_MIN = 1e-3  # a walk-in's booking spans at least this (a session at its target)


@dataclass(eq=False)
class _Waiter:
    """A walk-in at one of this company's stations, queued or just arrived."""

    session_id: str
    vehicle_id: str
    body: m.SessionCreate
    queue: bool  # False: start now or 409, never wait
    arrive_t_min: float = 0.0
    deadline_min: float = math.inf  # arrive + patience: leaves the queue then (abandon)
    status: Literal["QUEUED", "ACTIVE", "ABANDONED"] = "QUEUED"  # -> ACTIVE | ABANDONED
    wait_min: float | None = None
    connector_id: str | None = None
    booking_id: str | None = None
    power_kw: float = 0.0


class SessionManager:
    def __init__(self, svc: CompanyService) -> None:
        self.svc = svc
        # walk-in queues (station id -> waiters in arrival order) and the walk-ins queued
        # since this server started (session id -> waiter): guarded by the protocol host's
        # lock (a queue is only touched inside ``host.execute``, next to the participant it
        # reads); stored in ``walkin_queue`` by the same steps, rebuilt from it on restart
        self._queues: dict[str, list[_Waiter]] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._dirty: set[str] = set()  # stations whose queue may move (reservations changed)
        # station -> when a reservation that keeps its queue waiting stops blocking it
        self._retry_at: dict[str, float] = {}
        self._wake = threading.Event()
        self._stop_ev = threading.Event()
        self._thread: threading.Thread | None = None
        self._restore()
        svc.host.hooks.append(self._after_protocol)

    # ------------------------------------------------------------------ start

    def start(self, vehicle_id: str, body: m.SessionCreate) -> m.SessionPublic:
        return self.start_or_queue(vehicle_id, body)[1]

    def start_or_queue(self, vehicle_id: str, body: m.SessionCreate) -> tuple[int, m.SessionPublic]:
        """Start a session (201), or queue a walk-in with ``queue`` set (202, QUEUED)."""
        svc = self.svc
        if body.target_soc is None:  # the scenario's, as the simulation's vehicles charge to
            target = svc.world.scenario.charging.target_soc
            if target <= body.soc:
                raise ApiError(422, f"soc {body.soc} is at or above the scenario's target_soc "
                               f"{target}; give a target_soc above it", "bad_request")
            body = body.model_copy(update={"target_soc": target})
        cfg = svc.world.stations.get(body.station_id)
        if cfg is None:
            raise ApiError(404, f"unknown station {body.station_id!r}", "unknown_station")
        if cfg.company != svc.company:
            raise ApiError(422, f"station {body.station_id!r} belongs to {cfg.company!r}; "
                           "start the session at its company's server", "foreign_station")
        if body.connector_id is not None:
            c = svc.world.connector_index.get(body.connector_id)
            if c is None or c.station_id != body.station_id:
                raise ApiError(422, f"connector {body.connector_id!r} is not at "
                               f"{body.station_id!r}", "unknown_connector")
        if not svc.status.is_online(body.station_id):
            raise ApiError(409, f"station {body.station_id!r} is offline", "station_offline")
        if body.booking_id is None:
            return self._walk_in(vehicle_id, body)
        return 201, self._start_booked(vehicle_id, body)

    def _start_booked(self, vehicle_id: str, body: m.SessionCreate) -> m.SessionPublic:
        svc, host = self.svc, self.svc.host
        assert body.booking_id is not None
        v = svc.local_booking(vehicle_id, body.booking_id)  # 404 unless the caller's
        if v.station_id != body.station_id:
            raise ApiError(422, f"booking {body.booking_id!r} is at {v.station_id!r}",
                           "station_mismatch")
        if body.connector_id is not None and body.connector_id != v.connector_id:
            raise ApiError(422, f"booking {body.booking_id!r} is on {v.connector_id!r}",
                           "connector_mismatch")
        active = svc.storage.sessions_where(booking_id=body.booking_id, status="ACTIVE")
        if active:
            raise ApiError(409, f"session {active[0]['session_id']} already runs on this "
                           "booking", "already_charging")
        session_id = f"{svc.company}-s-{secrets.token_hex(6)}"
        bid = body.booking_id

        queue_len: list[int] = []  # the station's walk-in line (under the lock, in op)

        def op(now: float) -> tuple[tuple[str, Any], list]:
            p = host.participant
            if svc.storage.sessions_where(booking_id=bid, status="ACTIVE"):
                return ("active", None), []
            v = p.start_charging(bid, now)
            if not v.charging:
                return ("refused", v), []
            queue_len.append(len(self._queues.get(body.station_id, ())))
            return ("ok", v), []

        def extra(conn: Any, value: tuple[str, Any], fx: Any) -> None:
            kind, v = value
            if kind != "ok":
                return
            conn_spec = svc.world.connector_index[v.connector_id]
            power = session_power_kw(conn_spec.power_kw, conn_spec.type, body.max_dc_kw,
                                     body.max_ac_kw)
            self._add_session(conn, session_id, vehicle_id, body, v.connector_id, bid, False,
                              fx.now, power)
            base = {"vehicle_id": vehicle_id, "station_id": body.station_id,
                    "company_id": svc.company, "session_id": session_id, "soc": body.soc,
                    "booking_id": bid}
            # a vehicle early for its window waited at the station for it (as in the
            # simulation); one on time did not wait (the request's latency is no wait)
            came = body.arrived_t_min
            arrived = min(came, fx.now) if came is not None and came < v.start_min else fx.now
            # queue_len: the walk-in line, which a booked vehicle is not in (as simulated)
            Storage.add_trace(conn, [
                {"t_min": arrived, "kind": "arrive", **base, "queue_len": queue_len[0]},
                {"t_min": fx.now, "kind": "session_start", **base,
                 "connector_id": v.connector_id, "wait_min": fx.now - arrived,
                 "power_kw": power, "queue_len": queue_len[0]},
            ])

        kind, v = host.execute(op, extra=extra)
        if kind == "active":
            raise ApiError(409, f"a session already runs on booking {bid!r}", "already_charging")
        if kind == "refused":
            raise ApiError(409, f"cannot start charging on booking {bid!r}: {v.reason}",
                           v.reason or "refused")
        row = svc.storage.session(session_id)
        assert row is not None
        self._command_start(row, body)
        return session_public(row)

    def _add_session(self, conn: Any, session_id: str, vehicle_id: str, body: m.SessionCreate,
                     connector_id: str, bid: str, walk_in: bool, now: float,
                     power: float) -> None:
        tariff = self.svc.world.tariffs[body.station_id]
        Storage.add_session(conn, {
            "session_id": session_id, "vehicle_id": vehicle_id,
            "station_id": body.station_id, "company_id": self.svc.company,
            "connector_id": connector_id, "booking_id": bid, "walk_in": int(walk_in),
            "status": "ACTIVE", "start_t_min": now, "soc_start": body.soc,
            "target_soc": body.target_soc, "battery_kwh": body.battery_kwh,
            "power_kw": power, "currency": tariff.currency if tariff else "BRL",
        })

    def _command_start(self, row: dict[str, Any], body: m.SessionCreate) -> None:
        svc = self.svc
        svc.publish(topics.cmd_topic(svc.company, row["station_id"]),
                    start_command(row, body.max_dc_kw, body.max_ac_kw))
        svc.notify(row["vehicle_id"], "charging_started", session_id=row["session_id"],
                   station_id=row["station_id"], connector_id=row["connector_id"],
                   t_min=row["start_t_min"])

    # ------------------------------------------------------------------ walk-in queue

    def _from_row(self, row: dict[str, Any]) -> _Waiter | None:
        """The waiter of a ``walkin_queue`` row; None (logged) if it is unusable here."""
        try:
            body = m.SessionCreate.model_validate_json(row["request"])
        except ValueError as exc:
            log.error("walk-in queue entry %s has a bad request, ignored: %s",
                      row["session_id"], exc)
            return None
        cfg = self.svc.world.stations.get(body.station_id)
        if cfg is None or cfg.company != self.svc.company or body.station_id != row["station_id"]:
            log.error("walk-in queue entry %s: station %r is not one of ours, ignored",
                      row["session_id"], row["station_id"])
            return None
        return _Waiter(row["session_id"], row["vehicle_id"], body, True,
                       arrive_t_min=row["arrive_t_min"], deadline_min=row["deadline_min"],
                       status=row["status"], wait_min=row["wait_min"])

    def _restore(self) -> None:
        """Rebuild the queues from the QUEUED rows, in arrival order (at construction)."""
        n = 0
        for row in self.svc.storage.queued("QUEUED"):
            w = self._from_row(row)
            if w is None:
                continue
            self._queues.setdefault(w.body.station_id, []).append(w)
            self._waiters[w.session_id] = w
            n += 1
        if n:
            log.info("restored %d queued walk-in(s) at %d station(s)", n,
                     sum(1 for q in self._queues.values() if q))

    def resume(self) -> None:
        """After a restart (the bus is attached): expire the waiters whose patience ran out
        while the server was down, start whoever fits now, and watch the queues again."""
        with self.svc.host.lock:
            stations = [sid for sid, q in self._queues.items() if q]
        for sid in stations:
            try:
                self._run_queue(sid)
            except Exception:
                log.exception("resuming the walk-in queue at %s failed", sid)
        if stations:
            self._ensure_thread()
            self._wake.set()

    def _waiter(self, session_id: str) -> _Waiter | None:
        """A walk-in queued here, from memory or (a finished one, after a restart) the
        database; None if it never queued or has started (its session row answers)."""
        w = self._waiters.get(session_id)
        if w is not None:
            return w
        row = self.svc.storage.queue_entry(session_id)
        if row is None or row["status"] == "ACTIVE":
            return None
        return self._from_row(row)

    def _walk_in(self, vehicle_id: str, body: m.SessionCreate) -> tuple[int, m.SessionPublic]:
        """Join the station's FIFO queue and hand out connectors (:mod:`evsim.queueing`)."""
        w = _Waiter(f"{self.svc.company}-s-{secrets.token_hex(6)}", vehicle_id, body, body.queue)
        rejected = self._run_queue(body.station_id, w)
        if rejected is not None:
            raise ApiError(409, f"no free connector at {body.station_id!r} now", "no_connector",
                           alternatives=[{"connector_id": a.connector_id,
                                          "start_min": a.start_min, "end_min": a.end_min}
                                         for a in rejected.alternatives])
        if w.status == "ACTIVE":
            row = self.svc.storage.session(w.session_id)
            assert row is not None
            return 201, session_public(row, w)
        self._ensure_thread()
        self._wake.set()
        return 202, self._queued_public(w)

    def _charge_min(self, body: m.SessionCreate, spec: Any) -> tuple[float, float]:
        """(session power, minutes to the target) of ``body`` on connector ``spec``."""
        ch = self.svc.world.scenario.charging
        power = session_power_kw(spec.power_kw, spec.type, body.max_dc_kw, body.max_ac_kw)
        assert body.target_soc is not None  # (start_or_queue filled in the default)
        minutes = ChargeCurve(body.battery_kwh, power, ch.taper_soc, ch.efficiency).minutes_to(
            body.soc, session_soc_out(body.soc, body.target_soc))
        return power, minutes

    def _run_queue(self, station_id: str, new: _Waiter | None = None) -> Any:
        """Expire, enqueue ``new``, start whoever gets a connector now; one transaction.

        Returns the participant's rejection (with alternatives) when ``new`` does not queue
        and got no connector, else None.
        """
        svc, host = self.svc, self.svc.host
        specs = list(svc.world.connectors[station_id])
        patience = svc.world.scenario.charging.max_wait_min
        started: list[_Waiter] = []
        left: list[_Waiter] = []
        out: dict[str, Any] = {"rejected": None, "queue_len": 0, "enqueued": False}

        def op(now: float) -> tuple[None, list]:
            p = host.participant
            q = self._queues.setdefault(station_id, [])
            for w in expired([(w, w.deadline_min) for w in q], now):
                q.remove(w)
                w.status, w.wait_min = "ABANDONED", w.deadline_min - w.arrive_t_min
                left.append(w)
            if new is not None:  # (its patience counts from its arrival at the station; one
                # spent already leaves now, unless a connector is free: the simulation's rule)
                came = new.body.arrived_t_min
                new.arrive_t_min = now if came is None else min(came, now)
                wait = new.body.max_wait_min
                new.deadline_min = max(new.arrive_t_min + (patience if wait is None else wait),
                                       now)
                q.append(new)
            if not q:
                return None, []
            free = {k: c for k, c in enumerate(specs)
                    if not any(b.charging for b in p.active_bookings(c.connector_id))}
            sized: dict[tuple[int, int], tuple[float, float]] = {}
            retry = [math.inf]  # the first time a reservation in the way stops blocking

            def fits(w: _Waiter, k: int, spec: Any) -> bool:
                if w.body.connector_id is not None and w.body.connector_id != spec.connector_id:
                    return False
                power, minutes = self._charge_min(w.body, spec)
                end = now + max(minutes, _MIN_WALKIN_MIN)
                until = p.blocked_until(spec.connector_id, now, end)
                if until is not None:  # a reservation (or hold) in the way until then
                    retry[0] = min(retry[0], until)
                    return False
                sized[(id(w), k)] = (power, end)
                return True

            for w, k in assign_walkins(list(q), free, fits):
                spec = specs[k]
                power, end = sized[(id(w), k)]
                bid = f"{w.vehicle_id}.{secrets.token_hex(8)}"
                reply = p.book(bid, station_id, now, end, now, connector_id=spec.connector_id,
                               grace_min=WALKIN_GRACE_MIN)
                if reply.state != BookingState.RESERVED.value:
                    log.warning("walk-in %s: booking %s refused: %s", w.session_id,
                                spec.connector_id, reply.reason)
                    continue
                v = p.start_charging(bid, now)
                if not v.charging:
                    p.cancel(bid, now, "walk_in_failed")
                    continue
                q.remove(w)
                w.status, w.wait_min = "ACTIVE", now - w.arrive_t_min
                w.connector_id, w.booking_id, w.power_kw = spec.connector_id, bid, power
                started.append(w)
            if new is not None and not new.queue and new.status == "QUEUED":
                q.remove(new)  # no queueing wanted: answer 409 (and trace nothing)
                out["rejected"] = p.book(f"{new.vehicle_id}.{secrets.token_hex(8)}", station_id,
                                         now, now + 5.0, now, connector_id=new.body.connector_id,
                                         grace_min=5.0)
                if out["rejected"].state == BookingState.RESERVED.value:
                    p.cancel(out["rejected"].booking_id, now, "walk_in_failed")
            out["queue_len"] = len(q)
            # no event announces that a reservation stopped blocking: look again then
            self._retry_at[station_id] = retry[0] if q else math.inf
            # decided here, under the lock: the queue thread may move ``new`` on before this
            # step's extra runs on the commit leader
            out["enqueued"] = new is not None and new.queue and new.status == "QUEUED"
            return None, []

        def extra(conn: Any, _v: None, fx: Any) -> None:
            rows: list[dict[str, Any]] = []
            q_len = out["queue_len"]
            if out["enqueued"]:
                assert new is not None
                Storage.add_queued(conn, {
                    "session_id": new.session_id, "vehicle_id": new.vehicle_id,
                    "station_id": station_id, "arrive_t_min": new.arrive_t_min,
                    "deadline_min": new.deadline_min,
                    "request": new.body.model_dump(mode="json")})
            for w in left:
                Storage.update_queued(conn, w.session_id, status="ABANDONED",
                                      wait_min=w.wait_min)
                rows.append({**self._base(w), "t_min": w.deadline_min, "kind": "abandon",
                             "wait_min": w.wait_min, "queue_len": q_len})
            if new is not None and (new.queue or new.status == "ACTIVE"):
                rows.append({**self._base(new), "t_min": new.arrive_t_min, "kind": "arrive",
                             "queue_len": q_len + len(started)})
            for w in started:
                self._add_session(conn, w.session_id, w.vehicle_id, w.body,
                                  w.connector_id or "", w.booking_id or "", True, fx.now,
                                  w.power_kw)
                if w is not new:  # it was queued: its entry is served now
                    Storage.update_queued(conn, w.session_id, status="ACTIVE",
                                          wait_min=w.wait_min)
                rows.append({**self._base(w), "t_min": fx.now, "kind": "session_start",
                             "connector_id": w.connector_id, "wait_min": w.wait_min,
                             "power_kw": w.power_kw, "queue_len": q_len})
            if rows:
                Storage.add_trace(conn, rows)

        host.execute(op, extra=extra)
        for w in started:
            self._waiters.pop(w.session_id, None)
            row = svc.storage.session(w.session_id)
            if row is not None:
                self._command_start(row, w.body)
        for w in left:
            svc.notify(w.vehicle_id, "queue_abandoned", session_id=w.session_id,
                       station_id=station_id, wait_min=w.wait_min, t_min=w.deadline_min)
        if new is not None and new.status == "QUEUED" and new.queue:
            self._waiters[new.session_id] = new
        for w in left:
            self._waiters[w.session_id] = w
        if left or started or (new is not None and new.queue):
            svc.publish(topics.cmd_topic(svc.company, station_id), {
                "cmd": topics.CMD_QUEUE, "queued": out["queue_len"], "t_min": svc.now()})
        return out["rejected"]

    def _base(self, w: _Waiter) -> dict[str, Any]:
        return {"vehicle_id": w.vehicle_id, "station_id": w.body.station_id,
                "company_id": self.svc.company, "session_id": w.session_id, "soc": w.body.soc}

    def _queued_public(self, w: _Waiter) -> m.SessionPublic:
        pos = None
        assert w.body.target_soc is not None  # (start_or_queue filled in the default)
        if w.status == "QUEUED":
            with self.svc.host.lock:
                q = self._queues.get(w.body.station_id, [])
                pos = q.index(w) + 1 if w in q else None
        return m.SessionPublic(
            session_id=w.session_id, vehicle_id=w.vehicle_id, station_id=w.body.station_id,
            company_id=self.svc.company, connector_id=None, booking_id=None, status=w.status,
            start_t_min=None, arrive_t_min=w.arrive_t_min, wait_min=w.wait_min,
            queue_position=pos, end_t_min=None, soc_start=w.body.soc, soc_end=None,
            target_soc=w.body.target_soc, power_kw=None, energy_kwh=None, charge_min=None,
            parking_min=None, energy_source=None, price=None,
        )

    def leave_queue(self, session_id: str) -> m.SessionPublic:
        """The vehicle gives up waiting (``POST /sessions/{id}/stop`` while QUEUED)."""
        svc = self.svc
        w = self._waiter(session_id)
        if w is None:
            raise ApiError(404, f"unknown session {session_id!r}", "not_found")
        gone: list[_Waiter] = []

        def op(now: float) -> tuple[None, list]:
            q = self._queues.get(w.body.station_id, [])
            if w in q:
                q.remove(w)
                w.status, w.wait_min = "ABANDONED", now - w.arrive_t_min
                w.deadline_min = now
                gone.append(w)
            return None, []

        def extra(conn: Any, _v: None, fx: Any) -> None:
            if gone:
                Storage.update_queued(conn, w.session_id, status="ABANDONED",
                                      wait_min=w.wait_min)
                Storage.add_trace(conn, [{**self._base(w), "t_min": fx.now, "kind": "abandon",
                                          "wait_min": w.wait_min, "detail": "left"}])

        svc.host.execute(op, extra=extra)
        if gone:
            self._run_queue(w.body.station_id)  # the next in line may fit now
        return self._queued_public(w)

    _FREEING = frozenset({"ABORT", "LEASE_EXPIRE", "WOUND", "CANCEL", "NO_SHOW_EXPIRE"})

    def _after_protocol(self, fx: Any) -> None:
        """Host hook: a hold or reservation went away (not a session stop, :meth:`stop`
        dispatches that itself): look at that station's queue again."""
        if not any(self._queues.values()):
            return
        ids = [r.booking_id for r in fx.participant_records
               if isinstance(r, BookingChanged) and r.event in self._FREEING]
        if not ids:
            return
        with self.svc.host.lock:
            p = self.svc.host.participant
            stations = {v.station_id for v in map(p.booking, ids) if v is not None}
            self._dirty.update(s for s in stations if self._queues.get(s))
        if self._dirty:
            self._wake.set()

    def _ensure_thread(self) -> None:
        with self.svc.host.lock:
            if self._thread is not None or self._stop_ev.is_set():
                return
            self._thread = threading.Thread(target=self._queue_loop, daemon=True,
                                            name=f"walkin-queue-{self.svc.company}")
            self._thread.start()

    def _queue_loop(self) -> None:
        """Leave queues at each waiter's patience deadline; re-dispatch stations whose
        reservations changed, or whose blocking reservation window has just ended (no event
        announces that: the simulation's stations look again at that time too), and every
        few scenario minutes any queue."""
        svc = self.svc
        tick = max(svc.settings.tick_s, 0.02)
        scale = svc.settings.time_scale
        sweep_at = svc.now() + SWEEP_MIN
        while not self._stop_ev.is_set():
            with svc.host.lock:
                due = min(min((w.deadline_min for q in self._queues.values() for w in q),
                              default=math.inf),
                          min(self._retry_at.values(), default=math.inf))
            delay = min(max((due - svc.now()) * 60.0 / scale, 0.0), tick)
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop_ev.is_set():
                return
            now = svc.now()
            sweep = now >= sweep_at
            if sweep:
                sweep_at = now + SWEEP_MIN
            with svc.host.lock:
                dirty, self._dirty = self._dirty, set()
                todo = [sid for sid, q in self._queues.items() if q and (
                    sweep or sid in dirty or self._retry_at.get(sid, math.inf) <= now
                    or any(w.deadline_min <= now for w in q))]
            for sid in todo:
                try:
                    self._run_queue(sid)
                except Exception:
                    log.exception("walk-in queue at %s failed", sid)

    def close(self) -> None:
        """Stop the queue thread (the queues stay stored: a restart resumes them)."""
        self._stop_ev.set()
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)

    # ------------------------------------------------------------------ stop

    def own_session(self, vehicle_id: str, session_id: str) -> dict[str, Any]:
        row = self.svc.storage.session(session_id)
        if row is None or row["vehicle_id"] != vehicle_id:
            raise ApiError(404, f"unknown session {session_id!r}", "not_found")
        return row

    def own_public(self, vehicle_id: str, session_id: str) -> m.SessionPublic:
        """The caller's session: queued / abandoned walk-ins too (404 unless the caller's)."""
        w = self._waiter(session_id)
        if w is not None and w.vehicle_id == vehicle_id and w.status != "ACTIVE":
            return self._queued_public(w)
        return session_public(self.own_session(vehicle_id, session_id))

    def stop_or_leave(self, vehicle_id: str, session_id: str,
                      energy_kwh: float | None = None) -> m.SessionPublic:
        """Stop the caller's session, or leave the queue if it is still waiting."""
        w = self._waiter(session_id)
        if w is not None and w.vehicle_id == vehicle_id and w.status != "ACTIVE":
            return self.leave_queue(session_id)
        self.own_session(vehicle_id, session_id)  # 404 unless the caller's
        return self.stop(session_id, energy_kwh)

    def stop(self, session_id: str, energy_kwh: float | None = None,
             end_t_min: float | None = None) -> m.SessionPublic:
        """End a session (idempotent: a completed session is returned as stored)."""
        svc, host = self.svc, self.svc.host
        ch = svc.world.scenario.charging
        done: list[dict[str, Any]] = []
        queue_len: list[int] = []  # the station's walk-in line (under the lock, in op)

        def op(now: float) -> tuple[dict[str, Any] | None, list]:
            row = svc.storage.session(session_id)
            if row is None or row["status"] != "ACTIVE":
                return None, []
            try:
                host.participant.stop_charging(row["booking_id"], now)
            except ProtocolError as exc:  # the booking has no session any more
                log.warning("session %s: %s", session_id, exc)
            queue_len.append(len(self._queues.get(row["station_id"], ())))
            return row, []

        def extra(conn: Any, row: dict[str, Any] | None, fx: Any) -> None:
            if row is None:
                return
            end = fx.now if end_t_min is None else min(max(end_t_min, row["start_t_min"]), fx.now)
            metered = energy_kwh if energy_kwh is not None else row["metered_kwh"]
            cdr = session_cdr(
                svc.world.tariffs[row["station_id"]], start_t_min=row["start_t_min"],
                end_t_min=end, soc_start=row["soc_start"], target_soc=row["target_soc"],
                battery_kwh=row["battery_kwh"], power_kw=row["power_kw"],
                taper_soc=ch.taper_soc, efficiency=ch.efficiency, metered_kwh=metered,
            )
            p = cdr.price
            Storage.update_session(
                conn, session_id, status="COMPLETED", end_t_min=end,
                energy_kwh=cdr.energy_kwh, soc_end=cdr.soc_end, charge_min=cdr.charge_min,
                parking_min=cdr.parking_min, energy_source=cdr.energy_source,
                price_energy=p.energy, price_time=p.time, price_parking=p.parking,
                price_flat=p.flat, price_total=p.total,
            )
            Storage.add_trace(conn, [{
                "t_min": end, "kind": "session_end", "vehicle_id": row["vehicle_id"],
                "station_id": row["station_id"], "company_id": svc.company,
                "connector_id": row["connector_id"], "session_id": session_id,
                "soc": cdr.soc_end, "energy_kwh": cdr.energy_kwh,
                "price": p.total, "power_kw": row["power_kw"], "queue_len": queue_len[0],
            }])
            done.append(row)

        host.execute(op, extra=extra)
        row = svc.storage.session(session_id)
        if row is None:
            raise ApiError(404, f"unknown session {session_id!r}", "not_found")
        if done:
            svc.publish(topics.cmd_topic(svc.company, row["station_id"]), {
                "cmd": topics.CMD_STOP, "session_id": session_id,
                "connector_id": row["connector_id"], "t_min": row["end_t_min"],
            })
            if self._queues.get(row["station_id"]):  # the connector is free: next in line
                self._run_queue(row["station_id"])
            svc.notify(row["vehicle_id"], "charging_finished", session_id=session_id,
                       station_id=row["station_id"], energy_kwh=row["energy_kwh"],
                       price=row["price_total"], currency=row["currency"],
                       t_min=row["end_t_min"])
        return session_public(row)

    def history(self, vehicle_id: str) -> list[m.SessionPublic]:
        return [session_public(r) for r in self.svc.storage.sessions_where(vehicle_id=vehicle_id)]


__all__ = ["SessionManager", "owner_of", "session_public"]
