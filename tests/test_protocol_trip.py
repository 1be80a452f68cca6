"""Protocol: trip bookings across companies (2PC with leases), every failure branch."""

from __future__ import annotations

from test_protocol_support import Link, make_participant, to, trip

from evsim.protocol import (
    Abort,
    AbortAck,
    Alternative,
    BookedStop,
    BookingState,
    CancelReply,
    CancelRequest,
    Commit,
    CommitAck,
    CommitFailed,
    ConnectorStatus,
    Coordinator,
    Outgoing,
    Participant,
    Prepare,
    QueryDecision,
    StopCanceled,
    TripCancel,
    TripResult,
    TripState,
    Vote,
    dump_log,
    load_log,
    may_defer,
    split_before_log,
)

LEGS = [("P1", 100.0, 130.0), ("P2", 200.0, 230.0), ("P3", 300.0, 330.0)]
HELD = (BookingState.PENDING, BookingState.RESERVED)


def setup(**coord_kw: float) -> tuple[Link, Coordinator, dict[str, Participant]]:
    c = Coordinator("C", **coord_kw)
    ps = {pid: make_participant(pid) for pid in ("P1", "P2", "P3")}
    return Link(c, *ps.values()), c, ps


def state(ps: dict[str, Participant], bid: str) -> BookingState | None:
    for p in ps.values():
        b = p.booking(bid)
        if b is not None:
            return b.state
    return None


def results(link: Link) -> list[TripResult]:
    return [m for m in link.outside.get("V", []) if isinstance(m, TripResult)]


def test_happy_path_exact_messages() -> None:
    link, c, ps = setup()
    out = link.send(c.request_trip(trip("t1", LEGS), 0.0))
    assert out == [
        Outgoing("P1", Prepare("C:PREPARE:t1/0", "C", "t1", "t1/0", "S1", None, 100.0, 130.0,
                               10.0, 10.0, 100.0)),
        Outgoing("P2", Prepare("C:PREPARE:t1/1", "C", "t1", "t1/1", "S2", None, 200.0, 230.0,
                               10.0, 10.0, 100.0)),
        Outgoing("P3", Prepare("C:PREPARE:t1/2", "C", "t1", "t1/2", "S3", None, 300.0, 330.0,
                               10.0, 10.0, 100.0)),
    ]
    assert c.trip_state("t1") is TripState.PREPARING
    votes = link.deliver(1.0)
    assert votes[0] == Outgoing("C", Vote("P1:VOTE:t1/0:yes", "P1", "t1", "t1/0", True, "",
                                          "P1-c1", 11.0))
    assert all(isinstance(o.msg, Vote) and o.msg.yes for o in votes)
    assert state(ps, "t1/2") is BookingState.PENDING
    commits = link.deliver(1.5)
    assert commits == [
        Outgoing(p, Commit(f"C:COMMIT:t1/{i}", "C", "t1", f"t1/{i}"))
        for i, p in enumerate(("P1", "P2", "P3"))
    ]
    assert c.trip_state("t1") is TripState.COMMITTING
    acks = link.deliver(2.0)
    assert acks[2] == Outgoing("C", CommitAck("P3:COMMIT_ACK:t1/2", "P3", "t1", "t1/2", "P3-c1"))
    link.pump(2.5)
    assert c.trip_state("t1") is TripState.BOOKED
    assert link.queue == []
    (res,) = results(link)
    assert res == TripResult(
        "C:TRIP_RESULT:t1:BOOKED", "C", "t1", "BOOKED", "",
        (BookedStop("t1/0", "P1", "S1", "P1-c1", 100.0, 130.0),
         BookedStop("t1/1", "P2", "S2", "P2-c1", 200.0, 230.0),
         BookedStop("t1/2", "P3", "S3", "P3-c1", 300.0, 330.0)),
    )
    assert c.trip_result("t1") == res
    assert [state(ps, f"t1/{i}") for i in range(3)] == [BookingState.RESERVED] * 3
    assert ps["P3"].connector_status("P3-c1", 300.0) is ConnectorStatus.RESERVED
    # nothing left to do for anyone
    assert link.tick(50.0) == []
    # a booked trip is still subject to no-show expiry like any booking
    ps["P1"].tick(111.0)
    assert state(ps, "t1/0") is BookingState.NO_SHOW


