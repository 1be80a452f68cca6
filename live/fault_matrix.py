"""The all-or-nothing invariant checker and the fault-case matrix of the live network.

The faults themselves are injected inside the company servers by :mod:`live.faults`
(:class:`live.faults.FaultInjector`, armed through ``EVSIM_FAULT`` / ``EVSIM_FAULT_FILE``);
this module drives the cases from outside and checks what the servers left behind.

Checking (after recovery)
-------------------------
:func:`read_db` reads one company database (protocol log, trips, completed sessions) and
:func:`check` replays every log with ``Participant.from_log`` / ``Coordinator.from_log`` and
reports every broken invariant: a trip that is neither fully booked nor fully released, a trip
without a definitive outcome, a hold of a trip its coordinator never logged (presumed abort
broken), a hold that outlived its lease or was committed after it.  :func:`lost` compares a
snapshot taken at the fault with the state after recovery: every log must still start with the
records it had, every completed session and trip row must still be there.

The harness that drives the cases (:class:`Harness`, :data:`CASES`) is used by
``tests/test_reliability.py`` and ``bench/reliability.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evsim.protocol import (
    BookingState,
    Coordinator,
    Participant,
    Record,
    TripState,
    decode_record,
)
from evsim.protocol.log import BookingChanged, BookingCreated, TripStarted

__all__ = [
    "CASES",
    "Case",
    "CaseRun",
    "Check",
    "DbSnapshot",
    "Harness",
    "check",
    "lost",
    "read_db",
    "run_matrix",
    "table",
]


# =========================================================================== checking

HELD = frozenset({BookingState.PENDING, BookingState.RESERVED, BookingState.FULFILLED})
BOOKED_OK = frozenset({BookingState.RESERVED, BookingState.FULFILLED, BookingState.NO_SHOW})
RELEASED_TRIPS = frozenset({TripState.ABORTED, TripState.FAILED, TripState.CANCELED})


@dataclass
class DbSnapshot:
    """What one company database holds (read with sqlite3, the server may be running)."""

    company: str
    participant_log: list[str]
    coordinator_log: list[str]
    trips: dict[str, str]  # trip_id -> vehicle_id (the trips this company coordinates)
    sessions: dict[str, tuple[Any, ...]]  # COMPLETED sessions -> what a CDR must keep

    def records(self, node: str) -> list[Record]:
        text = self.participant_log if node == "participant" else self.coordinator_log
        return [decode_record(r) for r in text]


def read_db(path: str | Path, company: str) -> DbSnapshot:
    """Read a company database (protocol log of both nodes, trips, completed sessions)."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=10.0)
    try:
        conn.execute("PRAGMA busy_timeout=10000")
        rows = conn.execute("SELECT node_id, record FROM protocol_log ORDER BY seq").fetchall()
        plog = [r for n, r in rows if n == company]
        clog = [r for n, r in rows if n == f"{company}.coord"]
        trips = dict(conn.execute("SELECT trip_id, vehicle_id FROM trips").fetchall())
        sessions = {
            r[0]: tuple(r[1:])
            for r in conn.execute(
                "SELECT session_id, vehicle_id, booking_id, connector_id, start_t_min, end_t_min,"
                " energy_kwh, price_total FROM sessions WHERE status = 'COMPLETED'"
            ).fetchall()
        }
    finally:
        conn.close()
    return DbSnapshot(company, plog, clog, trips, sessions)


@dataclass
class TripCheck:
    trip_id: str
    coordinator: str
    vehicle_id: str
    state: str  # the coordinator's TripState
    outcome: str  # "booked" | "released" | "open"
    stops: list[tuple[str, str, str]]  # (participant, booking_id, booking state or "-")


