"""Company server REST API: two company apps on one InMemoryBus, fake scenario clock.

Cross-company trips run the real protocol end to end in-process (acme coordinates, zap
participates over the bus).  Scenario: data/tiny.toml (acme: acme_alpha, acme_charlie; zap:
zap_bravo, zap_delta).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fastapi.testclient import TestClient

from evsim.battery import ChargeCurve, session_power_kw
from evsim.protocol import BookingState, Vote, encode
from evsim.scenario import DATA_DIR, load_scenario
from evsim.tariff import price_session
from live import topics
from live.bus import BadPayload, InMemoryBus, decode_json, encode_json, topic_matches
from live.server import create_app
from live.settings import Settings

TINY = DATA_DIR / "tiny.toml"
SCEN = load_scenario(TINY)


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Net:
    """Two company servers sharing one bus and one clock."""

    def __init__(self, tmp: Path, *, wait_s: float = 2.0) -> None:
        self.bus = InMemoryBus()
        self.clock = Clock()
        self.tmp = tmp
        self.wait_s = wait_s
        self.apps = {c: self.make(c) for c in ("acme", "zap")}
        self.c = {k: TestClient(a) for k, a in self.apps.items()}

    def settings(self, company: str) -> Settings:
        return Settings(company=company, scenario=TINY, booking_wait_s=self.wait_s,
                        db_url=f"sqlite:///{self.tmp / f'{company}.db'}")

    def make(self, company: str, bus: InMemoryBus | None = None):
        return create_app(self.settings(company), bus or self.bus, self.clock)

    def svc(self, company: str):
        return self.apps[company].state.service

    def register(self, company: str = "acme") -> tuple[str, dict[str, str]]:
        r = self.c[company].post("/vehicles", json={})
        assert r.status_code == 201, r.text
        return r.json()["vehicle_id"], {"Authorization": f"Bearer {r.json()['token']}"}

    def roam(self, company: str, vid: str) -> dict[str, str]:
        r = self.c[company].post("/vehicles", json={"vehicle_id": vid})
        assert r.status_code == 201, r.text
        assert r.json()["home_company"] == "acme"
        return {"Authorization": f"Bearer {r.json()['token']}"}

    def notes(self, vid: str) -> list[dict]:
        return [json.loads(p) for _, p in self.bus.messages(topics.vehicle_notify_topic(vid))]


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return Net(tmp_path)


TRIP = {"stops": [
    {"station_id": "acme_alpha", "start_min": 110, "end_min": 140},
    {"station_id": "zap_bravo", "start_min": 200, "end_min": 230},
]}


def book_trip(net: Net, h: dict[str, str], body: dict = TRIP) -> dict:
    r = net.c["acme"].post("/bookings", json=body, headers=h)
    assert r.status_code == 201, r.text
    return r.json()


def charge_first_stop(net: Net, h: dict[str, str], trip: dict) -> tuple[dict, dict]:
    """Charge at the trip's first stop (acme_alpha) from t=110 to t=130: (session, CDR)."""
    net.clock.t = 110.0
    s = net.c["acme"].post("/sessions", headers=h, json={
        "booking_id": trip["bookings"][0]["booking_id"], "station_id": "acme_alpha",
        "soc": 0.2, "battery_kwh": 60}).json()
    net.clock.t = 130.0
    cdr = net.c["acme"].post(f"/sessions/{s['session_id']}/stop", headers=h).json()
    return s, cdr


def expected_price(station: str, connector_kw: float, ctype: str, start: float, end: float,
                   soc: float, target: float, battery: float, max_dc: float = 150.0,
                   max_ac: float = 11.0) -> tuple[float, float]:
    cfg = next(s for s in SCEN.stations if s.id == station)
    ch = SCEN.charging
    power = session_power_kw(connector_kw, ctype, max_dc, max_ac)
    curve = ChargeCurve(battery, power, ch.taper_soc, ch.efficiency)
    cm = min(end - start, curve.minutes_to(soc, target))
    p = price_session(SCEN.tariff_for(cfg), start, cm,
                      lambda e: curve.energy_kwh(soc, curve.soc_after(soc, e)), power,
                      end - start - cm)
    return p.total, curve.energy_kwh(soc, curve.soc_after(soc, cm))


# ------------------------------------------------------------------ contracts


def test_bus_and_topics_contracts() -> None:
    bus = InMemoryBus()
    got: list[str] = []
    bus.publish(topics.status_topic("acme", "s1"), b'{"online":true}', retain=True)
    bus.subscribe(topics.ALL_STATUS, lambda t, p: got.append(t))  # retained replay
    bus.subscribe("evsim/#", lambda t, p: 1 / 0)  # a raising handler is logged, not fatal
    bus.publish(topics.status_topic("zap", "s2"), b"{}")
    bus.publish(topics.meter_topic("zap", "s2"), b"{}")
    assert got == ["evsim/acme/stations/s1/status", "evsim/zap/stations/s2/status"]
    assert topic_matches("evsim/#", "evsim") and not topic_matches("evsim/+", "evsim/a/b")
    with pytest.raises(ValueError):
        bus.subscribe("evsim/#/x", lambda t, p: None)
    with pytest.raises(ValueError):
        topics.status_topic("a/b", "s")
    info = topics.parse(topics.cmd_topic("acme", "acme_alpha"))
    assert (info.kind, info.company, info.station_id) == ("cmd", "acme", "acme_alpha")
    info = topics.parse(topics.protocol_topic("acme.coord", "zap"))
    assert (info.kind, info.node_id, info.src) == ("protocol", "acme.coord", "zap")
    assert topics.parse(topics.vehicle_notify_topic("v1")).vehicle_id == "v1"
    assert topics.parse("evsim/acme/stations/x/bogus") is None
    assert decode_json(encode_json({"a": 1})) == {"a": 1}
    for bad, why in [(b"\xff", "UTF-8"), (b"{", "JSON"), (b"[1]", "object"),
                     (b" " * 70_000, "too large")]:
        with pytest.raises(BadPayload, match=why):
            decode_json(bad)


