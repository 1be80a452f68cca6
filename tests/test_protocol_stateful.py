"""Protocol: hypothesis stateful test over a hostile network with crashes and restarts.

Two coordinators and three participants (with different clock offsets)
exchange messages that hypothesis delivers in any order, drops or
duplicates; time advances in steps (every node ticks), and any node may crash
and be rebuilt from its persisted log.  Invariants after every step:

* no connector has two active bookings (PENDING / RESERVED / charging) with
  overlapping windows, and P1 (``walkin_share`` 0.5) never has both its connectors
  booked at once;
* no hold outlives its lease (nodes tick on every time step);
* logs only grow, each node's log equals what was persisted, and a node
  rebuilt from its log has exactly the state it had before the crash;
* a vehicle told BOOKED has every stop RESERVED; told REJECTED, none reserved;
  a vehicle never gets two different answers.

Teardown ("quiesce"): the network becomes reliable and time advances past
every lease, deadline and retry; then every trip must be all-RESERVED
(BOOKED) or all-released, and every vehicle must hold a definitive answer.

``EVSIM_PROTOCOL_EXAMPLES`` sets the number of examples (default 200); the
``slow``-marked variant runs longer programs (default 1000 examples).
"""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from evsim.protocol import (
    BookingState,
    Coordinator,
    Message,
    Outgoing,
    Participant,
    Prepare,
    StopRequest,
    TripRequest,
    TripResult,
    TripState,
    split_before_log,
)

STATIONS = {
    "P1": {"S1": ["P1-c1", "P1-c2"]},
    "P2": {"S2": ["P2-c1", "P2-c2"]},
    "P3": {"S3": ["P3-c1"]},
}
COORDS = ["C1", "C2"]
PARTS = list(STATIONS)
OFFSETS = {"C1": 0.0, "C2": 0.37, "P1": -0.21, "P2": 0.0, "P3": 0.55}
COORD_CFG = {"lease_min": 6.0, "vote_timeout_min": 2.0, "commit_margin_min": 1.5,
             "ack_timeout_min": 4.0, "retry_min": 0.5}
PART_CFG = {"retry_min": 0.7, "query_after_min": 1.5}
WALKIN = {"P1": 0.5}  # S1: one of its two connectors is never booked (walkin_share)
ACTIVE = (BookingState.PENDING, BookingState.RESERVED)

legs_st = st.lists(
    st.tuples(
        st.sampled_from(PARTS),
        st.integers(0, 5),  # start slot: heavy overlap -> contention
        st.integers(1, 3),  # duration in slots
        st.booleans(),  # pinned to connector c1?
    ),
    min_size=1,
    max_size=3,
)


def build(nid: str, records: list | None = None) -> Coordinator | Participant:
    recs = records or []
    if nid in STATIONS:
        return Participant.from_log(nid, STATIONS[nid], recs, **PART_CFG,
                                    walkin_share=WALKIN.get(nid, 0.0))
    return Coordinator.from_log(nid, recs, **COORD_CFG)


class ProtocolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.nodes: dict[str, Coordinator | Participant] = {
            nid: build(nid) for nid in COORDS + PARTS
        }
        self.persisted: dict[str, list] = {nid: [] for nid in self.nodes}
        self.in_flight: list[Outgoing] = []
        self.answers: dict[str, list[TripResult]] = {}
        self.trips: dict[str, tuple[str, TripRequest]] = {}
        self.n_trips = 0

    # ----------------------------------------------------------------- plumbing

    def local(self, nid: str) -> float:
        return self.now + OFFSETS[nid]

    def dispatch(self, nid: str, outs: list[Outgoing]) -> None:
        self.persisted[nid].extend(self.nodes[nid].new_records())  # write-ahead
        self.in_flight.extend(outs)

    def deliver(self, o: Outgoing) -> None:
        node = self.nodes.get(o.dst)
        if node is None:  # a vehicle
            assert isinstance(o.msg, TripResult)
            self.answers.setdefault(o.msg.trip_id, []).append(o.msg)
            return
        self.dispatch(o.dst, node.handle(o.msg, self.local(o.dst)))

    def tick_all(self) -> None:
        for nid, node in self.nodes.items():
            self.dispatch(nid, node.tick(self.local(nid)))

    # ----------------------------------------------------------------- rules

    def _new_trip(self, coord: str, legs: list[tuple[str, int, int, bool]]) -> TripRequest:
        self.n_trips += 1
        tid, vid = f"T{self.n_trips}", f"V{self.n_trips}"
        stops = tuple(
            StopRequest(p, "S" + p[1:], 1000.0 + 10 * s, 1000.0 + 10 * (s + d), 5.0,
                        f"{p}-c1" if pin else None)
            for p, s, d, pin in legs
        )
        req = TripRequest(f"{vid}:req", vid, tid, vid, stops)
        self.trips[tid] = (coord, req)
        return req

    @rule(coord=st.sampled_from(COORDS), legs=legs_st)
    def request_trip(self, coord: str, legs: list[tuple[str, int, int, bool]]) -> None:
        req = self._new_trip(coord, legs)
        node = self.nodes[coord]
        assert isinstance(node, Coordinator)
        self.dispatch(coord, node.request_trip(req, self.local(coord)))

    @rule(coord=st.sampled_from(COORDS), legs=legs_st)
    def request_trip_then_crash(self, coord: str,
                                legs: list[tuple[str, int, int, bool]]) -> None:
        """Presumed abort: the PREPAREs leave before TripStarted is durable
        (``BEFORE_LOG``) and the coordinator crashes before it is: the trip's record and
        every message that had to wait for it are lost."""
        req = self._new_trip(coord, legs)
        node = self.nodes[coord]
        assert isinstance(node, Coordinator)
        early, _after = split_before_log(node.request_trip(req, self.local(coord)))
        assert all(isinstance(o.msg, Prepare) for o in early)
        self.in_flight.extend(early)
        node.new_records()  # never written: they die with the process
        self.nodes[coord] = build(coord, list(self.persisted[coord]))
        assert self.nodes[coord].trip_state(req.trip_id) is None  # type: ignore[union-attr]

    @precondition(lambda self: self.in_flight)
    @rule(i=st.integers(0, 10_000), action=st.sampled_from(["deliver"] * 3 + ["drop", "dup"]))
    def network(self, i: int, action: str) -> None:
        o = self.in_flight.pop(i % len(self.in_flight))  # any order: reordering
        if action == "drop":
            return
        if action == "dup":
            self.in_flight.append(o)
        self.deliver(o)

    @precondition(lambda self: any(o.dst in COORDS for o in self.in_flight))
    @rule(i=st.integers(0, 10_000))
    def deliver_then_crash(self, i: int) -> None:
        """A coordinator handles a message, sends only what may precede its records
        (``before_log``: a BOOKED answer after the last COMMIT_ACK, say) and crashes
        before the records are durable."""
        mine = [k for k, o in enumerate(self.in_flight) if o.dst in COORDS]
        o = self.in_flight.pop(mine[i % len(mine)])
        node = self.nodes[o.dst]
        early, _after = split_before_log(node.handle(o.msg, self.local(o.dst)))
        for e in early:
            if e.dst in self.nodes:
                self.in_flight.append(e)
            else:  # the vehicle's answer
                self.deliver(e)
        node.new_records()  # never written: they die with the process
        self.nodes[o.dst] = build(o.dst, list(self.persisted[o.dst]))

    @rule(dt=st.sampled_from([0.1, 0.3, 0.5, 1.0, 2.5]))
    def advance(self, dt: float) -> None:
        self.now += dt
        self.tick_all()

    @rule(nid=st.sampled_from(COORDS + PARTS))
    def crash_and_restart(self, nid: str) -> None:
        old = self.nodes[nid]
        new = build(nid, list(self.persisted[nid]))
        assert new.durable_state() == old.durable_state()
        assert new.log == old.log
        self.nodes[nid] = new

    # ----------------------------------------------------------------- invariants

    def participants(self) -> list[Participant]:
        return [n for n in self.nodes.values() if isinstance(n, Participant)]

    def bookings_of(self, tid: str) -> list[BookingState | None]:
        _coord, req = self.trips[tid]
        out: list[BookingState | None] = []
        for i, stop in enumerate(req.stops):
            b = self.nodes[stop.participant].booking(f"{tid}/{i}")
            out.append(None if b is None else b.state)
        return out

    @invariant()
    def no_double_booking(self) -> None:
        for p in self.participants():
            by_conn: dict[str, list[tuple[float, float, str]]] = {}
            for b in p.bookings():
                if b.state in ACTIVE or b.charging:
                    by_conn.setdefault(b.connector_id, []).append(
                        (b.start_min, b.end_min, b.booking_id))
            for cid, ws in by_conn.items():
                ws.sort()
                for (s1, e1, b1), (s2, _e2, b2) in itertools.pairwise(ws):
                    assert e1 <= s2, f"{p.node_id}/{cid}: {b1} [{s1},{e1}) overlaps {b2}"

    @invariant()
    def walkin_share_is_kept(self) -> None:
        for p in self.participants():
            for sid, cids in p.stations.items():
                room = len(cids) - int(p.walkin_share * len(cids))
                edges = sorted(
                    (t, step)
                    for b in p.bookings()
                    if b.station_id == sid and (b.state in ACTIVE or b.charging)
                    for t, step in ((b.start_min, 1), (b.end_min, -1))
                )
                active = list(itertools.accumulate(step for _, step in edges))
                assert max(active, default=0) <= room, f"{p.node_id}/{sid}: {edges}"

    @invariant()
    def no_hold_outlives_its_lease(self) -> None:
        for p in self.participants():
            now = self.local(p.node_id)
            for b in p.bookings():
                if b.state is BookingState.PENDING and b.lease_until_min is not None:
                    assert b.lease_until_min > now, f"{b.booking_id} outlived its lease"

    @invariant()
    def logs_only_grow_and_are_persisted(self) -> None:
        for nid, node in self.nodes.items():
            assert node.log == self.persisted[nid]

    @invariant()
    def answers_are_consistent(self) -> None:
        for tid, results in self.answers.items():
            assert len({r.outcome for r in results}) == 1, f"{tid}: {results}"
            states = self.bookings_of(tid)
            if results[0].outcome == "BOOKED":
                assert all(s is BookingState.RESERVED for s in states), (tid, states)
            elif results[0].outcome == "REJECTED":
                assert BookingState.RESERVED not in states, (tid, states)

    # ----------------------------------------------------------------- quiesce

    def teardown(self) -> None:
        for _ in range(400):
            for _ in range(10_000):
                if not self.in_flight:
                    break
                self.deliver(self.in_flight.pop(0))
            else:
                raise AssertionError("network never drained")
            if self.settled():
                break
            self.now += 0.5
            self.tick_all()
            for tid, (coord, req) in self.trips.items():  # vehicles re-ask, idempotently
                if tid not in self.answers:
                    self.dispatch(coord, self.nodes[coord].handle(req, self.local(coord)))
        else:
            raise AssertionError("protocol did not quiesce")
        for tid, (coord, _) in self.trips.items():
            node = self.nodes[coord]
            assert isinstance(node, Coordinator)
            state = node.trip_state(tid)
            states = self.bookings_of(tid)
            outcome = {r.outcome for r in self.answers[tid]}
            if state is TripState.BOOKED:
                assert outcome == {"BOOKED"}
                assert all(s is BookingState.RESERVED for s in states), (tid, states)
            else:
                assert state in (TripState.ABORTED, TripState.FAILED), (tid, state)
                assert outcome == {"REJECTED" if state is TripState.ABORTED else "FAILED"}
                assert not any(s in ACTIVE for s in states), (tid, states)

    def settled(self) -> bool:
        for tid, (coord, _) in self.trips.items():
            node = self.nodes[coord]
            assert isinstance(node, Coordinator)
            if tid not in self.answers or node.open_trip_ids():
                return False
        return all(
            b.state is not BookingState.PENDING for p in self.participants() for b in p.bookings()
        )


def _settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


_ENV = os.environ.get("EVSIM_PROTOCOL_EXAMPLES")

TestProtocolStateful = ProtocolMachine.TestCase
TestProtocolStateful.settings = _settings(int(_ENV or 200), 40)


class _Long(ProtocolMachine):
    pass


TestProtocolStatefulLong = pytest.mark.slow(_Long.TestCase)
TestProtocolStatefulLong.settings = _settings(int(_ENV or 1000), 80)


def test_message_types_cover_the_machine() -> None:
    """Sanity: the machine above only ever routes protocol messages."""
    assert issubclass(TripResult, Message)