@dataclass
class Check:
    """Result of :func:`check`: every trip's outcome and every broken invariant."""

    now_min: float
    trips: dict[str, TripCheck]
    problems: list[str]
    max_hold_overstay_min: float  # the latest a hold was released after its lease (info)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(
    snaps: Mapping[str, DbSnapshot],
    stations: Mapping[str, Mapping[str, Sequence[str]]],
    now_min: float,
    *,
    slack_min: float = 1.0,
    quiescent: bool = True,
    lease_companies: Iterable[str] | None = None,
) -> Check:
    """Check the all-or-nothing invariants over every company's state.

    * every trip any coordinator logged is BOOKED with every stop RESERVED (or FULFILLED /
      NO_SHOW: it was reserved), or closed (ABORTED / FAILED / CANCELED) with no stop held;
      with ``quiescent`` a trip still in PREPARING / COMMITTING / ABORTING / COMPENSATING /
      CANCELING is a problem too (no definitive, finished outcome);
    * no participant holds (PENDING / RESERVED / FULFILLED) a stop of a trip its coordinator
      never logged (presumed abort);
    * at the participants in ``lease_companies`` (default all), no hold is still PENDING more
      than ``slack_min`` after its lease ended (``now_min`` is their clock), and no hold was
      ever committed after its lease ended.
    """
    parts: dict[str, Participant] = {}
    coords: dict[str, Coordinator] = {}
    problems: list[str] = []
    for c, s in snaps.items():
        parts[c] = Participant.from_log(c, stations[c], s.records("participant"))
        coords[c] = Coordinator.from_log(f"{c}.coord", s.records("coordinator"))
    trips: dict[str, TripCheck] = {}
    for c, s in snaps.items():
        for rec in s.records("coordinator"):
            if not isinstance(rec, TripStarted):
                continue
            state = coords[c].trip_state(rec.trip_id)
            assert state is not None
            stops = []
            for i, stop in enumerate(rec.stops):
                bid = coords[c].booking_ids(rec.trip_id)[i]
                p = parts.get(stop.participant)
                v = p.booking(bid) if p is not None else None
                stops.append((stop.participant, bid, v.state.value if v is not None else "-"))
            held = [b for _, b, st in stops if st != "-" and BookingState(st) in HELD]
            if state is TripState.BOOKED:
                outcome = "booked"
                bad = [f"{b}={st}" for _, b, st in stops
                       if st == "-" or BookingState(st) not in BOOKED_OK]
                if bad:
                    problems.append(f"trip {rec.trip_id} BOOKED but stops {', '.join(bad)}")
            elif state in RELEASED_TRIPS:
                outcome = "released"
                if held:
                    problems.append(f"trip {rec.trip_id} {state.value} but still holds "
                                    f"{', '.join(held)}")
            else:
                outcome = "open"
                if quiescent:
                    problems.append(f"trip {rec.trip_id} has no final outcome ({state.value})")
            trips[rec.trip_id] = TripCheck(rec.trip_id, c, rec.vehicle_id, state.value,
                                           outcome, stops)
    lease_at = set(snaps) if lease_companies is None else set(lease_companies)
    overstay = 0.0
    for c, s in snaps.items():
        created: dict[str, BookingCreated] = {}
        first_change: dict[str, BookingChanged] = {}
        for rec in s.records("participant"):
            if isinstance(rec, BookingCreated):
                created[rec.booking_id] = rec
            elif isinstance(rec, BookingChanged) and rec.booking_id not in first_change:
                first_change[rec.booking_id] = rec
        for bid, cr in created.items():
            v = parts[c].booking(bid)
            assert v is not None
            if cr.coordinator and v.state in HELD:
                owner = cr.coordinator.removesuffix(".coord")
                if owner in coords and coords[owner].trip_state(cr.trip_id) is None:
                    problems.append(f"{c} holds {bid} ({v.state.value}) of trip {cr.trip_id} "
                                    f"that {owner} never logged")
            if cr.lease_until_min is None:
                continue
            ch = first_change.get(bid)
            if ch is not None:
                if ch.event == "CONFIRM" and ch.t_min > cr.lease_until_min:
                    problems.append(f"{c} committed {bid} at {ch.t_min:.2f} after its lease "
                                    f"ended at {cr.lease_until_min:.2f}")
                if ch.event == "LEASE_EXPIRE":
                    overstay = max(overstay, ch.t_min - cr.lease_until_min)
            elif (c in lease_at and v.state is BookingState.PENDING
                  and now_min > cr.lease_until_min + slack_min):
                problems.append(f"{c} still holds {bid} {now_min - cr.lease_until_min:.2f} min "
                                "after its lease ended")
    return Check(now_min, trips, problems, overstay)


