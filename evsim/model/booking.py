"""The ``trip`` booking mode: a driver app that books the trip's charging stops as it goes.

:func:`booked_trip_process` replaces :func:`evsim.model.vehicle.trip_process`. The vehicle's
app (:class:`BookedTrip`) keeps a *plan* of the stops ahead (:func:`evsim.planning.plan_trip`:
the configured policy asked at each planned decision node with the snapshot as it is now)
and books them through the reservation protocol (a ``TripRequest`` to the vehicle's home
company coordinator; one window per stop: expected arrival to arrival + estimated charging
time + ``booking.slot_min``, NO_SHOW ``booking.grace_min`` after its start):

* **Rolling horizon.** A stop is booked only once its window starts at most
  ``booking.max_advance_min`` ahead (default 120 min): the stops that close at departure
  (the vehicle waits for the answer before it leaves, at most ``booking.answer_timeout_min``
  per request), the later ones on the way (a timer fires when a planned stop enters the
  horizon; the request runs while the vehicle drives). Reservations made many hours ahead
  block connectors that walk-ins could use meanwhile (a walk-in only gets a connector its
  whole session fits on before the next reservation), and the further ahead a plan looks the
  less it knows (the policy sees today's queues, the arrival time drifts with every queue on
  the way); two hours covers the next stop of almost every trip, whose arrival time is known
  to within minutes.
* **Re-planning.** On leaving every charging stop (booked or not) the app plans the rest of
  the trip again from the vehicle's real state; bookings that still fit the new plan (same
  station and connector class, expected arrival at most ``slot_min`` before the booked
  window's start or ``grace_min / 2`` after it) are kept, the others canceled and booked
  again. Nothing is booked while the vehicle is at a station, nor beyond a stop that will be
  a walk-in (the queue there makes every later time a guess): those wait for the re-plan.
* **Rebooking.** A REJECTED request is retried, up to ``booking.max_attempts`` requests per
  booking round: if the NO vote offered a window on the same connector class that starts at
  most ``booking.max_shift_min`` after the wanted one, the app takes it (the vehicle then
  waits at the station for its window); otherwise it asks the policy again for that stop's
  decision with the refused station left out (as if offline) and books that one, unless the
  rest of the trip would run dry from there (a farther station beyond the horizon is put in
  the plan and booked once it is due). A stop
  that still gets no booking (or a FAILED / unanswered request: those are not retried) is a
  walk-in: at its decision node the vehicle asks the policy and queues, as in ``on_arrival``.
  The round itself is :func:`evsim.booking_app.booking_round` (sans-IO, shared with the live
  agent); this module drives it with SimPy.

At a booked stop the vehicle charges on the booked connector
(:meth:`SimStation.visit_booked`); when the booking cannot be used there (``no_show``,
``server_down``, ``connector_busy``) it charges as a walk-in at that station and the rest of
that request's trip is canceled (``TripCancel``). A station owner's cancel (an unsolicited
CANCELED answer) drops the stop's booking, which is then booked again. Unused bookings are
canceled when the trip ends or strands, and a BOOKED answer that comes after the vehicle
gave up waiting or passed the stop is canceled at once.

Every request is a protocol trip of its own: ids ``<vehicle id>`` for the first,
``<vehicle id>.<n>`` for the n-th (so the participant's ``booking`` trace rows of later
requests carry that trip id as their ``vehicle_id``). The vehicle traces each request as
``trip_booking`` rows with ``booking_id`` = that trip id: PENDING, then BOOKED / REJECTED /
FAILED, then possibly CANCELED.

Simplifications: a vehicle's home company is a hash of its id; the vehicle drives exactly
the planned route, so a plan's arrival times are exact up to the wait for the departure
answer and the queues on the way (and each re-plan starts again from the real state).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

import simpy

from evsim.booking_app import (
    Answer,
    Choose,
    Send,
    Window,
    booking_round,
    booking_window,
    kept_stop,
    next_booking_min,
    stops_to_book,
)
from evsim.model.protocol_bus import coordinator_id, vehicle_node
from evsim.model.station import SessionResult, SimStation
from evsim.model.vehicle import (
    Drive,
    SessionPlanner,
    TakenStop,
    ask_policy,
    drive,
    start_trip,
    unplanned_stop,
)
from evsim.planning import (
    PlannedStop,
    avoid_after,
    back_to_city,
    choose_again,
    class_connectors,
    plan_trip,
)
from evsim.protocol import (
    BookedStop,
    Outgoing,
    StopRequest,
    TripCancel,
    TripRequest,
    TripResult,
)
from evsim.protocol.messages import Message, msg_id
from evsim.trace import Kind

if TYPE_CHECKING:
    from evsim.model.simulation import Simulation

__all__ = ["BookedTrip", "VehicleLink", "booked_trip_process", "trip_request"]


class VehicleLink:
    """The vehicle's line to its home coordinator: several requests and cancels in flight at
    once, answers told apart by trip id."""

    def __init__(self, sim: Simulation, vehicle_id: str, home: str) -> None:
        assert sim.bus is not None
        self.env = sim.env
        self.bus = sim.bus
        self.cfg = sim.scenario.booking
        self.vehicle_id, self.home = vehicle_id, home
        self.vnode = vehicle_node(vehicle_id)
        self.coordinator = coordinator_id(home)
        self._trace = sim.trace
        self._answers: dict[str, simpy.Event] = {}
        self._abandoned: set[str] = set()
        self._cancels: dict[str, simpy.Event] = {}
        self.on_canceled: Callable[[str, str], None] | None = None
        # the bus delivers every message for this vehicle node here
        self.bus.attach_vehicle(self.vnode, self._deliver)

    def trace(self, trip_id: str, status: str, detail: str | None) -> None:
        """A ``trip_booking`` row for request ``trip_id`` (PENDING, its answer, CANCELED)."""
        self._trace.emit(
            self.env.now,
            Kind.TRIP_BOOKING,
            vehicle_id=self.vehicle_id,
            booking_id=trip_id,
            company_id=self.home,
            status=status,
            detail=detail,
        )

    def _deliver(self, msg: Message) -> None:
        if not isinstance(msg, TripResult):
            return
        tid = msg.trip_id
        if msg.outcome == "CANCELED":
            done = self._cancels.get(tid)
            if done is not None:
                if not done.triggered:
                    done.succeed()
            elif self.on_canceled is not None and tid in self._answers:
                self.on_canceled(tid, msg.reason)  # not asked for: the station owner canceled
            return
        answer = self._answers.get(tid)
        if answer is None:
            return
        if tid in self._abandoned:
            if msg.outcome == "BOOKED":  # too late: the vehicle went on without it
                self.cancel(tid)
            return
        if not answer.triggered:
            answer.succeed(msg)

    def request(self, req: TripRequest) -> Generator[simpy.Event, Any, TripResult | None]:
        """Send the request (re-sent every ``request_retry_min``) and wait at most
        ``answer_timeout_min`` for the definitive answer; None if none came."""
        env = self.env
        answer = self._answers[req.trip_id] = env.event()
        deadline = env.now + self.cfg.answer_timeout_min
        while not answer.triggered and env.now < deadline:
            self.bus.send(self.vnode, [Outgoing(self.coordinator, req)])
            yield answer | env.timeout(min(self.cfg.request_retry_min, deadline - env.now))
        if answer.triggered:
            return answer.value
        self._abandoned.add(req.trip_id)
        return None

    def cancel(self, trip_id: str) -> None:
        """Cancel a booked trip (re-sent until the coordinator confirms, within bounds)."""
        if trip_id not in self._cancels:
            self._cancels[trip_id] = self.env.event()
            self.env.process(self._cancel(trip_id))

    def _cancel(self, trip_id: str) -> Generator[simpy.Event, Any, None]:
        env = self.env
        done = self._cancels[trip_id]
        msg = TripCancel(msg_id(self.vnode, "TRIP_CANCEL", trip_id), self.vnode, trip_id)
        deadline = env.now + self.cfg.answer_timeout_min
        while not done.triggered and env.now < deadline:
            self.bus.send(self.vnode, [Outgoing(self.coordinator, msg)])
            yield done | env.timeout(min(self.cfg.request_retry_min, deadline - env.now))


@dataclasses.dataclass(slots=True)
class _Held:
    """A reservation the vehicle holds for a stop of its current plan."""

    trip_id: str
    stop: BookedStop
    arrive_min: float  # the arrival it was booked for


class BookedTrip:
    """The driver app of one vehicle: plan, book within the horizon, rebook, re-plan."""

    def __init__(self, sim: Simulation, d: Drive, home: str) -> None:
        self.sim = sim
        self.env = sim.env
        self.cfg = sim.scenario.booking
        self.d = d
        self.home = home
        self.link = VehicleLink(sim, d.vid, home)
        self.link.on_canceled = self._owner_canceled
        self.active = True
        self.plan: tuple[PlannedStop, ...] = ()
        self.next = 0  # index in plan of the next stop to come
        self.held: dict[int, _Held] = {}  # plan index -> reservation
        self.busy: dict[int, PlannedStop] = {}  # id -> stop being booked now
        self.tried: dict[int, PlannedStop] = {}  # id -> stop left to walk in
        self._t_plan = 0.0  # the plan's times assume the vehicle leaves then ...
        self._leave: float | None = None  # ... it leaves then (None: still waiting to)
        self._requests = 0
        self._wake_at = math.inf
        self._using: _Held | None = None
        self._at_station = False  # between a decision and leaving the station

    # ------------------------------------------------------------------ plans

    @property
    def offset(self) -> float:
        """How late the vehicle runs on the current plan's times."""
        leave = self.env.now if self._leave is None else self._leave
        return leave - self._t_plan

    def depart(self) -> Generator[simpy.Event, Any, bool]:
        """Plan at the origin and book the stops within the horizon; False: no stop needed."""
        sim, d, env = self.sim, self.d, self.env
        world = sim.world
        plan = plan_trip(
            world.roads,
            sim.snapshot,
            world.connectors,
            sim.policy,
            world.scenario.charging,
            d.params,
            d.pos,
            d.dest,
            d.soc,
            env.now,
        )
        if not plan.stops:
            return False
        self._set_plan(plan.stops, env.now, None)
        due = self._due()
        if due:
            yield from self._round(due, kick=False)
        self._leave = env.now
        self._kick()
        return True

    def _set_plan(self, stops: tuple[PlannedStop, ...], t_plan: float, leave: float | None) -> None:
        """Adopt a new plan; keep the reservations that still fit it, cancel the others."""
        old, held = self.plan, self.held
        self.plan, self.next, self._t_plan, self._leave = stops, 0, t_plan, leave
        self.tried = {}
        self.held = {}
        drop: list[str] = []
        offset = self.offset
        for i, h in held.items():
            k = kept_stop(
                old[i],
                h.stop.start_min,
                stops,
                self.cfg.slot_min,
                self.cfg.grace_min,
                offset=offset,
                taken=self.held,
            )
            if k is None:
                if h.trip_id not in drop:
                    drop.append(h.trip_id)
            else:
                self.held[k] = _Held(h.trip_id, h.stop, h.arrive_min)
        for tid in drop:
            self._drop_trip(tid, "replanned")

    def _replan_from(self, index: int, soc: float) -> None:
        """The vehicle is done at station ``index`` with ``soc``: plan the rest again."""
        sim, d, env = self.sim, self.d, self.env
        world = sim.world
        node = world.stations.node_list[index]
        # what drive() does next: back to the city on the access road
        back_min, soc = back_to_city(soc, d.per_km, world.stations.access_km_list[index])
        t0 = env.now + back_min
        plan = plan_trip(
            world.roads,
            sim.snapshot,
            world.connectors,
            sim.policy,
            world.scenario.charging,
            d.params,
            node,
            d.dest,
            soc,
            t0,
            skip_at=d.skip_at,
            avoid=d.gave_up,
        )
        self._at_station = False
        self._set_plan(plan.stops, t0, t0)
        self._kick()

    # ------------------------------------------------------------------ booking rounds

    def _due(self) -> list[int]:
        """Plan stops to book now: within the horizon, not booked, not being booked, not
        given up."""
        if self._at_station:
            return []  # its times are unknown until it leaves: re-planned then
        return stops_to_book(
            self.plan,
            self.env.now,
            self.cfg.max_advance_min,
            first=self.next,
            offset=self.offset,
            held=self.held,
            blocked=self._blocked(),
        )

    def _blocked(self) -> set[int]:
        """Plan stops being booked now, or left to walk in."""
        return {
            i
            for i in range(self.next, len(self.plan))
            if id(self.plan[i]) in self.busy or id(self.plan[i]) in self.tried
        }

    def _kick(self) -> None:
        """Book what is due now (in the background), or wake up when the next stop is."""
        if not self.active:
            return
        due = self._due()
        if due:
            self.env.process(self._round(due))
            return
        if self._at_station:
            return
        t = next_booking_min(
            self.plan,
            self.cfg.max_advance_min,
            first=self.next,
            offset=self.offset,
            held=self.held,
            blocked=self._blocked(),
        )
        if t is not None and t < self._wake_at:
            self._wake_at = t
            ev = self.env.timeout(max(t - self.env.now, 0.0))

            def wake(_ev: object, at: float = t) -> None:
                self._wake(at)

            ev.callbacks.append(wake)

    def _wake(self, t: float) -> None:
        if self._wake_at == t:
            self._wake_at = math.inf
            self._kick()

    def _round(self, idx: list[int], kick: bool = True) -> Generator[simpy.Event, Any, None]:
        """Book plan stops ``idx``: drive :func:`evsim.booking_app.booking_round`."""
        cfg = self.cfg
        app = booking_round(self, idx, cfg.max_attempts, cfg.max_shift_min)
        try:
            reply: Any = None
            while True:
                try:
                    effect = app.send(reply)
                except StopIteration:
                    return
                if isinstance(effect, Send):
                    reply = yield from self._send(effect)
                elif isinstance(effect, Choose):
                    reply = self._choose_again(effect.index, effect.stop, effect.excluded)
                else:
                    tid = effect.answer.trip_id
                    self.link.trace(tid, "CANCELED", effect.reason)
                    self.link.cancel(tid)
                    reply = None
        finally:
            app.close()
            if kick:
                self._kick()

    def _send(self, e: Send) -> Generator[simpy.Event, Any, Answer | None]:
        """One trip request of a round, traced: PENDING, then its answer."""
        tid = self.d.vid if self._requests == 0 else f"{self.d.vid}.{self._requests + 1}"
        self._requests += 1
        req = self._request(tid, e.stops, e.windows)
        detail = f"{len(e.stops)} stop(s)"
        if e.attempt > 1:
            detail += f", attempt {e.attempt}: {e.how}"
        self.link.trace(tid, "PENDING", detail)
        result = yield from self.link.request(req)
        status = "FAILED" if result is None else result.outcome
        reason = "no_answer" if result is None else result.reason
        self.link.trace(tid, status, reason or None)
        if result is None:
            return None
        return Answer(result.outcome, tid, result.failed_stop, result.alternatives,
                      result.bookings)

    # -- the TripHost side of booking_round

    def window(self, s: PlannedStop) -> Window:
        start, end = booking_window(s, self.cfg.slot_min, self.offset)
        return Window(start, end, None, start)

    def beyond_horizon(self, s: PlannedStop) -> bool:
        return s.arrive_min + self.offset > self.env.now + self.cfg.max_advance_min

    def hold(self, idx: Sequence[int], windows: Sequence[Window], answer: Answer) -> None:
        for i, w, b in zip(idx, windows, answer.bookings, strict=True):
            self.held[i] = _Held(answer.trip_id, b, w.asked_min)

    def _request(
        self, tid: str, stops: Sequence[PlannedStop], windows: Sequence[Window]
    ) -> TripRequest:
        return trip_request(self.sim, self.d.vid, tid, stops, windows)

    def _choose_again(
        self, i: int, s: PlannedStop, excluded: frozenset[int]
    ) -> PlannedStop | None:
        """The stop the policy picks for plan stop ``i``'s decision with the ``excluded``
        stations off; None if none, or if the rest of the trip would run dry from there."""
        sim, d = self.sim, self.d
        world = sim.world
        # a detour must not strand the vehicle later (it charges once per city per trip)
        skip = set(d.skip_at) | {p.decision_node for p in self.plan[: i + 1]}
        return choose_again(
            world.roads,
            sim.snapshot,
            world.connectors,
            sim.policy,
            world.scenario.charging,
            d.params,
            s,
            d.dest,
            excluded,
            skip,
            d.gave_up,
        )

    def replace(self, i: int, new: PlannedStop) -> None:
        """Plan stop ``i`` becomes ``new``; the stops after it are unknown until then."""
        for k in [k for k in self.held if k > i]:
            h = self.held.get(k)
            if h is not None:
                self._drop_trip(h.trip_id, "replanned")
        self.plan = (*self.plan[:i], new)

    # ------------------------------------------------------------------ cancels

    def _drop_trip(self, tid: str, reason: str, notify: bool = True) -> None:
        """Forget the reservations of request ``tid`` (and cancel it at the coordinator)."""
        for k in [k for k, h in self.held.items() if h.trip_id == tid]:
            del self.held[k]
        if notify:
            self.link.trace(tid, "CANCELED", reason)
            self.link.cancel(tid)

    def _owner_canceled(self, tid: str, reason: str) -> None:
        if any(h.trip_id == tid for h in self.held.values()):
            self.link.trace(tid, "CANCELED", reason or "owner_canceled")
            self._drop_trip(tid, reason, notify=False)
            self._kick()  # book those stops again

    def finish(self, reason: str) -> None:
        """The trip is over: cancel the reservations it did not use."""
        if not self.active:
            return
        self.active = False
        for tid in dict.fromkeys(h.trip_id for h in self.held.values()):
            self._drop_trip(tid, reason)

    # ------------------------------------------------------------------ drive() hooks

    def take(self, pos: int) -> TakenStop | None:
        """Where to charge at decision node ``pos``: the booked stop if there is one, else
        the policy's choice now (a walk-in); None if the policy has none."""
        i = self.next
        self._at_station = True
        if i < len(self.plan) and self.plan[i].decision_node == pos:
            self.next = i + 1
            h = self.held.pop(i, None)
            if h is not None:
                self._using = h
                return self.plan[i], h.stop
        # not booked (or not planned): ask the policy, exactly as on arrival
        choice = ask_policy(self.sim, self.d, pos)
        if choice is None:
            return None
        return unplanned_stop(pos, choice, self.d.soc, self.env.now), None

    def visit(
        self, station: SimStation, stop: TakenStop, session_id: str, soc: float,
        plan: SessionPlanner, patience_min: float,
    ) -> Generator[simpy.Event, Any, SessionResult]:
        _, b = stop
        if b is None:
            result = yield from station.visit(self.d.vid, session_id, soc, plan, patience_min)
        else:
            h = self._using
            assert h is not None and h.stop is b
            self._using = None
            result, why = yield from station.visit_booked(
                self.d.vid,
                session_id,
                soc,
                plan,
                b.booking_id,
                b.connector_id,
                b.start_min,
                patience_min,
            )
            if why:  # the rest of that request's trip goes too
                self._drop_trip(h.trip_id, why)
        d = self.d  # (before the re-plan, which must avoid it too)
        d.gave_up = avoid_after(d.gave_up, station.index, result.connector is not None)
        if self.active:
            p = result.plan
            soc_after = p.soc_after if p is not None and p.soc_after is not None else soc
            self._replan_from(station.index, soc_after)
        return result


