"""Benchmark: three-stop trips (three companies) fully booked per second, one core.

Runs the pure protocol state machines (one coordinator, three participants)
with no I/O:

1. lossless -- every message delivered at once (FIFO pump), records drained
   into in-memory "persisted" lists as an adapter would;
2. lossless + JSON -- the same, but every message goes through
   ``encode``/``decode`` (what the live MQTT network adds);
3. 10 % loss -- a seeded :class:`~evsim.protocol.network.SimNetwork` drops one
   message in ten; retries are driven by ``tick`` every 0.25 simulated minutes.

Prints trips booked per second for each (median of ``--repeats`` runs) and
the ratios.  Usage: ``python bench/protocol_throughput.py [--trips N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import deque
from typing import Any

from evsim.protocol import (
    Coordinator,
    Outgoing,
    Participant,
    StopRequest,
    TripRequest,
    TripState,
    decode,
    encode,
)
from evsim.protocol.network import Cluster, SimNetwork

N_CONNECTORS = 8
PIDS = ("P1", "P2", "P3")


def stations(pid: str) -> dict[str, list[str]]:
    return {f"S-{pid}": [f"{pid}-c{i}" for i in range(N_CONNECTORS)]}


def requests(n: int) -> list[TripRequest]:
    """n non-conflicting trips: N_CONNECTORS trips per 60-minute slot per station."""
    out = []
    for k in range(n):
        base = 10_000.0 + (k // N_CONNECTORS) * 60.0
        stops = tuple(
            StopRequest(pid, f"S-{pid}", base + 120.0 * j, base + 120.0 * j + 30.0, 10.0)
            for j, pid in enumerate(PIDS)
        )
        out.append(TripRequest(f"V{k}:req", f"V{k}", f"trip{k}", f"V{k}", stops))
    return out


def run_lossless(reqs: list[TripRequest], json_wire: bool) -> tuple[float, int]:
    coord = Coordinator("C")
    nodes: dict[str, Coordinator | Participant] = {"C": coord}
    for pid in PIDS:
        nodes[pid] = Participant(pid, stations(pid))
    persisted: dict[str, list] = {nid: [] for nid in nodes}
    queue: deque[Outgoing] = deque()
    now = 0.0
    t0 = time.perf_counter()
    for req in reqs:
        queue.extend(coord.request_trip(req, now))
        persisted["C"].extend(coord.new_records())
        while queue:
            dst, msg = queue.popleft()
            node = nodes.get(dst)
            if node is None:
                continue  # the vehicle's answer
            if json_wire:
                msg = decode(encode(msg))
            queue.extend(node.handle(msg, now))
            persisted[dst].extend(node.new_records())
    elapsed = time.perf_counter() - t0
    booked = sum(coord.trip_state(r.trip_id) is TripState.BOOKED for r in reqs)
    return elapsed, booked


def run_lossy(reqs: list[TripRequest], drop_p: float, seed: int) -> tuple[float, int, int]:
    cl = Cluster(SimNetwork(seed, drop_p=drop_p))
    coord = Coordinator("C")
    cl.add(coord, lambda r: Coordinator.from_log("C", r))
    for pid in PIDS:
        st = stations(pid)
        cl.add(Participant(pid, st), functools.partial(Participant.from_log, pid, st))
    per_round = 200
    pending = deque(reqs)
    t0 = time.perf_counter()
    while pending or coord.open_trip_ids():
        for _ in range(min(per_round, len(pending))):
            req = pending.popleft()

            def request(n: Any, now: float, req: TripRequest = req) -> list[Any]:
                return n.request_trip(req, now)

            cl.call("C", request)
        cl.deliver_due()
        cl.tick_all()
        cl.deliver_due()
        cl.now_min += 0.25
    elapsed = time.perf_counter() - t0
    booked = sum(coord.trip_state(r.trip_id) is TripState.BOOKED for r in reqs)
    return elapsed, booked, cl.network.sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trips", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    reqs = requests(args.trips)
    n = len(reqs)

    rates: dict[str, list[float]] = {"lossless": [], "lossless+json": [], "loss10": []}
    booked_frac: dict[str, list[float]] = {k: [] for k in rates}
    msgs_per_trip = 0.0
    for r in range(args.repeats):
        for key, json_wire in (("lossless", False), ("lossless+json", True)):
            el, booked = run_lossless(reqs, json_wire)
            rates[key].append(booked / el)
            booked_frac[key].append(booked / n)
        el, booked, sent = run_lossy(reqs, 0.10, seed=r)
        rates["loss10"].append(booked / el)
        booked_frac["loss10"].append(booked / n)
        msgs_per_trip = sent / n

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"protocol throughput: {n} three-stop trips (3 companies), "
          f"median of {args.repeats} repeats, one core")
    for key, label in (
        ("lossless", "lossless, in-memory messages"),
        ("lossless+json", "lossless, JSON encode+decode per message"),
        ("loss10", "10% message loss, tick-driven retries"),
    ):
        runs = ", ".join(f"{x:,.0f}" for x in rates[key])
        print(f"  {label:44s} {med[key]:>9,.0f} trips/s booked "
              f"(booked {statistics.median(booked_frac[key]):.1%}; runs: {runs})")
    print(f"  messages sent per trip at 10% loss: {msgs_per_trip:.1f} (13 without loss)")
    print(f"  ratio json/lossless:   {med['lossless+json'] / med['lossless']:.2f}")
    print(f"  ratio loss10/lossless: {med['loss10'] / med['lossless']:.2f}")
    target = 5_000
    verdict = "meets" if med["lossless"] >= target else "misses"
    print(f"  target >= {target:,}/s lossless: {verdict}")


if __name__ == "__main__":
    main()