def test_only_all_acked_may_be_deferred_and_a_coordinator_without_it_asks_again() -> None:
    """``may_defer``: of every record a booked trip writes, only the coordinator's
    ALL_ACKED may miss its step's commit. A coordinator rebuilt from a log that lost it
    re-sends COMMIT, each stop acknowledges from its state, and the trip is BOOKED again
    with the same stops (what a live server that deferred the record relies on)."""
    link, c, ps = setup()
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.pump(1.0)
    assert c.trip_state("t1") is TripState.BOOKED
    records = [*c.log, *(r for p in ps.values() for r in p.log)]
    assert [getattr(r, "event", "") for r in records if may_defer(r)] == ["ALL_ACKED"]
    (booked,) = results(link)
    lost = [r for r in c.log if not may_defer(r)]
    c2 = Coordinator.from_log("C", lost)
    assert c2.trip_state("t1") is TripState.COMMITTING
    link2 = Link(c2, *ps.values())
    resent = link2.tick(1.0 + c2.retry_min)
    assert [type(o.msg).__name__ for o in resent] == ["Commit"] * 3
    link2.pump(2.0)
    assert c2.trip_state("t1") is TripState.BOOKED
    (again,) = results(link2)
    assert again == booked
    assert [state(ps, f"t1/{i}") for i in range(3)] == [BookingState.RESERVED] * 3


def test_no_vote_aborts_everything_with_reason_and_alternatives() -> None:
    link, c, ps = setup()
    ps["P3"].book("other", "S3", 290.0, 320.0, 0.0)
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.deliver(1.0)  # votes: P1 yes, P2 yes, P3 no
    no = [o.msg for o in link.queue if isinstance(o.msg, Vote) and not o.msg.yes]
    assert no == [Vote("P3:VOTE:t1/2:no", "P3", "t1", "t1/2", False, "conflict", "", None,
                       (Alternative("P3-c1", 320.0, 350.0),))]
    aborts = link.deliver(1.5, to("C"))
    assert [o.msg for o in aborts if isinstance(o.msg, Abort)] == [
        Abort(f"C:ABORT:t1/{i}", "C", "t1", f"t1/{i}", "conflict") for i in range(3)
    ]
    assert c.trip_state("t1") is TripState.ABORTING
    (res,) = results(link)  # the vehicle hears at once: nothing can be reserved any more
    assert (res.outcome, res.reason, res.failed_stop) == ("REJECTED", "conflict", 2)
    assert res.alternatives == (Alternative("P3-c1", 320.0, 350.0),)
    link.deliver(2.0)
    assert [state(ps, f"t1/{i}") for i in range(3)] == [
        BookingState.CANCELED, BookingState.CANCELED, BookingState.REJECTED]
    link.pump(2.5)
    assert c.trip_state("t1") is TripState.ABORTED
    assert ps["P1"].active_bookings("P1-c1") == []


def test_vote_timeout_retries_prepare_then_aborts() -> None:
    link, c, ps = setup()
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.take(to("P2"))  # P2's PREPARE is lost
    link.pump(0.1)
    assert c.trip_state("t1") is TripState.PREPARING
    # retry after retry_min re-sends only to the stop that has not voted
    assert link.tick(0.3) == []
    resend = link.tick(0.6)
    assert resend == [Outgoing("P2", Prepare("C:PREPARE:t1/1", "C", "t1", "t1/1", "S2", None,
                                             200.0, 230.0, 10.0, 10.0, 100.0))]
    link.take(to("P2"))  # lost again, and again...
    for t in (1.2, 1.8, 2.4):
        link.tick(t)
        link.take(to("P2"))
    out = link.tick(3.0)  # vote deadline t0 + vote_timeout_min
    assert c.trip_state("t1") is TripState.ABORTING
    assert [o.dst for o in out if isinstance(o.msg, Abort)] == ["P1", "P2", "P3"]
    link.pump(3.0)
    assert c.trip_state("t1") is TripState.ABORTED
    assert [r.outcome for r in results(link)] == ["REJECTED"]
    assert results(link)[0].reason == "vote_timeout"
    assert state(ps, "t1/0") is BookingState.CANCELED
    # P2 never saw the PREPARE; the ABORT left a tombstone, so a straggler votes NO
    late = ps["P2"].handle(Prepare("C:PREPARE:t1/1", "C", "t1", "t1/1", "S2", None, 200.0,
                                   230.0, 10.0, 10.0, 100.0), 4.0)
    assert late[0].msg.yes is False
    assert late[0].msg.reason == "aborted"
    assert ps["P2"].active_bookings("P2-c1") == []


