"""Vehicle agent: the scenario's vehicles as REST clients of the company servers.

One asyncio process drives the whole fleet (``python -m live vehicle-agent``). The trips are
exactly the simulation's (:func:`evsim.model.demand.generate_trips`, same world and seed,
vehicle ``v{k}`` for trip ``k``) and the driving follows the simulation's vehicle process
(:mod:`evsim.model.vehicle`): shortest route, drain per km, the same "do I need to charge
here" rule, the same target SoC. What differs is that every decision goes over HTTP:

1. at a city where charging is needed: ``POST /recommendations`` to the home server (any
   server sees the whole network through the replicated status);
2. book: ``POST /bookings`` with one stop (``booking="stop"``); ``booking="none"`` walks in;
   with ``booking="trip"`` the driver app of the simulation's ``trip`` mode
   (:mod:`evsim.model.booking`) runs over REST (:class:`live.trip_app.TripApp`): the home
   server plans the trip's stops (``POST /plans``: :func:`evsim.planning.plan_trip` with its
   policy and snapshot) and the app books them with the same pure rules (:mod:`evsim.planning`:
   rolling horizon, rebooking, keeping reservations across re-plans);
3. drive there on the scaled clock, ``POST /sessions`` at the station's company server
   (retrying while the station is full, abandoning after ``max_wait_min``);
4. wait for ``charging_finished`` on ``evsim/vehicles/{id}/notify`` (when an MQTT URL is
   given), or for the CC-CV model's charge time, then ``POST /sessions/{id}/stop``;
5. at the end, ``GET /vehicles/{id}/sessions`` on every company to read the history.

Trace rows (evsim.trace schema) for what only the vehicle sees -- ``trip_start``,
``station_chosen``, ``no_station``, ``arrive``, ``abandon``, ``trip_end``, ``stranded`` -- go
to a JSON-lines part file (flushed per row, so a killed agent keeps what it wrote); the company
servers record sessions and bookings, and the launcher merges all parts into one trace.
Every POST carries an ``Idempotency-Key`` so retries after a server restart are safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from evsim.battery import ChargeCurve, session_soc_out
from evsim.booking_app import booking_window, home_company
from evsim.model.demand import generate_trips
from evsim.model.world import World
from evsim.planning import (
    PlannedStop,
    VehicleParams,
    avoid_after,
    back_to_city,
    charge_request,
    charge_target,
    class_connectors,
    dry_on_the_way,
    fallback_requests,
    route_legs,
    stop_at,
    to_station,
    walk_rules,
)
from evsim.protocol import START_LATER_REASONS
from evsim.scenario import Scenario
from evsim.snapshot import ChargeRequest
from evsim.trace import Kind
from live.station_agent import ScaledClock

if TYPE_CHECKING:
    from live.trip_app import TripApp

__all__ = ["ApiError", "Fleet", "TraceSink", "main"]

log = logging.getLogger(__name__)


class ApiError(RuntimeError):
    """A non-success HTTP answer (``status`` 0: the server could not be reached)."""

    def __init__(self, status: int, detail: Any, url: str = "", reason: str | None = None):
        super().__init__(f"{url}: HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.reason = reason


class TraceSink:
    """Trace rows as JSON lines (one ``{"t_min", "kind", ...}`` object per line)."""

    def __init__(self, path: str | Path | None) -> None:
        self.rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._fh = None
        if path is not None:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            self._fh = p.open("a", encoding="utf-8")

    def emit(self, t_min: float, kind: str, **cols: Any) -> None:
        row = {"t_min": float(t_min), "kind": str(kind)}
        row.update({k: v for k, v in cols.items() if v is not None})
        with self._lock:
            self.rows.append(row)
            if self._fh is not None:
                self._fh.write(json.dumps(row) + "\n")
                self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class Server:
    """One company server's REST API (async httpx), retrying through restarts."""

    def __init__(self, company: str, base_url: str, retry_s: float = 20.0) -> None:
        self.company = company
        self.base_url = base_url.rstrip("/")
        self.retry_s = retry_s
        self.client = httpx.AsyncClient(
            base_url=self.base_url, timeout=30.0,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )

    async def call(
        self, method: str, path: str, *, token: str | None = None, json_body: Any = None,
        ok: tuple[int, ...] = (200, 201), idempotent: bool = True,
    ) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if method in ("POST", "DELETE"):
            headers["Idempotency-Key"] = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_s
        delay = 0.05
        while True:
            try:
                r = await self.client.request(method, path, json=json_body, headers=headers)
            except httpx.TransportError as exc:  # server down or restarting: same key again
                if loop.time() > deadline:
                    raise ApiError(0, str(exc), self.base_url + path) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if r.status_code in ok:
                return r.json() if r.content else None
            if r.status_code in (502, 503) and loop.time() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            try:
                body = r.json()
                detail, reason = body.get("detail"), body.get("reason")
            except (ValueError, AttributeError):
                detail, reason = r.text, None
            raise ApiError(r.status_code, detail, self.base_url + path, reason)

    async def close(self) -> None:
        await self.client.aclose()


