"""Trips a vehicle can always find, and trips that tell the truth after a station cancel.

* ``POST /bookings`` with an ``Idempotency-Key`` derives the trip id from (vehicle, key): a
  retry after the coordinator crashed between logging the trip (even its outcome) and
  answering -- the replay record was never written -- returns the *same* trip and its
  outcome instead of booking a second one ("unaware" trips of the fault matrix);
* ``GET /vehicles/{id}/trips``: the caller's trips coordinated here, with state, outcome and
  the requested stops; another vehicle's list is 403;
* a station owner that cancels a reserved stop (station offline) tells the trip's coordinator
  (``StopCanceled``): the whole trip ends CANCELED, every other stop is released, and
  ``GET /bookings/{trip}`` says so, with the reason and the stop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from sqlalchemy import delete
from test_live_api import TRIP, Net, book_trip

from evsim.protocol import BookingState, Coordinator, Participant, TripState
from live import topics
from live.bus import InMemoryBus, encode_json
from live.server.node import CommitError
from live.storage import Storage, idempotency


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return Net(tmp_path)


def test_retried_post_after_a_lost_answer_returns_the_same_trip(net: Net) -> None:
    vid, h = net.register()
    hk = {**h, "Idempotency-Key": "trip-1"}
    first = net.c["acme"].post("/bookings", json=TRIP, headers=hk)
    assert first.status_code == 201, first.text
    trip_id = first.json()["trip_id"]
    svc = net.svc("acme")
    assert trip_id == svc.trip_id_for(vid, "trip-1") and trip_id.startswith(f"{vid}.")
    # the crash: the trip (and its BOOKED outcome) is logged, the replay record is not
    with svc.storage.begin() as conn:
        conn.execute(delete(idempotency))
    again = net.c["acme"].post("/bookings", json=TRIP, headers=hk)
    assert again.status_code == 201, again.text
    assert "Idempotent-Replayed" not in again.headers  # recomputed, not replayed
    body = again.json()
    assert body["trip_id"] == trip_id and body["outcome"] == "BOOKED"
    assert body["bookings"] == first.json()["bookings"]
    assert svc.host.coordinator.trip_ids().count(trip_id) == 1
    assert len(svc.storage.trips_of(vid)) == 1  # nothing booked twice
    # from now on a plain replay
    third = net.c["acme"].post("/bookings", json=TRIP, headers=hk)
    assert third.headers.get("Idempotent-Replayed") == "true" and third.json() == body
    # the same key for another request, replay record lost too: refused, not confused
    with svc.storage.begin() as conn:
        conn.execute(delete(idempotency))
    other = {"stops": [{**TRIP["stops"][0], "end_min": 150}]}
    r = net.c["acme"].post("/bookings", json=other, headers=hk)
    assert r.status_code == 422 and r.json()["reason"] == "idempotency_key_reused"
    # another key is another trip; no key: a random id
    k2 = net.c["acme"].post("/bookings", json={"stops": [TRIP["stops"][0] | {
        "start_min": 400, "end_min": 430}]}, headers={**h, "Idempotency-Key": "trip-2"})
    assert k2.status_code == 201 and k2.json()["trip_id"] != trip_id
    # the same key from another vehicle is another trip
    vid2, h2 = net.register()
    r2 = net.c["acme"].post("/bookings", json={"stops": [TRIP["stops"][0] | {
        "start_min": 500, "end_min": 530}]}, headers={**h2, "Idempotency-Key": "trip-1"})
    assert r2.status_code == 201 and r2.json()["trip_id"].startswith(f"{vid2}.")


def test_vehicle_lists_its_own_trips_with_status_and_stops(net: Net) -> None:
    vid, h = net.register()
    other, ho = net.register()
    assert net.c["acme"].get(f"/vehicles/{vid}/trips", headers=h).json() == []
    trip = book_trip(net, h)
    r = net.c["acme"].get(f"/vehicles/{vid}/trips", headers=h)
    assert r.status_code == 200, r.text
    (t,) = r.json()
    assert t["trip_id"] == trip["trip_id"] and t["outcome"] == "BOOKED"
    assert t["state"] == "BOOKED" and len(t["bookings"]) == 2
    assert [s["station_id"] for s in t["stops"]] == ["acme_alpha", "zap_bravo"]
    assert t["created_t_min"] == 100.0
    assert net.c["acme"].get(f"/vehicles/{other}/trips", headers=h).status_code == 403
    assert net.c["acme"].get(f"/vehicles/{vid}/trips", headers=ho).status_code == 403
    assert net.c["acme"].get(f"/vehicles/{vid}/trips").status_code == 401
    net.c["acme"].delete(f"/bookings/{trip['trip_id']}", headers=h)
    (t,) = net.c["acme"].get(f"/vehicles/{vid}/trips", headers=h).json()
    assert t["outcome"] == "CANCELED"


def test_station_owner_cancel_cancels_the_trip_at_its_coordinator(net: Net) -> None:
    vid, h = net.register()
    trip = book_trip(net, h, {"stops": [
        {"station_id": "zap_bravo", "start_min": 200, "end_min": 230},
        {"station_id": "acme_alpha", "start_min": 300, "end_min": 330},
    ]})
    tid = trip["trip_id"]
    zap_stop = next(b["booking_id"] for b in trip["bookings"] if b["company_id"] == "zap")
    acme_stop = next(b["booking_id"] for b in trip["bookings"] if b["company_id"] == "acme")
    # zap_bravo goes offline; its window (t=200, grace 10) ends within the assumed outage
    net.clock.t = 196.0
    zap, acme = net.svc("zap"), net.svc("acme")
    net.bus.publish(topics.status_topic("zap", "zap_bravo"), encode_json(
        {"station_id": "zap_bravo", "company_id": "zap", "online": False}), retain=True)
    zap.outages.handle_offline("zap_bravo")  # (or the outage loop, whichever comes first)

    def settled() -> bool:
        with acme.host.lock:
            return acme.host.coordinator.trip_state(tid) is TripState.CANCELED

    import time
    deadline = time.monotonic() + 10
    while not settled() and time.monotonic() < deadline:
        zap.host.tick()
        acme.host.tick()
        time.sleep(0.05)
    assert settled()
    got = net.c["acme"].get(f"/bookings/{tid}", headers=h).json()
    assert got["outcome"] == "CANCELED" and got["reason"] == "station_offline"
    assert got["failed_stop"] == 0
    with zap.host.lock:
        assert zap.host.participant.booking(zap_stop).state is BookingState.CANCELED
    with acme.host.lock:  # the other stop is released too: all or nothing
        assert acme.host.participant.booking(acme_stop).state is BookingState.CANCELED
    events = [n["event"] for n in net.notes(vid)]
    assert events.count("booking_cancelled") >= 2  # the station's note and the trip's
    trip_note = [n for n in net.notes(vid) if n.get("outcome") == "CANCELED"]
    assert trip_note and trip_note[-1]["trip_id"] == tid


def _hold_commits(svc: Any, fail: bool = False) -> tuple[threading.Event, threading.Event,
                                                         Callable[[], None]]:
    """Hold the server's next commits until ``gate`` is set (``committing`` says one is
    waiting), then write them, or fail them (``fail``: a disk that refuses the write).
    Returns (gate, committing, restore)."""
    gate, committing = threading.Event(), threading.Event()
    real_begin = svc.storage.begin

    @contextmanager
    def held_begin() -> Iterator[Any]:
        committing.set()
        assert gate.wait(10.0)
        if fail:
            raise OSError("disk full")
        with real_begin() as conn:
            yield conn

    svc.storage.begin = held_begin
    return gate, committing, lambda: setattr(svc.storage, "begin", real_begin)


def test_booked_answer_waits_for_the_step_that_decided_the_trip(net: Net) -> None:
    """A BOOKED answer may skip waiting for ALL_ACKED (``before_log``), never for the
    decision: a trip with every stop at home is decided and booked in one step, and a
    second request waiting for it must not answer before that step is committed."""
    vid, h = net.register()
    svc = net.svc("acme")
    host = svc.host
    trip_id = svc.trip_id_for(vid, "local-1")
    gate, committing, restore = _hold_commits(svc)
    body = {"stops": [TRIP["stops"][0]]}  # acme_alpha only: all at home
    first: dict[str, Any] = {}
    a = threading.Thread(target=lambda: first.update(r=net.c["acme"].post(
        "/bookings", json=body, headers={**h, "Idempotency-Key": "local-1"})))
    a.start()
    assert committing.wait(10.0)  # the trip's only step is run, its commit is held up
    assert host.result(trip_id) is not None and host.result(trip_id).outcome == "BOOKED"
    answered: dict[str, Any] = {}
    b = threading.Thread(target=lambda: answered.update(
        res=host.wait_result(trip_id, 5.0), t=time.monotonic()))
    b.start()
    b.join(0.3)
    assert b.is_alive(), "BOOKED answered before its decision was committed"
    opened = time.monotonic()
    gate.set()
    b.join(10.0)
    a.join(10.0)
    restore()
    assert answered["res"].outcome == "BOOKED" and answered["t"] >= opened
    assert first["r"].status_code == 201


def test_a_failed_commit_leaves_a_log_that_replays_and_the_server_recovers(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trip's own row cannot be written, so the commit carrying its TripStarted fails.
    Nothing the in-memory nodes did on top of it may reach the log (its ALL_YES decision, in
    a later step of the same batch, would make the log unreplayable); the caller gets 503,
    the nodes are rebuilt from the log, and the server goes on booking."""
    _vid, h = net.register()
    acme, zap = net.svc("acme"), net.svc("zap")

    def disk_full(*_a: Any, **_k: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Storage, "add_trip", staticmethod(disk_full))
    r = net.c["acme"].post("/bookings", json=TRIP, headers=h)
    assert r.status_code == 503, r.text
    assert r.json()["reason"] == "storage_unavailable"
    monkeypatch.undo()
    coord = Coordinator.from_log(acme.host.cid, acme.storage.load_records(acme.host.cid))
    assert coord.trip_ids() == []  # nothing of the trip, and the log replays
    Participant.from_log(acme.host.pid, acme.world.protocol_stations("acme"),
                         acme.storage.load_records(acme.host.pid))
    later = {"stops": [{**s, "start_min": s["start_min"] + 300, "end_min": s["end_min"] + 300}
                       for s in TRIP["stops"]]}
    ok = net.c["acme"].post("/bookings", json=later, headers=h)
    assert ok.status_code == 201, ok.text
    with acme.host.lock:
        assert acme.host.coordinator.trip_ids() == [ok.json()["trip_id"]]
    # zap held a stop for the lost trip (its PREPARE left early): presumed abort frees it
    net.clock.t += 30.0
    for _ in range(3):
        zap.host.tick()
        acme.host.tick()
    with zap.host.lock:
        held = [b for b in zap.host.participant.bookings()
                if b.state in (BookingState.PENDING, BookingState.RESERVED)]
    assert [b.booking_id.split("/")[0] for b in held] == [ok.json()["trip_id"]]