def test_settings_from_env() -> None:
    s = Settings.from_env({"EVSIM_COMPANY": "zap", "EVSIM_TIME_SCALE": "30",
                           "EVSIM_EPOCH": "1000", "EVSIM_START_MIN": "60"})
    assert s.database_url == "sqlite:///./evsim-zap.db"
    assert s.sim_minutes(120) == 60 + 120 * 30 / 60
    with pytest.raises(ValueError):
        Settings.from_env({"EVSIM_TIME_SCALE": "-1"})


# ------------------------------------------------------------------ happy path


def test_health_docs_and_stations(net: Net) -> None:
    c = net.c["acme"]
    h = c.get("/health").json()
    assert h["status"] == "ok" and h["company"] == "acme" and h["journal_mode"] == "wal"
    assert c.get("/docs").status_code == 200
    assert "/bookings" in c.get("/openapi.json").json()["paths"]
    own = c.get("/stations").json()
    assert [s["station_id"] for s in own] == ["acme_alpha", "acme_charlie"]
    assert [x["connector_id"] for x in own[0]["connectors"]] == [
        "acme_alpha/1", "acme_alpha/2", "acme_alpha/3"]
    assert len(c.get("/network/stations").json()) == 4
    t = c.get("/tariffs").json()
    assert t[0]["currency"] == "BRL" and t[0]["elements"][0]["energy_per_kwh"] == 2.0


def test_two_company_trip_sessions_and_prices(net: Net) -> None:
    vid, h = net.register()
    r = net.c["acme"].post("/recommendations", headers=h, json={
        "city": "alpha", "destination": "delta", "soc": 0.5, "battery_kwh": 60,
        "consumption_kwh_per_km": 0.18})
    assert r.status_code == 200 and r.json()["choices"]
    ranked = r.json()["choices"]
    assert [c["rank"] for c in ranked] == list(range(1, len(ranked) + 1))
    assert len({c["station_id"] for c in ranked}) == len(ranked)  # each pick excluded next
    assert len(ranked) >= 2 and ranked[0]["score"] <= ranked[1]["score"], ranked
    trip = book_trip(net, h)
    assert trip["outcome"] == "BOOKED" and trip["state"] == "BOOKED"
    b0, b1 = trip["bookings"]
    assert (b0["company_id"], b1["company_id"]) == ("acme", "zap")
    assert net.notes(vid)[-1]["event"] == "booking_confirmed"
    zb = net.svc("zap").host.participant.booking(b1["booking_id"])
    assert zb.state is BookingState.RESERVED
    # GET by trip id and by booking id (held here) work
    by_trip = net.c["acme"].get(f"/bookings/{trip['trip_id']}", headers=h).json()
    assert by_trip["outcome"] == "BOOKED"
    by_stop = net.c["acme"].get(f"/bookings/{b0['booking_id']}", headers=h).json()
    assert by_stop["state"] == "RESERVED"

    # stop 1 at acme: 60 minutes plugged, charging ends at the target, then parking
    net.clock.t = 110.0
    r = net.c["acme"].post("/sessions", headers=h, json={
        "booking_id": b0["booking_id"], "station_id": "acme_alpha", "soc": 0.2,
        "battery_kwh": 60, "target_soc": 0.8})
    assert r.status_code == 201, r.text
    s1 = r.json()
    cmds = [json.loads(p) for _, p in net.bus.messages(topics.cmd_topic("acme", "acme_alpha"))]
    assert cmds[-1]["cmd"] == "start" and cmds[-1]["session_id"] == s1["session_id"]
    st = net.c["acme"].get("/stations").json()[0]["connectors"][0]
    assert st["status"] == "CHARGING"
    net.clock.t = 170.0
    r = net.c["acme"].post(f"/sessions/{s1['session_id']}/stop", headers=h)
    assert r.status_code == 200, r.text
    cdr = r.json()
    total, kwh = expected_price("acme_alpha", 50.0, "DC", 110, 170, 0.2, 0.8, 60)
    assert cdr["status"] == "COMPLETED" and cdr["energy_source"] == "model"
    assert cdr["energy_kwh"] == pytest.approx(kwh)
    assert cdr["price"]["total"] == pytest.approx(total)
    assert cdr["price"]["parking"] > 0 and cdr["price"]["flat"] == 2.0
    assert cdr["price"]["total"] == pytest.approx(sum(
        cdr["price"][k] for k in ("energy", "time", "parking", "flat")))
    # stopping again is idempotent
    again = net.c["acme"].post(f"/sessions/{s1['session_id']}/stop", headers=h).json()
    assert again == cdr

    # stop 2 at zap (roaming registration); the station reports metered energy
    hz = net.roam("zap", vid)
    net.clock.t = 205.0
    r = net.c["zap"].post("/sessions", headers=hz, json={
        "booking_id": b1["booking_id"], "station_id": "zap_bravo", "soc": 0.3,
        "battery_kwh": 60, "target_soc": 0.9})
    assert r.status_code == 201, r.text
    s2 = r.json()
    assert s2["power_kw"] == 150.0
    net.clock.t = 220.0
    ev = topics.events_topic("zap", "zap_bravo")
    net.bus.publish(topics.meter_topic("zap", "zap_bravo"), encode_json({
        "session_id": s2["session_id"], "connector_id": "zap_bravo/1", "energy_kwh": 20.0,
        "power_kw": 150.0, "soc": 0.6, "t_min": 215.0}))
    net.bus.publish(ev, encode_json({"event": "session_finished", "session_id": s2["session_id"],
                                     "connector_id": "zap_bravo/1", "energy_kwh": 30.0,
                                     "soc": 0.75, "t_min": 218.0}))
    hist = net.c["zap"].get(f"/vehicles/{vid}/sessions", headers=hz).json()
    (z,) = hist
    assert z["status"] == "COMPLETED" and z["energy_source"] == "meter"
    assert z["energy_kwh"] == 30.0 and z["end_t_min"] == 218.0
    # zap: 1.8/kWh outside 08:00-10:00 plus 6/h while charging, no flat, no parking
    ch = SCEN.charging
    curve = ChargeCurve(60, 150.0, ch.taper_soc, ch.efficiency)
    cm = min(13.0, curve.minutes_to(0.3, 0.9))
    assert z["price"]["energy"] == pytest.approx(30.0 * 1.8)
    assert z["price"]["time"] == pytest.approx(cm / 60 * 6.0)
    assert z["price"]["currency"] == "BRL"
    hist_a = net.c["acme"].get(f"/vehicles/{vid}/sessions", headers=h).json()
    assert [x["session_id"] for x in hist_a] == [s1["session_id"]]
    events = [n["event"] for n in net.notes(vid)]
    assert events.count("charging_started") == 2 and events.count("charging_finished") == 2
    kinds = {r["kind"] for r in net.c["acme"].get("/trace").json()["rows"]}
    assert {"server_status", "trip_booking", "booking", "arrive", "session_start",
            "session_end"} <= kinds


