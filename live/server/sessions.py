"""Charging sessions at this company's stations: start, stop, pricing (OCPI CDR-like).

A session always runs against a booking of this company's Participant: either the vehicle's
reservation (``booking_id``), or a *walk-in* booking made on the spot for the window
``[now, now + estimated charge time)`` on a free connector (the Participant picks it, so
walk-ins and reservations can never overlap).  ``start_charging`` / ``stop_charging`` are the
protocol's; this module stores the session, commands the station over the bus
(``evsim/{company}/stations/{station}/cmd``) and prices the result.

Pricing (:func:`price`): the session charged from ``soc_start`` towards ``target_soc`` along
the :class:`evsim.battery.ChargeCurve` (connector power capped by the vehicle), then stayed
plugged (PARKING_TIME).  Energy is the station's metered energy when it reported one
(``meter`` / ``session_finished`` events, or the caller's ``energy_kwh``), else the curve's;
:func:`evsim.tariff.price_session` splits it over tariff windows.  With a meter reading the
curve's shape is kept and scaled to the metered total.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import TYPE_CHECKING, Any

from evsim.battery import ChargeCurve, session_power_kw
from evsim.protocol import BookingState, ProtocolError
from evsim.scenario import TariffConfig
from evsim.tariff import price_session
from live import topics
from live.bus import BadPayload, decode_json
from live.server import models as m
from live.server.service import ApiError, owner_of
from live.storage import Storage

if TYPE_CHECKING:
    from live.server.service import CompanyService

log = logging.getLogger(__name__)


def price(
    tariff: TariffConfig | None,
    *,
    start_t_min: float,
    end_t_min: float,
    soc_start: float,
    target_soc: float,
    battery_kwh: float,
    power_kw: float,
    taper_soc: float,
    efficiency: float,
    metered_kwh: float | None = None,
) -> dict[str, Any]:
    """Energy, SoC, charge/parking minutes and the OCPI price breakdown of a session."""
    curve = ChargeCurve(battery_kwh, power_kw, taper_soc, efficiency)
    elapsed = max(end_t_min - start_t_min, 0.0)
    charge_min = min(elapsed, curve.minutes_to(soc_start, target_soc))
    parking_min = elapsed - charge_min

    def model_kwh(e: float) -> float:
        return curve.energy_kwh(soc_start, curve.soc_after(soc_start, e))

    energy = model_kwh(charge_min)
    energy_at = model_kwh
    source = "model"
    if metered_kwh is not None:
        source = "meter"
        scale = metered_kwh / energy if energy > 0 else 0.0

        def energy_at(e: float) -> float:
            return model_kwh(e) * scale

        energy = metered_kwh
    soc_end = min(soc_start + energy * efficiency / battery_kwh, 1.0)
    p = price_session(tariff, start_t_min, charge_min, energy_at, power_kw, parking_min)
    return {
        "energy_kwh": energy,
        "soc_end": soc_end,
        "charge_min": charge_min,
        "parking_min": parking_min,
        "energy_source": source,
        "price_energy": p.energy,
        "price_time": p.time,
        "price_parking": p.parking,
        "price_flat": p.flat,
        "price_total": p.total,
    }


def session_public(row: dict[str, Any]) -> m.SessionPublic:
    done = row["status"] == "COMPLETED"
    return m.SessionPublic(
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


_EVENT_NUMBERS = (("energy_kwh", 0.0, 1000.0), ("soc", 0.0, 1.0), ("t_min", 0.0, 1e7),
                  ("power_kw", 0.0, 2000.0))
_EVENTS = (topics.EV_SESSION_STARTED, topics.EV_SESSION_FINISHED, topics.EV_FAULT)


class SessionManager:
    def __init__(self, svc: CompanyService) -> None:
        self.svc = svc

    # ------------------------------------------------------------------ start

    def start(self, vehicle_id: str, body: m.SessionCreate) -> m.SessionPublic:
        svc, host = self.svc, self.svc.host
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
        if body.booking_id is not None:
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
        walk_in = body.booking_id is None
        bid = body.booking_id or f"{vehicle_id}.{secrets.token_hex(8)}"
        ch = svc.world.scenario.charging

        def op(now: float) -> tuple[tuple[str, Any], list]:
            p = host.participant
            if not walk_in and svc.storage.sessions_where(booking_id=bid, status="ACTIVE"):
                return ("active", None), []
            if walk_in:
                slow = min(c.power_kw for c in svc.world.connectors[body.station_id]
                           if body.connector_id is None or c.connector_id == body.connector_id)
                est = ChargeCurve(body.battery_kwh, slow, ch.taper_soc, ch.efficiency).minutes_to(
                    body.soc, body.target_soc)
                reply = p.book(bid, body.station_id, now, now + max(est, 5.0), now,
                               connector_id=body.connector_id, grace_min=5.0)
                if reply.state != BookingState.RESERVED.value:
                    return ("rejected", reply), []
            v = p.start_charging(bid, now)
            if not v.charging:
                if walk_in:
                    p.cancel(bid, now, "walk_in_failed")
                return ("refused", v), []
            return ("ok", v), []

        def extra(conn: Any, value: tuple[str, Any], fx: Any) -> None:
            kind, v = value
            if kind != "ok":
                return
            conn_spec = svc.world.connector_index[v.connector_id]
            power = session_power_kw(conn_spec.power_kw, conn_spec.type, body.max_dc_kw,
                                     body.max_ac_kw)
            tariff = svc.world.tariffs[body.station_id]
            Storage.add_session(conn, {
                "session_id": session_id, "vehicle_id": vehicle_id,
                "station_id": body.station_id, "company_id": svc.company,
                "connector_id": v.connector_id, "booking_id": bid, "walk_in": int(walk_in),
                "status": "ACTIVE", "start_t_min": fx.now, "soc_start": body.soc,
                "target_soc": body.target_soc, "battery_kwh": body.battery_kwh,
                "power_kw": power, "currency": tariff.currency if tariff else "BRL",
            })
            base = {"vehicle_id": vehicle_id, "station_id": body.station_id,
                    "company_id": svc.company, "session_id": session_id, "soc": body.soc,
                    "booking_id": bid if not walk_in else None}
            Storage.add_trace(conn, [
                {"t_min": fx.now, "kind": "arrive", **base},
                {"t_min": fx.now, "kind": "session_start", **base,
                 "connector_id": v.connector_id, "wait_min": 0.0, "power_kw": power},
            ])

        kind, v = host.execute(op, extra=extra)
        if kind == "active":
            raise ApiError(409, f"a session already runs on booking {bid!r}", "already_charging")
        if kind == "rejected":
            raise ApiError(409, f"no free connector at {body.station_id!r} now", "no_connector",
                           alternatives=[{"connector_id": a.connector_id, "start_min": a.start_min,
                                          "end_min": a.end_min} for a in v.alternatives])
        if kind == "refused":
            raise ApiError(409, f"cannot start charging on booking {bid!r}: {v.reason}",
                           v.reason or "refused")
        row = svc.storage.session(session_id)
        assert row is not None
        svc.publish(topics.cmd_topic(svc.company, body.station_id), {
            "cmd": topics.CMD_START, "session_id": session_id, "connector_id": v.connector_id,
            "vehicle_id": vehicle_id, "soc": body.soc, "battery_kwh": body.battery_kwh,
            "target_soc": body.target_soc, "max_dc_kw": body.max_dc_kw,
            "max_ac_kw": body.max_ac_kw, "t_min": row["start_t_min"],
        })
        svc.notify(vehicle_id, "charging_started", session_id=session_id,
                   station_id=body.station_id, connector_id=v.connector_id,
                   t_min=row["start_t_min"])
        return session_public(row)

    # ------------------------------------------------------------------ stop

    def own_session(self, vehicle_id: str, session_id: str) -> dict[str, Any]:
        row = self.svc.storage.session(session_id)
        if row is None or row["vehicle_id"] != vehicle_id:
            raise ApiError(404, f"unknown session {session_id!r}", "not_found")
        return row

    def stop(self, session_id: str, energy_kwh: float | None = None,
             end_t_min: float | None = None) -> m.SessionPublic:
        """End a session (idempotent: a completed session is returned as stored)."""
        svc, host = self.svc, self.svc.host
        ch = svc.world.scenario.charging
        done: list[dict[str, Any]] = []

        def op(now: float) -> tuple[dict[str, Any] | None, list]:
            row = svc.storage.session(session_id)
            if row is None or row["status"] != "ACTIVE":
                return None, []
            try:
                host.participant.stop_charging(row["booking_id"], now)
            except ProtocolError as exc:  # the booking has no session any more
                log.warning("session %s: %s", session_id, exc)
            return row, []

        def extra(conn: Any, row: dict[str, Any] | None, fx: Any) -> None:
            if row is None:
                return
            end = fx.now if end_t_min is None else min(max(end_t_min, row["start_t_min"]), fx.now)
            metered = energy_kwh if energy_kwh is not None else row["metered_kwh"]
            res = price(
                svc.world.tariffs[row["station_id"]], start_t_min=row["start_t_min"],
                end_t_min=end, soc_start=row["soc_start"], target_soc=row["target_soc"],
                battery_kwh=row["battery_kwh"], power_kw=row["power_kw"],
                taper_soc=ch.taper_soc, efficiency=ch.efficiency, metered_kwh=metered,
            )
            Storage.update_session(conn, session_id, status="COMPLETED", end_t_min=end, **res)
            Storage.add_trace(conn, [{
                "t_min": end, "kind": "session_end", "vehicle_id": row["vehicle_id"],
                "station_id": row["station_id"], "company_id": svc.company,
                "connector_id": row["connector_id"], "session_id": session_id,
                "soc": res["soc_end"], "energy_kwh": res["energy_kwh"],
                "price": res["price_total"], "power_kw": row["power_kw"],
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
            svc.notify(row["vehicle_id"], "charging_finished", session_id=session_id,
                       station_id=row["station_id"], energy_kwh=row["energy_kwh"],
                       price=row["price_total"], currency=row["currency"],
                       t_min=row["end_t_min"])
        return session_public(row)

    def history(self, vehicle_id: str) -> list[m.SessionPublic]:
        return [session_public(r) for r in self.svc.storage.sessions_where(vehicle_id=vehicle_id)]

    # ------------------------------------------------------------------ station events

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
            self.stop(row["session_id"], None if e is None else float(e), t)
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


__all__ = ["SessionManager", "owner_of", "price", "session_public"]