def _trip_records(svc: Any, trip_id: str) -> list[Any]:
    return [r for r in svc.storage.load_records(svc.host.cid)
            if getattr(r, "trip_id", None) == trip_id]


def test_a_trip_start_is_not_forced_on_its_own_but_rides_on_the_decision(net: Net) -> None:
    """``execute(lazy=True)``: the PREPARE leaves and the request waits for the votes with
    the trip's start (TripStarted, the hold at home) still unwritten; the decision's commit
    writes it.  And the ALL_ACKED (``evsim.protocol.may_defer``) waits for the next commit,
    here the ticker's, once it has stayed queued for a whole tick: a two-company trip costs
    its coordinator one commit of its own (the decision) where it took two."""
    vid, h = net.register()
    acme, zap = net.svc("acme"), net.svc("zap")
    held: list[tuple[str, Any]] = []
    real = zap.host.deliver
    zap.host.deliver = lambda dst, msg: held.append((dst, msg))  # type: ignore[method-assign]
    c0 = acme.host.commits
    out: dict[str, Any] = {}
    post = threading.Thread(target=lambda: out.update(r=net.c["acme"].post(
        "/bookings", json=TRIP, headers={**h, "Idempotency-Key": "lazy-1"})))
    post.start()
    deadline = time.monotonic() + 10.0
    while not held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held, "no PREPARE reached zap"
    trip_id = acme.trip_id_for(vid, "lazy-1")
    time.sleep(0.1)  # (the request would have committed by now)
    assert post.is_alive()  # waiting for zap's vote
    assert acme.host.commits == c0
    assert _trip_records(acme, trip_id) == []  # presumed abort: lost in a crash, nothing owed
    zap.host.deliver = real  # type: ignore[method-assign]
    for dst, msg in held:
        real(dst, msg)
    post.join(10.0)
    assert out["r"].status_code == 201, out["r"].text
    assert acme.host.commits - c0 == 1

    def events() -> list[str]:
        return [getattr(r, "event", type(r).__name__) for r in _trip_records(acme, trip_id)]

    assert events()[0] == "TripStarted" and "ALL_YES" in events(), events()
    assert "ALL_ACKED" not in events()  # queued, not forced on its own
    acme.host.tick()  # (a tick notes what is queued; the queue is younger than a tick)
    assert acme.host.commits - c0 == 1 and "ALL_ACKED" not in events()
    acme.host.tick()  # still queued a whole tick later: the ticker writes it
    assert acme.host.commits - c0 == 2 and events()[-1] == "ALL_ACKED", events()