@dataclass
class VehicleRun:
    vid: str
    home: str
    tokens: dict[str, str] = field(default_factory=dict)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    outcome: str = ""
    gave_up: tuple[str, ...] = ()  # stations left without charging (evsim.planning.avoid_after)


class Fleet:
    """Drives every trip of ``scenario`` against ``servers`` (company id -> base URL)."""

    def __init__(
        self,
        scenario: Scenario,
        servers: Mapping[str, str],
        clock: ScaledClock,
        *,
        trace: TraceSink | None = None,
        mqtt_url: str | None = None,
        booking: str = "stop",
        seed: int | None = None,
        trips_scale: float = 1.0,
        max_trips: int | None = None,
        trip_ids: list[int] | None = None,
        poll_s: float = 0.5,
        mqtt_user: str | None = None,
        mqtt_password: str | None = None,
    ) -> None:
        if booking not in ("stop", "trip", "none"):
            raise ValueError("booking must be 'stop', 'trip' or 'none'")
        self.scenario = scenario
        self.world = World.build(scenario)
        self.clock = clock
        self.trace = trace or TraceSink(None)
        self.booking = booking
        self.seed = scenario.seed if seed is None else seed
        self.trips = generate_trips(self.world, self.seed, trips_scale)
        ids = list(range(len(self.trips))) if trip_ids is None else list(trip_ids)
        self.trip_ids = ids[:max_trips] if max_trips is not None else ids
        self.server_urls = dict(servers)
        self.companies = [c.id for c in scenario.companies if c.id in self.server_urls]
        if not self.companies:
            raise ValueError("no company server URL given")
        self.poll_s = poll_s
        self.mqtt_url = mqtt_url
        self._mqtt_auth = (mqtt_user, mqtt_password)
        self._waiters: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.servers: dict[str, Server] = {}
        self.runs: dict[str, VehicleRun] = {}
        self.errors: list[str] = []
        self.lag_s: list[float] = []
        st = self.world.stations
        self._station = {sid: i for i, sid in enumerate(st.ids)}

    # -- notifications ---------------------------------------------------------------------

    NOTIFY_EVENTS = ("charging_started", "charging_finished", "queue_abandoned")

    def _on_notify(self, topic: str, payload: bytes) -> None:
        from live.bus import decode_json

        msg = decode_json(payload)
        event = msg.get("event")
        if event in self.NOTIFY_EVENTS and self._loop is not None:
            sid = str(msg.get("session_id"))
            self._loop.call_soon_threadsafe(self._wake, sid, str(event))

    def _wake(self, session_id: str, event: str = "charging_finished") -> None:
        self._event(session_id, event).set()

    def _event(self, session_id: str, event: str) -> asyncio.Event:
        return self._waiters.setdefault(f"{event}:{session_id}", asyncio.Event())

    def _forget(self, session_id: str, *events: str) -> None:
        for event in events or ("charging_finished",):
            self._waiters.pop(f"{event}:{session_id}", None)

    # -- helpers ---------------------------------------------------------------------------

    async def sleep_until(self, t_min: float) -> None:
        due = self.clock.wall_at(t_min)
        delay = due - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        self.lag_s.append(max(time.time() - due, 0.0))  # how late the agent woke up

    def lag_summary(self) -> dict[str, float]:
        """How far behind the scaled clock the agent woke up (wall s and scenario min)."""
        lag = sorted(self.lag_s) or [0.0]
        pick = {"mean": sum(lag) / len(lag), "p50": lag[len(lag) // 2],
                "p99": lag[min(int(len(lag) * 0.99), len(lag) - 1)], "max": lag[-1]}
        out: dict[str, float] = {"n": float(len(self.lag_s))}
        for k, v in pick.items():
            out[f"{k}_s"] = v
            out[f"{k}_min"] = v * self.clock.time_scale / 60.0
        return out

    async def sleep_min(self, minutes: float) -> None:
        if minutes > 0:
            await asyncio.sleep(self.clock.wall_s(minutes))

    async def _token(self, run: VehicleRun, company: str) -> str:
        """Register the vehicle with ``company`` (roaming: same vehicle id) on first use."""
        if company not in run.tokens:
            body: dict[str, Any] = {"vehicle_id": run.vid, "home_company": run.home}
            reg = await self.servers[company].call("POST", "/vehicles", json_body=body)
            run.tokens[company] = reg["token"]
        return run.tokens[company]

    # -- the trip --------------------------------------------------------------------------

    async def trip(self, k: int) -> VehicleRun:
        """Drive trip ``k`` with the simulation's rules (:mod:`evsim.planning`: the same
        :func:`~evsim.planning.route_legs` and :func:`~evsim.planning.walk_rules`,
        :func:`~evsim.planning.charge_request`, :func:`~evsim.planning.charge_target`; the
        station is the home server's recommendation, with :func:`~evsim.planning.
        choose_station`'s reserve fallback). ``t`` is the trip's own scenario-time cursor:
        every stretch ends at an absolute time (no drift from HTTP latency piling up), as
        one SimPy timeout per stretch does in the model."""
        trips, roads, world = self.trips, self.world.roads, self.world
        ch = self.scenario.charging
        vm = world.vehicle_models[int(trips.model[k])]
        battery = vm.battery_kwh
        per_km = vm.consumption_kwh_per_km * float(trips.drain[k]) / battery
        vid = f"v{k}"
        params = VehicleParams(vid, battery, per_km, vm.max_charge_kw, vm.max_ac_kw)
        run = VehicleRun(vid, home_company(vid, self.companies))  # (as the simulation's)
        self.runs[vid] = run
        pos, dest = int(trips.origin[k]), int(trips.destination[k])
        t = float(trips.depart_t_min[k])
        await self.sleep_until(t)
        await self._token(run, run.home)
        soc, driven_km, n_sessions = float(trips.soc0[k]), 0.0, 0
        skip_at: set[int] = set()
        tr = self.trace
        tr.emit(t, Kind.TRIP_START, vehicle_id=vid, booking_id=vid, soc=soc,
                detail=f"{roads.node_ids[pos]}->{roads.node_ids[dest]}")

        app: TripApp | None = None
        if self.booking == "trip":
            from live.trip_app import TripApp  # imports this module: not at the top

            app = TripApp(self, run, params, dest, skip_at)
            if not await app.depart(pos, soc, t):
                app = None  # no stop planned: charge on arrival, as the simulation does

        while True:
            legs = route_legs(roads, pos, dest)  # the route on from here, as the sim's
            w = walk_rules(ch, legs, soc, per_km, skip_at)
            t += w.minutes
            await self.sleep_until(t)
            soc, driven_km, pos = w.soc, driven_km + w.km, legs.nodes[w.j]
            if w.stranded_km is not None or not w.stop_here:
                stranded = w.stranded_km is not None
                kind = Kind.STRANDED if stranded else Kind.TRIP_END
                tr.emit(t, kind, vehicle_id=vid, booking_id=vid, soc=soc,
                        distance_km=driven_km, detail=roads.node_ids[pos] if stranded else None)
                run.outcome = str(kind)
                break
            taken = app.take(pos) if app is not None else None
            stop, held = taken if taken is not None else (None, None)
            choice = None
            if stop is None:
                request = charge_request(roads, ch, params, pos, dest, soc)
                choice = await self._recommend(run, request, run.gave_up)
                skip_at.add(pos)
                if choice is None:
                    tr.emit(t, Kind.NO_STATION, vehicle_id=vid, soc=soc,
                            detail=roads.node_ids[pos])
                    continue
            skip_at.add(pos)
            if stop is not None:  # the plan's stop
                station_id, detour, why = stop.station_id, stop.detour_km, "trip"
                i = self._station[station_id]
                company = world.stations.company_ids[i]
            else:  # the recommendation
                assert choice is not None
                station_id, detour = choice["station_id"], float(choice["detour_km"])
                why = str(choice.get("policy", ""))
                i = self._station[station_id]
                company = choice["company_id"]
            st_node = int(world.stations.node[i])
            access = float(world.stations.access_km[i])
            go_km, go_min = to_station(roads, pos, st_node, access)
            tr.emit(t, Kind.STATION_CHOSEN, vehicle_id=vid, station_id=station_id,
                    company_id=company, soc=soc, distance_km=detour, detail=why)
            dry = dry_on_the_way(soc, per_km, go_km, go_min)
            if dry is not None:  # a stale or optimistic choice: run dry on the way
                t += dry[0]
                await self.sleep_until(t)
                tr.emit(t, Kind.STRANDED, vehicle_id=vid, booking_id=vid, soc=0.0,
                        distance_km=driven_km + dry[1], detail=station_id)
                run.outcome = "stranded"
                break
            target = charge_target(roads, ch, per_km, st_node, dest, access)
            booking_id = held.booking["booking_id"] if held is not None else None
            if booking_id is None and self.booking == "stop":
                planned = stop_at(roads, world.stations, world.connectors, ch, params, i,
                                  detour, pos, dest, soc, t)
                if planned is not None:  # (it is: dry_on_the_way said so above)
                    booking_id = await self._book_stop(run, planned)
            t += go_min
            await self.sleep_until(t)
            soc -= go_km * per_km
            driven_km += go_km
            pos = st_node
            n_sessions += 1
            soc, t, refused, charged = await self._charge(
                run, company, station_id, booking_id, soc, target, battery, vm,
                f"{vid}-{n_sessions}", t,
                float(held.booking["start_min"]) if held is not None else None)
            run.gave_up = avoid_after(run.gave_up, station_id, charged)
            if app is not None and held is not None and refused:
                app.unusable(held)  # the rest of that request's trip goes too (as the sim)
            if app is not None:  # leaving the station: plan the rest of the trip again
                await app.replan_from(i, soc, t)
            if access > 0:  # back from the station to its city (access road)
                back_min, soc = back_to_city(soc, per_km, access)
                t += back_min
                await self.sleep_until(t)
                driven_km += access
        if app is not None:  # cancel the reservations it did not use
            await app.finish()
        await self._read_history(run)
        return run

    async def _recommend(self, run: VehicleRun, request: ChargeRequest,
                         gave_up: Sequence[str] = ()) -> dict[str, Any] | None:
        """The home server's policy choice for ``request`` (:func:`evsim.planning.
        charge_request`), leaving out the stations the vehicle ``gave_up`` on; none: ask
        again dipping into the reserve, then with those stations back, exactly as
        :func:`evsim.planning.choose_station` does in the simulation."""
        roads = self.world.roads
        body = {
            "city": roads.node_ids[request.node], "destination": roads.node_ids[request.dest_node],
            "soc": request.soc, "battery_kwh": request.battery_kwh,
            "consumption_kwh_per_km": request.consumption_kwh_per_km,
            "max_dc_kw": request.max_dc_kw, "max_ac_kw": request.max_ac_kw,
            "reserve_soc": request.reserve_soc, "target_soc": request.target_soc, "limit": 1,
        }
        token = await self._token(run, run.home)
        index = self._station
        for attempt, leave_out in fallback_requests(request, [index[s] for s in gave_up]):
            body["reserve_soc"] = attempt.reserve_soc
            body["exclude"] = [s for s in gave_up if index[s] in leave_out]
            r = await self.servers[run.home].call("POST", "/recommendations", token=token,
                                                  json_body=body)
            if r.get("choices"):
                return dict(r["choices"][0], policy=r.get("policy", ""))
        return None

    async def _request_trip(self, run: VehicleRun,
                            stops: list[dict[str, Any]]) -> dict[str, Any] | None:
        """``POST /bookings`` at the home server; the trip once definitive (or still PENDING
        after 10 s), None if the request itself failed (unreachable, 4xx before a trip)."""
        token = await self._token(run, run.home)
        try:
            trip = await self.servers[run.home].call("POST", "/bookings", token=token,
                                                     json_body={"stops": stops},
                                                     ok=(200, 201, 202, 409))
            deadline = asyncio.get_running_loop().time() + 10.0
            while (trip.get("outcome") == "PENDING"
                   and asyncio.get_running_loop().time() < deadline):
                await asyncio.sleep(self.poll_s / 5)
                trip = await self.servers[run.home].call("GET", f"/bookings/{trip['trip_id']}",
                                                         token=token)
        except ApiError as exc:
            log.info("%s: booking failed: %s", run.vid, exc)
            return None
        return trip if "outcome" in trip else None  # a 409 before any trip (station offline)

    async def _book(self, run: VehicleRun, stops: list[dict[str, Any]]) -> dict[str, Any] | None:
        trip = await self._request_trip(run, stops)
        return trip if trip is not None and trip.get("outcome") == "BOOKED" else None

    async def _book_stop(self, run: VehicleRun, stop: PlannedStop) -> str | None:
        """Book one stop (the ``stop`` mode, as the simulation's :class:`evsim.model.
        stop_booking.StopBooking`): the window of the trip mode's stops, arrival to arrival
        + the charge + ``booking.slot_min`` (:func:`evsim.booking_app.booking_window`),
        NO_SHOW ``booking.grace_min`` after its start, on the connector class the charge is
        sized for."""
        bk = self.scenario.booking
        start, end = booking_window(stop, bk.slot_min)
        connectors = class_connectors(self.world.connectors[stop.station_index],
                                      stop.connector_power_kw, stop.connector_type)
        trip = await self._book(run, [{"station_id": stop.station_id, "start_min": start,
                                       "end_min": end, "grace_min": bk.grace_min,
                                       "connector_ids": list(connectors)}])
        if trip is None:
            return None
        return next((b["booking_id"] for b in trip.get("bookings", [])), None)

    async def _charge(self, run: VehicleRun, company: str, station_id: str,
                      booking_id: str | None, soc: float, target: float, battery: float,
                      vm: Any, local_sid: str, t_arrive: float,
                      booking_start: float | None = None) -> tuple[float, float, str, bool]:
        """Plug in (queueing at the station if it is full), charge, stop; returns the new
        SoC, the scenario time the vehicle leaves the connector (or the queue), when
        ``booking_id`` could not be used, why (else ""), and whether it charged (False: it
        left without, :func:`evsim.planning.avoid_after`).

        With a booking, as the simulation's ``visit_booked``: a vehicle early for its window
        (``booking_start``) waits for it at the station, and one whose connector is still
        busy keeps asking until ``charging.max_wait_min`` after it arrived (then it leaves);
        a booking that cannot be used (expired, canceled...), or a connector still busy when
        that patience is spent, sends it to the queue as a walk-in with the patience left
        since it arrived (``arrived_t_min``)."""
        ch, tr = self.scenario.charging, self.trace
        srv = self.servers[company]
        token = await self._token(run, company)
        target_soc = session_soc_out(soc, target)  # what the simulation charges to
        if target_soc <= soc:
            return soc, t_arrive, "", True
        body: dict[str, Any] = {
            "station_id": station_id, "soc": soc, "battery_kwh": battery,
            "target_soc": target_soc, "max_dc_kw": vm.max_charge_kw,
            "max_ac_kw": vm.max_ac_kw,
        }
        if booking_id:
            body.update(booking_id=booking_id, arrived_t_min=t_arrive)
            if booking_start is not None and booking_start > t_arrive:
                await self.sleep_until(booking_start)  # early: wait for the window
        else:
            body.update(queue=True, max_wait_min=ch.max_wait_min)
        session = None
        refused = ""  # why the booking could not be used
        while session is None:
            try:
                session = await srv.call("POST", "/sessions", token=token, json_body=body,
                                         ok=(200, 201, 202))
            except ApiError as exc:
                booked = "booking_id" in body
                waited = self.clock() - t_arrive
                if booked and exc.reason in START_LATER_REASONS and waited <= ch.max_wait_min:
                    # the window has not opened on the server's clock yet, or the previous
                    # session still holds the connector: ask again a scenario minute later
                    await self.sleep_until(self.clock() + 1.0)
                    continue
                if booked:  # the booking cannot be used here
                    refused = str(exc.reason or "refused")
                gone = exc.status not in (409, 423, 429) or exc.reason == "station_offline"
                if gone or (not booked and waited > ch.max_wait_min):
                    t = self.clock()
                    tr.emit(t_arrive, Kind.ARRIVE, vehicle_id=run.vid, station_id=station_id,
                            company_id=company, session_id=local_sid, soc=soc)
                    tr.emit(t, Kind.ABANDON, vehicle_id=run.vid, station_id=station_id,
                            company_id=company, session_id=local_sid, soc=soc,
                            wait_min=t - t_arrive, detail=str(exc.detail))
                    return soc, t, refused, False
                if not booked:  # a refused walk-in: ask again a scenario minute later
                    await self.sleep_until(self.clock() + 1.0)
                    continue
                # an unusable booking: queue as a walk-in instead, patient for what is left
                # since the arrival (the server counts it from arrived_t_min), as the
                # simulation's visit_booked does
                body.pop("booking_id", None)
                body.update(queue=True, max_wait_min=ch.max_wait_min, arrived_t_min=t_arrive)
        sid = session["session_id"]
        if session.get("status") == "QUEUED":
            session = await self._wait_queued(srv, token, session)
            if session.get("status") != "ACTIVE":  # left the queue after max_wait_min
                wait = session.get("wait_min")
                t_left = float(session.get("arrive_t_min") or t_arrive) + float(
                    wait if wait is not None else ch.max_wait_min)
                return soc, t_left, refused, False
        power = float(session.get("power_kw") or vm.max_charge_kw)
        start = float(session.get("start_t_min") or t_arrive)
        minutes = ChargeCurve(battery, power, ch.taper_soc, ch.efficiency).minutes_to(
            soc, target_soc)
        ev = self._event(sid, "charging_finished")
        wait_s = self.clock.wall_at(start + minutes) - time.time()
        # with notifications, wait a little past the model's end for the station's own report
        slack = min(2.0, self.clock.wall_s(2.0)) + 0.1 if self.mqtt_url else 0.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ev.wait(), timeout=max(wait_s, 0.0) + slack)
        self._forget(sid)
        done = await srv.call("POST", f"/sessions/{sid}/stop", token=token, json_body={})
        run.sessions.append(done)
        end = done.get("end_t_min")
        t_end = float(end) if end is not None else self.clock()
        soc_end = done.get("soc_end")
        if soc_end is None or not math.isfinite(float(soc_end)):
            soc_end = ChargeCurve(battery, power, ch.taper_soc, ch.efficiency).soc_after(
                soc, t_end - start)
        return float(soc_end), t_end, refused, True

    async def _wait_queued(self, srv: Server, token: str,
                           session: dict[str, Any]) -> dict[str, Any]:
        """Wait in the station's queue until the server starts the session (notification
        ``charging_started``) or drops it after the patience (``queue_abandoned``); polls
        ``GET /sessions/{id}`` as a fallback (and without a broker)."""
        sid = session["session_id"]
        started = self._event(sid, "charging_started")
        left = self._event(sid, "queue_abandoned")
        poll_s = max(self.poll_s, 0.05) if not self.mqtt_url else max(self.poll_s * 10, 2.0)
        try:
            while session.get("status") == "QUEUED":
                waits = [asyncio.ensure_future(started.wait()), asyncio.ensure_future(left.wait())]
                try:
                    await asyncio.wait(waits, timeout=poll_s,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for f in waits:
                        f.cancel()
                session = await srv.call("GET", f"/sessions/{sid}", token=token)
        finally:
            self._forget(sid, "charging_started", "queue_abandoned")
        return session

    async def _read_history(self, run: VehicleRun) -> None:
        for company, token in run.tokens.items():
            try:
                rows = await self.servers[company].call(
                    "GET", f"/vehicles/{run.vid}/sessions", token=token)
            except ApiError as exc:
                log.info("%s: history at %s: %s", run.vid, company, exc)
                continue
            run.history.extend(rows if isinstance(rows, list) else rows.get("sessions", []))

    # -- run -------------------------------------------------------------------------------

    async def _guarded(self, k: int) -> None:
        try:
            await self.trip(k)
        except Exception as exc:  # one vehicle's failure never stops the fleet
            log.exception("trip v%d failed", k)
            self.errors.append(f"v{k}: {exc}")

    async def _servers_up(self, timeout_s: float = 60.0) -> None:
        """Wait until every server answers ``/health`` (the agent may start with them: a
        launcher, or compose, which starts a service without waiting for the ones it needs
        to be healthy); say so if the clock has run since the run began by then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for s in self.servers.values():
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await s.client.get("/health", timeout=2.0)).status_code == 200:
                        break
                if loop.time() > deadline:
                    raise RuntimeError(f"server {s.company} ({s.base_url}) not healthy after "
                                       f"{timeout_s:g} s")
                await asyncio.sleep(0.05)
        now = self.clock.now()
        first = min((float(self.trips.depart_t_min[k]) for k in self.trip_ids), default=now)
        if first < now:
            log.warning("vehicle agent ready at t=%.2f min, after the first departure "
                        "(t=%.2f): its first trips run up to %.2f s late", now, first,
                        (now - first) * 60.0 / self.clock.time_scale)

    async def run(self, until_min: float | None = None) -> dict[str, VehicleRun]:
        """Drive every trip (stops at ``until_min`` scenario minutes if given)."""
        self._loop = asyncio.get_running_loop()
        self.servers = {c: Server(c, self.server_urls[c]) for c in self.companies}
        await self._servers_up()
        bus = None
        if self.mqtt_url:
            from live.mqtt import MqttBus

            bus = MqttBus(self.mqtt_url, username=self._mqtt_auth[0],
                          password=self._mqtt_auth[1], connect_timeout=10.0)
            bus.subscribe("evsim/vehicles/+/notify", self._on_notify)
        tasks = [asyncio.create_task(self._guarded(k)) for k in self.trip_ids]
        try:
            if until_min is None:
                await asyncio.gather(*tasks)
            else:
                timeout = max(self.clock.wall_at(until_min) - time.time(), 0.0)
                _, pending = await asyncio.wait(tasks, timeout=timeout)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for s in self.servers.values():
                await s.close()
            if bus is not None:
                bus.close()
            self.trace.close()
        return self.runs


def main(argv: list[str] | None = None) -> int:
    """``python -m live vehicle-agent``: drive the fleet against the servers, then exit."""
    import argparse
    import os

    from evsim.scenario import load_scenario
    from live.settings import Settings

    p = argparse.ArgumentParser(prog="live vehicle-agent")
    p.add_argument("--server", action="append", default=[], metavar="COMPANY=URL",
                   help="company server base URL (repeat; or EVSIM_SERVERS='a=url,b=url')")
    p.add_argument("--scenario")
    p.add_argument("--mqtt", help="broker URL for notifications (EVSIM_MQTT_URL)")
    p.add_argument("--time-scale", type=float)
    p.add_argument("--booking", choices=["stop", "trip", "none"], default="stop")
    p.add_argument("--trace", help="JSON-lines trace part (default EVSIM_TRACE_DIR/vehicles.jsonl)")
    p.add_argument("--max-trips", type=int)
    p.add_argument("--until-min", type=float)
    a = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("EVSIM_LOG", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    over = {k: v for k, v in {"scenario": a.scenario, "mqtt_url": a.mqtt,
                              "time_scale": a.time_scale}.items() if v is not None}
    s = Settings.from_env(**over)
    pairs = a.server or [x for x in os.environ.get("EVSIM_SERVERS", "").split(",") if x]
    servers = dict(x.split("=", 1) for x in pairs)
    sc = load_scenario(s.scenario)
    trace_path = a.trace or (Path(s.trace_dir) / "vehicles.jsonl" if s.trace_dir else None)
    fleet = Fleet(sc, servers, ScaledClock(s.time_scale, s.start_min, s.epoch),
                  trace=TraceSink(trace_path), mqtt_url=s.mqtt_url if a.mqtt or
                  os.environ.get("EVSIM_MQTT_URL") else None, booking=a.booking,
                  max_trips=a.max_trips, mqtt_user=s.mqtt_user, mqtt_password=s.mqtt_password)
    runs = asyncio.run(fleet.run(until_min=a.until_min if a.until_min else sc.duration_min))
    lag = fleet.lag_summary()
    log.info("vehicle agent: %d trips, %d errors; clock lag mean %.3f s (%.2f min), p99 %.3f s "
             "(%.2f min), max %.3f s", len(runs), len(fleet.errors), lag["mean_s"],
             lag["mean_min"], lag["p99_s"], lag["p99_min"], lag["max_s"])
    if trace_path is not None:
        Path(trace_path).with_name("vehicle_lag.json").write_text(json.dumps(lag, indent=2))
    return 0