def test_lost_commit_is_retried_until_acknowledged() -> None:
    link, c, ps = setup()
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.deliver(1.0)
    link.deliver(1.0)  # votes -> COMMIT x3
    link.take(to("P2", Commit))
    link.pump(1.2)
    assert c.trip_state("t1") is TripState.COMMITTING
    assert state(ps, "t1/1") is BookingState.PENDING
    resend = link.tick(1.6)
    assert resend == [Outgoing("P2", Commit("C:COMMIT:t1/1", "C", "t1", "t1/1"))]
    link.deliver(1.6, to("P2"))
    link.take(to("C", CommitAck))  # the ACK is lost this time
    assert state(ps, "t1/1") is BookingState.RESERVED
    assert link.tick(2.0) == []
    link.tick(2.2)
    link.pump(2.2)
    assert c.trip_state("t1") is TripState.BOOKED
    assert [r.outcome for r in results(link)] == ["BOOKED"]


def test_participant_releases_hold_when_lease_ends() -> None:
    link, c, ps = setup()
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.deliver(1.0)
    link.take()  # every vote lost; the coordinator is cut off
    assert ps["P1"].booking("t1/0").lease_until_min == 11.0
    out = ps["P1"].tick(10.99)
    assert [o.msg.__class__ for o in out] == [QueryDecision] * 1  # asking for the decision
    assert ps["P1"].booking("t1/0").state is BookingState.PENDING
    out = ps["P1"].tick(11.0)
    assert out == [Outgoing("C", Vote("P1:VOTE:t1/0:no", "P1", "t1", "t1/0", False,
                                      "lease_expired"))]
    assert state(ps, "t1/0") is BookingState.FAILED
    assert ps["P1"].active_bookings("P1-c1") == []
    assert ps["P1"].tick(30.0) == []  # no more queries for a released hold


def test_late_commit_is_refused_and_coordinator_compensates() -> None:
    link, c, ps = setup()
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.deliver(1.0)
    link.deliver(1.0)  # COMMIT x3 queued
    late = link.take(to("P3", Commit))
    link.pump(1.2)  # P1, P2 reserved and acked
    assert [state(ps, f"t1/{i}") for i in range(2)] == [BookingState.RESERVED] * 2
    # the COMMIT to P3 arrives after its lease (11.0) without P3 having ticked
    link.send(late)
    replies = link.deliver(11.5, to("P3"))
    assert replies == [Outgoing("C", CommitFailed("P3:COMMIT_FAILED:t1/2", "P3", "t1", "t1/2",
                                                  "lease_expired"))]
    assert state(ps, "t1/2") is BookingState.FAILED
    out = link.deliver(11.6)
    assert c.trip_state("t1") is TripState.COMPENSATING
    assert [o.msg for o in out if isinstance(o.msg, CancelRequest)] == [
        CancelRequest(f"C:CANCEL:t1/{i}", "C", f"t1/{i}", "t1", "lease_expired")
        for i in range(3)
    ]
    (res,) = results(link)
    assert (res.outcome, res.reason, res.failed_stop) == ("FAILED", "lease_expired", 2)
    link.pump(11.7)
    assert c.trip_state("t1") is TripState.FAILED
    assert [state(ps, f"t1/{i}") for i in range(3)] == [
        BookingState.CANCELED, BookingState.CANCELED, BookingState.FAILED]
    assert ps["P1"].connector_status("P1-c1", 100.0) is ConnectorStatus.AVAILABLE


def test_commit_acks_missing_until_ack_timeout_compensates() -> None:
    link, c, ps = setup(ack_timeout_min=5.0)
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.deliver(1.0)
    link.deliver(1.0)
    t = 1.0
    cut = lambda o: "P3" in (o.dst, o.msg.src)  # noqa: E731
    while c.trip_state("t1") is TripState.COMMITTING:  # P3 partitioned after voting
        link.pump(t, drop=cut)
        t += 0.25
        link.tick(t)
    assert c.trip_state("t1") is TripState.COMPENSATING
    assert t == 6.0  # decided at 1.0 + ack_timeout_min
    assert results(link)[0].reason == "ack_timeout"
    link.pump(t)  # the partition heals
    assert c.trip_state("t1") is TripState.FAILED
    assert all(state(ps, f"t1/{i}") not in HELD for i in range(3))


def test_all_yes_but_lease_nearly_gone_aborts() -> None:
    link, c, ps = setup()
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.deliver(1.0)
    link.deliver(8.5)  # votes processed without any tick: 8.5 + 2 > 0 + 10
    assert c.trip_state("t1") is TripState.ABORTING
    assert results(link)[0].reason == "lease_too_short"
    link.pump(8.6)
    assert all(state(ps, f"t1/{i}") is BookingState.CANCELED for i in range(3))