def test_a_crash_before_the_deferred_all_acked_is_written_loses_nothing(
        tmp_path: Path) -> None:
    """The ALL_ACKED that rides on a later commit is lost if the coordinator dies first. Its
    restart finds the trip COMMITTING, asks the stops again, gets the same ACKs from their
    state, and the trip is BOOKED with every stop RESERVED: nothing owed was lost."""
    net = Net(tmp_path)
    _, h = net.register()
    trip = book_trip(net, h)
    trip_id = trip["trip_id"]
    assert [getattr(r, "event", "") for r in _trip_records(net.svc("acme"), trip_id)][-1] \
        == "ALL_YES"
    # acme "crashes" (its queue is never written); both servers start again on their files
    bus = InMemoryBus()
    acme = net.make("acme", bus).state.service
    zap = net.make("zap", bus).state.service
    assert acme.host.coordinator.trip_state(trip_id) is TripState.COMMITTING
    net.clock.t += 1.0  # past the coordinator's retry: it re-sends COMMIT
    acme.host.tick()
    acme.host.barrier()
    assert acme.host.coordinator.trip_state(trip_id) is TripState.BOOKED
    assert [getattr(r, "event", "") for r in _trip_records(acme, trip_id)][-1] == "ALL_ACKED"
    with zap.host.lock:
        states = {b.booking_id: b.state for b in zap.host.participant.bookings()}
    zap_stop = next(b["booking_id"] for b in trip["bookings"] if b["company_id"] == "zap")
    assert states[zap_stop] is BookingState.RESERVED


