"""Benchmark: where a lone three-company trip booking's time goes, hop by hop.

The latency aim of the live network (a lone three-company trip's p50 within 10x one QoS 1
round trip, ``bench/live_load.py``) is met on some machines and missed on others. This bench
says why on the machine at hand. It starts the network of ``bench/live_load.py`` (Mosquitto,
three company servers with SQLite in WAL mode, ``synchronous=FULL``) with
``bench/hoptrace/sitecustomize.py`` loaded in each server, which notes the time at each step
of a booking (``CLOCK_MONOTONIC``, one clock for every process). It books ``--bookings`` lone
three-company trips, one at a time, and splits each booking's time at the vehicle into the
segments of its critical path: the coordinator's HTTP handling, each protocol message in
flight, each participant's and the coordinator's hand-over and step, each forced commit,
and the answer. The participant on the path is the slower of the two at each phase. The
segments add up to the booking's time exactly; medians and p90 are printed per segment,
then per kind (HTTP, MQTT in flight, commits, hand-overs and steps), against the floors
measured in the same run: a QoS 1 round trip and one forced write.

Usage::

    python bench/live_hops.py [--bookings 300] [--workdir DIR]

Bounded: it sends ``--bookings`` requests (after 50 for warm-up) and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import live_load as L

HERE = Path(__file__).resolve().parent
HOME = "acme"  # the coordinator: the vehicle's home company

# (segment, kind) along the critical path, in order; see segments()
SEGMENTS: tuple[tuple[str, str], ...] = (
    ("request to the server", "http"),
    ("routing, body, dependencies", "http"),
    ("trip start, PREPARE published", "step"),
    ("PREPARE in flight", "mqtt"),
    ("participant: PREPARE handed over, step", "step"),
    ("participant: hold, statements", "write"),
    ("participant: hold, COMMIT (fsync)", "commit"),
    ("participant: vote published", "step"),
    ("vote in flight", "mqtt"),
    ("coordinator: votes handed over, step", "step"),
    ("coordinator: decision, statements", "write"),
    ("coordinator: decision, COMMIT (fsync)", "commit"),
    ("coordinator: COMMIT published", "step"),
    ("COMMIT in flight", "mqtt"),
    ("participant: COMMIT handed over, step", "step"),
    ("participant: reservation, statements", "write"),
    ("participant: reservation, COMMIT", "commit"),
    ("participant: ack published", "step"),
    ("ack in flight", "mqtt"),
    ("coordinator: ack, answer wakes", "step"),
    ("answer built and sent", "http"),
    ("response to the vehicle", "http"),
)


@dataclass(frozen=True)
class Note:
    t_ns: int
    who: str  # company
    thread: str
    what: str


def read_notes(folder: Path) -> list[Note]:
    out = []
    for f in folder.glob("*.tsv"):
        who = f.name.split("-")[0]
        for line in f.read_text().splitlines():
            t, th, what = line.split("\t")
            out.append(Note(int(t), who, th, what))
    out.sort(key=lambda n: n.t_ns)
    return out


def _first(notes: Sequence[Note], what: str, after: int = 0, thread: str | None = None) -> int:
    for n in notes:
        if n.t_ns >= after and (thread is None or n.thread == thread) and n.what == what:
            return n.t_ns
    raise LookupError(what)


def _commit(notes: Sequence[Note], after: int) -> tuple[int, int, int]:
    """The first group commit from ``after``: (start, its statements written, end)."""
    start = _first(notes, "_commit", after)
    end = _first(notes, "_commit-end", start)
    written = max((n.t_ns for n in notes if start <= n.t_ns <= end and n.what == "_write-end"),
                  default=start)
    return start, written, end


def segments(t0: int, t1: int, notes: Sequence[Note], participants: Sequence[str]
             ) -> list[float] | None:
    """One booking's critical path, in microseconds per :data:`SEGMENTS` (None when a
    note is missing, e.g. a retry or a batch that merged two steps)."""
    by: dict[str, list[Note]] = defaultdict(list)
    for n in notes:
        by[n.who].append(n)
    co = by[HOME]
    try:
        http_in = _first(co, "http in", t0)
        handler = _first(co, "book_async", http_in)
        # each participant: PREPARE in, hold commit, vote out, COMMIT in, commit, ack out
        path: dict[str, list[int]] = {}
        for p in participants:
            ps = by[p]
            rx1 = _first(ps, f"rx evsim/protocol/{p}/{HOME}", handler)
            c1 = _commit(ps, rx1)
            v = _first(ps, f"tx evsim/protocol/{HOME}.coord/{p}", c1[2])
            rx2 = _first(ps, f"rx evsim/protocol/{p}/{HOME}", v)
            c2 = _commit(ps, rx2)
            a = _first(ps, f"tx evsim/protocol/{HOME}.coord/{p}", c2[2])
            prep = _first(co, f"tx evsim/protocol/{p}/{HOME}", handler, "MainThread")
            path[p] = [prep, rx1, *c1, v, rx2, *c2, a]
        p1 = max(participants, key=lambda p: path[p][5])  # the later vote
        p2 = max(participants, key=lambda p: path[p][10])  # the later ack
        votes_in = max(_first(co, f"rx evsim/protocol/{HOME}.coord/{p}", path[p][5])
                       for p in participants)
        d = _commit(co, votes_in)
        commit_out = _first(co, f"tx evsim/protocol/{p2}/{HOME}", d[2])
        acks_in = max(_first(co, f"rx evsim/protocol/{HOME}.coord/{p}", path[p][10])
                      for p in participants)
        woke = _first(co, "wait_result_async-end", acks_in, "MainThread")
        sent = _first(co, "http http.response.body", woke, "MainThread")
    except LookupError:
        return None
    a1, a2 = path[p1], path[p2]
    marks = [t0, http_in, handler, *a1[:6], votes_in, *d, commit_out, *a2[6:], acks_in, woke,
             sent, t1]
    if any(b < a for a, b in itertools.pairwise(marks)):
        return None  # out of order: not a lone booking's path
    return [(b - a) / 1e3 for a, b in itertools.pairwise(marks)]


async def book_lone(net: L.LoadNetwork, n: int, gap_s: float = 0.0,
                    warmup: int = 50) -> list[tuple[int, int]]:
    """``n`` lone three-company bookings by a vehicle of :data:`HOME`, ``gap_s`` apart:
    (sent, answered) in ``CLOCK_MONOTONIC`` ns."""
    out = []
    async with L.Client(4) as client:
        vehicles = await L.register_many(client, net.servers, 3)
        v = next(x for x in vehicles if x.home == HOME)
        stations = L.stations_for(HOME, 3)
        base = net.now() + 5000.0
        for k in range(warmup + n):
            start = base + k
            body = {"stops": [{"station_id": s, "start_min": start, "end_min": start + 0.5,
                               "grace_min": 0.0} for s in stations]}
            t0 = time.monotonic_ns()
            code, _ = await client.post(f"{v.url}/bookings", body, v.headers)
            t1 = time.monotonic_ns()
            if code != 201:
                raise RuntimeError(f"booking {k} answered {code}")
            if k >= warmup:
                out.append((t0, t1))
            if gap_s > 0:
                await asyncio.sleep(gap_s)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bookings", type=int, default=300)
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="idle time between two bookings (default 0: one after the other, as "
                    "the paired rounds of bench/live_load.py)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the databases, logs and notes here (default: a temporary folder)")
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="evsim-hops-")))
        notes_dir = workdir / "notes"
        notes_dir.mkdir(parents=True, exist_ok=True)
        for old in notes_dir.glob("*.tsv"):
            old.unlink()
        # the servers inherit this process's environment (LoadNetwork.start)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(HERE / "hoptrace"), *filter(None, [os.environ.get("PYTHONPATH")])])
        os.environ["EVSIM_HOPTRACE"] = str(notes_dir)
        try:
            with L.LoadNetwork(workdir) as net:
                assert net.broker is not None
                rtt = statistics.median(L.mqtt_rtt(net.broker.url, 200)) * 1e6
                fsync = statistics.median(L.commit_times(workdir, 200)) * 1e6
                windows = asyncio.run(book_lone(net, args.bookings, args.gap_ms / 1e3))
            # (the servers write their notes as they exit)
        finally:
            os.environ.pop("EVSIM_HOPTRACE", None)
        notes = read_notes(notes_dir)
    if not notes:
        print("no notes from the servers: bench/hoptrace/sitecustomize.py did not load")
        return 1
    starts = [n.t_ns for n in notes]
    participants = [c for c in L.COMPANIES if c != HOME]
    rows: list[list[float]] = []
    for t0, t1 in windows:
        lo, hi = bisect.bisect_left(starts, t0), bisect.bisect_right(starts, t1)
        seg = segments(t0, t1, notes[lo:hi], participants)
        if seg is not None:
            rows.append(seg)
    if not rows:
        print("no booking could be split into its segments")
        return 1
    totals = [sum(r) for r in rows]
    p50 = statistics.median(totals)
    print(f"lone three-company trip bookings (coordinator {HOME}, participants "
          f"{', '.join(participants)}, {args.gap_ms:g} ms apart): {len(rows)} of "
          f"{len(windows)} split into segments; {os.cpu_count()} CPUs")
    print(f"floors in the same run: QoS 1 round trip p50 {rtt:.0f} us, one forced write "
          f"(SQLite WAL, synchronous=FULL) p50 {fsync:.0f} us")
    print(f"{'segment':<40} {'p50 us':>8} {'p90 us':>8} {'share':>7}")
    cols = list(zip(*rows, strict=True))
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(rows))
    for (name, kind), col in zip(SEGMENTS, cols, strict=True):
        med = statistics.median(col)
        p90 = sorted(col)[int(0.9 * (len(col) - 1))]
        print(f"{name:<40} {med:>8.0f} {p90:>8.0f} {med / p50:>7.1%}")
        for i, x in enumerate(col):
            kinds[kind][i] += x
    print(f"{'booking, as the vehicle saw it':<40} {p50:>8.0f} "
          f"{sorted(totals)[int(0.9 * (len(totals) - 1))]:>8.0f}   = {p50 / rtt:.1f}x the "
          "QoS 1 round trip")
    labels = {"http": "HTTP at the coordinator (4 segments)",
              "mqtt": "MQTT in flight (4 messages)",
              "write": "statements of the 3 commits",
              "commit": "COMMITs (3 on the path)",
              "step": "hand-overs, protocol steps, publishes"}
    floors = {"mqtt": 2 * rtt, "commit": 3 * fsync}
    for kind, label in labels.items():
        med = statistics.median(kinds[kind])
        extra = (f"  (floor {floors[kind]:.0f} us: "
                 f"{'2 round trips' if kind == 'mqtt' else '3 forced writes'})"
                 if kind in floors else "")
        print(f"  {label:<40} p50 {med:>6.0f} us {med / p50:>6.1%}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
