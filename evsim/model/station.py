"""A charging station in the SimPy model: connectors, a FIFO queue, sessions.

Vehicles queue first-come first-served for any free connector (the most powerful free one is
handed out first). A vehicle that waits longer than its patience leaves (``abandon``). What a
session does once plugged in (how long, how much energy, what it costs) is the caller's
``plan`` function, so the same station serves the EV model and the queueing-theory checks.
Every change is reported to the owning company server, which publishes it with a delay.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import simpy

from evsim.model.world import ConnectorSpec
from evsim.trace import Kind, TraceWriter

if TYPE_CHECKING:
    from evsim.model.company import CompanyServer

__all__ = ["SessionPlan", "SessionResult", "SimStation"]


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
        ewma_alpha: float = 0.1,
        default_session_min: float = 45.0,
    ) -> None:
        self.env = env
        self.index = index
        self.station_id = station_id
        self.company_id = company_id
        self.connectors = connectors
        self.trace = trace
        self.company = company
        self._free = simpy.PriorityStore(env)
        for k, spec in enumerate(connectors):
            self._free.put(simpy.PriorityItem((-spec.power_kw, k), spec))
        self._order = {spec.connector_id: k for k, spec in enumerate(connectors)}
        self.waiting = 0
        self.busy = 0
        self.online = True
        self.mean_session_min = default_session_min
        self._alpha = ewma_alpha

    @property
    def n_connectors(self) -> int:
        return len(self.connectors)

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
        env, tr = self.env, self.trace
        t_arrive = env.now
        self.waiting += 1
        tr.emit(
            t_arrive,
            Kind.ARRIVE,
            vehicle_id=vehicle_id,
            station_id=self.station_id,
            company_id=self.company_id,
            session_id=session_id,
            soc=soc,
            queue_len=self.waiting,
        )
        self._changed()
        get = self._free.get()
        if patience_min == float("inf"):
            item = yield get
        else:
            timeout = env.timeout(patience_min)
            fired = yield get | timeout
            if get not in fired:
                get.cancel()
                self.waiting -= 1
                tr.emit(
                    env.now,
                    Kind.ABANDON,
                    vehicle_id=vehicle_id,
                    station_id=self.station_id,
                    company_id=self.company_id,
                    session_id=session_id,
                    soc=soc,
                    wait_min=env.now - t_arrive,
                    queue_len=self.waiting,
                )
                self._changed()
                return SessionResult(None, env.now - t_arrive, None)
            item = fired[get]
        spec: ConnectorSpec = item.item
        self.waiting -= 1
        self.busy += 1
        wait = env.now - t_arrive
        tr.emit(
            env.now,
            Kind.SESSION_START,
            vehicle_id=vehicle_id,
            station_id=self.station_id,
            company_id=self.company_id,
            connector_id=spec.connector_id,
            session_id=session_id,
            soc=soc,
            wait_min=wait,
            queue_len=self.waiting,
        )
        self._changed()
        p = plan(spec, env.now)
        try:
            yield env.timeout(p.charge_min)
        finally:
            self.busy -= 1
            self._free.put(
                simpy.PriorityItem((-spec.power_kw, self._order[spec.connector_id]), spec)
            )
        self.mean_session_min += self._alpha * (p.charge_min - self.mean_session_min)
        tr.emit(
            env.now,
            Kind.SESSION_END,
            vehicle_id=vehicle_id,
            station_id=self.station_id,
            company_id=self.company_id,
            connector_id=spec.connector_id,
            session_id=session_id,
            soc=p.soc_after,
            energy_kwh=p.energy_kwh,
            price=p.price,
            power_kw=p.power_kw,
            queue_len=self.waiting,
        )
        self._changed()
        return SessionResult(spec, wait, p)
