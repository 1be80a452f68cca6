"""Protocol: message/record codec, transition tables, and single-stop participant behaviour."""

from __future__ import annotations

import json

import pytest

from evsim.protocol import (
    Abort,
    AbortAck,
    Alternative,
    BookedStop,
    BookingChanged,
    BookingCreated,
    BookingEvent,
    BookingState,
    BookReply,
    BookRequest,
    CancelReply,
    CancelRequest,
    Commit,
    CommitAck,
    CommitFailed,
    ConnectorStatus,
    OwnerCanceled,
    Participant,
    Prepare,
    ProtocolError,
    QueryDecision,
    StopCanceled,
    StopRequest,
    Tombstone,
    TripCancel,
    TripChanged,
    TripRequest,
    TripResult,
    TripStarted,
    TripState,
    Vote,
    decode,
    decode_record,
    dump_log,
    encode,
    encode_record,
    load_log,
)
from evsim.protocol.messages import MESSAGE_TYPES
from evsim.protocol.states import (
    BOOKING_TRANSITIONS,
    TRIP_TRANSITIONS,
    TripEvent,
    booking_next,
    trip_next,
)

R, P, C = BookingState.RESERVED, BookingState.PENDING, BookingState.CANCELED

ALL_MESSAGES = [
    TripRequest("m1", "V", "t1", "V", (StopRequest("P1", "S1", 10.0, 40.0, 5.0, "c1"),)),
    TripCancel("m2", "V", "t1"),
    TripResult(
        "m3", "C", "t1", "BOOKED", "", (BookedStop("t1/0", "P1", "S1", "c1", 10.0, 40.0),),
        None, (Alternative("c2", 1.0, 2.0),),
    ),
    Prepare("m4", "C", "t1", "t1/0", "S1", None, 10.0, 40.0, 5.0, 10.0, 10.0),
    Vote("m5", "P1", "t1", "t1/0", True, "", "c1", 12.5),
    Vote("m6", "P1", "t1", "t1/0", False, "conflict", "", None, (Alternative("c2", 1, 2),)),
    Commit("m7", "C", "t1", "t1/0"),
    CommitAck("m8", "P1", "t1", "t1/0", "c1"),
    CommitFailed("m9", "P1", "t1", "t1/0", "lease_expired"),
    Abort("m10", "C", "t1", "t1/0", "vote_timeout"),
    AbortAck("m11", "P1", "t1", "t1/0"),
    CancelRequest("m12", "C", "t1/0", "t1", "compensate"),
    CancelReply("m13", "P1", "t1/0", "t1", "CANCELED"),
    QueryDecision("m14", "P1", "t1", "t1/0"),
    BookRequest("m15", "V", "b1", "S1", 0.0, 30.0, 10.0, None),
    BookReply("m16", "P1", "b1", "RESERVED", "c1"),
    StopCanceled("m17", "P1", "t1", "t1/0", "station_offline"),
]