def lost(before: Mapping[str, DbSnapshot], after: Mapping[str, DbSnapshot]) -> list[str]:
    """Durable facts of ``before`` missing from ``after``: log records (every log must still
    start with what it had), trips rows and completed sessions (unchanged)."""
    out: list[str] = []
    for c, b in before.items():
        a = after[c]
        for name, old, new in (("participant log", b.participant_log, a.participant_log),
                               ("coordinator log", b.coordinator_log, a.coordinator_log)):
            gone = sum(1 for i, r in enumerate(old) if i >= len(new) or new[i] != r)
            if gone:
                out.append(f"{c}: {gone} of {len(old)} {name} records lost or changed")
        for tid in b.trips.keys() - a.trips.keys():
            out.append(f"{c}: trip row {tid} lost")
        for sid, row in b.sessions.items():
            if a.sessions.get(sid) != row:
                out.append(f"{c}: completed session {sid} lost or changed")
    return out


# =========================================================================== the harness

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "tiny.toml"


@dataclass(frozen=True)
class Case:
    """One fault case. ``kind``: ``inject`` (arm ``spec`` at ``target``: ``coord`` is the
    coordinating company, ``part`` the other participant), ``sigkill`` (SIGKILL a random
    server at a random moment, restart it), ``broker`` (SIGKILL the broker, request the trips,
    bring it back on the same port after ``down_leases`` leases)."""

    name: str
    kind: str
    target: str = ""
    spec: str = ""
    down_leases: float = 0.0  # broker / pause / cut: how long the fault lasts, in leases
    what: str = ""


CASES: tuple[Case, ...] = (
    Case("coord-before-prepare", "inject", "coord", "crash_after:TRIP_STARTED:1",
         what="coordinator killed after logging the trip, before any PREPARE went out"),
    Case("coord-after-prepare", "inject", "coord", "crash_after:PREPARE:1",
         what="coordinator killed right after a PREPARE reached the broker"),
    Case("coord-after-decision", "inject", "coord", "crash_after:TRIP_CHANGED.ALL_YES:1",
         what="coordinator killed after logging COMMIT, before sending it"),
    Case("coord-after-commit", "inject", "coord", "crash_after:COMMIT:1",
         what="coordinator killed after a COMMIT reached the broker, before the ACKs"),
    Case("coord-after-outcome", "inject", "coord", "crash_after:TRIP_CHANGED.ALL_ACKED:1",
         what="coordinator killed after logging BOOKED, before telling the vehicle"),
    Case("part-after-hold", "inject", "part", "crash_after:BOOKING_CREATED:1",
         what="participant killed after logging its hold, before its vote went out"),
    Case("part-after-vote", "inject", "part", "crash_after:VOTE:1",
         what="participant killed right after its YES vote reached the broker"),
    Case("part-before-ack", "inject", "part", "crash_after:BOOKING_CHANGED.CONFIRM:1",
         what="participant killed after logging the commit, before its COMMIT_ACK"),
    Case("part-after-ack", "inject", "part", "crash_after:COMMIT_ACK:1",
         what="participant killed right after its COMMIT_ACK reached the broker"),
    Case("sigkill-random", "sigkill",
         what="SIGKILL of a random server at a random moment of the booking, restart"),
    Case("broker-drop", "broker", down_leases=0.2,
         what="broker SIGKILLed, trips requested, broker back on its port after 1/5 lease"),
    Case("broker-drop-long", "broker", down_leases=1.5,
         what="broker SIGKILLed, trips requested, broker back on its port after 1.5 leases"),
    Case("cut-coord-after-prepare", "inject", "coord", "cut_after:PREPARE:1", 1.5,
         what="coordinator cut off the bus after sending PREPARE, for 1.5 leases"),
    Case("cut-part-after-vote", "inject", "part", "cut_after:VOTE:1", 1.5,
         what="participant cut off the bus after its YES vote, for 1.5 leases"),
    Case("pause-part-after-vote", "inject", "part", "pause_after:VOTE:1", 1.5,
         what="participant frozen (SIGSTOP) after its YES vote, for 1.5 leases"),
    Case("pause-coord-after-decision", "inject", "coord", "pause_after:TRIP_CHANGED.ALL_YES:1",
         1.5, what="coordinator frozen (SIGSTOP) after logging COMMIT, for 1.5 leases"),
)
FAST_CASES = ("coord-after-decision", "part-after-vote")


