"""Shared helpers for the protocol tests (no tests here): a hand-driven in-memory link."""

from __future__ import annotations

from collections.abc import Callable

from evsim.protocol import Coordinator, Message, Outgoing, Participant, StopRequest, TripRequest

STATIONS = {
    "P1": {"S1": ["P1-c1", "P1-c2"]},
    "P2": {"S2": ["P2-c1", "P2-c2"]},
    "P3": {"S3": ["P3-c1"]},
}


def make_participant(pid: str, records: list | None = None, **kw: float) -> Participant:
    if records is None:
        return Participant(pid, STATIONS[pid], **kw)
    return Participant.from_log(pid, STATIONS[pid], records, **kw)


def trip(
    trip_id: str, legs: list[tuple[str, float, float]], *, connector: bool = False,
    vehicle: str = "V",
) -> TripRequest:
    """A trip request; each leg is (participant, start_min, end_min)."""
    stops = tuple(
        StopRequest(p, "S" + p[1:], s, e, 10.0, f"{p}-c1" if connector else None)
        for p, s, e in legs
    )
    return TripRequest(f"{vehicle}:req:{trip_id}", vehicle, trip_id, vehicle, stops)


Pred = Callable[[Outgoing], bool]


class Link:
    """Messages between nodes, delivered only when the test says so."""

    def __init__(self, *nodes: Coordinator | Participant) -> None:
        self.nodes: dict[str, Coordinator | Participant] = {n.node_id: n for n in nodes}
        self.queue: list[Outgoing] = []
        self.outside: dict[str, list[Message]] = {}

    def send(self, outs: list[Outgoing]) -> list[Outgoing]:
        """Queue messages between nodes; others (vehicles) arrive at once in ``outside``."""
        for o in outs:
            if o.dst in self.nodes:
                self.queue.append(o)
            else:
                self.outside.setdefault(o.dst, []).append(o.msg)
        return outs

    def take(self, pred: Pred = lambda o: True) -> list[Outgoing]:
        """Remove and return queued messages matching ``pred`` (lose them)."""
        taken = [o for o in self.queue if pred(o)]
        self.queue = [o for o in self.queue if not pred(o)]
        return taken

    def deliver(self, now_min: float, pred: Pred = lambda o: True) -> list[Outgoing]:
        """Deliver the queued messages matching ``pred`` once (FIFO); queue replies."""
        replies: list[Outgoing] = []
        for o in self.take(pred):
            replies += self.nodes[o.dst].handle(o.msg, now_min)
        self.send(replies)
        return replies

    def pump(self, now_min: float, drop: Pred = lambda o: False, rounds: int = 50) -> None:
        """Deliver until quiet, losing messages matching ``drop``."""
        for _ in range(rounds):
            self.take(drop)
            if not self.queue:
                return
            self.deliver(now_min)
        raise AssertionError("link did not go quiet")

    def tick(self, now_min: float) -> list[Outgoing]:
        outs: list[Outgoing] = []
        for n in self.nodes.values():
            outs += n.tick(now_min)
        return self.send(outs)


def to(dst: str, kind: type | None = None) -> Pred:
    return lambda o: o.dst == dst and (kind is None or isinstance(o.msg, kind))


def of(kind: type) -> Pred:
    return lambda o: isinstance(o.msg, kind)