def test_duplicates_and_replays_are_harmless() -> None:
    link, c, ps = setup()
    req = trip("t1", LEGS)
    link.send(c.request_trip(req, 0.0))
    prepares = list(link.queue)
    link.deliver(1.0)
    votes = list(link.queue)
    n_logs = {nid: len(n.log) for nid, n in link.nodes.items()}
    # replayed PREPAREs: same votes, nothing logged, leases not extended
    assert [r for o in prepares for r in link.nodes[o.dst].handle(o.msg, 2.0)] == votes
    assert {nid: len(n.log) for nid, n in link.nodes.items()} == n_logs
    assert ps["P1"].booking("t1/0").lease_until_min == 11.0
    link.send(votes)  # duplicated votes
    link.deliver(1.1)
    commits = [o for o in link.queue if isinstance(o.msg, Commit)]
    assert len(commits) == 3  # decided once
    link.send(commits)  # duplicated commits
    link.pump(1.2)
    assert c.trip_state("t1") is TripState.BOOKED
    assert len(results(link)) == 1
    # replayed COMMIT / PREPARE / request after the fact
    assert ps["P1"].handle(commits[0].msg, 3.0)[0].msg.__class__ is CommitAck
    assert ps["P1"].handle(prepares[0].msg, 3.0)[0].msg.yes
    again = c.request_trip(req, 5.0)
    assert [o.msg for o in again] == results(link)
    assert c.handle(req, 5.0) == again
    assert {nid: len(n.log) for nid, n in link.nodes.items()} == {
        nid: len(n.log) for nid, n in link.nodes.items()}


def test_abort_overtaking_prepare_leaves_no_orphan_hold() -> None:
    link, c, ps = setup()
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    delayed = link.take(to("P3"))
    link.deliver(1.0)
    link.deliver(1.0)
    link.tick(3.0)  # vote timeout -> ABORT overtakes the delayed PREPARE
    link.pump(3.0)
    assert c.trip_state("t1") is TripState.ABORTED
    link.send(delayed)
    link.pump(3.5)
    assert state(ps, "t1/2") is None
    assert ps["P3"].active_bookings("P3-c1") == []


def restart_coordinator(link: Link, c: Coordinator, **kw: float) -> Coordinator:
    c2 = Coordinator.from_log("C", load_log(dump_log(c.log)), **kw)
    assert c2.durable_state() == c.durable_state()
    link.nodes["C"] = c2
    return c2


def restart_participant(link: Link, ps: dict[str, Participant], pid: str) -> Participant:
    p2 = make_participant(pid, load_log(dump_log(ps[pid].log)))
    assert p2.durable_state() == ps[pid].durable_state()
    link.nodes[pid] = ps[pid] = p2
    return p2


def test_coordinator_restart_while_preparing_resends_prepare() -> None:
    link, c, _ps = setup()
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.deliver(1.0)
    link.take()  # crash: the votes die with the process
    c = restart_coordinator(link, c)
    assert c.trip_state("t1") is TripState.PREPARING
    out = link.tick(1.5)
    assert [o.dst for o in out] == ["P1", "P2", "P3"]
    assert all(isinstance(o.msg, Prepare) for o in out)
    link.pump(1.5)
    assert c.trip_state("t1") is TripState.BOOKED


def test_coordinator_restart_while_committing_resends_decision() -> None:
    link, c, _ps = setup()
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.deliver(1.0)
    link.deliver(1.0)
    link.deliver(1.0, to("P1"))
    link.take()  # crash after deciding: queued COMMITs and P1's ACK are lost
    c = restart_coordinator(link, c)
    assert c.trip_state("t1") is TripState.COMMITTING
    out = link.tick(1.5)
    assert [(o.dst, type(o.msg)) for o in out] == [(p, Commit) for p in ("P1", "P2", "P3")]
    link.pump(1.5)
    assert c.trip_state("t1") is TripState.BOOKED
    # the booked connectors survive another restart
    c = restart_coordinator(link, c)
    assert c.trip_result("t1").bookings[2].connector_id == "P3-c1"


