"""Hosting the sans-IO protocol nodes of one company: a Participant and a Coordinator.

``ProtocolHost`` is the only place that calls into the state machines (they are not
thread-safe; one re-entrant lock serialises every call, from HTTP handlers, the bus worker
and the ticker alike).  Every call follows the same steps (:meth:`ProtocolHost.execute`):

1. under the lock, run the operation at ``now = clock()``; messages addressed to this
   company's own nodes are delivered in-process right away (a trip with a stop at home
   needs no broker round trip), TripResults addressed to the API node are collected;
2. persist both nodes' ``new_records()`` -- plus whatever the caller adds in the same
   transaction (the trips row, trace rows) -- and commit (write-ahead rule);
3. release the lock, publish the messages for other companies on
   ``evsim/protocol/{dst}/{company}`` (QoS 1), then run the post-commit hooks (vehicle
   notifications).  Publishing outside the lock means a synchronous bus (tests) or a slow
   broker can never deadlock two servers.

Node ids: the participant is ``{company}``, the coordinator ``{company}.coord`` and the API
front end (the "vehicle node" TripResults go to) ``{company}.api``.  Garbage on the protocol
topics is logged and dropped; it never reaches the state machines.

Fault injection (:mod:`live.faults`, only when ``EVSIM_FAULT`` / ``EVSIM_FAULT_FILE`` is set):
the host calls the injector right after each commit (step 2) and before / after each publish
(step 3), and drops protocol traffic in and out while an injected partition lasts.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Connection

from evsim.protocol import (
    BookingChanged,
    BookingEvent,
    Coordinator,
    Message,
    Outgoing,
    Participant,
    ProtocolError,
    Record,
    TripResult,
    decode,
    encode,
)
from live import topics
from live.bus import MAX_PAYLOAD_BYTES, Bus
from live.faults import FaultInjector
from live.storage import Storage

log = logging.getLogger(__name__)

T = TypeVar("T")


def node_ids(company: str) -> tuple[str, str, str]:
    """(participant, coordinator, api) node ids of a company."""
    return company, f"{company}.coord", f"{company}.api"


@dataclass(slots=True)
class Effects:
    """What one protocol step produced, handed to post-commit hooks."""

    now: float
    results: list[TripResult] = field(default_factory=list)
    participant_records: list[Record] = field(default_factory=list)
    coordinator_records: list[Record] = field(default_factory=list)
    sent: list[Outgoing] = field(default_factory=list)

    def booking_events(self, event: BookingEvent) -> list[BookingChanged]:
        return [
            r for r in self.participant_records
            if isinstance(r, BookingChanged) and r.event == event.value
        ]


class ProtocolHost:
    """A company's Participant + Coordinator behind one lock, persisted and wired to a bus."""

    def __init__(
        self,
        company: str,
        stations: Mapping[str, Sequence[str]],
        storage: Storage,
        clock: Callable[[], float],
        *,
        participant_config: Mapping[str, Any] | None = None,
        coordinator_config: Mapping[str, Any] | None = None,
        faults: FaultInjector | None = None,
    ) -> None:
        self.company = company
        self.pid, self.cid, self.api = node_ids(company)
        self.storage = storage
        self.clock = clock
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        # trip id -> Event of each request waiting for its TripResult (set after the commit
        # that stores the result; waking only that waiter, not every waiting request)
        self._waiters: dict[str, threading.Event] = {}
        self.participant = Participant.from_log(
            self.pid, stations, storage.load_records(self.pid), **(participant_config or {})
        )
        self.coordinator = Coordinator.from_log(
            self.cid, storage.load_records(self.cid), **(coordinator_config or {})
        )
        self.bus: Bus | None = None
        self.hooks: list[Callable[[Effects], None]] = []
        self._results: dict[str, TripResult] = {}  # also answers for never-started trips
        self.dropped = 0  # garbage / misaddressed protocol payloads ignored
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        # fault injection (live.faults): None unless EVSIM_FAULT / EVSIM_FAULT_FILE is set
        self.faults = faults if faults is not None else FaultInjector.from_env()

    # ------------------------------------------------------------------ bus

    def attach(self, bus: Bus) -> None:
        """Subscribe this company's protocol topics on ``bus`` and send through it."""
        self.bus = bus
        bus.subscribe(topics.protocol_filter(self.pid), self.on_payload)  # [access] {dst}/+
        bus.subscribe(topics.protocol_filter(self.cid), self.on_payload)

    def on_payload(self, topic: str, payload: bytes) -> None:
        """Bus handler for ``evsim/protocol/{node}/{src}``; never raises."""
        if self.faults is not None and self.faults.partitioned():
            return  # injected partition (live.faults): this company is cut off the bus
        info = topics.parse(topic)
        if info is None or info.kind != "protocol" or info.node_id not in (self.pid, self.cid):
            self.dropped += 1
            log.warning("protocol message on unexpected topic %s ignored", topic)
            return
        if len(payload) > MAX_PAYLOAD_BYTES:
            self.dropped += 1
            log.warning("oversized protocol payload (%d bytes) on %s ignored", len(payload), topic)
            return
        try:
            msg = decode(payload)
        except (ProtocolError, UnicodeDecodeError, ValueError, TypeError) as exc:
            self.dropped += 1
            log.warning("malformed protocol payload on %s ignored: %s", topic, exc)
            return
        if info.src is not None and msg.src not in node_ids(info.src):  # [access] no spoofing
            self.dropped += 1
            log.warning("protocol message from %r on %s (sender %r) ignored", msg.src, topic,
                        info.src)
            return
        try:
            self.deliver(info.node_id or "", msg)
        except Exception:  # state machines reject some inputs with ProtocolError
            self.dropped += 1
            log.exception("protocol message %s on %s could not be handled", msg.msg_id, topic)

    def deliver(self, dst: str, msg: Message) -> None:
        node: Participant | Coordinator = self.participant if dst == self.pid else self.coordinator
        self.execute(lambda now: (None, node.handle(msg, now)))

    # ------------------------------------------------------------------ the one path in

    def execute(
        self,
        op: Callable[[float], tuple[T, list[Outgoing]]],
        *,
        extra: Callable[[Connection, T, Effects], None] | None = None,
    ) -> T:
        """Run ``op(now)`` on the nodes, persist, then send; returns op's value.

        ``extra(conn, value, effects)`` runs inside the same transaction as the protocol
        records (after the operation and its local deliveries).
        """
        remote: list[Outgoing] = []
        with self.lock:
            now = self.clock()
            value, outs = op(now)
            fx = Effects(now)
            queue = deque(outs)
            while queue:
                o = queue.popleft()
                if o.dst == self.pid:
                    queue.extend(self.participant.handle(o.msg, now))
                elif o.dst == self.cid:
                    queue.extend(self.coordinator.handle(o.msg, now))
                elif o.dst == self.api:
                    if isinstance(o.msg, TripResult):
                        fx.results.append(o.msg)
                        self._results[o.msg.trip_id] = o.msg
                else:
                    remote.append(o)
            fx.participant_records = self.participant.new_records()
            fx.coordinator_records = self.coordinator.new_records()
            fx.sent = remote
            if fx.participant_records or fx.coordinator_records or extra is not None:
                with self.storage.begin() as conn:
                    Storage.append_records(conn, self.pid, fx.participant_records)
                    Storage.append_records(conn, self.cid, fx.coordinator_records)
                    if extra is not None:
                        extra(conn, value, fx)
                if self.faults is not None:  # injected crash right after the commit
                    self.faults.after_commit(fx.participant_records + fx.coordinator_records)
            if fx.results or fx.participant_records or fx.coordinator_records:
                self.changed.notify_all()
                for tid, ev in self._waiters.items():
                    if not ev.is_set() and self.result(tid) is not None:
                        ev.set()
        self._send(remote)
        if fx.results or fx.participant_records or fx.coordinator_records:
            for hook in self.hooks:
                try:
                    hook(fx)
                except Exception:
                    log.exception("post-commit hook %r failed", hook)
        return value

    def _send(self, outs: list[Outgoing]) -> None:
        bus, faults = self.bus, self.faults
        for o in outs:
            if bus is None:
                log.warning("no bus attached; %s to %s not sent", type(o.msg).__name__, o.dst)
                continue
            if faults is not None:  # live.faults: partition, crash before a publish
                if faults.partitioned():
                    continue
                faults.before_send(o.msg)
            try:
                bus.publish(topics.protocol_topic(o.dst, self.company),  # [access]
                            encode(o.msg).encode(), qos=1)
            except Exception:  # retries are the protocol's business (tick re-sends)
                log.exception("publishing %s to %s failed", type(o.msg).__name__, o.dst)
            if faults is not None:  # crash / pause / cut right after the broker has it
                faults.after_send(o.msg, bus)

    # ------------------------------------------------------------------ timers

    def tick(self) -> None:
        """Advance both nodes' timers to ``clock()`` and route what they emit."""
        self.execute(
            lambda now: (None, self.participant.tick(now) + self.coordinator.tick(now))
        )

    def start_ticker(self, interval_s: float) -> None:
        if self._ticker is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.tick()
                except Exception:
                    log.exception("protocol tick failed")

        self._ticker = threading.Thread(target=loop, name=f"ticker-{self.company}", daemon=True)
        self._ticker.start()

    def stop_ticker(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
            self._ticker = None

    # ------------------------------------------------------------------ trip results

    def result(self, trip_id: str) -> TripResult | None:
        """The trip's definitive result (current coordinator state first), or None."""
        with self.lock:
            return self.coordinator.trip_result(trip_id) or self._results.get(trip_id)

    def wait_result(self, trip_id: str, timeout_s: float) -> TripResult | None:
        """Block up to ``timeout_s`` wall seconds for a trip's definitive result."""
        with self.lock:
            res = self.result(trip_id)
            if res is not None:
                return res
            ev = self._waiters.setdefault(trip_id, threading.Event())
        try:
            ev.wait(timeout_s)
        finally:
            with self.lock:
                self._waiters.pop(trip_id, None)
        return self.result(trip_id)