def test_a_trip_across_companies_is_answered_without_a_waiting_thread(
        net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an Idempotency-Key a trip with a stop at another company is booked on the
    event loop (CompanyService.book_async: no thread blocks on the votes); one with every
    stop at home, or with a key, takes the blocking path (CompanyService.book) on the
    thread pool. Same answers either way."""
    svc = net.svc("acme")
    blocking: list[str] = []
    book = svc.book

    def counted(vehicle_id: str, body: object, key: str | None = None) -> object:
        blocking.append("home" if key is None else "key")
        return book(vehicle_id, body, key)  # type: ignore[arg-type]

    monkeypatch.setattr(svc, "book", counted)
    _, h = net.register()
    trip = book_trip(net, h)  # acme + zap
    assert trip["outcome"] == "BOOKED" and len(trip["bookings"]) == 2
    assert blocking == []
    home = net.c["acme"].post("/bookings", headers=h, json={"stops": [
        {"station_id": "acme_alpha", "start_min": 600, "end_min": 630}]})
    assert home.status_code == 201, home.text
    assert blocking == ["home"]
    keyed = net.c["acme"].post("/bookings", headers={**h, "Idempotency-Key": "k1"}, json={
        "stops": [{"station_id": "zap_bravo", "start_min": 700, "end_min": 730}]})
    assert keyed.status_code == 201, keyed.text
    assert blocking == ["home", "key"]
    # a conflict across companies is answered on the loop as before: 409 with the reason
    zap = trip["bookings"][1]
    assert zap["company_id"] == "zap"
    again = net.c["acme"].post("/bookings", headers=h, json={"stops": [
        {"station_id": "zap_bravo", "start_min": 200, "end_min": 230,
         "connector_id": zap["connector_id"]}]})
    assert again.status_code == 409 and again.json()["outcome"] == "REJECTED", again.text
    assert blocking == ["home", "key"]
    bad = net.c["acme"].post("/bookings", headers=h, json={"stops": [
        {"station_id": "nowhere", "start_min": 700, "end_min": 730}]})
    assert bad.status_code == 422 and bad.json()["reason"] == "unknown_station"
    # the host's lock held elsewhere (a step committing under it): the loop does not wait,
    # the blocking path books the trip once the lock is free
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with svc.host.lock:
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    threading.Timer(0.2, release.set).start()
    busy = net.c["acme"].post("/bookings", headers=h, json={"stops": [
        {"station_id": "zap_bravo", "start_min": 800, "end_min": 830}]})
    holder.join(5)
    assert busy.status_code == 201, busy.text
    assert blocking == ["home", "key", "home"]


def test_the_loop_does_not_wait_for_the_hosts_lock_to_answer(
        net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the result is in, the answer reads the host's state under its lock; taken by
    another thread past LOOP_LOCK_WAIT_S, the answer goes to the blocking path."""
    svc = net.svc("acme")
    wait_async = svc.host.wait_result_async
    release = threading.Event()
    holders: list[threading.Thread] = []

    async def result_then_lock_taken(trip_id: str, timeout_s: float) -> object:
        res = await wait_async(trip_id, timeout_s)
        held = threading.Event()

        def hold() -> None:
            with svc.host.lock:
                held.set()
                release.wait(5)

        holders.append(threading.Thread(target=hold))
        holders[-1].start()
        held.wait(5)
        threading.Timer(0.3, release.set).start()
        return res

    answered: list[str] = []
    wait_and_answer = svc._wait_and_answer

    def counted(started: object) -> object:
        answered.append("blocking")
        return wait_and_answer(started)

    monkeypatch.setattr(svc.host, "wait_result_async", result_then_lock_taken)
    monkeypatch.setattr(svc, "_wait_and_answer", counted)
    _, h = net.register()
    trip = book_trip(net, h)  # acme + zap: the event-loop path
    assert trip["outcome"] == "BOOKED"
    assert answered == ["blocking"]
    holders[0].join(5)


def test_a_booked_answer_waits_while_its_decision_is_not_durable(net: Net) -> None:
    """The event-loop path answers BOOKED at once only when the step that logged the
    decision is durable (ProtocolHost.booked_durable); otherwise it hands the answer to the
    blocking path, which waits for that commit."""
    host = net.svc("acme").host
    assert host.booked_durable("no-such-trip", host.epoch)  # nothing decided: nothing to wait
    host._decided["t-pending"] = host._durable + 1  # decided in a step not yet committed
    assert not host.booked_durable("t-pending", host.epoch)
    host._decided["t-pending"] = host._durable
    assert host.booked_durable("t-pending", host.epoch)


def test_servers_keep_no_copy_of_their_log_in_memory(net: Net) -> None:
    """The database is a server's protocol log: its nodes keep their state, not every
    record they wrote (memory and garbage-collector work that grew with each booking)."""
    _, h = net.register()
    book_trip(net, h)
    for company in ("acme", "zap"):
        host = net.svc(company).host
        assert host.storage.load_records(host.pid) or host.storage.load_records(host.cid)
        for node in (host.participant, host.coordinator):
            assert not node.keep_log and node.log == []


def test_a_server_keeps_nothing_per_request_beyond_the_protocol_state(net: Net) -> None:
    """What grew with every booking and nothing read again: the answers of started trips
    (the coordinator has them), a decided trip's votes, and one lock per Idempotency-Key
    (the vehicle agent sends a fresh key with every request)."""
    from live.server import deps
    from live.server.node import MAX_UNSTARTED

    _, h = net.register()
    for k in range(3):
        start = 300 + 40 * k
        body = {"stops": [{"station_id": "acme_alpha", "start_min": start, "end_min": start + 30},
                          {"station_id": "zap_bravo", "start_min": start, "end_min": start + 30}]}
        r = net.c["acme"].post("/bookings", json=body, headers=h | {"Idempotency-Key": f"m{k}"})
        assert r.status_code == 201, r.text
    host = net.svc("acme").host
    coord = host.coordinator
    assert len(coord.trip_ids()) == 3
    assert host._results == {}
    assert all(host.result(t).outcome == "BOOKED" for t in coord.trip_ids())
    assert all(coord._trips[t].votes == {} for t in coord.trip_ids())
    assert not [k for k in deps._locks if k[0] == id(net.svc("acme"))]
    # an answer for a trip the coordinator never started is kept, the last MAX_UNSTARTED
    from evsim.protocol import TripResult

    for k in range(MAX_UNSTARTED + 5):
        host._keep_unstarted(TripResult(f"r{k}", "acme.coord", f"bad{k}", "REJECTED", "x"))
    assert len(host._results) == MAX_UNSTARTED
    assert host.result(f"bad{MAX_UNSTARTED + 4}") is not None and host.result("bad0") is None


def test_cancel_trip_releases_both_stops(net: Net) -> None:
    _, h = net.register()
    trip = book_trip(net, h)
    r = net.c["acme"].delete(f"/bookings/{trip['trip_id']}", headers=h)
    assert r.status_code == 200 and r.json()["outcome"] == "CANCELED"
    assert r.json()["state"] == "CANCELED"
    for company, b in zip(("acme", "zap"), trip["bookings"], strict=True):
        assert net.svc(company).host.participant.booking(b["booking_id"]).state is \
            BookingState.CANCELED
    # the window is free again
    _, h2 = net.register()
    assert book_trip(net, h2)["outcome"] == "BOOKED"


def test_conflict_is_rejected_with_alternatives(net: Net) -> None:
    _, h = net.register()
    body = {"stops": [{"station_id": "zap_delta", "start_min": 300, "end_min": 330,
                       "connector_id": "zap_delta/1"}]}
    book_trip(net, h, body)
    r = net.c["acme"].post("/bookings", json=body, headers=h)
    assert r.status_code == 409
    j = r.json()
    assert (j["outcome"], j["reason"], j["failed_stop"]) == ("REJECTED", "conflict", 0)
    assert {"connector_id": "zap_delta/2", "start_min": 300.0, "end_min": 330.0} in \
        j["alternatives"]


def test_a_stop_can_ask_for_one_connector_class(net: Net) -> None:
    """``connector_ids``: the hold goes to one of them (here the AC connector, where any
    would have been a DC one), a conflict on them is refused though other connectors are
    free, and ids of another station or a pin outside them are 422."""
    _vid, h = net.register()
    conns = net.svc("acme").world.connectors["acme_alpha"]
    ac = [c.connector_id for c in conns if c.type == "AC"]
    dc = [c.connector_id for c in conns if c.type == "DC"]
    stop = {"station_id": "acme_alpha", "start_min": 300, "end_min": 330}

    def book(**extra: object):
        return net.c["acme"].post("/bookings", json={"stops": [{**stop, **extra}]}, headers=h)

    first = book(connector_ids=ac)
    assert first.status_code == 201, first.text
    assert first.json()["bookings"][0]["connector_id"] in ac
    second = book(connector_ids=ac)
    assert second.status_code == 409 and second.json()["outcome"] == "REJECTED"
    assert {a["connector_id"] for a in second.json()["alternatives"]} <= set(ac)
    anywhere = book()
    assert anywhere.status_code == 201 and anywhere.json()["bookings"][0]["connector_id"] in dc
    zap_conn = net.svc("zap").world.connectors["zap_bravo"][0].connector_id
    for extra in ({"connector_ids": [zap_conn]}, {"connector_ids": ac, "connector_id": dc[0]}):
        bad = book(**extra)
        assert bad.status_code == 422 and bad.json()["reason"] == "unknown_connector", bad.text


def test_a_vehicle_early_for_its_booking_waits_for_the_window(net: Net) -> None:
    """Before its window a booked session is refused ``too_early`` (the vehicle waits at the
    station, as in the simulation); at the window it starts, and with ``arrived_t_min`` the
    trace has the arrival and the wait; a vehicle on time waited nothing."""
    _vid, h = net.register()
    svc = net.svc("acme")
    windows = [(300.0, 330.0), (400.0, 430.0)]
    trip = book_trip(net, h, {"stops": [
        {"station_id": "acme_alpha", "start_min": a, "end_min": b} for a, b in windows]})
    b1, b2 = (b["booking_id"] for b in trip["bookings"])
    body = {"station_id": "acme_alpha", "soc": 0.2, "battery_kwh": 40, "target_soc": 0.3}
    net.clock.t = 290.0
    early = net.c["acme"].post("/sessions", headers=h, json={**body, "booking_id": b1})
    assert early.status_code == 409 and early.json()["reason"] == "too_early"
    net.clock.t = 300.5
    r = net.c["acme"].post("/sessions", headers=h,
                           json={**body, "booking_id": b1, "arrived_t_min": 290.0})
    assert r.status_code == 201, r.text
    net.clock.t = 330.0
    assert net.c["acme"].post(f"/sessions/{r.json()['session_id']}/stop",
                              headers=h).status_code == 200
    net.clock.t = 400.2
    r2 = net.c["acme"].post("/sessions", headers=h,
                            json={**body, "booking_id": b2, "arrived_t_min": 400.1})
    assert r2.status_code == 201, r2.text
    rows = [x for x in svc.storage.trace_rows() if x.get("booking_id") in (b1, b2)
            and x["kind"] in ("arrive", "session_start")]
    got = {(x["booking_id"], x["kind"]): (x["t_min"], x.get("wait_min")) for x in rows}
    assert got[(b1, "arrive")][0] == 290.0
    assert got[(b1, "session_start")] == (300.5, 10.5)
    assert got[(b2, "arrive")][0] == 400.2  # on time: the request's latency is no wait
    assert got[(b2, "session_start")] == (400.2, 0.0)


def test_walk_in_session_and_no_free_connector(net: Net) -> None:
    _, h = net.register()
    body = {"station_id": "acme_charlie", "soc": 0.2, "battery_kwh": 40, "target_soc": 0.8}
    ids = []
    for _ in range(2):
        r = net.c["acme"].post("/sessions", headers=h, json=body)
        assert r.status_code == 201, r.text
        ids.append(r.json()["connector_id"])
    assert ids == ["acme_charlie/1", "acme_charlie/2"]
    r = net.c["acme"].post("/sessions", headers=h, json=body)
    assert r.status_code == 409 and r.json()["reason"] == "no_connector"


def _charlie_busy_and_booked(net: Net, window: dict) -> tuple[tuple, dict, Any, dict]:
    """Three vehicles at acme_charlie (2 connectors): A charging on /1 from t=100, B's
    reservation ``window`` on /2; returns (their headers A, B, C), a session body, A's
    answer and B's trip."""
    ha, hb, hc = (net.register()[1] for _ in range(3))
    body = {"station_id": "acme_charlie", "soc": 0.2, "battery_kwh": 40, "target_soc": 0.8}
    busy = net.c["acme"].post("/sessions", headers=ha, json=body)  # t=100, keeps /1
    assert busy.status_code == 201 and busy.json()["connector_id"] == "acme_charlie/1"
    trip = book_trip(net, hb, {"stops": [{
        "station_id": "acme_charlie", **window, "connector_ids": ["acme_charlie/2"]}]})
    assert trip["bookings"][0]["connector_id"] == "acme_charlie/2"
    return (ha, hb, hc), body, busy, trip


def test_a_walk_in_waits_out_a_reservations_grace_as_in_the_simulation(net: Net) -> None:
    """A queued walk-in is kept off a connector while a reservation there blocks it, grace
    included (``Participant.blocked_until``, the simulation's rule), and the server looks
    again the moment it stops blocking (no event announces that). A walk-in's patience and
    wait count from ``arrived_t_min``, as for a vehicle whose booking could not be used."""
    svc = net.svc("acme")
    (_ha, _hb, hc), body, _busy, _trip = _charlie_busy_and_booked(
        net, {"start_min": 130, "end_min": 132, "grace_min": 15})
    net.clock.t = 120.0
    r = net.c["acme"].post("/sessions", headers=hc, json={
        **body, "queue": True, "max_wait_min": 40.0, "arrived_t_min": 118.0})
    assert r.status_code == 202 and r.json()["arrive_t_min"] == 118.0
    sid = r.json()["session_id"]
    # its ~15-minute charge would run into the reservation's [130, 145): not before 145
    assert svc.sessions._retry_at["acme_charlie"] == 145.0
    net.clock.t = 133.0  # the window has ended, its grace has not
    svc.sessions._run_queue("acme_charlie")
    assert net.c["acme"].get(f"/sessions/{sid}", headers=hc).json()["status"] == "QUEUED"
    net.clock.t = 145.0
    svc.sessions._run_queue("acme_charlie")
    s = net.c["acme"].get(f"/sessions/{sid}", headers=hc).json()
    assert (s["status"], s["connector_id"]) == ("ACTIVE", "acme_charlie/2")
    rows = {x["kind"]: x for x in svc.storage.trace_rows() if x.get("session_id") == sid}
    assert rows["arrive"]["t_min"] == 118.0
    assert rows["session_start"]["wait_min"] == pytest.approx(27.0)


def test_trace_queue_len_is_the_walk_in_line_as_simulated(net: Net) -> None:
    """Booked arrivals, starts and session ends carry ``queue_len`` too: the vehicles in the
    station's walk-in line (which a booked vehicle is not in), as the simulated stations
    write it; a session's end counts the line before its connector goes to the next."""
    svc = net.svc("acme")
    (ha, hb, hc), body, busy, trip = _charlie_busy_and_booked(
        net, {"start_min": 130, "end_min": 150})
    bid = trip["bookings"][0]["booking_id"]
    net.clock.t = 120.0
    q = net.c["acme"].post("/sessions", headers=hc, json={**body, "queue": True})
    assert q.status_code == 202  # /2 is held for the reservation: in line
    net.clock.t = 130.0
    b = net.c["acme"].post("/sessions", headers=hb, json={**body, "booking_id": bid,
                                                          "arrived_t_min": 129.0})
    assert b.status_code == 201, b.text
    net.clock.t = 131.0
    a_sid = busy.json()["session_id"]
    assert net.c["acme"].post(f"/sessions/{a_sid}/stop", headers=ha).status_code == 200
    c = net.c["acme"].get(f"/sessions/{q.json()['session_id']}", headers=hc).json()
    assert (c["status"], c["connector_id"]) == ("ACTIVE", "acme_charlie/1")
    rows = svc.storage.trace_rows()
    booked = {x["kind"]: x["queue_len"] for x in rows if x.get("booking_id") == bid
              and x["kind"] in ("arrive", "session_start")}
    assert booked == {"arrive": 1, "session_start": 1}  # C in line; B itself is not
    end = next(x for x in rows if x["kind"] == "session_end" and x["session_id"] == a_sid)
    assert end["queue_len"] == 1  # C, still in line as A's session ends
    start_c = next(x for x in rows if x["kind"] == "session_start"
                   and x["session_id"] == q.json()["session_id"])
    assert start_c["queue_len"] == 0


def test_a_walk_in_whose_patience_is_spent_leaves_at_once(net: Net) -> None:
    """A vehicle that queues after its booking proved unusable, its patience already spent
    since it arrived, gets a free connector if there is one, else leaves now (waited from
    its arrival until now), as the simulation's station does."""
    svc = net.svc("acme")
    heads = [net.register() for _ in range(3)]
    body = {"station_id": "acme_charlie", "soc": 0.2, "battery_kwh": 40, "target_soc": 0.8}
    for _, h in heads[:2]:  # both connectors busy
        assert net.c["acme"].post("/sessions", headers=h, json=body).status_code == 201
    net.clock.t = 120.0
    r = net.c["acme"].post("/sessions", headers=heads[2][1], json={
        **body, "queue": True, "max_wait_min": 10.0, "arrived_t_min": 100.0})
    assert r.status_code == 202, r.text
    sid = r.json()["session_id"]
    svc.sessions._run_queue("acme_charlie")  # (what the queue thread does at once)
    s = net.c["acme"].get(f"/sessions/{sid}", headers=heads[2][1]).json()
    assert (s["status"], s["wait_min"]) == ("ABANDONED", 20.0)
    rows = [x for x in svc.storage.trace_rows() if x.get("session_id") == sid]
    assert [(x["kind"], x["t_min"]) for x in rows] == [("arrive", 100.0), ("abandon", 120.0)]


def test_a_session_without_a_target_charges_to_the_scenarios(tmp_path: Path) -> None:
    """Unset, ``target_soc`` is the scenario's ``charging.target_soc`` (what the simulated
    vehicles charge to), not a constant of the API; a vehicle already there gets a 422."""
    path = tmp_path / "tiny90.toml"
    path.write_text(TINY.read_text().replace("target_soc = 0.8", "target_soc = 0.9"))
    settings = Settings(company="acme", scenario=path, db_url=f"sqlite:///{tmp_path / 'a.db'}")
    app = create_app(settings, InMemoryBus(), Clock())
    try:
        c = TestClient(app)
        reg = c.post("/vehicles", json={}).json()
        h = {"Authorization": f"Bearer {reg['token']}"}
        body = {"station_id": "acme_alpha", "battery_kwh": 40}
        r = c.post("/sessions", headers=h, json={**body, "soc": 0.3})
        assert r.status_code == 201, r.text
        assert r.json()["target_soc"] == 0.9
        r = c.post("/sessions", headers=h, json={**body, "soc": 0.95})
        assert r.status_code == 422 and "target_soc" in r.json()["detail"]
        r = c.post("/recommendations", headers=h, json={
            "city": "alpha", "soc": 0.5, "battery_kwh": 60, "consumption_kwh_per_km": 0.18})
        assert r.status_code == 200 and r.json()["choices"]
    finally:
        app.state.service.close()


def test_no_show_expires_and_notifies(net: Net) -> None:
    vid, h = net.register()
    trip = book_trip(net, h, {"stops": [{"station_id": "acme_alpha", "start_min": 110,
                                         "end_min": 140}]})
    net.clock.t = 125.0
    net.svc("acme").host.tick()
    bid = trip["bookings"][0]["booking_id"]
    assert net.c["acme"].get(f"/bookings/{bid}", headers=h).json()["state"] == "NO_SHOW"
    assert net.notes(vid)[-1]["event"] == "booking_expired"


# ------------------------------------------------------------------ access control & 4xx


def test_other_vehicle_cannot_read_or_cancel(net: Net) -> None:
    vid, h = net.register()
    _, h2 = net.register()
    trip = book_trip(net, h)
    net.clock.t = 110.0
    s = net.c["acme"].post("/sessions", headers=h, json={
        "booking_id": trip["bookings"][0]["booking_id"], "station_id": "acme_alpha",
        "soc": 0.2, "battery_kwh": 60}).json()
    c = net.c["acme"]
    assert c.get(f"/bookings/{trip['trip_id']}", headers=h2).status_code == 404
    assert c.get(f"/bookings/{trip['bookings'][0]['booking_id']}", headers=h2).status_code == 404
    assert c.delete(f"/bookings/{trip['trip_id']}", headers=h2).status_code == 404
    assert c.get(f"/vehicles/{vid}/sessions", headers=h2).status_code == 403
    assert c.get(f"/sessions/{s['session_id']}", headers=h2).status_code == 404
    assert c.post(f"/sessions/{s['session_id']}/stop", headers=h2).status_code == 404
    r = c.post("/sessions", headers=h2, json={
        "booking_id": trip["bookings"][1]["booking_id"], "station_id": "acme_alpha",
        "soc": 0.2, "battery_kwh": 60})
    assert r.status_code == 404
    assert c.get(f"/bookings/{trip['trip_id']}", headers=h).json()["outcome"] == "BOOKED"


@pytest.mark.parametrize(
    ("method", "path", "body", "code"),
    [
        ("post", "/bookings", "{not json", 422),
        ("post", "/bookings", {"stops": []}, 422),
        ("post", "/bookings", {"stops": [{"station_id": "nope", "start_min": 110,
                                          "end_min": 120}]}, 422),
        ("post", "/bookings", {"stops": [{"station_id": "acme_alpha", "start_min": 130,
                                          "end_min": 120}]}, 422),
        ("post", "/bookings", {"stops": [{"station_id": "acme_alpha", "start_min": -5,
                                          "end_min": 120}]}, 422),
        ("post", "/bookings", {"stops": [{"station_id": "acme_alpha", "start_min": 10,
                                          "end_min": 20}]}, 422),
        ("post", "/bookings", {"stops": [{"station_id": "acme_alpha", "start_min": 110,
                                          "end_min": 120, "connector_id": "zap_bravo/1"}]}, 422),
        ("post", "/bookings", {"stops": [{"station_id": "acme_alpha", "start_min": 110,
                                          "end_min": 120, "extra": 1}]}, 422),
        ("get", "/bookings/acme-x.123", None, 404),
        ("delete", "/bookings/acme-x.123/0", None, 404),
        ("get", "/sessions/nope", None, 404),
        ("post", "/sessions/nope/stop", None, 404),
        ("post", "/sessions", {"station_id": "acme_alpha", "soc": 1.5, "battery_kwh": 60}, 422),
        ("post", "/sessions", {"station_id": "acme_alpha", "soc": 0.2, "battery_kwh": -1}, 422),
        ("post", "/sessions", {"station_id": "acme_alpha", "soc": 0.9, "battery_kwh": 60,
                               "target_soc": 0.5}, 422),
        ("post", "/sessions", {"station_id": "zap_bravo", "soc": 0.2, "battery_kwh": 60}, 422),
        ("post", "/sessions", {"station_id": "nope", "soc": 0.2, "battery_kwh": 60}, 404),
        ("post", "/sessions", {"station_id": "acme_alpha", "soc": 0.2, "battery_kwh": 60,
                               "booking_id": "acme-x.1/0"}, 404),
        ("post", "/sessions", {"station_id": "acme_alpha", "soc": 0.2, "battery_kwh": 60,
                               "connector_id": "acme_charlie/1"}, 422),
        ("post", "/recommendations", {"soc": 0.5, "battery_kwh": 60,
                                      "consumption_kwh_per_km": 0.2}, 422),
        ("post", "/recommendations", {"city": "atlantis", "soc": 0.5, "battery_kwh": 60,
                                      "consumption_kwh_per_km": 0.2}, 422),
        ("post", "/recommendations", {"lat": 91, "lon": 0, "soc": 0.5, "battery_kwh": 60,
                                      "consumption_kwh_per_km": 0.2}, 422),
    ],
)
def test_bad_requests_are_4xx_with_reason(net: Net, method: str, path: str, body: object,
                                          code: int) -> None:
    _, h = net.register()
    kw: dict = {"headers": h}
    if isinstance(body, str):
        kw["content"] = body
        kw["headers"] = h | {"Content-Type": "application/json"}
    elif body is not None:
        kw["json"] = body
    r = getattr(net.c["acme"], method)(path, **kw)
    assert r.status_code == code, r.text
    assert r.json()["detail"]


def test_sessions_stop_body_validated(net: Net) -> None:
    _, h = net.register()
    s = net.c["acme"].post("/sessions", headers=h, json={
        "station_id": "acme_alpha", "soc": 0.2, "battery_kwh": 60}).json()
    r = net.c["acme"].post(f"/sessions/{s['session_id']}/stop", headers=h,
                           json={"energy_kwh": -3})
    assert r.status_code == 422
    r = net.c["acme"].post(f"/sessions/{s['session_id']}/stop", headers=h,
                           json={"energy_kwh": 3.5})
    assert r.status_code == 200 and r.json()["energy_kwh"] == 3.5


@pytest.mark.parametrize("auth", [None, "Bearer nope", "Basic abc", "Bearer "])
def test_missing_or_bad_token_is_401(net: Net, auth: str | None) -> None:
    headers = {} if auth is None else {"Authorization": auth}
    for method, path, body in [("post", "/bookings", TRIP), ("get", "/bookings/x", None),
                               ("post", "/sessions", {}), ("get", "/vehicles/x/sessions", None),
                               ("post", "/recommendations", {})]:
        kw = {"headers": headers} | ({"json": body} if body is not None else {})
        r = getattr(net.c["acme"], method)(path, **kw)
        assert r.status_code == 401, (path, r.text)


def test_vehicle_registration_conflicts(net: Net) -> None:
    vid, _ = net.register()
    assert net.c["acme"].post("/vehicles", json={"vehicle_id": vid}).status_code == 409
    r = net.c["acme"].post("/vehicles", json={"home_company": "zap"})
    assert r.status_code == 422 and r.json()["reason"] == "bad_home"


# ------------------------------------------------------------------ idempotency


def test_idempotency_key_replays_and_detects_reuse(net: Net) -> None:
    _, h = net.register()
    hk = h | {"Idempotency-Key": "k1"}
    r1 = net.c["acme"].post("/bookings", json=TRIP, headers=hk)
    r2 = net.c["acme"].post("/bookings", json=TRIP, headers=hk)
    assert r1.status_code == r2.status_code == 201
    assert r1.json() == r2.json() and r2.headers["Idempotent-Replayed"] == "true"
    assert len(net.svc("acme").host.coordinator.trip_ids()) == 1
    other = {"stops": TRIP["stops"][:1]}
    r3 = net.c["acme"].post("/bookings", json=other, headers=hk)
    assert r3.status_code == 422 and r3.json()["reason"] == "idempotency_key_reused"
    # keys are per vehicle: another vehicle's k1 is a fresh request
    _, h2 = net.register()
    r4 = net.c["acme"].post("/bookings", json=other, headers=h2 | {"Idempotency-Key": "k1"})
    assert r4.status_code == 201 and r4.json()["trip_id"] != r1.json()["trip_id"]
    a = net.c["acme"].post("/vehicles", json={}, headers={"Idempotency-Key": "reg"}).json()
    b = net.c["acme"].post("/vehicles", json={}, headers={"Idempotency-Key": "reg"}).json()
    assert a == b


# ------------------------------------------------------------------ bus input robustness


def test_garbage_protocol_payloads_are_ignored(net: Net) -> None:
    _, h = net.register()
    book_trip(net, h)
    acme = net.svc("acme").host
    before = (acme.participant.durable_state(), acme.coordinator.durable_state())
    vote = Vote("zap:VOTE:x/0:yes", "zap", "x", "x/0", True, "", "zap_bravo/1", 1.0)
    for payload in [b"garbage", b"\xff\xfe", b"[1,2]", b'{"type":"VOTE"}',
                    b'{"type":"NOPE","msg_id":"a","src":"b"}', b"{" * 100_000,
                    encode(vote).encode()]:
        net.bus.publish(topics.protocol_topic("acme.coord", "zap"), payload)
        net.bus.publish(topics.protocol_topic("acme", "zap"), payload)
    net.bus.publish(topics.status_topic("zap", "zap_bravo"), b"not json")
    net.bus.publish(topics.status_topic("acme", "zap_bravo"), b'{"online": false}')
    net.bus.publish(topics.events_topic("acme", "acme_alpha"), b'{"event":"session_finished"}')
    after = (acme.participant.durable_state(), acme.coordinator.durable_state())
    assert before == after
    assert acme.dropped == 12
    assert net.c["acme"].get("/health").json()["dropped_messages"] == 12
    assert net.svc("acme").status.is_online("zap_bravo")


def test_offline_station_is_not_recommended_nor_booked(net: Net) -> None:
    _, h = net.register()
    req = {"city": "bravo", "destination": "bravo", "soc": 0.5, "battery_kwh": 60,
           "consumption_kwh_per_km": 0.18, "limit": 4}
    first = net.c["acme"].post("/recommendations", json=req, headers=h).json()["choices"]
    assert first[0]["station_id"] == "zap_bravo"
    net.bus.publish(topics.status_topic("zap", "zap_bravo"),
                    encode_json({"station_id": "zap_bravo", "company_id": "zap",
                                 "online": False}), retain=True)
    got = net.c["acme"].post("/recommendations", json=req, headers=h).json()["choices"]
    assert "zap_bravo" not in [c["station_id"] for c in got]
    net_st = {s["station_id"]: s for s in net.c["acme"].get("/network/stations").json()}
    assert net_st["zap_bravo"]["online"] is False and net_st["zap_bravo"]["reported"]
    r = net.c["acme"].post("/bookings", json=TRIP, headers=h)
    assert r.status_code == 409 and r.json()["reason"] == "station_offline"
    # a server started later sees the retained offline status too
    late = net.make("acme", net.bus)
    assert not late.state.service.status.is_online("zap_bravo")
    net.bus.publish(topics.status_topic("zap", "zap_bravo"), encode_json({
        "station_id": "zap_bravo", "company_id": "zap", "online": True, "t_min": 101.0,
        "busy": 1, "queued": 0, "connectors": [
            {"connector_id": "zap_bravo/1", "power_kw": 150, "type": "DC",
             "status": "CHARGING"}]}), retain=True)
    st = {s["station_id"]: s for s in net.c["acme"].get("/network/stations").json()}
    assert st["zap_bravo"]["online"] and st["zap_bravo"]["busy"] == 1
    assert st["zap_bravo"]["connectors"][0]["status"] == "CHARGING"


def test_trip_waits_for_remote_votes_then_polls(tmp_path: Path) -> None:
    """zap is not on acme's bus yet: 202 with the trip id, BOOKED once it joins."""
    net = Net(tmp_path, wait_s=0.0)
    lonely = InMemoryBus()
    acme = net.make("acme", lonely)
    ca = TestClient(acme)
    r = ca.post("/vehicles", json={})
    h = {"Authorization": f"Bearer {r.json()['token']}"}
    r = ca.post("/bookings", json=TRIP, headers=h)
    assert r.status_code == 202 and r.json()["outcome"] == "PENDING"
    trip_id = r.json()["trip_id"]
    net.make("zap", lonely)  # zap joins; the coordinator's retry re-sends PREPARE
    net.clock.t = 101.0
    acme.state.service.host.tick()
    assert ca.get(f"/bookings/{trip_id}", headers=h).json()["outcome"] == "BOOKED"


def test_server_protocol_nodes_use_the_scenario_booking_config(tmp_path: Path) -> None:
    """A live company server runs the protocol with the scenario's timers and walk-in share,
    as the simulated company servers do (evsim.scenario.BookingConfig)."""
    text = TINY.read_text() + (
        "\n[booking]\nlease_min = 7.0\nvote_timeout_min = 2.0\ncommit_margin_min = 1.5\n"
        "ack_timeout_min = 4.0\nretry_min = 0.25\nwalkin_share = 0.5\n"
    )
    scen = tmp_path / "timers.toml"
    scen.write_text(text)
    settings = Settings(company="acme", scenario=scen,
                        db_url=f"sqlite:///{tmp_path / 'acme.db'}")
    host = create_app(settings, InMemoryBus(), Clock()).state.service.host
    coord = host.coordinator
    assert (coord.lease_min, coord.vote_timeout_min, coord.commit_margin_min,
            coord.ack_timeout_min, coord.retry_min) == (7.0, 2.0, 1.5, 4.0, 0.25)
    assert host.participant.walkin_share == 0.5
    # kept per connector class of a station, as in the simulation: acme_alpha has two
    # 50 kW DC and one 22 kW AC connectors, so one DC stays free and the AC is bookable
    p = host.participant
    dc = [c for c in p.stations["acme_alpha"] if p._pool_of[c][1] == "50DC"]
    assert len(dc) == 2 and p._reservable[("acme_alpha", "50DC")] == 1
    assert p._reservable[("acme_alpha", "22AC")] == 1


def test_native_telemetry_is_off_unless_asked(tmp_path: Path) -> None:
    """FastAPI >= 0.165 looks the global OpenTelemetry providers up on every request unless
    its telemetry is off (about a tenth of a server's CPU per booking); EVSIM_OTEL=1 keeps
    it on."""
    for otel in (False, True):
        s = Settings(company="acme", scenario=TINY, otel=otel,
                     db_url=f"sqlite:///{tmp_path / f'acme-{otel}.db'}")
        app = create_app(s, InMemoryBus(), Clock())
        cfg = getattr(app, "_telemetry", None)
        if cfg is None:
            pytest.skip("this FastAPI has no native telemetry")
        assert (cfg["tracing"], cfg["metrics"], cfg["logs"]) == (otel, otel, otel)
    assert Settings.from_env({"EVSIM_OTEL": "1"}).otel is True
    assert Settings.from_env({}).otel is False
