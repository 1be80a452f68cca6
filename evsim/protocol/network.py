"""Deterministic in-memory network and cluster driver for protocol nodes.

Pure and seeded (``random.Random``), so the SimPy model, tests and benchmarks
can run the protocol over a network that drops, duplicates, delays and
reorders messages, and crash/restart nodes from their persisted logs, with
reproducible results.  No real time and no I/O: the caller advances
``now_min``.

* :class:`SimNetwork` -- messages in flight, each with a delivery time.
* :class:`Cluster` -- nodes + network + persisted logs, with the write-ahead
  rule applied after every node call (records persisted, then messages sent),
  per-node clock offsets, ``crash`` (rebuild from the persisted log) and an
  inbox for destinations that are not nodes (vehicles).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from evsim.protocol.log import Record
from evsim.protocol.messages import Message, Outgoing


class Node(Protocol):
    """What the cluster needs from a protocol node (Coordinator, Participant)."""

    node_id: str
    log: list[Record]

    def handle(self, msg: Message, now_min: float) -> list[Outgoing]: ...

    def tick(self, now_min: float) -> list[Outgoing]: ...

    def new_records(self) -> list[Record]: ...


@dataclass(order=True, slots=True)
class Envelope:
    """A message in flight to ``dst``, deliverable from ``deliver_at_min``."""

    deliver_at_min: float
    seq: int
    dst: str = field(compare=False)
    msg: Message = field(compare=False)


class SimNetwork:
    """Lossy, duplicating, delaying (hence reordering) network of messages in flight.

    Each sent message is dropped with probability ``drop_p``; otherwise it is
    delivered after ``delay_min + U(0, jitter_min)``, and with probability
    ``dup_p`` a second copy with its own delay is also queued.
    """

    def __init__(
        self,
        rng: random.Random | int = 0,
        *,
        drop_p: float = 0.0,
        dup_p: float = 0.0,
        delay_min: float = 0.0,
        jitter_min: float = 0.0,
    ) -> None:
        self.rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        self.drop_p = drop_p
        self.dup_p = dup_p
        self.delay_min = delay_min
        self.jitter_min = jitter_min
        self.in_flight: list[Envelope] = []  # a heap
        self._seq = 0
        self.sent = 0
        self.dropped = 0
        self.duplicated = 0

    def __len__(self) -> int:
        return len(self.in_flight)

    def _queue(self, dst: str, msg: Message, now_min: float) -> None:
        delay = self.delay_min
        if self.jitter_min:
            delay += self.rng.random() * self.jitter_min
        self._seq += 1
        heapq.heappush(self.in_flight, Envelope(now_min + delay, self._seq, dst, msg))

    def send(self, outgoing: Iterable[Outgoing], now_min: float) -> None:
        """Put messages in flight (or lose them)."""
        rng = self.rng
        for dst, msg in outgoing:
            self.sent += 1
            if self.drop_p and rng.random() < self.drop_p:
                self.dropped += 1
                continue
            self._queue(dst, msg, now_min)
            if self.dup_p and rng.random() < self.dup_p:
                self.duplicated += 1
                self._queue(dst, msg, now_min)

    def pop_due(self, now_min: float) -> Envelope | None:
        """The next envelope deliverable at ``now_min``, or None."""
        if self.in_flight and self.in_flight[0].deliver_at_min <= now_min:
            return heapq.heappop(self.in_flight)
        return None

    def next_delivery_min(self) -> float | None:
        """When the earliest message in flight becomes deliverable."""
        return self.in_flight[0].deliver_at_min if self.in_flight else None


class Cluster:
    """Protocol nodes wired through a :class:`SimNetwork`, with durable logs."""

    def __init__(self, network: SimNetwork | None = None, now_min: float = 0.0) -> None:
        self.network = network if network is not None else SimNetwork()
        self.now_min = now_min
        self.nodes: dict[str, Node] = {}
        self.persisted: dict[str, list[Record]] = {}
        self.offsets_min: dict[str, float] = {}
        self.inbox: dict[str, list[Message]] = {}
        self._rebuild: dict[str, Callable[[list[Record]], Node]] = {}
        self.delivered = 0

    def add(
        self, node: Node, rebuild: Callable[[list[Record]], Node], offset_min: float = 0.0
    ) -> None:
        """Register a node and how to rebuild it from its records after a crash."""
        self.nodes[node.node_id] = node
        self.persisted[node.node_id] = list(node.log)
        self.offsets_min[node.node_id] = offset_min
        self._rebuild[node.node_id] = rebuild

    def local_now(self, node_id: str) -> float:
        """The node's own clock (global time plus its constant offset)."""
        return self.now_min + self.offsets_min.get(node_id, 0.0)

    def dispatch(self, node_id: str, out: list[Outgoing], *, lose: bool = False) -> None:
        """Write-ahead: persist the node's new records, then send its messages."""
        self.persisted[node_id].extend(self.nodes[node_id].new_records())
        if not lose:
            self.network.send(out, self.now_min)

    def call(self, node_id: str, fn: Callable[[Node, float], list[Outgoing]]) -> None:
        """Run a local command ``fn(node, local_now)`` and dispatch its output."""
        node = self.nodes[node_id]
        self.dispatch(node_id, fn(node, self.local_now(node_id)))

    def deliver(self, env: Envelope) -> None:
        """Hand one envelope to its node (or to the inbox if not a node)."""
        self.delivered += 1
        node = self.nodes.get(env.dst)
        if node is None:
            self.inbox.setdefault(env.dst, []).append(env.msg)
            return
        self.dispatch(env.dst, node.handle(env.msg, self.local_now(env.dst)))

    def deliver_due(self, max_messages: int = 1_000_000) -> int:
        """Deliver everything deliverable now (including replies sent with no delay)."""
        n = 0
        while n < max_messages:
            env = self.network.pop_due(self.now_min)
            if env is None:
                break
            self.deliver(env)
            n += 1
        return n

    def tick_all(self) -> None:
        """Tick every node at its local time."""
        for nid, node in self.nodes.items():
            self.dispatch(nid, node.tick(self.local_now(nid)))

    def crash(self, node_id: str) -> Node:
        """Lose the node's memory and rebuild it from its persisted log."""
        self.nodes[node_id].new_records()  # unpersisted records die with the process
        node = self._rebuild[node_id](list(self.persisted[node_id]))
        self.nodes[node_id] = node
        return node

    def run(self, until_min: float, tick_min: float) -> None:
        """Alternate delivering due messages and ticking every ``tick_min``."""
        while self.now_min < until_min:
            self.deliver_due()
            self.tick_all()
            self.deliver_due()
            self.now_min += tick_min