def test_every_message_type_round_trips_through_json() -> None:
    assert {type(m) for m in ALL_MESSAGES} == set(MESSAGE_TYPES.values())
    for m in ALL_MESSAGES:
        text = encode(m)
        assert json.loads(text)["type"] == m.TYPE
        assert decode(text) == m
        assert decode(text.encode()) == m


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"msg_id": "x"}', "'type'"),
        ('{"type": "NOPE", "msg_id": "x", "src": "y"}', "unknown type 'NOPE'"),
        ('{"type": "COMMIT", "msg_id": "x", "src": "y", "trip_id": "t"}', "booking_id"),
        ('{"type": "COMMIT", "msg_id": 1, "src": "y", "trip_id": "t", "booking_id": "b"}',
         "COMMIT.msg_id: expected string"),
        ('{"type": "COMMIT", "msg_id": "x", "src": "y", "trip_id": "t", "booking_id": "b",'
         ' "extra": 1}', "unknown field(s) extra"),
        ('{"type": "VOTE", "msg_id": "x", "src": "y", "trip_id": "t", "booking_id": "b",'
         ' "yes": 1}', "VOTE.yes: expected boolean"),
        ('{"type": "BOOK_REQUEST", "msg_id": "x", "src": "y", "booking_id": "b",'
         ' "station_id": "S", "start_min": NaN, "end_min": 1}', "must be finite"),
        ('{"type": "BOOK_REQUEST", "msg_id": "x", "src": "y", "booking_id": "b",'
         ' "station_id": "S", "start_min": true, "end_min": 1}', "expected number"),
        ('{"type": "TRIP_REQUEST", "msg_id": "x", "src": "y", "trip_id": "t",'
         ' "vehicle_id": "v", "stops": [{"participant": "P"}]}', "stops[0]: missing field"),
        ('{"type": "TRIP_REQUEST", "msg_id": "x", "src": "y", "trip_id": "t",'
         ' "vehicle_id": "v", "stops": {}}', "TRIP_REQUEST.stops: expected list"),
    ],
)
def test_decode_rejects_garbage_naming_the_problem(text: str, needle: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode(text)
    assert needle in str(exc.value)


def test_records_round_trip_and_log_dump() -> None:
    recs = [
        BookingCreated("b", "S1", "c1", 0.0, 1.0, 5.0, 0.0, "t", "C", 10.0, 0.0),
        BookingChanged("b", "CONFIRM", 1.0),
        Tombstone("x", 2.0, "aborted"),
        OwnerCanceled("b", 3.0, "station_offline"),
        TripStarted("t", "V", "V", (StopRequest("P1", "S1", 0, 1),), 0.0, 3.0, 10.0),
        TripChanged("t", "VOTE_NO", 1.0, "conflict", 0, (Alternative("c", 1, 2),), ("c1",)),
    ]
    for r in recs:
        assert decode_record(encode_record(r)) == r
    assert load_log(dump_log(recs)) == recs
    with pytest.raises(ProtocolError, match="unknown type"):
        decode_record('{"type": "COMMIT", "msg_id": "x"}')


def test_transition_tables_validate() -> None:
    for (s, e), n in BOOKING_TRANSITIONS.items():
        assert booking_next(s, e) is n
    for (s, e), n in TRIP_TRANSITIONS.items():
        assert trip_next(s, e) is n
    with pytest.raises(ProtocolError, match="illegal booking transition: CANCELED --CONFIRM"):
        booking_next(BookingState.CANCELED, BookingEvent.CONFIRM)
    with pytest.raises(ProtocolError, match="illegal trip transition: BOOKED --ALL_YES"):
        trip_next(TripState.BOOKED, TripEvent.ALL_YES)
    # every state is reachable from the initial one
    for table, start in ((BOOKING_TRANSITIONS, P), (TRIP_TRANSITIONS, TripState.PREPARING)):
        seen, frontier = {start}, [start]
        while frontier:
            s = frontier.pop()
            for (a, _), b in table.items():
                if a is s and b not in seen:
                    seen.add(b)
                    frontier.append(b)
        assert seen == set(type(start))


def make() -> Participant:
    return Participant("P1", {"S1": ["c1", "c2"], "S9": ["c9"]})


def test_book_picks_free_connector_and_never_double_books() -> None:
    p = make()
    a = p.book("a", "S1", 100.0, 130.0, 0.0)
    b = p.book("b", "S1", 110.0, 140.0, 0.0)
    c = p.book("c", "S1", 120.0, 125.0, 0.0)
    assert (a.state, a.connector_id) == ("RESERVED", "c1")
    assert (b.state, b.connector_id) == ("RESERVED", "c2")
    assert (c.state, c.reason, c.connector_id) == ("REJECTED", "conflict", "")
    # alternatives: the earliest later windows of the same length on each connector
    assert c.alternatives == (Alternative("c1", 130.0, 135.0), Alternative("c2", 140.0, 145.0))
    # half-open windows: back-to-back is fine
    d = p.book("d", "S1", 130.0, 160.0, 0.0, connector_id="c1")
    assert (d.state, d.connector_id) == ("RESERVED", "c1")
    e = p.book("e", "S1", 150.0, 170.0, 0.0, connector_id="c1")
    assert e.state == "REJECTED"
    assert Alternative("c2", 150.0, 170.0) in e.alternatives


def test_book_is_idempotent_and_validates() -> None:
    p = make()
    first = p.book("a", "S1", 100.0, 130.0, 0.0)
    n = len(p.log)
    assert p.book("a", "S1", 100.0, 130.0, 5.0) == first
    assert len(p.log) == n
    assert p.book("x", "NOPE", 1, 2, 0).reason == "unknown_station"
    assert p.book("y", "S1", 1, 2, 0, connector_id="c9").reason == "unknown_connector"
    assert p.book("z", "S1", 2, 2, 0).reason == "invalid_window"
    out = p.handle(BookRequest("m", "V", "q", "S9", 0.0, 10.0), 0.0)
    assert out[0].dst == "V"
    assert isinstance(out[0].msg, BookReply)
    assert (out[0].msg.state, out[0].msg.connector_id) == ("RESERVED", "c9")


def test_session_lifecycle_and_connector_status() -> None:
    p = make()
    p.book("a", "S1", 100.0, 130.0, 0.0, grace_min=10.0)
    assert p.connector_status("c1", 99.0) is ConnectorStatus.AVAILABLE
    assert p.connector_status("c1", 100.0) is ConnectorStatus.RESERVED
    assert p.start_charging("a", 95.0).reason == "too_early"
    v = p.start_charging("a", 104.0)
    assert (v.state, v.charging) == (BookingState.FULFILLED, True)
    assert p.connector_status("c1", 104.0) is ConnectorStatus.CHARGING
    assert p.start_charging("a", 105.0).charging  # idempotent
    with pytest.raises(ProtocolError):
        p.cancel("nope", 0.0)
    v = p.stop_charging("a", 128.0)
    assert (v.state, v.charging) == (BookingState.FULFILLED, False)
    assert p.stop_charging("a", 129.0) == v  # idempotent
    assert p.connector_status("c1", 129.0) is ConnectorStatus.AVAILABLE
    assert p.active_bookings("c1") == []
    assert p.tick(500.0) == []  # a fulfilled booking never becomes a no-show
    assert p.booking("a").state is BookingState.FULFILLED


def test_no_show_frees_the_connector() -> None:
    """A connector left RESERVED after its booking expired would be a bug."""
    p = make()
    p.book("a", "S1", 100.0, 160.0, 0.0, grace_min=15.0)
    assert p.connector_status("c1", 110.0) is ConnectorStatus.RESERVED
    assert p.tick(114.9) == []
    assert p.booking("a").state is R
    p.tick(115.0)
    assert p.booking("a").state is BookingState.NO_SHOW
    assert p.connector_status("c1", 115.0) is ConnectorStatus.AVAILABLE
    assert p.active_bookings("c1") == []
    # the window is bookable again, and a late vehicle is refused
    assert p.book("b", "S1", 120.0, 150.0, 116.0, connector_id="c1").state == "RESERVED"
    assert p.start_charging("a", 116.0).reason == "not_reserved"


def test_blocked_until_keeps_walk_ins_off_a_reservation_and_its_grace() -> None:
    """The rule the sim's stations and the live servers admit walk-ins by: a reservation
    or hold blocks ``[start, max(end, start + grace))``; a charging one, an ended one, or
    one outside the walk-in's window does not."""
    p = make()
    p.book("a", "S1", 130.0, 132.0, 0.0, connector_id="c1", grace_min=15.0)
    assert p.blocked_until("c1", 120.0, 131.0) == 145.0  # the grace outlasts the window
    assert p.blocked_until("c1", 133.0, 150.0) == 145.0  # past the end, inside the grace
    assert p.blocked_until("c1", 100.0, 130.0) is None  # ends as the reservation starts
    assert p.blocked_until("c1", 145.0, 160.0) is None
    assert p.blocked_until("c2", 120.0, 150.0) is None
    p.book("b", "S1", 150.0, 200.0, 0.0, connector_id="c1", grace_min=5.0)
    assert p.blocked_until("c1", 140.0, 160.0) == 200.0  # the latest of the two
    p.start_charging("a", 131.0)  # the booked vehicle plugged in: its connector is in use
    assert p.blocked_until("c1", 131.0, 140.0) is None
    p.cancel("b", 131.0)
    assert p.blocked_until("c1", 140.0, 160.0) is None


def test_late_arrival_without_tick_becomes_no_show() -> None:
    p = make()
    p.book("a", "S1", 100.0, 160.0, 0.0, grace_min=15.0)
    v = p.start_charging("a", 120.0)
    assert (v.state, v.reason) == (BookingState.NO_SHOW, "not_reserved")
    assert p.connector_status("c1", 120.0) is ConnectorStatus.AVAILABLE


def test_connector_busy_while_previous_session_overstays() -> None:
    p = make()
    p.book("a", "S1", 100.0, 130.0, 0.0, connector_id="c1")
    p.book("b", "S1", 130.0, 160.0, 0.0, connector_id="c1")
    p.start_charging("a", 100.0)
    assert p.start_charging("b", 131.0).reason == "connector_busy"
    p.stop_charging("a", 133.0)
    assert p.start_charging("b", 134.0).charging


def test_cancel_frees_and_is_idempotent() -> None:
    p = make()
    p.book("a", "S1", 100.0, 130.0, 0.0, connector_id="c1")
    assert p.cancel("a", 1.0).state is C
    assert p.cancel("a", 2.0).state is C
    assert p.book("b", "S1", 100.0, 130.0, 3.0, connector_id="c1").state == "RESERVED"
    out = p.handle(CancelRequest("m", "V", "b"), 4.0)
    assert out[0].msg == CancelReply("P1:CANCEL_REPLY:b", "P1", "b", "", "CANCELED")
    # cancel of an unknown id leaves a tombstone: a later booking with that id is refused
    out = p.handle(CancelRequest("m", "V", "zzz"), 5.0)
    assert out[0].msg.state == "UNKNOWN"
    assert p.book("zzz", "S1", 200.0, 230.0, 6.0).state == "REJECTED"


def test_restart_rebuilds_identical_state() -> None:
    p = make()
    p.book("a", "S1", 100.0, 130.0, 0.0)
    p.book("b", "S1", 100.0, 130.0, 0.0)
    p.book("c", "S1", 100.0, 130.0, 0.0)
    p.start_charging("a", 101.0)
    p.tick(200.0)
    p.handle(Prepare("m", "C", "t", "t/0", "S9", None, 300.0, 330.0, 5.0, 10.0, 300.0), 290.0)
    p.handle(CancelRequest("m", "V", "ghost"), 291.0)
    q = Participant.from_log("P1", p.stations, load_log(dump_log(p.log)))
    assert q.durable_state() == p.durable_state()
    assert q.log == p.log
    assert q.new_records() == []


def test_a_node_that_forgets_its_log_still_persists_and_rebuilds() -> None:
    """``forget_log`` (what the live servers do: their database is the log) keeps no copy
    of the records, yet every record still goes out through ``new_records`` and the node
    rebuilt from those has the same state."""
    p = make()
    p.forget_log()
    persisted = []
    p.book("a", "S1", 100.0, 130.0, 0.0)
    p.book("b", "S1", 100.0, 130.0, 0.0)
    persisted += p.new_records()
    p.start_charging("a", 101.0)
    p.tick(200.0)
    p.handle(Prepare("m", "C", "t", "t/0", "S9", None, 300.0, 330.0, 5.0, 10.0, 300.0), 290.0)
    persisted += p.new_records()
    assert p.log == [] and len(persisted) >= 5
    twin = make()  # the same steps, keeping its log
    twin.book("a", "S1", 100.0, 130.0, 0.0)
    twin.book("b", "S1", 100.0, 130.0, 0.0)
    twin.start_charging("a", 101.0)
    twin.tick(200.0)
    twin.handle(Prepare("m", "C", "t", "t/0", "S9", None, 300.0, 330.0, 5.0, 10.0, 300.0), 290.0)
    assert persisted == twin.log
    q = Participant.from_log("P1", p.stations, load_log(dump_log(persisted)))
    assert q.durable_state() == p.durable_state() == twin.durable_state()


# ----------------------------------------------------------------------------- walk-in share


def test_walkin_share_keeps_connectors_free_at_every_instant() -> None:
    """4 connectors, walkin_share 0.5: at most 2 bookings active at any instant; the third
    overlapping one is refused ``walkin_reserve`` even though a connector is free, with
    alternatives that keep the share; windows that only touch are fine."""
    st = {"S": ["c1", "c2", "c3", "c4"]}
    p = Participant("P", st, walkin_share=0.5)
    assert p.book("b1", "S", 10.0, 40.0, 0.0).state == "RESERVED"
    assert p.book("b2", "S", 30.0, 60.0, 0.0).state == "RESERVED"
    third = p.book("b3", "S", 35.0, 50.0, 0.0)
    assert (third.state, third.reason) == ("REJECTED", "walkin_reserve")
    assert third.alternatives and all(a.start_min >= 40.0 for a in third.alternatives)
    assert p.book("b4", "S", 60.0, 90.0, 0.0).state == "RESERVED"  # touches b2: allowed
    assert p.book("b5", "S", 0.0, 10.0, 0.0).state == "RESERVED"  # touches b1: allowed
    # a trip hold is held to the same rule, and counts against it while PENDING
    out = p.handle(Prepare("m", "C", "t1", "t1/0", "S", None, 38.0, 45.0, 5.0, 10.0, 38.0), 0.0)
    (vote,) = [o.msg for o in out]
    assert vote.yes is False and vote.reason == "walkin_reserve"  # b1 + b2 at 38-40
    out = p.handle(Prepare("m", "C", "t2", "t2/0", "S", None, 40.0, 55.0, 5.0, 10.0, 40.0), 0.0)
    assert out[0].msg.yes is True
    assert p.book("b6", "S", 50.0, 58.0, 0.0).reason == "walkin_reserve"
    # without the share the same station books all four connectors
    q = Participant("Q", st)
    assert [q.book(f"b{i}", "S", 10.0, 40.0, 0.0).state for i in range(5)] == [
        "RESERVED"] * 4 + ["REJECTED"]


def test_walkin_share_rounds_down_per_station() -> None:
    p = Participant("P", {"one": ["a1"], "three": ["t1", "t2", "t3"]}, walkin_share=0.4)
    assert p.book("x1", "one", 0.0, 10.0, 0.0).state == "RESERVED"  # floor(0.4) = 0 kept
    assert p.book("y1", "three", 0.0, 10.0, 0.0).state == "RESERVED"
    assert p.book("y2", "three", 0.0, 10.0, 0.0).state == "RESERVED"
    assert p.book("y3", "three", 0.0, 10.0, 0.0).reason == "walkin_reserve"  # 1 of 3 kept
    with pytest.raises(ValueError, match="walkin_share"):
        Participant("P", {"s": ["c"]}, walkin_share=1.0)


def test_walkin_share_is_kept_per_pool_with_pools() -> None:
    """``pools`` (connector -> class): the share is kept in each class of a station, so
    bookings of one class never use up another's; unknown connectors are refused."""
    st = {"S": ["d1", "d2", "d3", "d4", "a1", "a2"]}
    pools = {"d1": "150DC", "d2": "150DC", "d3": "150DC", "d4": "150DC",
             "a1": "22AC", "a2": "22AC"}
    p = Participant("P", st, walkin_share=0.5, pools=pools)
    dc, ac = ("d1", "d2", "d3", "d4"), ("a1", "a2")
    got = [p.book(f"x{i}", "S", 10.0, 40.0, 0.0, connector_ids=dc) for i in range(3)]
    assert [g.state for g in got] == ["RESERVED", "RESERVED", "REJECTED"]  # 2 of 4 kept
    assert got[2].reason == "walkin_reserve"
    y = [p.book(f"y{i}", "S", 10.0, 40.0, 0.0, connector_ids=ac) for i in range(2)]
    assert [g.state for g in y] == ["RESERVED", "REJECTED"]  # 1 of 2 kept, DC aside
    # one pool for the station (no pools): 3 of 6 bookable, whatever the class
    q = Participant("Q", st, walkin_share=0.5)
    assert [q.book(f"z{i}", "S", 10.0, 40.0, 0.0, connector_ids=dc).state
            for i in range(4)] == ["RESERVED"] * 3 + ["REJECTED"]
    with pytest.raises(ValueError, match="unknown connector"):
        Participant("P", st, pools={"zz": "x"})


def test_a_hold_on_some_connectors_takes_only_those() -> None:
    """``connector_ids`` (a connector class, as a vehicle planned it): the hold goes to one
    of them, a refusal offers windows on them only, and ids of another station are refused
    by name; without them any connector of the station will do."""
    p = Participant("P1", {"S1": ["ac1", "dc1", "dc2"], "S9": ["c9"]})
    dc = ("dc2", "dc1")  # (any order: the station's own order decides)

    def prepare(bid: str, start: float, end: float, ids: tuple[str, ...] = dc) -> Vote:
        m = Prepare(f"m-{bid}", "C", f"t-{bid}", bid, "S1", None, start, end, 5.0, 10.0,
                    start, ids)
        (out,) = p.handle(m, 0.0)
        assert isinstance(out.msg, Vote)
        return out.msg

    a, b = prepare("a", 100.0, 130.0), prepare("b", 100.0, 130.0)
    assert (a.yes, a.connector_id, b.yes, b.connector_id) == (True, "dc1", True, "dc2")
    c = prepare("c", 110.0, 120.0)
    assert (c.yes, c.reason) == (False, "conflict")  # ac1 is free, but not of the class
    assert {x.connector_id for x in c.alternatives} == {"dc1", "dc2"}
    assert all(x.start_min >= 130.0 for x in c.alternatives)
    d = prepare("d", 110.0, 120.0, ())
    assert (d.yes, d.connector_id) == (True, "ac1")
    e = prepare("e", 200.0, 210.0, ("dc1", "c9"))
    assert (e.yes, e.reason) == (False, "unknown_connector")
    r = p.book("f", "S1", 300.0, 330.0, 0.0, connector_ids=("dc2",))
    assert (r.state, r.connector_id) == ("RESERVED", "dc2")


def test_connector_ids_round_trip_and_default_when_absent() -> None:
    m = Prepare("m", "C", "t", "t/0", "S1", None, 1.0, 2.0, 5.0, 10.0, 1.0, ("c1", "c2"))
    assert decode(encode(m)) == m
    req = TripRequest("r", "V", "t", "V", (StopRequest("P1", "S1", 1.0, 2.0, 5.0, None,
                                                       ("c1",)),))
    assert decode(encode(req)) == req
    old = json.loads(encode(m))
    del old["connector_ids"]  # a message from before the field: any connector
    assert decode(json.dumps(old)).connector_ids == ()