def test_booked_answer_before_all_acked_is_durable_survives_a_restart() -> None:
    """BOOKED may leave before ALL_ACKED is durable (``before_log``).  A coordinator that
    crashes right then restarts in COMMITTING and, not knowing whether the vehicle was
    told BOOKED, waits for every stop instead of compensating at its ack deadline."""
    link, c, ps = setup(ack_timeout_min=5.0)
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.deliver(1.0)  # votes
    link.deliver(1.0)  # ALL_YES (durable before the COMMITs leave), COMMITs
    link.deliver(1.1)  # each participant commits (durable), then acknowledges
    durable = list(c.log)
    out: list[Outgoing] = []
    for o in link.take():  # the three COMMIT_ACKs
        out += c.handle(o.msg, 1.2)
    early, after = split_before_log(out)
    assert [(o.dst, o.msg.outcome) for o in early] == [("V", "BOOKED")]
    assert after == []
    link.send(early)
    # the crash loses ALL_ACKED
    c = Coordinator.from_log("C", load_log(dump_log(durable)), ack_timeout_min=5.0)
    link.nodes["C"] = c
    assert c.trip_state("t1") is TripState.COMMITTING
    cut = lambda o: "P3" in (o.dst, o.msg.src)  # noqa: E731 (P3 unreachable for long)
    t = 1.5
    while t < 20.0:  # well past decided (1.0) + ack_timeout_min (5.0)
        link.tick(t)
        link.pump(t, drop=cut)
        t += 0.5
    assert c.trip_state("t1") is TripState.COMMITTING  # no ACK_TIMEOUT compensation
    assert [state(ps, f"t1/{i}") for i in range(3)] == [BookingState.RESERVED] * 3
    link.tick(t)  # the partition heals: P3 answers from state
    link.pump(t)
    assert c.trip_state("t1") is TripState.BOOKED
    assert {r.outcome for r in results(link)} == {"BOOKED"}


def test_trip_decided_after_a_restart_keeps_its_ack_deadline() -> None:
    link, c, _ps = setup(ack_timeout_min=5.0)
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.take()  # crash before any PREPARE arrived
    c = restart_coordinator(link, c, ack_timeout_min=5.0)
    link.tick(0.5)  # re-sent PREPAREs
    link.deliver(1.0)
    link.deliver(1.0)  # this incarnation decides ALL_YES at 1.0
    assert c.trip_state("t1") is TripState.COMMITTING
    cut = lambda o: "P3" in (o.dst, o.msg.src)  # noqa: E731
    t = 1.0
    while c.trip_state("t1") is TripState.COMMITTING and t < 30.0:
        link.pump(t, drop=cut)
        t += 0.25
        link.tick(t)
    assert t == 6.0 and results(link)[0].reason == "ack_timeout"


def test_participant_restart_asks_coordinator_for_the_decision() -> None:
    link, c, ps = setup()
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.deliver(1.0)
    link.deliver(1.0)
    link.take(to("P2"))  # P2 crashes before it gets the COMMIT ...
    link.pump(1.0)
    p2 = restart_participant(link, ps, "P2")
    assert p2.booking("t1/1").state is BookingState.PENDING
    # ... and the coordinator's retries are lost too; P2 asks after query_after_min
    link.tick(1.4)
    link.take()
    assert p2.tick(2.9) == []  # hold placed at 1.0, query_after_min = 2
    q = p2.tick(3.0)
    assert q == [Outgoing("C", QueryDecision("P2:QUERY_DECISION:t1/1", "P2", "t1", "t1/1"))]
    ans = c.handle(q[0].msg, 3.0)
    assert ans == [Outgoing("P2", Commit("C:COMMIT:t1/1", "C", "t1", "t1/1"))]
    link.send(ans)
    link.pump(3.0)
    assert p2.booking("t1/1").state is BookingState.RESERVED
    assert c.trip_state("t1") is TripState.BOOKED


def test_presumed_abort_for_unknown_trip_and_aborted_trip() -> None:
    link, c, ps = setup()
    # a hold whose coordinator has no record of the trip (e.g. a forged/old PREPARE)
    ps["P1"].handle(Prepare("x", "C", "ghost", "ghost/0", "S1", None, 50.0, 60.0, 5.0, 10.0,
                            50.0), 0.0)
    q = ps["P1"].tick(2.0)
    assert [type(o.msg) for o in q] == [QueryDecision]
    ans = c.handle(q[0].msg, 2.0)
    assert ans == [Outgoing("P1", Abort("C:ABORT:ghost/0", "C", "ghost", "ghost/0",
                                        "unknown_trip"))]
    assert ps["P1"].handle(ans[0].msg, 2.1) == [
        Outgoing("C", AbortAck("P1:ABORT_ACK:ghost/0", "P1", "ghost", "ghost/0"))]
    assert ps["P1"].booking("ghost/0").state is BookingState.CANCELED
    # undecided: the coordinator stays silent (the participant keeps its lease)
    link.send(c.request_trip(trip("t1", LEGS), 3.0))
    link.deliver(3.0)
    link.take()
    assert c.handle(QueryDecision("q", "P1", "t1", "t1/0"), 3.5) == []