@dataclass
class Ticket:
    """One trip request from a vehicle."""

    vehicle_id: str
    token: str
    stops: list[dict[str, Any]]
    thread: threading.Thread | None = None
    code: int | None = None
    body: dict[str, Any] | None = None
    error: str = ""
    trip_id: str = ""
    key: str = field(default_factory=lambda: os.urandom(8).hex())  # Idempotency-Key
    retried: bool = False  # the POST was cut and sent again with the same key

    @property
    def answered(self) -> str:
        """The outcome the POST answered with ('' if it was cut or still pending)."""
        return str(self.body.get("outcome", "")) if self.body and self.code else ""


@dataclass
class CaseRun:
    case: str
    run: int
    fired: bool
    outcomes: dict[str, str] = field(default_factory=dict)  # trip -> booked/released/open
    trip_states: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    recovery_s: float = float("nan")
    unaware: int = 0  # trips whose vehicle never learned the trip id (POST cut, no notify,
    # and the retried POST did not find it either)
    recovered: int = 0  # logged trips whose POST was cut, found by the retried POST
    not_logged: int = 0  # requests cut by a crash before the coordinator logged a trip
    max_hold_overstay_min: float = 0.0

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)

    @property
    def failed(self) -> int:
        """Trips not all-or-nothing or without a final outcome (should always be 0)."""
        return len(self.outcomes) - self.count("booked") - self.count("released")