def test_booked_is_not_answered_when_the_decision_cannot_be_written(net: Net) -> None:
    """A BOOKED answer waits for the step that decided the trip; if that step's commit
    fails, a request waiting for the trip (here a second one, as a retry would) raises
    :class:`CommitError` (503) instead of answering a BOOKED the log cannot back."""
    vid, h = net.register()
    svc = net.svc("acme")
    host = svc.host
    trip_id = svc.trip_id_for(vid, "local-2")
    gate, committing, restore = _hold_commits(svc, fail=True)
    body = {"stops": [TRIP["stops"][0]]}  # acme_alpha only: decided and booked in one step
    first: dict[str, Any] = {}
    a = threading.Thread(target=lambda: first.update(r=net.c["acme"].post(
        "/bookings", json=body, headers={**h, "Idempotency-Key": "local-2"})))
    a.start()
    assert committing.wait(10.0)
    assert host.result(trip_id) is not None and host.result(trip_id).outcome == "BOOKED"
    answered: dict[str, Any] = {}

    def second() -> None:
        try:
            answered["res"] = host.wait_result(trip_id, 5.0)
        except CommitError as exc:
            answered["error"] = exc

    b = threading.Thread(target=second)
    b.start()
    b.join(0.3)
    gate.set()
    b.join(10.0)
    a.join(10.0)
    restore()
    assert "error" in answered, f"answered {answered.get('res')} on a lost decision"
    assert first["r"].status_code == 503, first["r"].text
    coord = Coordinator.from_log(host.cid, svc.storage.load_records(host.cid))
    assert coord.trip_ids() == []
    assert net.c["acme"].post("/bookings", json=body, headers=h).status_code == 201
