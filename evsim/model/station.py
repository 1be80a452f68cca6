"""A charging station in the SimPy model: connectors, a FIFO queue, sessions.

Vehicles queue first-come first-served for any free connector (the most powerful free one is
handed out first: :func:`evsim.queueing.assign_walkins`, the rule the live company servers
apply to their walk-in queues; the plain FIFO below keeps its idle connectors in a heap
keyed ``(-power_kw, index)`` and hands a freed connector to the first vehicle in line).
A vehicle that finds a connector idle plugs in at once, with no event in between; one that
waits is woken by the event its connector is handed over with, or by its patience timer,
whichever comes first, and then leaves (``abandon``). What a
session does once plugged in (how long, how much energy, what it costs) is the caller's
``plan`` function, so the same station serves the EV model and the queueing-theory checks.
Every change is reported to the owning company server, which publishes it with a delay.

With a :class:`ConnectorDesk` attached (``attach_desk``, the ``trip`` booking mode) the
station also honours reservations: a walk-in only gets a free connector on which its whole
planned session fits before the next reservation (PENDING hold or RESERVED window, see
:meth:`ConnectorDesk.blocked_until`), walk-ins that do not fit anywhere may be overtaken by
later ones that do, and a booked vehicle waits for *its* connector, which it gets before any
walk-in as soon as it frees (:meth:`SimStation.visit_booked`). Without a desk the station is
the plain FIFO above, event for event.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from functools import partial
from heapq import heappop, heappush
from typing import TYPE_CHECKING, Any, Protocol, cast

import simpy

from evsim.model.world import ConnectorSpec
from evsim.queueing import assign_walkins
from evsim.slots import slot_constructor
from evsim.snapshot import DEFAULT_SESSION_MIN, SESSION_EWMA_ALPHA, mean_session_after
from evsim.trace import Kind, TraceWriter

if TYPE_CHECKING:
    from evsim.model.company import CompanyServer

__all__ = ["ConnectorDesk", "SessionPlan", "SessionResult", "SimStation", "new_plan"]

_INF = float("inf")


class ConnectorDesk(Protocol):
    """The station's view of its owner's reservations (see :mod:`evsim.model.protocol_bus`)."""

    def blocked_until(self, connector_id: str, start_min: float, end_min: float) -> float | None:
        """None if a walk-in session ``[start_min, end_min)`` fits on the connector, else
        when the reservation in the way stops blocking it."""
        ...

    def walkin_started(
        self, session_id: str, connector_id: str, start_min: float, end_min: float
    ) -> None: ...

    def walkin_ended(self, session_id: str, now_min: float) -> None: ...

    def authorize(self, booking_id: str, now_min: float) -> str:
        """Start a session against a booking: "" if accepted, else why not."""
        ...

    def session_ended(self, booking_id: str, now_min: float) -> None: ...


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """What one session will do on a given connector."""

    charge_min: float
    energy_kwh: float
    price: float
    soc_after: float | None
    power_kw: float


@dataclass(frozen=True, slots=True)
class SessionResult:
    connector: ConnectorSpec | None  # None when the vehicle abandoned the queue
    wait_min: float
    plan: SessionPlan | None


# SessionPlan(charge_min, energy_kwh, price, soc_after, power_kw) and
# SessionResult(connector, wait_min, plan) without the frozen __init__ (one each per session)
new_plan = slot_constructor(SessionPlan)
_new_result = slot_constructor(SessionResult)


class SimStation:
    def __init__(
        self,
        env: simpy.Environment,
        index: int,
        station_id: str,
        company_id: str,
        connectors: tuple[ConnectorSpec, ...],
        trace: TraceWriter,
        company: CompanyServer | None = None,
        ewma_alpha: float = SESSION_EWMA_ALPHA,
        default_session_min: float = DEFAULT_SESSION_MIN,
    ) -> None:
        self.env = env
        self.index = index
        self.station_id = station_id
        self.company_id = company_id
        self.connectors = connectors
        self.trace = trace
        self.company = company
        # plain FIFO: idle connectors, the most powerful first, and the vehicles in line (each
        # an event that succeeds with its connector, or with None when its patience ran out);
        # a connector is idle only while nobody waits
        self._idle: list[tuple[float, int, ConnectorSpec]] = [
            (-spec.power_kw, k, spec) for k, spec in enumerate(connectors)
        ]
        self._idle.sort()
        self._line: deque[simpy.Event] = deque()
        self._order = {spec.connector_id: k for k, spec in enumerate(connectors)}
        self.waiting = 0
        self.busy = 0
        self.online = True
        self.mean_session_min = default_session_min
        self._alpha = ewma_alpha
        self._desk: ConnectorDesk | None = None
        row = trace.row_writer
        base = ("vehicle_id", "station_id", "company_id")
        self._abandon_row = row(Kind.ABANDON, *base, "session_id", "soc", "wait_min", "queue_len")
        self._arrive_row = row(Kind.ARRIVE, *base, "session_id", "booking_id", "soc", "queue_len")
        self._start_row = row(
            Kind.SESSION_START,
            *base,
            "connector_id",
            "session_id",
            "booking_id",
            "soc",
            "wait_min",
            "queue_len",
        )
        self._end_row = row(
            Kind.SESSION_END,
            *base,
            "connector_id",
            "session_id",
            "booking_id",
            "soc",
            "energy_kwh",
            "price",
            "power_kw",
            "queue_len",
        )

    def attach_desk(self, desk: ConnectorDesk) -> None:
        """Honour reservations from now on (call before the run starts)."""
        self._desk = desk
        self._free_now: dict[int, ConnectorSpec] = dict(enumerate(self.connectors))
        self._walkins: list[_Waiter] = []
        self._booked: dict[str, list[_Waiter]] = {}
        self._retry_at = float("inf")

    @property
    def n_connectors(self) -> int:
        return len(self.connectors)

    @property
    def queued(self) -> int:
        """What the station reports as queued (the status policies read): the vehicles in its
        walk-in line. With reservations (a desk), vehicles waiting for their booked window or
        connector are not in that line, as in the live server's queue; their reservations
        already hold the connectors. ``waiting`` counts every vehicle not yet plugged in.
        The trace's ``queue_len`` is this count too, in both runs."""
        return self.waiting if self._desk is None else len(self._walkins)

    def _changed(self) -> None:
        if self.company is not None:
            self.company.report(self)

    def visit(
        self,
        vehicle_id: str,
        session_id: str,
        soc: float | None,
        plan: Callable[[ConnectorSpec, float], SessionPlan],
        patience_min: float = float("inf"),
    ) -> Generator[simpy.Event, Any, SessionResult]:
        """Queue, charge and leave. ``plan(connector, t_start)`` sizes the session."""
        if self._desk is not None:
            return (yield from self._visit_managed(vehicle_id, session_id, soc, plan, patience_min))
        env = self.env
        t_arrive = env.now
        # (_arrive, inline)
        self.waiting += 1
        self._arrive_row(
            t_arrive,
            vehicle_id,
            self.station_id,
            self.company_id,
            session_id,
            None,
            soc,
            self.waiting,
        )
        if self.company is not None:  # (_changed)
            self.company.report(self)
        spec: ConnectorSpec | None
        if self._idle:  # nobody is in line: plug in now
            spec = heappop(self._idle)[2]
        else:
            turn = simpy.Event(env)
            self._line.append(turn)
            if patience_min != _INF:
                simpy.Timeout(env, patience_min).callbacks.append(partial(self._give_up, turn))
            spec = yield turn
            if spec is None:
                return self._abandon(vehicle_id, session_id, soc, t_arrive)
        p = plan(spec, env.now)  # pure: sizing before or after the start row is the same
        return (yield from self._session(vehicle_id, session_id, soc, spec, p, t_arrive))

    def _give_up(self, turn: simpy.Event, _timer: simpy.Event) -> None:
        """A waiting vehicle's patience ran out: out of the line, unless it was served."""
        if turn in self._line:
            self._line.remove(turn)
            turn.succeed(None)

    # ------------------------------------------------------------------ reservations (desk)

    def _abandon(
        self, vehicle_id: str, session_id: str, soc: float | None, t_arrive: float
    ) -> SessionResult:
        """The vehicle gave up waiting: leave the queue, trace it."""
        self.waiting -= 1
        now = self.env.now
        self._abandon_row(
            now,
            vehicle_id,
            self.station_id,
            self.company_id,
            session_id,
            soc,
            now - t_arrive,
            self.queued,
        )
        self._changed()
        return SessionResult(None, self.env.now - t_arrive, None)

    def _arrive(
        self, vehicle_id: str, session_id: str, soc: float | None, booking_id: str | None = None
    ) -> None:
        self.waiting += 1
        self._arrive_row(
            self.env.now,
            vehicle_id,
            self.station_id,
            self.company_id,
            session_id,
            booking_id,
            soc,
            # the walk-in line after it (a walk-in joins it next; a booked vehicle does not)
            len(self._walkins) + (booking_id is None),
        )
        self._changed()

    def _visit_managed(
        self,
        vehicle_id: str,
        session_id: str,
        soc: float | None,
        plan: Callable[[ConnectorSpec, float], SessionPlan],
        patience_min: float,
    ) -> Generator[simpy.Event, Any, SessionResult]:
        self._arrive(vehicle_id, session_id, soc)
        return (
            yield from self._queue_walkin(
                vehicle_id, session_id, soc, plan, patience_min, self.env.now
            )
        )

    def _queue_walkin(
        self,
        vehicle_id: str,
        session_id: str,
        soc: float | None,
        plan: Callable[[ConnectorSpec, float], SessionPlan],
        patience_min: float,
        t_arrive: float,
    ) -> Generator[simpy.Event, Any, SessionResult]:
        """Wait (already counted in ``waiting``) for a connector the session fits on."""
        env = self.env
        w = _Waiter(env.event(), plan)
        self._walkins.append(w)
        self._dispatch()
        if not w.event.triggered:  # in the line: the station reports it (else its start did)
            self._changed()
        left = patience_min - (env.now - t_arrive)
        if not w.event.triggered:
            if left == float("inf"):
                yield w.event
            else:
                yield w.event | env.timeout(max(left, 0.0))
        if not w.event.triggered:
            self._walkins.remove(w)
            return self._abandon(vehicle_id, session_id, soc, t_arrive)
        spec, p = cast("tuple[ConnectorSpec, SessionPlan]", w.event.value)
        assert self._desk is not None
        self._desk.walkin_started(session_id, spec.connector_id, env.now, env.now + p.charge_min)
        result = yield from self._session(vehicle_id, session_id, soc, spec, p, t_arrive)
        self._desk.walkin_ended(session_id, env.now)
        return result

    def visit_booked(
        self,
        vehicle_id: str,
        session_id: str,
        soc: float | None,
        plan: Callable[[ConnectorSpec, float], SessionPlan],
        booking_id: str,
        connector_id: str,
        start_min: float,
        patience_min: float = float("inf"),
    ) -> Generator[simpy.Event, Any, tuple[SessionResult, str]]:
        """Charge against a reservation on ``connector_id``; returns the session and ""
        or, when the booking could not be used (e.g. ``no_show``, ``server_down``), the
        reason, after charging as a walk-in at this station instead (same session)."""
        env = self.env
        assert self._desk is not None
        t_arrive = env.now
        self._arrive(vehicle_id, session_id, soc, booking_id)
        if env.now < start_min:  # early: the reservation starts later
            yield env.timeout(start_min - env.now)
        spec = self.connectors[self._order[connector_id]]
        w = _Waiter(env.event(), plan)
        self._booked.setdefault(connector_id, []).append(w)
        self._dispatch()
        left = patience_min - (env.now - t_arrive)
        if not w.event.triggered:
            if left == float("inf"):
                yield w.event
            else:
                yield w.event | env.timeout(max(left, 0.0))
        why = ""
        if not w.event.triggered:
            self._booked[connector_id].remove(w)
            why = "connector_busy"
        else:
            why = self._desk.authorize(booking_id, env.now)
            if not why:
                p = plan(spec, env.now)
                result = yield from self._session(
                    vehicle_id, session_id, soc, spec, p, t_arrive, booking_id
                )
                self._desk.session_ended(booking_id, env.now)
                return result, ""
            self._release(spec)  # give the connector back, then queue like anyone else
        result = yield from self._queue_walkin(
            vehicle_id, session_id, soc, plan, patience_min, t_arrive
        )
        return result, why

    def _session(
        self,
        vehicle_id: str,
        session_id: str,
        soc: float | None,
        spec: ConnectorSpec,
        p: SessionPlan,
        t_arrive: float,
        booking_id: str | None = None,
    ) -> Generator[simpy.Event, Any, SessionResult]:
        env = self.env
        company = self.company
        self.waiting -= 1
        self.busy += 1
        now = env.now
        wait = now - t_arrive
        queued = self.waiting if self._desk is None else len(self._walkins)  # (self.queued)
        self._start_row(
            now,
            vehicle_id,
            self.station_id,
            self.company_id,
            spec.connector_id,
            session_id,
            booking_id,
            soc,
            wait,
            queued,
        )
        if company is not None:  # (_changed)
            company.report(self)
        try:
            yield simpy.Timeout(env, p.charge_min)
        finally:
            self.busy -= 1
            # the line as the session ends, before its connector goes to the next in it
            queued = self.waiting if self._desk is None else len(self._walkins)
            self._release(spec)
        self.mean_session_min = mean_session_after(self.mean_session_min, p.charge_min,
                                                   self._alpha)
        self._end_row(
            env.now,
            vehicle_id,
            self.station_id,
            self.company_id,
            spec.connector_id,
            session_id,
            booking_id,
            p.soc_after,
            p.energy_kwh,
            p.price,
            p.power_kw,
            queued,
        )
        if company is not None:  # (_changed)
            company.report(self)
        return _new_result(spec, wait, p)

    def _release(self, spec: ConnectorSpec) -> None:
        k = self._order[spec.connector_id]
        if self._desk is None:  # plain FIFO: to the first in line, else idle
            if self._line:
                # the connector is the first waiter's now; it plugs in after one hop more
                # through the event queue (what a store's put and get took), so vehicles that
                # carry on at the same instant (the one leaving, say) go first, as they did
                handover = simpy.Event(self.env)
                handover.callbacks.append(partial(_wake, self._line.popleft(), spec))
                handover.succeed()
            else:
                heappush(self._idle, (-spec.power_kw, k, spec))
            return
        self._free_now[k] = spec
        self._dispatch()

    def refresh(self) -> None:
        """Reservations changed (released, expired, ended): hand out connectors again."""
        if self._desk is not None:
            self._dispatch()

    def _dispatch(self) -> None:
        """Hand free connectors to booked vehicles first, then to walk-ins that fit."""
        desk, free, now = self._desk, self._free_now, self.env.now
        assert desk is not None
        if not free:
            return
        for cid, waiters in self._booked.items():
            k = self._order[cid]
            if waiters and k in free:
                waiters.pop(0).event.succeed((free.pop(k), None))
        if not self._walkins or not free:
            return
        retry = float("inf")
        plans: dict[int, SessionPlan] = {}

        def fits(w: _Waiter, k: int, spec: ConnectorSpec) -> bool:
            nonlocal retry
            p = w.plan(spec, now)
            until = desk.blocked_until(spec.connector_id, now, now + p.charge_min)
            if until is None:
                plans[id(w)] = p
                return True
            retry = min(retry, until)
            return False

        # the rule the live company servers use too (evsim.queueing)
        for w, k in assign_walkins(self._walkins, free, fits):
            self._walkins.remove(w)
            w.event.succeed((free.pop(k), plans[id(w)]))
        if retry < self._retry_at and retry > now:
            # nothing else may announce that a reservation stopped blocking: look again then
            self._retry_at = retry
            ev = self.env.timeout(retry - now)

            def retry_then(_ev: object, t: float = retry) -> None:
                self._retry(t)

            ev.callbacks.append(retry_then)

    def _retry(self, t: float) -> None:
        if self._retry_at == t:
            self._retry_at = float("inf")
        self._dispatch()


def _wake(turn: simpy.Event, spec: ConnectorSpec, _handover: simpy.Event) -> None:
    turn.succeed(spec)


@dataclass(slots=True)
class _Waiter:
    event: simpy.Event  # succeeds with (connector, plan or None)
    plan: Callable[[ConnectorSpec, float], SessionPlan]