def test_contention_lower_first_leg_wins_by_wounding_a_hold() -> None:
    link, c, ps = setup()
    ca = Coordinator("CA")
    link.nodes["CA"] = ca
    # trip A (first leg at 100) and trip B (first leg at 50) both want P2-c1 at 200
    a = trip("tA", [("P1", 100.0, 130.0), ("P2", 200.0, 230.0)], connector=True)
    b = trip("tB", [("P3", 50.0, 80.0), ("P2", 210.0, 240.0)], connector=True, vehicle="W")
    link.send(ca.request_trip(a, 0.0))
    link.deliver(0.0, lambda o: o.dst != "CA")  # A holds P1-c1 and P2-c1; votes in flight
    p1_vote = link.take(lambda o: o.dst == "CA" and o.msg.booking_id == "tA/0")
    link.deliver(0.0, to("CA"))  # P2's YES is in; A still waits for P1
    link.send(c.request_trip(b, 0.1))
    replies = link.deliver(0.2, to("P2", Prepare))  # B's PREPARE wounds A's hold
    assert replies == [
        Outgoing("CA", Vote("P2:VOTE:tA/1:no", "P2", "tA", "tA/1", False, "preempted")),
        Outgoing("C", Vote("P2:VOTE:tB/1:yes", "P2", "tB", "tB/1", True, "", "P2-c1", 10.2)),
    ]
    link.send(p1_vote)
    link.pump(0.3)
    assert ca.trip_state("tA") is TripState.ABORTED
    assert c.trip_state("tB") is TripState.BOOKED
    ra = [m for m in link.outside["V"] if isinstance(m, TripResult)]
    assert [(r.outcome, r.reason, r.failed_stop) for r in ra] == [("REJECTED", "preempted", 1)]
    assert state(ps, "tA/0") is BookingState.CANCELED


def test_contention_higher_first_leg_loses_with_alternatives() -> None:
    link, c, _ps = setup()
    ca = Coordinator("CA")
    link.nodes["CA"] = ca
    b = trip("tB", [("P3", 50.0, 80.0), ("P2", 210.0, 240.0)], connector=True, vehicle="W")
    a = trip("tA", [("P1", 100.0, 130.0), ("P2", 200.0, 230.0)], connector=True)
    link.send(c.request_trip(b, 0.0))
    link.deliver(0.0, lambda o: o.dst != "C")  # B holds P2-c1 (not yet committed)
    link.send(ca.request_trip(a, 0.1))
    replies = link.deliver(0.2, to("P2", Prepare))
    assert replies == [Outgoing("CA", Vote(
        "P2:VOTE:tA/1:no", "P2", "tA", "tA/1", False, "conflict", "", None,
        (Alternative("P2-c2", 200.0, 230.0), Alternative("P2-c1", 240.0, 270.0)),
    ))]
    link.pump(0.3)
    assert (ca.trip_state("tA"), c.trip_state("tB")) == (TripState.ABORTED, TripState.BOOKED)
    # reservations always win, even against a better priority
    z = trip("tZ", [("P2", 215.0, 220.0)], connector=True, vehicle="Z")
    link.send(ca.request_trip(z, 1.0))
    link.pump(1.0)
    assert ca.trip_state("tZ") is TripState.ABORTED
    # equal first-leg start: the trip id breaks the tie deterministically
    p = make_participant("P1")
    mk = lambda tid: Prepare("m", "X", tid, tid + "/0", "S1", "P1-c1", 500.0, 530.0, 5.0,  # noqa: E731
                             10.0, 400.0)
    p.handle(mk("t2"), 0.0)
    assert p.handle(mk("t1"), 0.0)[-1].msg.yes  # t1 < t2 wounds
    assert not p.handle(mk("t3"), 0.0)[-1].msg.yes  # t3 > t1 loses


