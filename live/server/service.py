"""The company server's application service: everything the REST routers call.

``CompanyService`` owns the static world, the storage, the protocol host, the replicated
status and the bus.  Routers stay thin: they validate input with pydantic, call one method
here and turn :class:`ApiError` into a 4xx with a reason.  Nothing here decides what a
policy or the protocol should decide: recommendations come from the configured policy over
a snapshot, every booking is a trip run by this company's :class:`~evsim.protocol.Coordinator`
(one stop or many; stops of other companies go over the bus), and connector availability
is the :class:`~evsim.protocol.Participant`'s.

Identity and ownership
----------------------
Vehicle ids are issued as ``{company}-{hex}``; a vehicle charging at another company
registers there too with the same ``vehicle_id`` (roaming registration, its own token).
Trip ids are ``{vehicle_id}.{hex}`` and booking ids ``{trip_id}/{stop}``, so every server
can tell the owner of a booking it holds without extra protocol fields; walk-in bookings
(made for a session without reservation) are ``{vehicle_id}.{hex}`` as well.  Another
vehicle's bookings and sessions answer 404, another vehicle's history 403.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.concurrency import run_in_threadpool

from evsim.policies import resolve
from evsim.policies.outage import alternatives_for
from evsim.protocol import (
    BookingEvent,
    BookingView,
    StopRequest,
    TripRequest,
    TripResult,
    before_log,
)
from evsim.protocol.tracing import BookingRows
from evsim.scenario import load_scenario
from evsim.snapshot import ChargeRequest
from live import topics
from live.bus import Bus, encode_json
from live.server import models as m
from live.server.node import ProtocolHost
from live.server.status import StatusReplica
from live.server.steps import Effects
from live.server.world import LiveWorld
from live.settings import Settings
from live.storage import Storage

log = logging.getLogger(__name__)

TRIP_EVENTS = {
    "BOOKED": "booking_confirmed",
    "REJECTED": "booking_rejected",
    "FAILED": "booking_failed",
    "CANCELED": "booking_cancelled",
}


class ApiError(Exception):
    """An error the API reports as ``status`` with ``detail`` (and a machine ``reason``)."""

    def __init__(self, status: int, detail: Any, reason: str | None = None, **extra: Any):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason
        self.extra = extra


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def owner_of(booking_or_trip_id: str) -> str:
    """The vehicle id encoded in a trip / booking id (``{vehicle}.{hex}[/{stop}]``)."""
    trip = booking_or_trip_id.split("/", 1)[0]
    return trip.rpartition(".")[0]


LOOP_LOCK_WAIT_S = 0.05  # the longest the event loop waits for the protocol host's lock


@dataclass
class _StartedTrip:
    """A trip this server started (or found started), between its request and its answer."""

    trip_id: str
    vehicle_id: str
    request_json: list[dict[str, Any]]
    epoch: int | None = None  # the host's epoch when its first step ran
    created: float | None = None  # when its row was committed (set by the commit leader)


class CompanyService:
    """One company's server state and operations (thread-safe)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        scenario = load_scenario(settings.scenario)
        companies = [c.id for c in scenario.companies]
        if settings.company not in companies:
            raise ValueError(f"company {settings.company!r} not in scenario ({companies})")
        self.company = settings.company
        self.world = LiveWorld.build(scenario)
        self.clock = clock or settings.wall_clock()
        self.storage = Storage(settings.database_url)
        self.host = ProtocolHost(
            self.company, self.world.protocol_stations(self.company), self.storage, self.clock,
            # the scenario's timers, as the simulated company servers use them
            coordinator_config=scenario.booking.coordinator_config(),
            participant_config={**scenario.booking.participant_config(),
                                "pools": self.world.protocol_pools(self.company)},
        )
        self.host.hooks.append(self._after_protocol)
        self.host.tracers.append(self._trace_rows)  # written in the step's own transaction
        self._booking_rows = BookingRows(self.company, owner_of)  # (as a simulated server's)
        self.status = StatusReplica(self.world)
        name = settings.policy or scenario.policy.name
        params = scenario.policy.params if name == scenario.policy.name else {}
        self.policy_name = name
        self.policy = resolve(name, params)
        self.bus: Bus | None = None
        from live.server.sessions import SessionManager

        self.sessions = SessionManager(self)
        from live.server.station_feed import StationFeed

        self.station_feed = StationFeed(self)
        from live.server.reconcile import Reconciler

        self.reconciler = Reconciler(self, settings.reconcile_s)
        from live.server.outages import StationOutages

        self.outages = StationOutages(self)  # own stations going offline and coming back
        self.status.listeners.append(self.outages.on_station_status)

    # ------------------------------------------------------------------ wiring

    def attach(self, bus: Bus) -> None:
        """Connect to the bus: protocol topics, replicated status, own station channels."""
        self.bus = bus
        self.host.attach(bus)
        bus.subscribe(topics.ALL_STATUS, self.status.on_status)
        self.status.start_watchdog(  # heartbeats: offline after 1.5 silent periods
            (lambda: bool(bus.connected)) if hasattr(bus, "connected") else None)
        bus.subscribe(topics.company_filter(self.company, "events"), self.station_feed.on_event)
        bus.subscribe(topics.company_filter(self.company, "meter"), self.station_feed.on_meter)
        self.outages.start()
        self.sessions.resume()  # walk-ins queued before a restart: expire / serve them

    def close(self) -> None:
        self.sessions.close()  # its queue thread runs steps on the host: stop it first
        self.outages.close()
        self.host.stop_ticker()
        self.status.close()
        self.host.close()
        self.storage.close()

    def now(self) -> float:
        return float(self.clock())

    def publish(self, topic: str, obj: dict[str, Any]) -> None:
        if self.bus is None:
            log.warning("no bus attached; %s not published", topic)
            return
        try:
            self.bus.publish(topic, encode_json(obj), qos=1)
        except Exception:
            log.exception("publishing to %s failed", topic)

    def notify(self, vehicle_id: str, event: str, **fields: Any) -> None:
        if not vehicle_id:
            return
        try:
            topic = topics.vehicle_notify_topic(vehicle_id)
        except ValueError:
            return
        self.publish(topic, {"event": event, "vehicle_id": vehicle_id, **fields})

    def trace(self, rows: list[dict[str, Any]]) -> None:
        try:
            with self.storage.begin() as conn:
                Storage.add_trace(conn, rows)
        except Exception:
            log.exception("writing trace rows failed")

    # ------------------------------------------------------------------ vehicles

    def register(self, body: m.VehicleCreate) -> m.VehicleRegistered:
        token = secrets.token_urlsafe(32)
        if body.vehicle_id is None:
            if body.home_company not in (None, self.company):
                raise ApiError(422, "a new vehicle's home company is this company", "bad_home")
            vid, home = f"{self.company}-{secrets.token_hex(6)}", self.company
        else:
            prefix = body.vehicle_id.rsplit("-", 1)[0]
            known = {c.id for c in self.world.scenario.companies}
            guess = prefix if prefix in known else self.company
            vid, home = body.vehicle_id, body.home_company or guess
        if not self.storage.add_vehicle(vid, hash_token(token), home, self.now()):
            raise ApiError(409, f"vehicle {vid!r} is already registered", "vehicle_exists")
        return m.VehicleRegistered(vehicle_id=vid, token=token, home_company=home)

    def authenticate(self, token: str) -> str | None:
        row = self.storage.vehicle_by_token_hash(hash_token(token))
        return None if row is None else str(row["vehicle_id"])

    def authenticate_cached(self, token: str) -> str | None:
        """The token's vehicle if the storage cache knows it (never touches the database);
        None means "ask :meth:`authenticate`"."""
        row = self.storage.cached_vehicle(hash_token(token))
        return None if row is None else str(row["vehicle_id"])

    # ------------------------------------------------------------------ stations

    def _station(self, station_id: str) -> m.StationPublic:
        cfg = self.world.stations[station_id]
        st = self.status.status(station_id)
        reported = {
            str(c.get("connector_id")): str(c.get("status")) for c in st.connectors
        }
        i = self.world.table.index[station_id]
        own = cfg.company == self.company
        now = self.now()
        conns = []
        for c in self.world.connectors[station_id]:
            if own:
                with self.host.lock:
                    status = self.host.participant.connector_status(c.connector_id, now).value
            else:
                status = reported.get(c.connector_id, "UNKNOWN")
            conns.append(
                m.ConnectorPublic(
                    connector_id=c.connector_id, power_kw=c.power_kw, type=c.type, status=status,
                    reported_status=reported.get(c.connector_id),
                )
            )
        return m.StationPublic(
            station_id=station_id, company_id=cfg.company, city=cfg.city,
            lat=float(self.world.table.lat[i]), lon=float(self.world.table.lon[i]),
            online=st.online, reported=st.reported, t_min=st.t_min, busy=st.busy,
            queued=st.queued, connectors=conns,
        )

    def own_stations(self) -> list[m.StationPublic]:
        return [self._station(s.id) for s in self.world.stations_of(self.company)]

    def network_stations(self) -> list[m.StationPublic]:
        return [self._station(s) for s in self.world.stations]

    def tariffs(self) -> list[m.TariffPublic]:
        out = []
        for s in self.world.stations_of(self.company):
            t = self.world.tariffs[s.id]
            out.append(
                m.TariffPublic(
                    station_id=s.id, tariff_id=t.id if t else None,
                    currency=t.currency if t else None,
                    elements=[e.model_dump(exclude_none=True) for e in t.elements] if t else [],
                )
            )
        return out

    # ------------------------------------------------------------------ recommendations

    def _city(self, city: str) -> int:
        i = self.world.roads.index.get(city)
        if i is None:
            raise ApiError(422, f"unknown city {city!r}", "unknown_city")
        return i

    def station_indices(self, station_ids: list[str], what: str = "station") -> set[int]:
        """The table indices of ``station_ids`` (422 naming the first unknown one)."""
        index = self.world.table.index
        out: set[int] = set()
        for sid in station_ids:
            i = index.get(sid)
            if i is None:
                raise ApiError(422, f"unknown {what} {sid!r}", "unknown_station")
            out.add(i)
        return out

    def recommend(self, vehicle_id: str, body: m.RecommendationCreate) -> m.Recommendations:
        roads = self.world.roads
        if body.city is not None:
            node = self._city(body.city)
            lat, lon = float(roads.lat[node]), float(roads.lon[node])
        else:
            assert body.lat is not None and body.lon is not None
            lat, lon = body.lat, body.lon
            node = roads.nearest_node(lat, lon)
        dest = self._city(body.destination) if body.destination else node
        ch = self.world.scenario.charging
        try:
            req = ChargeRequest(
                vehicle_id, node, lat, lon, dest, body.soc, body.battery_kwh,
                body.consumption_kwh_per_km, body.max_dc_kw, body.max_ac_kw,
                ch.reserve_soc if body.reserve_soc is None else body.reserve_soc,
                ch.target_soc if body.target_soc is None else body.target_soc,
            )
        except ValueError as exc:
            raise ApiError(422, str(exc), "bad_request") from None
        excluded = self.station_indices(body.exclude)
        now = self.now()
        # the policy's order on one snapshot, each pick excluded from the next ask
        ranked = alternatives_for(req, self.status.snapshot(), now, self.policy,
                                  exclude=excluded, limit=body.limit)
        choices = [
            m.ChoicePublic(
                rank=rank, station_id=c.station_id,
                company_id=self.world.table.company_ids[c.station_index], score=c.score,
                distance_km=c.distance_km, detour_km=c.detour_km, eta_min=c.eta_min,
                expected_wait_min=c.expected_wait_min,
            )
            for rank, c in enumerate(ranked, start=1)
        ]
        return m.Recommendations(policy=self.policy_name, t_min=now, choices=choices)

    # ------------------------------------------------------------------ bookings

    def _stop_request(self, i: int, s: m.StopCreate, now: float) -> StopRequest:
        company = self.world.company_of(s.station_id)
        if company is None:
            raise ApiError(422, f"stop {i}: unknown station {s.station_id!r}", "unknown_station")
        for cid in (*(() if s.connector_id is None else (s.connector_id,)), *s.connector_ids):
            c = self.world.connector_index.get(cid)
            if c is None or c.station_id != s.station_id:
                raise ApiError(
                    422, f"stop {i}: connector {cid!r} is not at {s.station_id!r}",
                    "unknown_connector",
                )
        if s.connector_id is not None and s.connector_ids \
                and s.connector_id not in s.connector_ids:
            raise ApiError(422, f"stop {i}: connector_id {s.connector_id!r} is not one of "
                           "connector_ids", "unknown_connector")
        if s.end_min <= now:
            raise ApiError(422, f"stop {i}: window ends before now ({now:.1f})", "window_past")
        if not self.status.is_online(s.station_id):
            raise ApiError(409, f"stop {i}: station {s.station_id!r} is offline", "station_offline")
        return StopRequest(company, s.station_id, s.start_min, s.end_min, s.grace_min,
                           s.connector_id, tuple(s.connector_ids))

    @staticmethod
    def trip_id_for(vehicle_id: str, idempotency_key: str | None) -> str:
        """``{vehicle}.{hex}``: random, or derived from the request's ``Idempotency-Key`` so
        that a POST retried after a crash (whose response, and maybe notification, was lost)
        finds the trip the first attempt logged instead of booking another one."""
        if idempotency_key is None:
            return f"{vehicle_id}.{secrets.token_hex(8)}"
        digest = hashlib.sha256(f"{vehicle_id}\n{idempotency_key}".encode()).hexdigest()
        return f"{vehicle_id}.{digest[:16]}"

    def book(self, vehicle_id: str, body: m.BookingCreate,
             idempotency_key: str | None = None) -> tuple[int, m.TripPublic]:
        """Book a trip; (201 BOOKED | 409 REJECTED/FAILED | 202 still pending, trip).

        With an ``Idempotency-Key`` the trip id is derived from it: a retry whose first
        attempt logged the trip (the replay record was lost with a crash) answers that
        trip's current outcome instead of booking again."""
        started = self._begin_trip(vehicle_id, body, idempotency_key)
        assert started is not None
        res = self.host.wait_result(started.trip_id, self._booking_wait_s(),
                                    started.epoch)
        return self._trip_answer(started, res)

    async def book_async(self, vehicle_id: str,
                         body: m.BookingCreate) -> tuple[int, m.TripPublic]:
        """:meth:`book` (no ``Idempotency-Key``) on the event loop: no thread waits for
        the votes. Taken when a stop is at another company (then starting the trip sends
        PREPAREs and returns without a commit, and a BOOKED answer rests on a decision
        already durable); otherwise, or when an answer must wait for a commit, the
        blocking path runs on the thread pool, as :meth:`book` does."""
        started = self._begin_trip(vehicle_id, body, None, remote_only=True)
        if started is None:  # every stop here (decided and committed in one step), or the
            # host's lock busy past LOOP_LOCK_WAIT_S: nothing started, the blocking path
            return await run_in_threadpool(self.book, vehicle_id, body, None)
        res = await self.host.wait_result_async(started.trip_id, self._booking_wait_s())
        # the answer reads the host's state under its lock: held (the lock is reentrant)
        # for all of it, and only if it comes within LOOP_LOCK_WAIT_S
        epoch = started.epoch  # set by the trip's first step (_begin_trip)
        if res is not None and epoch is not None and before_log(res) \
                and self.host.lock.acquire(timeout=LOOP_LOCK_WAIT_S):
            try:
                if self.host.booked_durable(started.trip_id, epoch):
                    self.host.wait_decided(started.trip_id, epoch)  # (at once)
                    return self._trip_answer(started, res)
            finally:
                self.host.lock.release()
        return await run_in_threadpool(self._wait_and_answer, started)

    def _wait_and_answer(self, started: _StartedTrip) -> tuple[int, m.TripPublic]:
        """The rest of :meth:`book` after the wait for votes: its commit waits."""
        res = self.host.wait_result(started.trip_id, 0.0, started.epoch)
        return self._trip_answer(started, res)

    def _booking_wait_s(self) -> float:
        coord = self.host.coordinator
        bound_min = coord.vote_timeout_min + coord.ack_timeout_min
        return min(self.settings.booking_wait_s,
                   bound_min * 60.0 / self.settings.time_scale + 1.0)

    def _begin_trip(self, vehicle_id: str, body: m.BookingCreate,
                    idempotency_key: str | None,
                    remote_only: bool = False) -> _StartedTrip | None:
        """Validate the stops and start the trip on the coordinator (or find the one an
        ``Idempotency-Key`` already started). ``remote_only`` (the event loop's path):
        None, starting nothing, when every stop is at this company or when the host's lock
        stays taken for LOOP_LOCK_WAIT_S (a step that reads the database holds it through
        a commit: the loop must not wait for a slow disk)."""
        trip_id = self.trip_id_for(vehicle_id, idempotency_key)
        request_json = [s.model_dump() for s in body.stops]
        row = self.storage.trip(trip_id) if idempotency_key is not None else None
        started = _StartedTrip(trip_id, vehicle_id, request_json)
        if row is not None:
            if row["vehicle_id"] != vehicle_id or row["request"] != json.loads(
                    json.dumps(request_json)):
                raise ApiError(422, f"Idempotency-Key {idempotency_key!r} was used for a "
                               "different request", "idempotency_key_reused")
            return started
        now = self.now()
        stops = tuple(self._stop_request(i, s, now) for i, s in enumerate(body.stops))
        if remote_only and all(s.participant == self.host.pid for s in stops):
            return None
        req = TripRequest(f"{self.host.api}:TRIP_REQUEST:{trip_id}", self.host.api,
                          trip_id, vehicle_id, stops)

        def op(t: float) -> tuple[bool, list]:
            started.epoch = self.host.epoch  # (under the host lock: the step's epoch)
            if self.host.coordinator.trip_state(trip_id) is not None:
                return False, []  # a concurrent retry logged it meanwhile
            return True, self.host.coordinator.request_trip(req, t,
                                                            vehicle_node=self.host.api)

        def extra(conn: Any, new: bool, fx: Effects) -> None:
            if new:
                Storage.add_trip(conn, trip_id, vehicle_id, fx.now, request_json)
                started.created = fx.now

        if remote_only and not self.host.lock.acquire(timeout=LOOP_LOCK_WAIT_S):
            return None
        try:
            # lazy: the trip's start rides on its decision's commit (no fsync of its own);
            # the answer's wait raises CommitError if that commit fails
            self.host.execute(op, extra=extra, pipelined=True, lazy=True)
        finally:
            if remote_only:
                self.host.lock.release()
        return started

    def _trip_answer(self, started: _StartedTrip,
                     res: TripResult | None) -> tuple[int, m.TripPublic]:
        if started.created is not None:  # committed: serve the row from memory from now on
            self.storage.cache_trip(started.trip_id, started.vehicle_id, started.created,
                                    started.request_json)
        # BOOKED rests on durable records only (wait_result): no barrier for it either
        trip = self.trip(started.trip_id, durable=res is None or not before_log(res))
        code = {"BOOKED": 201, "REJECTED": 409, "FAILED": 409, "CANCELED": 409}.get(
            trip.outcome, 202
        )
        return code, trip

    def trip(self, trip_id: str, *, durable: bool = True) -> m.TripPublic:
        """A trip as its vehicle sees it; ``durable=False`` skips the barrier (for a BOOKED
        answer, which no crash can undo)."""
        row = self.storage.trip(trip_id)
        with self.host.lock:
            coord = self.host.coordinator
            state = coord.trip_state(trip_id)
            res = self.host.result(trip_id)
            bids = list(coord.booking_ids(trip_id)) if state is not None else []
            epoch = self.host.epoch
        if durable:
            self.host.barrier(epoch)  # show nothing a crash could still undo
        if row is None and state is None:
            raise ApiError(404, f"unknown trip {trip_id!r}", "not_found")
        vehicle = row["vehicle_id"] if row else owner_of(trip_id)
        out = m.TripPublic(
            trip_id=trip_id, vehicle_id=vehicle,
            state=state.value if state is not None else "REJECTED",
            outcome="PENDING", booking_ids=bids,
        )
        if res is not None:
            out.outcome = res.outcome  # type: ignore[assignment]
            out.reason = res.reason
            out.failed_stop = res.failed_stop
            out.bookings = [
                m.BookedStopPublic(
                    booking_id=b.booking_id, company_id=b.participant, station_id=b.station_id,
                    connector_id=b.connector_id, start_min=b.start_min, end_min=b.end_min,
                )
                for b in res.bookings
            ]
            out.alternatives = [
                m.AlternativePublic(connector_id=a.connector_id, start_min=a.start_min,
                                    end_min=a.end_min)
                for a in res.alternatives
            ]
        return out

    @staticmethod
    def _booking_public(v: BookingView) -> m.BookingPublic:
        return m.BookingPublic(
            booking_id=v.booking_id, trip_id=v.trip_id, state=v.state.value,
            station_id=v.station_id, connector_id=v.connector_id, start_min=v.start_min,
            end_min=v.end_min, grace_min=v.grace_min, charging=v.charging, reason=v.reason,
        )

    def _own_trip_id(self, vehicle_id: str, any_id: str) -> str | None:
        """The trip id if ``any_id`` is (a stop of) a trip of this vehicle coordinated here."""
        trip_id = any_id.split("/", 1)[0]
        row = self.storage.trip(trip_id)
        if row is None:
            return None
        if row["vehicle_id"] != vehicle_id:
            raise ApiError(404, f"unknown booking {any_id!r}", "not_found")
        if any_id != trip_id:
            with self.host.lock:
                if any_id not in self.host.coordinator.booking_ids(trip_id):
                    raise ApiError(404, f"unknown booking {any_id!r}", "not_found")
        return trip_id

    def local_booking(self, vehicle_id: str, booking_id: str) -> BookingView:
        with self.host.lock:
            v = self.host.participant.booking(booking_id)
            epoch = self.host.epoch
        self.host.barrier(epoch)
        if v is None or owner_of(booking_id) != vehicle_id:
            raise ApiError(404, f"unknown booking {booking_id!r}", "not_found")
        return v

    def get_booking(self, vehicle_id: str, any_id: str) -> m.TripPublic | m.BookingPublic:
        if "/" in any_id:  # a stop: prefer the participant's own view of it
            with self.host.lock:
                held_here = self.host.participant.booking(any_id) is not None
            if held_here:
                return self._booking_public(self.local_booking(vehicle_id, any_id))
        trip_id = self._own_trip_id(vehicle_id, any_id)
        if trip_id is not None:
            return self.trip(trip_id)
        return self._booking_public(self.local_booking(vehicle_id, any_id))

    def cancel(self, vehicle_id: str, any_id: str) -> m.TripPublic:
        trip_id = self._own_trip_id(vehicle_id, any_id)
        if trip_id is None:
            v = self.local_booking(vehicle_id, any_id)  # 404 unless it is the caller's
            raise ApiError(
                409,
                f"booking {any_id!r} belongs to trip {v.trip_id!r} coordinated by another "
                "company; cancel it there" if v.trip_id else
                f"booking {any_id!r} is a walk-in session's; stop the session instead",
                "not_coordinated_here",
            )
        with self.host.lock:
            state = self.host.coordinator.trip_state(trip_id)
        if state is not None and state.value in ("PREPARING", "COMMITTING"):
            raise ApiError(409, f"trip {trip_id!r} is still being booked ({state.value})",
                           "trip_pending")
        if state is not None and state.value in ("ABORTING", "ABORTED", "COMPENSATING", "FAILED"):
            raise ApiError(409, f"trip {trip_id!r} was not booked ({state.value})", "not_booked")
        self.host.execute(lambda t: (None, self.host.coordinator.cancel_trip(trip_id, t)),
                          pipelined=True)
        return self.trip(trip_id)

    # ------------------------------------------------------------------ protocol effects

    def _after_protocol(self, fx: Effects) -> None:
        """Post-commit hook: tell the vehicles. Their trace rows are committed by then, but
        for a BOOKED result's, which ride on the next commit with the trip's ALL_ACKED
        (``evsim.protocol.may_defer``): like the HTTP answer, the notice rests on the
        trip's decision, durable already."""
        for res in fx.results:
            self._on_result(res, fx.now, None)
        for rec in fx.booking_events(BookingEvent.NO_SHOW_EXPIRE):
            self.notify(owner_of(rec.booking_id), "booking_expired", booking_id=rec.booking_id,
                        t_min=rec.t_min)

    def _trace_rows(self, fx: Effects) -> list[dict[str, Any]]:
        """Host tracer (under the host lock): the step's trace rows, committed with it: the
        trip results this server coordinates, and a ``booking`` row per change of its own
        participant's bookings (:class:`evsim.protocol.tracing.BookingRows`, the rows a
        simulated company server writes)."""
        rows: list[dict[str, Any]] = []
        for res in fx.results:
            self._on_result(res, fx.now, rows)
        p, booking_rows = self.host.participant, self._booking_rows
        for rec in fx.participant_records:
            row = booking_rows.row(p, rec)
            if row is not None:
                rows.append({"t_min": fx.now, "kind": "booking", **row})
        return rows

    def _on_result(self, res: TripResult, now: float, rows: list[dict[str, Any]] | None) -> None:
        """Notify the vehicle of a trip result (``rows is None``) or trace it into ``rows``."""
        vid = owner_of(res.trip_id)  # trip ids are {vehicle}.{hex}: no database read
        if rows is not None:
            self._result_rows(res, now, vid, rows)
            return
        self.notify(
            vid, TRIP_EVENTS.get(res.outcome, "booking_update"), trip_id=res.trip_id,
            outcome=res.outcome, reason=res.reason, t_min=now,
            bookings=[
                {"booking_id": b.booking_id, "company_id": b.participant,
                 "station_id": b.station_id, "connector_id": b.connector_id,
                 "start_min": b.start_min, "end_min": b.end_min}
                for b in res.bookings
            ],
        )

    def _result_rows(self, res: TripResult, now: float, vid: str,
                     rows: list[dict[str, Any]]) -> None:
        rows.append({
            "t_min": now, "kind": "trip_booking", "vehicle_id": vid, "booking_id": res.trip_id,
            "company_id": self.company, "status": res.outcome, "detail": res.reason or None,
        })