class Harness:
    """A live network (broker, two company servers, station agents) with fault files armed,
    a client that books trips, and the checks.  Use as a context manager."""

    def __init__(self, out: str | Path, scenario: str | Path = TINY, *,
                 time_scale: float = 120.0, coordinator: str = "acme",
                 participant: str = "zap", trips_per_run: int = 3, seed: int = 1,
                 sessions: bool = True) -> None:
        from live.launcher import LiveNetwork

        self.net = LiveNetwork(Path(scenario), Path(out), time_scale=time_scale, faults=True)
        self.coord, self.part = coordinator, participant
        self.trips_per_run = trips_per_run
        self.rng = random.Random(seed)
        self.with_sessions = sessions
        self.lease_min = 10.0  # Coordinator default, which the servers use
        self.acked: dict[str, str] = {}  # trip -> BOOKED, as a vehicle was told
        self.notified: dict[str, str] = {}  # trip -> outcome, from vehicle notifications
        self._slot = 0
        self._observer: Any = None
        from live.server.world import LiveWorld

        world = LiveWorld.build(self.net.scenario)
        self.stations = {c.id: world.protocol_stations(c.id) for c in self.net.scenario.companies}
        own = {c: [s for s in world.stations if world.company_of(s) == c]
               for c in self.stations}
        self.stop_stations = (own[participant][0], own[coordinator][-1])

    # -- lifecycle -------------------------------------------------------------------------

    def wall(self, minutes: float) -> float:
        """Wall seconds of ``minutes`` scenario minutes."""
        return minutes * 60.0 / self.net.time_scale

    def __enter__(self) -> Harness:
        import httpx

        from live.mqtt import MqttBus

        self.net.start()
        self._wait(lambda: all(s["reported"] for s in httpx.get(
            f"{self.net.servers[self.coord]}/network/stations", timeout=5).json()),
            30, "every station reported its status")
        creds = getattr(self.net, "creds", None)  # the broker may require credentials
        env = creds.vehicles_env() if creds is not None else {}
        self._observer = MqttBus(self.net.mqtt_url, client_id="evsim-reliability-observer",
                                 username=env.get("EVSIM_MQTT_USER"),
                                 password=env.get("EVSIM_MQTT_PASSWORD"))
        self._observer.subscribe("evsim/vehicles/+/notify", self._on_notify)
        if self.with_sessions:
            self.finish_sessions()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._observer is not None:
            with contextlib.suppress(Exception):
                self._observer.close()
        self.net.stop()

    def _on_notify(self, _topic: str, payload: bytes) -> None:
        with contextlib.suppress(ValueError, TypeError):
            d = json.loads(payload)
            if d.get("trip_id") and d.get("outcome"):
                self.notified[str(d["trip_id"])] = str(d["outcome"])

    @staticmethod
    def _wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                v = cond()
                if v:
                    return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.05)

    # -- the client ------------------------------------------------------------------------

    def _call(self, company: str, method: str, path: str, token: str = "",
              **kw: Any) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kw.pop("headers", {}))
        return httpx.request(method, self.net.servers[company] + path, headers=headers,
                             timeout=kw.pop("timeout", 30.0), **kw)

    def register(self, company: str) -> tuple[str, str]:
        r = self._call(company, "POST", "/vehicles", json={})
        r.raise_for_status()
        return r.json()["vehicle_id"], r.json()["token"]

    def finish_sessions(self) -> None:
        """One walk-in charging session to COMPLETED at every company (they must survive)."""
        for company, stations in self.stations.items():
            _, token = self.register(company)
            body = {"station_id": next(iter(stations)), "soc": 0.5, "battery_kwh": 30.0,
                    "target_soc": 0.6, "max_dc_kw": 50.0, "max_ac_kw": 6.6}

            def start(c: str = company, t: str = token, b: dict[str, Any] = body) -> Any:
                resp = self._call(c, "POST", "/sessions", t, json=b)
                return resp if resp.status_code == 201 else None

            sid = self._wait(start, 30, f"a session at {company}").json()["session_id"]

            def completed(s: str = sid, c: str = company, t: str = token) -> bool:
                return bool(self._call(c, "GET", f"/sessions/{s}", t).json()["status"]
                            == "COMPLETED")

            self._wait(completed, 60, f"session {sid} completed")

    def tickets(self, n: int) -> list[Ticket]:
        out = []
        for _ in range(n):
            vid, token = self.register(self.coord)
            base = self.net.now() + 3000.0 + 300.0 * self._slot
            self._slot += 1
            a, b = self.stop_stations
            stops = [{"station_id": a, "start_min": base, "end_min": base + 60.0},
                     {"station_id": b, "start_min": base + 120.0, "end_min": base + 180.0}]
            out.append(Ticket(vid, token, stops))
        return out

    def submit(self, tickets: Sequence[Ticket]) -> None:
        def post(t: Ticket) -> None:
            try:
                r = self._call(self.coord, "POST", "/bookings", t.token,
                               json={"stops": t.stops}, timeout=60.0,
                               headers={"Idempotency-Key": t.key})
                t.code, t.body = r.status_code, r.json()
                t.trip_id = str(t.body.get("trip_id", ""))
                if t.body.get("outcome") == "BOOKED":
                    self.acked[t.trip_id] = "BOOKED"
            except Exception as exc:  # the coordinator died under the request
                t.error = f"{type(exc).__name__}: {exc}"

        for t in tickets:
            t.thread = threading.Thread(target=post, args=(t,), daemon=True)
            t.thread.start()

    # -- state -----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, DbSnapshot]:
        return {c: read_db(self.net.db_path(c), c) for c in self.stations}

    def check(self, quiescent: bool = True, lease_companies: Iterable[str] | None = None,
              ) -> tuple[dict[str, DbSnapshot], Check]:
        snaps = self.snapshot()
        return snaps, check(snaps, self.stations, self.net.now(), quiescent=quiescent,
                            lease_companies=lease_companies)

    # -- one case --------------------------------------------------------------------------

    def run_case(self, case: Case, run: int = 0, recovery_timeout_s: float = 60.0) -> CaseRun:
        net = self.net
        target = {"coord": self.coord, "part": self.part}.get(case.target, "")
        tickets = self.tickets(self.trips_per_run)
        cr = CaseRun(case.name, run, fired=True)
        mid_problems: list[str] = []
        if case.kind == "inject":
            net.arm(target, case.spec)
            self.submit(tickets)
            name = f"server-{target}"
            try:
                self._wait(lambda: net.fired(target), 20, f"{case.spec} to fire")
            except TimeoutError:
                cr.fired = False
            action = case.spec.split("_", 1)[0]
            if action == "crash":
                if cr.fired:
                    self._wait(lambda: not net.proc(name).alive, 10, f"{name} to exit")
                net.disarm(target)
                before = self.snapshot()
                t0 = time.monotonic()
                if cr.fired:
                    net.restart(name)
                    net.wait_healthy(30)
            else:  # pause / cut: last longer than the lease, then heal
                if cr.fired and action == "pause":
                    self._wait(lambda: net.stopped(name), 10, f"{name} to stop")
                time.sleep(self.wall(case.down_leases * self.lease_min))
                up = [c for c in self.stations if c != target or action == "cut"]
                before, mid = self.check(quiescent=False, lease_companies=up)
                mid_problems = [f"during the fault: {p}" for p in mid.problems]
                t0 = time.monotonic()
                net.disarm(target)
                if action == "pause":
                    net.resume(name)
        elif case.kind == "sigkill":
            self.submit(tickets)
            time.sleep(self.rng.uniform(0.0, 0.1))  # a booking takes a few ms end to end
            name = f"server-{self.rng.choice([self.coord, self.part])}"
            net.kill(name)
            before = self.snapshot()
            t0 = time.monotonic()
            net.restart(name)
            net.wait_healthy(30)
        elif case.kind == "broker":
            assert net.broker is not None
            net.broker.kill()  # then book: every trip is in flight while the broker is away
            self.submit(tickets)
            time.sleep(self.wall(case.down_leases * self.lease_min))
            before = self.snapshot()
            t0 = time.monotonic()
            net.broker.start()
        else:
            raise ValueError(f"unknown case kind {case.kind!r}")

        # recovery: every trip of this run final and every invariant holding
        for t in tickets:
            if t.thread is not None:
                t.thread.join(timeout=recovery_timeout_s)
        logged_at_fault = set(before[self.coord].trips.values()) if self.coord in before \
            else set()
        for t in tickets:  # a cut POST is retried with the same Idempotency-Key
            if t.error and not t.trip_id:
                t.retried = True
                was_logged = t.vehicle_id in logged_at_fault
                t.error = ""
                t.thread = threading.Thread(target=self._retry, args=(t,), daemon=True)
                t.thread.start()
                t.thread.join(timeout=recovery_timeout_s)
                if was_logged:
                    cr.recovered += bool(t.trip_id)
                else:  # died before the trip was logged: the retry booked it afresh
                    cr.not_logged += 1
        deadline = time.monotonic() + recovery_timeout_s
        while True:
            snaps, chk = self.check()
            mine = self._trips_of(tickets, snaps)
            done = all(t.trip_id for t in tickets if not t.error or t.trip_id) and chk.ok and all(
                chk.trips[tid].outcome != "open" for tid in mine if tid in chk.trips)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        cr.recovery_s = time.monotonic() - t0
        cr.problems = mid_problems + chk.problems
        cr.max_hold_overstay_min = chk.max_hold_overstay_min
        if not done:
            cr.problems.append(f"not recovered within {recovery_timeout_s:.0f}s")
        for t in tickets:
            tid = mine.get(t.vehicle_id, "")
            if not tid:
                if t.error or t.code == 409:  # the request died with the coordinator,
                    cr.not_logged += not t.retried  # or was refused, before a trip was logged:
                    continue  # nothing was held for it (checked above: no orphan holds)
                cr.problems.append(f"{t.vehicle_id}: no trip logged ({t.code}: {t.body})")
                continue
            tc = chk.trips[tid]
            cr.outcomes[tid], cr.trip_states[tid] = tc.outcome, tc.state
            if not t.trip_id and tid not in self.notified:
                cr.unaware += 1
            if t.trip_id:  # the vehicle can read the final outcome
                got = self._call(self.coord, "GET", f"/bookings/{tid}", t.token).json()
                if got.get("outcome") in (None, "PENDING"):
                    cr.problems.append(f"{tid}: vehicle reads {got.get('outcome')}")
                elif got["outcome"] == "BOOKED":
                    self.acked[tid] = "BOOKED"
            elif tc.outcome == "booked" and self.notified.get(tid) == "BOOKED":
                self.acked[tid] = "BOOKED"
        cr.lost = lost(before, snaps)
        for tid in self.acked:
            found = chk.trips.get(tid)
            if found is None or found.state != "BOOKED":
                cr.lost.append(f"trip {tid} was BOOKED for its vehicle, now "
                               f"{found.state if found else 'unknown'}")
        return cr

    def _retry(self, t: Ticket, attempts: int = 20) -> None:
        for _ in range(attempts):
            try:
                r = self._call(self.coord, "POST", "/bookings", t.token,
                               json={"stops": t.stops}, timeout=60.0,
                               headers={"Idempotency-Key": t.key})
            except Exception as exc:  # still restarting
                t.error = f"{type(exc).__name__}: {exc}"
                time.sleep(0.5)
                continue
            t.code, t.body, t.error = r.status_code, r.json(), ""
            t.trip_id = str(t.body.get("trip_id", ""))
            if t.body.get("outcome") == "BOOKED":
                self.acked[t.trip_id] = "BOOKED"
            return

    def _trips_of(self, tickets: Sequence[Ticket],
                  snaps: Mapping[str, DbSnapshot]) -> dict[str, str]:
        by_vehicle = {v: t for t, v in snaps[self.coord].trips.items()}
        return {t.vehicle_id: by_vehicle[t.vehicle_id] for t in tickets
                if t.vehicle_id in by_vehicle}