def trip_request(
    sim: Simulation,
    vehicle_id: str,
    trip_id: str,
    stops: Sequence[PlannedStop],
    windows: Sequence[Window],
) -> TripRequest:
    """The protocol's request for ``stops`` in ``windows``, each on the connector class its
    charge was sized for (or on the one connector an offer named)."""
    grace = sim.scenario.booking.grace_min
    out = []
    for s, (start, end, connector, _) in zip(stops, windows, strict=True):
        station = sim.stations[s.station_index]
        out.append(
            StopRequest(
                station.company_id,
                station.station_id,
                start,
                end,
                grace,
                connector,  # (one connector of the class, when an offer named one)
                class_connectors(station.connectors, s.connector_power_kw, s.connector_type),
            )
        )
    vnode = vehicle_node(vehicle_id)
    return TripRequest(msg_id(vnode, "TRIP_REQUEST", trip_id), vnode, trip_id, vehicle_id,
                       tuple(out))


def booked_trip_process(sim: Simulation, k: int) -> Generator[simpy.Event, Any, None]:
    bus = sim.bus
    assert bus is not None
    d = start_trip(sim, k)
    app = BookedTrip(sim, d, bus.home_company(d.vid))
    if (yield from app.depart()):
        yield from drive(sim, d, app)
    else:
        app.active = False
        yield from drive(sim, d)