def test_wound_after_commit_decision_compensates() -> None:
    link, c, ps = setup()
    ca = Coordinator("CA")
    link.nodes["CA"] = ca
    a = trip("tA", [("P1", 100.0, 130.0), ("P2", 200.0, 230.0)], connector=True)
    link.send(ca.request_trip(a, 0.0))
    link.deliver(0.0)
    link.deliver(0.0, to("CA"))  # decided COMMIT; COMMITs in flight
    held = link.take(to("P2", Commit))
    b = trip("tB", [("P3", 50.0, 80.0), ("P2", 210.0, 240.0)], connector=True, vehicle="W")
    link.send(c.request_trip(b, 0.1))
    link.pump(0.2)  # B wounds A's hold at P2; A gets the NO while COMMITTING
    assert ca.trip_state("tA") is TripState.FAILED
    link.send(held)  # the stale COMMIT is refused
    link.pump(0.3)
    assert state(ps, "tA/0") is BookingState.CANCELED
    assert state(ps, "tA/1") is BookingState.FAILED
    assert c.trip_state("tB") is TripState.BOOKED
    ra = [m for m in link.outside["V"] if isinstance(m, TripResult)]
    assert [(r.outcome, r.reason) for r in ra] == [("FAILED", "preempted")]


def test_vehicle_cancels_booked_trip() -> None:
    link, c, ps = setup()
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.pump(0.0)
    assert c.trip_state("t1") is TripState.BOOKED
    out = link.send(c.handle(TripCancel("m", "V", "t1"), 1.0))
    assert [o.dst for o in out] == ["P1", "P2", "P3", "V"]
    link.pump(1.0)
    assert c.trip_state("t1") is TripState.CANCELED
    assert [r.outcome for r in results(link)] == ["BOOKED", "CANCELED"]
    assert all(state(ps, f"t1/{i}") is BookingState.CANCELED for i in range(3))
    assert c.cancel_trip("t1", 2.0) == []
    assert isinstance(ps["P1"].handle(CancelRequest("m", "C", "t1/0"), 3.0)[0].msg, CancelReply)


def test_station_owner_cancel_tells_the_coordinator_which_cancels_the_trip() -> None:
    link, c, ps = setup()
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.pump(0.0)
    assert c.trip_state("t1") is TripState.BOOKED
    # P2's station goes offline: its owner cancels the reserved stop (a local command)
    ps["P2"].cancel("t1/1", 5.0, "station_offline")
    assert state(ps, "t1/1") is BookingState.CANCELED
    notice = ps["P2"].tick(5.0)
    assert notice == [Outgoing("C", StopCanceled("P2:STOP_CANCELED:t1/1", "P2", "t1", "t1/1",
                                                 "station_offline"))]
    # lost: re-sent every retry_min until the coordinator answers
    assert ps["P2"].tick(5.5) == []
    assert [o.msg for o in ps["P2"].tick(6.0)] == [notice[0].msg]
    out = link.send(c.handle(notice[0].msg, 6.0))
    assert [o.dst for o in out] == ["P1", "P2", "P3", "V"]
    assert c.trip_state("t1") is TripState.CANCELING
    link.pump(6.0)
    assert c.trip_state("t1") is TripState.CANCELED
    res = results(link)[-1]
    assert (res.outcome, res.reason, res.failed_stop) == ("CANCELED", "station_offline", 1)
    assert all(state(ps, f"t1/{i}") is BookingState.CANCELED for i in range(3))
    assert ps["P2"].tick(20.0) == []  # acknowledged by the CancelRequest: no more notices
    # a duplicate notice (or one after a participant restart) just gets a CancelRequest
    again = c.handle(notice[0].msg, 21.0)
    assert [(o.dst, type(o.msg)) for o in again] == [("P2", CancelRequest)]
    assert c.trip_state("t1") is TripState.CANCELED
    # the notice is durable: a restarted participant re-sends it once, until answered
    p2 = Participant.from_log("P2", ps["P2"].stations, ps["P2"].log)
    assert p2.durable_state() == ps["P2"].durable_state()
    assert [type(o.msg) for o in p2.tick(22.0)] == [StopCanceled]
    # an unknown trip: answered too (presumed abort), nothing changes
    unknown = c.handle(StopCanceled("m", "P1", "tX", "tX/0", "station_offline"), 23.0)
    assert [type(o.msg) for o in unknown] == [CancelRequest]


def test_station_owner_cancel_while_committing_compensates() -> None:
    link, c, ps = setup()
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    link.deliver(1.0)  # PREPARE -> votes
    link.deliver(1.5)  # votes -> COMMIT
    link.deliver(1.6)  # COMMIT -> ACKs
    acks = link.take()  # every stop RESERVED, the ACKs not delivered yet
    assert len(acks) == 3 and c.trip_state("t1") is TripState.COMMITTING
    ps["P1"].cancel("t1/0", 2.0, "station_offline")
    out = link.send(c.handle(ps["P1"].tick(2.0)[0].msg, 2.0))
    assert c.trip_state("t1") is TripState.COMPENSATING
    assert {type(o.msg) for o in out} == {CancelRequest, TripResult}
    link.pump(2.0)
    assert c.trip_state("t1") is TripState.FAILED
    assert results(link)[-1].failed_stop == 0
    assert all(state(ps, f"t1/{i}") is BookingState.CANCELED for i in range(3))


