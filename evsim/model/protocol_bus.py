"""The reservation protocol inside the SimPy model: company servers exchanging messages.

Each company server runs one :class:`~evsim.protocol.Coordinator` (node
``"<company>:coordinator"``, books the trips of the vehicles whose home company it is) and one
:class:`~evsim.protocol.Participant` (node ``"<company>"``, owns its stations' connectors).
Vehicles are nodes ``"vehicle:<vehicle id>"``. :class:`ProtocolBus` is the adapter that runs
these sans-IO state machines on SimPy time:

* **Messages** between different servers, and between a vehicle and its home server, are
  delivered after ``network.latency_min`` (+ ``U(0, jitter_min)``) and lost with probability
  ``network.loss_rate``, drawn from a seeded ``random.Random`` of its own (the demand draws
  are untouched, so the same seed gives the same trips in every booking mode). Messages
  between the coordinator and participant of one server are local: no delay, no loss.
* **Write-ahead**: after every node call the node's new records are appended to its durable
  log (``persisted``) before its messages are sent.
* **Timers**: every node is ticked at its own ``next_timer_min()`` (re-armed after each call).
* **Outages** (``network.outages``): while a company is down its nodes are gone (every
  message to them is dropped, they send and tick nothing) and its status updates stop
  reaching the status board. At the end of the window both nodes are rebuilt from their
  durable logs with ``from_log`` (their volatile state -- votes, ACKs, retry timers -- is
  lost, exactly as after a crash) and the server republishes its stations' status.
* **Stations** talk to their owner through a :class:`StationDesk` (the charge point's OCPP
  link, modelled as local commands: no latency, no loss). Starting a session against a
  booking needs the owner up (``authorize``); session ends and walk-in sessions are
  buffered while it is down and replayed when it comes back, as a charge point queues its
  transaction messages offline. Walk-in sessions are registered with the participant as
  direct bookings ``walkin:<session id>`` (started at once), so the participant never books
  a window on a connector a walk-in occupies; they are not traced as bookings.
* **Connector classes**: the participant books per ``"<station>#<kW><type>"`` (for example
  ``acme_alpha#50DC``): one bookable "station" per group of equal connectors, so a booked
  window's length is computed for the power the vehicle will actually get.

Trace rows: ``booking`` for every change of a trip booking (status in OCPI words, the trip
id is the vehicle id, the booking id ``<trip id>/<stop>``), ``server_status`` (``down`` /
``up``) at outage edges. The vehicles trace ``trip_booking`` (see :mod:`evsim.model.booking`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import simpy

from evsim.booking_app import home_company
from evsim.planning import connector_pools
from evsim.protocol import (
    BookingChanged,
    BookingCreated,
    BookingState,
    Coordinator,
    Message,
    Outgoing,
    Participant,
    Record,
)
from evsim.protocol.tracing import BookingRows
from evsim.queueing import WALKIN_GRACE_MIN
from evsim.trace import Kind

if TYPE_CHECKING:
    from evsim.model.simulation import Simulation

__all__ = ["ProtocolBus", "StationDesk", "coordinator_id", "vehicle_node"]

WALKIN = "walkin:"


def coordinator_id(company: str) -> str:
    return f"{company}:coordinator"


def vehicle_node(vehicle_id: str) -> str:
    return f"vehicle:{vehicle_id}"


class ProtocolBus:
    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.env: simpy.Environment = sim.env
        self.trace = sim.trace
        sc = sim.scenario
        self.net = sc.network
        self.cfg = sc.booking
        self.rng = random.Random(f"evsim-network-{sim.seed}")
        self.companies = [c.id for c in sc.companies]
        self._coord_config: dict[str, Any] = self.cfg.coordinator_config()
        # per company, its stations' connectors (in the station's order) and their classes
        # (the walk-in share's pools, as at a live server); station ids -> indices
        self.station_maps: dict[str, dict[str, list[str]]] = {c: {} for c in self.companies}
        self.pools: dict[str, dict[str, str]] = {c: {} for c in self.companies}
        self.station_index: dict[str, int] = {}
        self.station_of: dict[str, str] = {}  # connector -> station id
        for st in sim.stations:
            self.station_maps[st.company_id][st.station_id] = [
                spec.connector_id for spec in st.connectors
            ]
            self.station_index[st.station_id] = st.index
            self.pools[st.company_id].update(connector_pools(st.connectors))
            for spec in st.connectors:
                self.station_of[spec.connector_id] = st.station_id
        self.nodes: dict[str, Coordinator | Participant | None] = {}
        self.persisted: dict[str, list[Record]] = {}
        self.company_of: dict[str, str] = {}
        self.participants: dict[str, Participant] = {}  # last live object (read while down)
        for c in self.companies:
            self._start_nodes(c, fresh=True)
        self.up = dict.fromkeys(self.companies, True)
        self._down_count = dict.fromkeys(self.companies, 0)
        self._pending: dict[str, list[Callable[[float], None]]] = {c: [] for c in self.companies}
        self._wake_at: dict[str, float] = dict.fromkeys(self.nodes, float("inf"))
        self._booking_rows = {c: BookingRows(c, trip_vehicle) for c in self.companies}
        self._inbox: dict[str, Callable[[Message], None]] = {}
        self.sent = self.lost = self.dropped_down = 0
        self.desks = {st.index: StationDesk(self, st.index, st.company_id) for st in sim.stations}
        for o in self.net.outages:
            self.env.process(self._outage(o.company, o.start_min, o.end_min))

    # ------------------------------------------------------------------ nodes

    def _start_nodes(self, company: str, fresh: bool) -> None:
        cid, pid = coordinator_id(company), company
        smap = self.station_maps[company]
        config: dict[str, Any] = {**self.cfg.participant_config(), "pools": self.pools[company]}
        if fresh:
            coord = Coordinator(cid, **self._coord_config)
            part = Participant(pid, smap, **config)
            self.persisted[cid], self.persisted[pid] = [], []
        else:  # recovery: rebuild from the durable logs
            coord = Coordinator.from_log(cid, self.persisted[cid], **self._coord_config)
            part = Participant.from_log(pid, smap, self.persisted[pid], **config)
        self.nodes[cid], self.nodes[pid] = coord, part
        self.company_of[cid] = self.company_of[pid] = company
        self.participants[company] = part

    def participant(self, company: str) -> Participant:
        """The company's participant (while it is down: its state at the crash, read-only)."""
        return self.participants[company]

    def coordinator(self, company: str) -> Coordinator | None:
        node = self.nodes[coordinator_id(company)]
        return node if isinstance(node, Coordinator) else None

    def home_company(self, vehicle_id: str) -> str:
        """A vehicle's home company (its coordinator): :func:`evsim.booking_app.home_company`."""
        return home_company(vehicle_id, self.companies)

    def _after(self, node_id: str, out: list[Outgoing]) -> None:
        """Write-ahead: persist the node's new records, trace them, then send its messages."""
        node = self.nodes[node_id]
        assert node is not None
        recs = node.new_records()
        if recs:
            self.persisted[node_id].extend(recs)
            if isinstance(node, Participant):
                self._trace_records(self.company_of[node_id], recs)
        self.send(node_id, out)
        self._arm(node_id)

    def _arm(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node is None:
            return
        t = node.next_timer_min()
        if t is None or t >= self._wake_at[node_id]:
            return
        self._wake_at[node_id] = t
        ev = self.env.timeout(max(t - self.env.now, 0.0))

        def wake(_ev: object, n: str = node_id, at: float = t) -> None:
            self._wake(n, at)

        ev.callbacks.append(wake)

    def _wake(self, node_id: str, t: float) -> None:
        if self._wake_at[node_id] != t:
            return  # superseded by an earlier wake-up
        self._wake_at[node_id] = float("inf")
        node = self.nodes[node_id]
        if node is None:
            return
        self._after(node_id, node.tick(self.env.now))

    # ------------------------------------------------------------------ network

    def send(self, src: str, out: list[Outgoing]) -> None:
        src_company = self.company_of.get(src)
        for dst, msg in out:
            self.sent += 1
            local = src_company is not None and self.company_of.get(dst) == src_company
            delay = 0.0
            if not local:
                if self.net.loss_rate and self.rng.random() < self.net.loss_rate:
                    self.lost += 1
                    continue
                delay = self.net.latency_min
                if self.net.jitter_min:
                    delay += self.rng.random() * self.net.jitter_min
            ev = self.env.timeout(delay)

            def deliver(_ev: object, d: str = dst, m: Message = msg) -> None:
                self._deliver(d, m)

            ev.callbacks.append(deliver)

    def _deliver(self, dst: str, msg: Message) -> None:
        handler = self._inbox.get(dst)
        if handler is not None:
            handler(msg)
            return
        node = self.nodes.get(dst)
        if node is None:  # server down (or nobody there): the message is lost
            self.dropped_down += 1
            return
        self._after(dst, node.handle(msg, self.env.now))

    # ------------------------------------------------------------------ outages

    def _outage(self, company: str, start: float, end: float) -> Generator[simpy.Event, Any, None]:
        env = self.env
        if start > env.now:
            yield env.timeout(start - env.now)
        self._down_count[company] += 1
        if self._down_count[company] == 1:
            self._go_down(company)
        yield env.timeout(end - env.now)
        self._down_count[company] -= 1
        if self._down_count[company] == 0:
            self._come_up(company)

    def _go_down(self, company: str) -> None:
        self.up[company] = False
        for nid in (coordinator_id(company), company):
            node = self.nodes[nid]
            if node is not None:
                node.new_records()  # anything not persisted dies with the process (none here)
            self.nodes[nid] = None
            self._wake_at[nid] = float("inf")
        server = self.sim.companies[company]
        server.up = False
        self.trace.emit(self.env.now, Kind.SERVER_STATUS, company_id=company, status="down")

    def _come_up(self, company: str) -> None:
        self._start_nodes(company, fresh=False)
        self.up[company] = True
        self.trace.emit(self.env.now, Kind.SERVER_STATUS, company_id=company, status="up")
        now = self.env.now
        pending, self._pending[company] = self._pending[company], []
        for cmd in pending:  # the charge points' buffered transaction messages
            cmd(now)
        for nid in (coordinator_id(company), company):
            self._arm(nid)
            node = self.nodes[nid]
            assert node is not None
            self._after(nid, node.tick(now))
        server = self.sim.companies[company]
        server.up = True
        for st in server.stations:
            server.report(st)
            st.refresh()

    # ------------------------------------------------------------------ stations (local)

    def local(self, company: str, cmd: Callable[[float], None]) -> None:
        """Run a charge point -> server command now, or when the server is back up."""
        if self.up[company]:
            cmd(self.env.now)
        else:
            self._pending[company].append(cmd)

    def _trace_records(self, company: str, recs: list[Record]) -> None:
        """The ``booking`` rows of the participant's new records
        (:class:`evsim.protocol.tracing.BookingRows`, as a live server's); the stations they
        touched hand out their connectors again."""
        part = self.participants[company]
        rows = self._booking_rows[company]
        touched: set[int] = set()
        for r in recs:
            if not isinstance(r, BookingCreated | BookingChanged):
                continue
            b = part.booking(r.booking_id)
            assert b is not None
            station = self.station_index.get(b.station_id)
            if station is not None:
                touched.add(station)
            row = rows.row(part, r)
            if row is not None:
                self.trace.emit(self.env.now, Kind.BOOKING, **row)
        for i in sorted(touched):
            self.sim.stations[i].refresh()

    # ------------------------------------------------------------------ vehicles

    def attach_vehicle(self, vehicle_node_id: str, deliver: Callable[[Message], None]) -> None:
        """Deliver every message addressed to ``vehicle_node_id`` to ``deliver``."""
        self._inbox[vehicle_node_id] = deliver


def trip_vehicle(trip_id: str) -> str | None:
    """The vehicle of a simulated trip request: ``v7`` for ``v7`` and ``v7.2`` (its 2nd)."""
    return trip_id.partition(".")[0] or None


class StationDesk:
    """A station's OCPP link to its owner's participant (see the module docstring)."""

    def __init__(self, bus: ProtocolBus, station_index: int, company: str) -> None:
        self.bus = bus
        self.station_index = station_index
        self.company = company
        self._walkins: set[str] = set()

    def blocked_until(self, connector_id: str, start_min: float, end_min: float) -> float | None:
        return self.bus.participant(self.company).blocked_until(connector_id, start_min, end_min)

    def walkin_started(
        self, session_id: str, connector_id: str, start_min: float, end_min: float
    ) -> None:
        bus = self.bus
        if not bus.up[self.company] or not end_min > start_min:
            return  # offline charge point: the server never hears of this session
        p = bus.participant(self.company)
        bid = WALKIN + session_id
        reply = p.book(
            bid,
            bus.station_of[connector_id],
            start_min,
            end_min,
            start_min,
            connector_id=connector_id,
            grace_min=WALKIN_GRACE_MIN,
        )
        if reply.state == BookingState.RESERVED.value:
            p.start_charging(bid, start_min)
            self._walkins.add(bid)
        bus._after(self.company, [])

    def walkin_ended(self, session_id: str, now_min: float) -> None:
        bid = WALKIN + session_id
        if bid in self._walkins:
            self._walkins.discard(bid)
            self.session_ended(bid, now_min)

    def authorize(self, booking_id: str, now_min: float) -> str:
        bus = self.bus
        if not bus.up[self.company]:
            return "server_down"
        v = bus.participant(self.company).start_charging(booking_id, now_min)
        bus._after(self.company, [])
        if v.state is BookingState.FULFILLED and v.charging:
            return ""
        return v.reason or v.state.value.lower()

    def session_ended(self, booking_id: str, now_min: float) -> None:
        def cmd(now: float, bid: str = booking_id) -> None:
            p = self.bus.participant(self.company)
            v = p.booking(bid)
            if v is not None and v.charging:
                p.stop_charging(bid, now)
                self.bus._after(self.company, [])

        self.bus.local(self.company, cmd)