def run_matrix(out: str | Path, cases: Sequence[Case] = CASES, runs: int = 1, *,
               time_scale: float = 120.0, seed: int = 1,
               progress: Callable[[CaseRun], None] | None = None) -> list[CaseRun]:
    """Run every case ``runs`` times on one network; returns one :class:`CaseRun` each."""
    results: list[CaseRun] = []
    with Harness(out, time_scale=time_scale, seed=seed) as h:
        for r in range(runs):
            for case in cases:
                cr = h.run_case(case, r)
                results.append(cr)
                if progress is not None:
                    progress(cr)
    return results


def table(results: Sequence[CaseRun]) -> str:
    """Markdown table: case, runs, outcomes, lost records, max recovery time."""
    by: dict[str, list[CaseRun]] = {}
    for r in results:
        by.setdefault(r.case, []).append(r)
    lines = ["| case | runs | trips | booked | released | failed | lost | not logged | "
             "recovered | unaware | max recovery (s) | problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in by.items():
        trips = sum(len(r.outcomes) for r in rs)
        probs = sum(len(r.problems) for r in rs) + sum(not r.fired for r in rs)
        lines.append(
            f"| {name} | {len(rs)} | {trips} | {sum(r.count('booked') for r in rs)} | "
            f"{sum(r.count('released') for r in rs)} | {sum(r.failed for r in rs)} | "
            f"{sum(len(r.lost) for r in rs)} | {sum(r.not_logged for r in rs)} | "
            f"{sum(r.recovered for r in rs)} | {sum(r.unaware for r in rs)} | "
            f"{max(r.recovery_s for r in rs):.1f} | {probs} |")
    return "\n".join(lines)