def test_invalid_trip_is_rejected_without_state() -> None:
    link, c, _ps = setup()
    bad = trip("t1", [("P1", 10.0, 5.0)])
    out = c.request_trip(bad, 0.0)
    assert out[0].msg.outcome == "REJECTED"
    assert out[0].msg.reason.startswith("invalid_request")
    assert c.log == []
    unknown = trip("t2", [("P1", 10.0, 20.0)])
    unknown = unknown.__class__(unknown.msg_id, "V", "t2", "V",
                                (unknown.stops[0].__class__("P1", "NOPE", 10.0, 20.0),))
    link.send(c.request_trip(unknown, 0.0))
    link.pump(0.0)
    assert results(link)[0].reason == "unknown_station"


def test_answer_is_bounded_even_under_total_partition() -> None:
    link, c, _ps = setup(vote_timeout_min=3.0, ack_timeout_min=4.0)
    link.send(c.request_trip(trip("t1", LEGS), 0.0))
    t = 0.0
    while c.trip_result("t1") is None:
        link.take(lambda o: o.dst != "V")  # everything between servers is lost
        t += 0.1
        link.tick(t)
    assert t <= 3.0 + 1e-9
    assert results(link)[0].outcome == "REJECTED"


def test_booking_rows_trace_each_change_at_the_participant() -> None:
    """:class:`evsim.protocol.tracing.BookingRows` (the rows both runs write): a booked stop
    traced PENDING -> RESERVED -> FULFILLED, the session's end not a change; a refused one
    PENDING -> REJECTED with its reason; a walk-in's hold (no trip) not at all; and after a
    restart (a booking first seen changing) the participant's state."""
    from evsim.protocol.tracing import BookingRows

    link, c, ps = setup()
    p1 = ps["P1"]
    rows = BookingRows("acme", lambda trip_id: "veh-" + trip_id)
    traced: list[dict] = []

    def trace() -> None:
        for rec in p1.new_records():
            row = rows.row(p1, rec)
            if row is not None:
                traced.append(row)

    link.send(c.request_trip(trip("t1", LEGS[:1]), 0.0))
    link.deliver(1.0)  # PREPARE -> vote
    link.deliver(1.5)  # the vote -> COMMIT
    link.deliver(2.0)  # COMMIT -> ack
    trace()
    link.send(c.request_trip(trip("t2", [("P1", 110.0, 125.0)], connector=True), 3.0))
    link.deliver(4.0)
    trace()
    p1.start_charging("t1/0", 100.0)
    p1.stop_charging("t1/0", 120.0)
    p1.book("walk", "S1", 125.0, 128.0, 125.0)  # a walk-in's hold (no trip)
    trace()
    window = "window 100.00-130.00"
    row = {"booking_id": "t1/0", "vehicle_id": "veh-t1", "station_id": "S1",
           "company_id": "acme", "connector_id": "P1-c1"}
    assert traced[:2] == [
        {**row, "connector_id": "P1-c1", "status": "PENDING", "detail": window},
        {**row, "status": "RESERVED", "detail": window},
    ]
    assert [(r["booking_id"], r["status"], r["detail"]) for r in traced[2:]] == [
        ("t2/0", "PENDING", "window 110.00-125.00"), ("t2/0", "REJECTED", "conflict"),
        ("t1/0", "FULFILLED", window)]
    # a restarted server: its rows go on from the participant's state
    link.send(c.request_trip(trip("t3", [("P1", 200.0, 230.0)]), 5.0))
    link.deliver(6.0)
    link.deliver(6.5)
    p1.new_records()
    fresh, traced = BookingRows("acme", lambda t: t), []
    rows = fresh
    link.deliver(7.0)  # COMMIT
    trace()
    assert [(r["booking_id"], r["status"]) for r in traced] == [("t3/0", "RESERVED")]
    # out of step (a live server's nodes rebuilt from the log after a failed commit): the
    # participant's state, never an error
    fresh._state["t3/0"] = BookingState.REJECTED
    p1.start_charging("t3/0", 200.0)
    traced = []
    trace()
    assert [(r["booking_id"], r["status"]) for r in traced] == [("t3/0", "FULFILLED")]
