"""Benchmark: how fast the SimPy model runs, against a bare SimPy floor, and what the spatial
pre-filter buys a policy. One core, one process; plain-text report.

1. the default scenario (``load_scenario()``): events/s and sessions/s (median of repeats;
   events = SimPy events scheduled, sessions = ``session_start`` rows);
2. the same with 10x the vehicles over 10x the time (``trips`` and ``duration_min`` both
   x10, so the load on stations stays what it is) and the wall-time ratio (aim <= 12x);
3. a bare SimPy M/M/4 queue with as many arrivals as the 10x run had sessions: the floor
   any SimPy model sits on; model / floor in sessions per second (aim >= 0.25); and the
   same per arrival, a floor with as many customers as the 10x run had trips (the
   scenario's Poisson arrivals) against the model's trips per second; model and floors run
   in turns and each round gives its own ratio (median and range printed), so the machine's
   drift in speed does not end up in the ratio;
4. one policy decision (``least_wait``) over 10,000 synthetic stations around Bahia with the
   spatial pre-filter (a node's stations by road distance, ``NodeIndex``; the k-d tree for
   requests off the road nodes, timed too), against (b) a linear haversine scan in place of
   the pre-filter and (c) no pre-filter at all, the road distance to every station tested
   by the same (vectorised) code (aim (c)/(a) >= 20x); and, for scale only, (d) a naive
   per-station Python loop, what "a scan of all stations" is in typical course code; all
   must pick the same station;
5. peak memory: ``ru_maxrss`` of the process and the tracemalloc peak of one default run.

``--sessions N`` instead runs one scaled scenario (trips and duration x f) until about N
charging sessions, streaming the trace to Parquet in a temporary directory, and reports wall
time, sessions, events/s and peak RSS.

Usage::

    python bench/sim_throughput.py [--repeats R]
    python bench/sim_throughput.py --sessions 1000000
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import simpy
from scipy.spatial import cKDTree

from evsim.geo import haversine_km, to_unit_xyz
from evsim.model import Simulation
from evsim.policies import resolve
from evsim.scenario import Scenario, load_scenario
from evsim.snapshot import ChargeRequest, Choice, NetworkSnapshot, StationTable, StatusBoard
from evsim.trace import Kind


def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def scaled(scenario: Scenario, factor: float) -> Scenario:
    """``factor`` x the trips over ``factor`` x the duration: same load, longer run."""
    demand = scenario.demand.model_dump()
    demand["trips"] = scenario.demand.trips * factor
    return scenario.with_overrides(duration_min=scenario.duration_min * factor, demand=demand)


@dataclass
class RunStats:
    wall_s: float
    events: int
    sessions: int
    trips: int
    cpu_s: float  # process CPU time of the same span (robust on a shared, busy machine)

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s

    @property
    def sessions_per_s(self) -> float:
        return self.sessions / self.wall_s


def run_model(
    scenario: Scenario, trace_path: Path | None = None, progress: bool = False
) -> RunStats:
    sim = Simulation(scenario, trace_path=trace_path)
    t0 = time.perf_counter()

    def report(t_min: float) -> None:
        print(
            f"  ... {t_min / scenario.duration_min:4.0%} of the horizon, "
            f"{time.perf_counter() - t0:7.1f} s, peak RSS {rss_mib():.0f} MiB",
            file=sys.stderr,
            flush=True,
        )

    c0 = time.process_time()
    # res.wall_s times run() only, not building the world and the trips
    res = sim.run(progress=report, steps=10) if progress else sim.run()
    cpu = time.process_time() - c0
    if trace_path is None:
        sessions = int((res.trace["kind"] == Kind.SESSION_START).sum())
    else:
        kinds = pq.read_table(trace_path, columns=["kind"])["kind"]
        sessions = int(pc.sum(pc.equal(kinds, str(Kind.SESSION_START))).as_py() or 0)
    return RunStats(res.wall_s, res.events, sessions, res.trips, cpu)


def median_run(scenario: Scenario, repeats: int) -> RunStats:
    runs = [run_model(scenario) for _ in range(repeats)]
    runs.sort(key=lambda r: r.wall_s)
    return runs[len(runs) // 2]


# --------------------------------------------------------------------------------------------
# the bare SimPy floor
# --------------------------------------------------------------------------------------------


def simpy_floor(n: int, c: int = 4, rho: float = 0.8, seed: int = 0) -> RunStats:
    """M/M/c in plain SimPy: a Resource, one process per customer, nothing recorded."""
    mu = 1 / 30.0
    lam = rho * c * mu
    rng = np.random.default_rng(seed)
    inter = rng.exponential(1 / lam, n).tolist()
    service = rng.exponential(1 / mu, n).tolist()
    env = simpy.Environment()
    server = simpy.Resource(env, capacity=c)
    served = [0]

    def customer(s: float):
        with server.request() as req:
            yield req
            yield env.timeout(s)
        served[0] += 1

    def source():
        for k in range(n):
            yield env.timeout(inter[k])
            env.process(customer(service[k]))

    env.process(source())
    t0, c0 = time.perf_counter(), time.process_time()
    env.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return RunStats(wall, next(env._eid), served[0], n, cpu)


# --------------------------------------------------------------------------------------------
# one policy decision over 10,000 stations
# --------------------------------------------------------------------------------------------

CIRCUITY = 1.25


def synthetic_network(
    n_stations: int, n_nodes: int, seed: int = 0
) -> tuple[NetworkSnapshot, np.ndarray, np.ndarray]:
    """Stations scattered over Bahia, hung off ``n_nodes`` road nodes. Road distance between
    nodes is great-circle x circuity (so it never undercuts the great circle and the k-d tree
    pre-filter stays exact); each station's access road likewise. Random status and prices.
    Read-only road tables and node positions, as a RoadNetwork has (for the node index).
    Returns the snapshot and the nodes' latitudes and longitudes."""
    rng = np.random.default_rng(seed)
    box = (-18.3, -8.6, -46.5, -37.4)  # lat lo/hi, lon lo/hi

    def points(k: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.uniform(box[0], box[1], k), rng.uniform(box[2], box[3], k)

    nlat, nlon = points(n_nodes)
    dist = haversine_km(nlat[:, None], nlon[:, None], nlat[None, :], nlon[None, :]) * CIRCUITY
    slat, slon = points(n_stations)
    _, node = cKDTree(to_unit_xyz(nlat, nlon)).query(to_unit_xyz(slat, slon))
    access = haversine_km(slat, slon, nlat[node], nlon[node]) * CIRCUITY
    n_conn = rng.integers(1, 9, n_stations)
    energy = np.repeat(rng.uniform(1.5, 2.8, (n_stations, 1)), 24, axis=1)
    table = StationTable.build(
        [f"s{i}" for i in range(n_stations)],
        [f"co{i % 7}" for i in range(n_stations)],
        slat,
        slon,
        node,
        access,
        n_conn,
        rng.choice([22.0, 50.0, 150.0, 350.0], n_stations),
        rng.random(n_stations) < 0.8,
        energy,
        np.zeros((n_stations, 24)),
        np.full((n_stations, 24), 2.0),
    )
    board = StatusBoard(n_stations)
    busy = rng.integers(0, n_conn + 1)
    for i in range(n_stations):
        board.update(
            i,
            busy=int(busy[i]),
            queued=int(rng.integers(0, 3)) if busy[i] == n_conn[i] else 0,
            online=bool(rng.random() > 0.05),
            t_min=0.0,
            mean_session_min=float(rng.uniform(20, 60)),
        )
    time = dist / 80.0 * 60.0
    for a in (dist, time):
        a.flags.writeable = False  # as a RoadNetwork's (the node index needs read-only tables)
    roads = SimpleNamespace(dist_km=dist, time_min=time, lat=nlat, lon=nlon)
    return NetworkSnapshot.of(table, roads, board), nlat, nlon  # type: ignore[arg-type]


class _TreeTable:
    """A StationTable without its node index: ``candidates`` queries the k-d tree
    (``within_km``), as for a request off the road nodes."""

    def __init__(self, table: StationTable) -> None:
        self._t = table

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

    def node_index(self, *args: Any) -> None:
        return None


class _ScanTable(_TreeTable):
    """A StationTable whose range query is a linear haversine scan instead of the pre-filter
    (no node index, and ``within_km`` a scan)."""

    def within_km(self, lat: float, lon: float, radius_km: float) -> np.ndarray:
        if radius_km <= 0:
            return np.empty(0, dtype=np.int64)
        d = haversine_km(lat, lon, self._t.lat, self._t.lon)
        return np.flatnonzero(d <= radius_km)


class _AllTable(_ScanTable):
    """No pre-filter: every station is a candidate (haversine to all of them is still
    computed, as a brute-force policy would); ``candidates`` computes the road distance to
    every station and keeps those in range, then the same scoring."""

    def within_km(self, lat: float, lon: float, radius_km: float) -> np.ndarray:
        haversine_km(lat, lon, self._t.lat, self._t.lon)
        return np.arange(len(self._t.ids), dtype=np.int64)


def _least_wait_on(snapshot: NetworkSnapshot) -> Callable[[ChargeRequest, float], Choice | None]:
    """The built-in ``least_wait`` itself (the same scoring code) on a snapshot whose table
    has another range query: the k-d tree, a scan (b) or every station (c) instead of the
    node index."""
    policy = resolve("least_wait")

    def run(request: ChargeRequest, now: float) -> Choice | None:
        return policy(request, snapshot, now)

    return run


def _naive_loop_on(snapshot: NetworkSnapshot) -> Callable[[ChargeRequest, float], Choice | None]:
    """What "a scan of all stations" usually is in course code: a Python loop over every
    station, scoring the reachable ones one by one (``least_wait``'s score, same arithmetic
    and tie-break), numpy arrays indexed element by element. Not the aim's baseline (that is
    the vectorised brute force); shown for scale."""
    st = snapshot.stations

    def policy(request: ChargeRequest, now: float) -> Choice | None:
        best: tuple[float, int] | None = None
        best_row: tuple[float, ...] = ()
        range_km = request.range_km
        direct = snapshot.dist_km[request.node, request.dest_node]
        for i in range(len(st.ids)):
            if not snapshot.online[i]:
                continue
            node = st.node[i]
            d = snapshot.dist_km[request.node, node] + st.access_km[i]
            if d > range_km:
                continue
            acc_min = st.access_km[i] / 50.0 * 60.0
            eta = snapshot.time_min[request.node, node] + acc_min
            onward = snapshot.time_min[node, request.dest_node] + acc_min
            n, busy, queued = st.n_connectors[i], snapshot.busy[i], snapshot.queued[i]
            if busy + queued < n:
                wait = 0.0
            else:
                wait = max(queued + busy - n + 1, 0) * snapshot.mean_session_min[i] / max(n, 1)
            arrival = request.soc - d * request.consumption_kwh_per_km / request.battery_kwh
            need = max(request.target_soc - arrival, 0.0) * request.battery_kwh
            cap = request.max_dc_kw if st.has_dc[i] else request.max_ac_kw
            charge = need / max(min(st.max_power_kw[i], cap), 1e-9) * 60.0
            score = eta + wait + charge + onward
            if best is None or (score, i) < best:
                best = (score, i)
                detour = d + snapshot.dist_km[node, request.dest_node] + st.access_km[i] - direct
                best_row = (d, detour, eta, wait)
        if best is None:
            return None
        d, detour, eta, wait = best_row
        return Choice(best[1], st.ids[best[1]], float(best[0]), d, detour, eta, wait)

    return policy


def bench_policy(n_stations: int, n_nodes: int, n_requests: int, seed: int = 1) -> dict:
    snap, node_lat, node_lon = synthetic_network(n_stations, n_nodes, seed)
    rng = np.random.default_rng(seed + 1)
    nodes = rng.integers(0, n_nodes, n_requests)
    dests = rng.integers(0, n_nodes, n_requests)
    requests = [
        ChargeRequest(
            vehicle_id=f"v{k}",
            node=int(nodes[k]),
            lat=float(node_lat[nodes[k]]),
            lon=float(node_lon[nodes[k]]),
            dest_node=int(dests[k]),
            soc=float(rng.uniform(0.2, 0.35)),
            battery_kwh=60.0,
            consumption_kwh_per_km=0.18,
        )
        for k in range(n_requests)
    ]

    def on(table: type[_TreeTable]) -> Callable[[ChargeRequest, float], Choice | None]:
        # (a duck-typed StationTable: every attribute but the range query is the table's)
        tables = cast(StationTable, table(snap.stations))
        return _least_wait_on(dataclasses.replace(snap, stations=tables))

    variants: dict[str, Callable[[ChargeRequest, float], Choice | None]] = {
        "node-index pre-filter (least_wait)": _least_wait_on(snap),
        "linear haversine scan, same scoring": on(_ScanTable),
        "no pre-filter: score all stations": on(_AllTable),
        "naive Python loop over all stations": _naive_loop_on(snap),
        "_kdtree": on(_TreeTable),  # the k-d tree in place of the node index
    }
    out: dict[str, Any] = {}
    answers: dict[str, list] = {}
    for name, fn in variants.items():
        answers[name] = [fn(r, 600.0) for r in requests]  # warm up, and the answers to compare
        reps = []
        for _ in range(2 if name.startswith("naive") else 5):
            t0 = time.process_time()  # cpu time: robust when the machine is shared
            for r in requests:
                fn(r, 600.0)
            reps.append((time.process_time() - t0) / n_requests)
        out[name] = min(reps)
    first = next(iter(answers.values()))
    for name, got in answers.items():
        same = [
            (a is None and b is None)
            or (a is not None and b is not None and a.station_index == b.station_index)
            for a, b in zip(first, got, strict=True)
        ]
        if not all(same):
            raise AssertionError(f"{name}: picks differ from the node-index policy")
    n_cand = [len(snap.stations.within_km(r.lat, r.lon, r.range_km)) for r in requests]
    out["_candidates_median"] = statistics.median(n_cand)
    ix = snap.node_index()
    assert ix is not None
    out["_index_rows"], out["_index_mib"] = len(ix._rows), ix._bytes / 2**20
    out["_range_km_median"] = statistics.median(r.range_km for r in requests)
    out["_none"] = sum(a is None for a in first)
    return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _line(r: RunStats) -> str:
    return (
        f"   wall {r.wall_s:8.3f} s (cpu {r.cpu_s:7.3f} s)  events {r.events:9,d}  "
        f"sessions {r.sessions:8,d}\n"
        f"   {r.events / r.wall_s:12,.0f} events/s   {r.sessions / r.wall_s:10,.0f} sessions/s"
        f"   (per cpu-second: {r.events / r.cpu_s:,.0f} and {r.sessions / r.cpu_s:,.0f})"
    )


def policy_report() -> None:
    """Section 4: one policy decision over 10,000 stations, four ways."""
    pol = bench_policy(10_000, 500, 300)
    names = [k for k in pol if not k.startswith("_")]
    t_tree = pol[names[0]]
    print(
        "\n4. one least_wait decision over 10,000 stations (500 road nodes, 300 requests, "
        "best of 5, cpu time)"
    )
    print(
        f"   range {pol['_range_km_median']:.0f} km (median): "
        f"{pol['_candidates_median']:.0f} stations within it; {pol['_none']} requests "
        "without a reachable station; all variants pick the same station"
    )
    labels = "abcd"
    for label, name in zip(labels, names, strict=True):
        t = pol[name]
        print(f"   ({label}) {name:38s} {t * 1e6:9.1f} us/decision  {t / t_tree:6.1f}x (a)")
    speedup = pol[names[2]] / t_tree
    print(
        f"   pre-filter speed-up vs scoring all (c)/(a): {speedup:.1f}x (aim >= 20x: "
        f"{'ok' if speedup >= 20 else 'MISS'})\n"
        f"   the k-d tree in place of the node index (as for requests off the road nodes): "
        f"{pol['_kdtree'] * 1e6:.1f} us/decision\n"
        f"   node index: {pol['_index_rows']} rows (nodes asked from), "
        f"{pol['_index_mib']:.0f} MiB\n"
        f"   (d) is a per-station Python loop (least_wait's arithmetic, one station at a "
        f"time), the usual\n       'scan of all stations' in course code: "
        f"{pol[names[3]] / t_tree:.0f}x (a); not the aim's baseline, shown for scale"
    )


def default_report(repeats: int) -> None:
    t_all = time.perf_counter()
    sc = load_scenario()
    print(
        f"scenario {sc.name}: {sc.demand.trips:g} trips over {sc.duration_min:g} min, "
        f"{len(sc.stations)} stations; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cpus"
    )

    base = median_run(sc, repeats)
    print(f"\n1. default scenario (median of {repeats} runs), {base.trips:,} trips")
    print(_line(base))

    big = median_run(scaled(sc, 10), max(1, repeats // 2))
    ratio, ratio_cpu = big.wall_s / base.wall_s, big.cpu_s / base.cpu_s
    per_session = ratio_cpu / (big.sessions / base.sessions)
    print(f"\n2. 10x vehicles over 10x the time, {big.trips:,} trips")
    print(_line(big))
    print(
        f"   time ratio 10x / 1x: {ratio:.2f}x wall, {ratio_cpu:.2f}x cpu (aim <= 12x: "
        f"{'ok' if min(ratio, ratio_cpu) <= 12 else 'MISS'}); per session {per_session:.2f}x "
        f"(the 10x run has {big.sessions / base.sessions:.1f}x the sessions)"
    )
    print(f"   peak RSS so far {rss_mib():.0f} MiB")

    # model and floor measured in turns, one round after the other, and the ratio taken per
    # round: this machine's speed drifts by tens of percent within a minute, which a block
    # of model runs followed by a block of floor runs turns into a ratio off by as much
    big_sc = scaled(sc, 10)
    rounds = max(3, repeats)
    per_round: list[tuple[RunStats, RunStats, RunStats]] = []
    for r in range(rounds):
        model = big if r == 0 else run_model(big_sc)
        per_round.append(
            (model, simpy_floor(model.sessions, seed=r), simpy_floor(model.trips, seed=r))
        )
    rel_s = sorted(
        (m.sessions / m.cpu_s) / (f.sessions / f.cpu_s) for m, f, _ in per_round
    )
    rel_w = sorted(m.sessions_per_s / f.sessions_per_s for m, f, _ in per_round)
    rel_ev = statistics.median(
        (m.events / m.cpu_s) / (f.events / f.cpu_s) for m, f, _ in per_round
    )
    rel_t = sorted((m.trips / m.cpu_s) / (ft.trips / ft.cpu_s) for m, _, ft in per_round)
    floor = sorted((f for _, f, _ in per_round), key=lambda x: x.cpu_s)[rounds // 2]
    floor_t = sorted((ft for _, _, ft in per_round), key=lambda x: x.cpu_s)[rounds // 2]
    rel, rel_wall, rel_trip = (statistics.median(x) for x in (rel_s, rel_w, rel_t))
    print(
        f"\n3. bare SimPy M/M/4 floor, {floor.trips:,} arrivals; {rounds} rounds of (the 10x "
        f"model, the floor), ratios per round, median [min-max]"
    )
    print(_line(floor).replace("sessions", "customers"))
    print(
        f"   model / floor in sessions/s: {rel:.3f} cpu [{rel_s[0]:.3f}-{rel_s[-1]:.3f}], "
        f"{rel_wall:.3f} wall (aim >= 0.25: {'ok' if max(rel, rel_wall) >= 0.25 else 'MISS'}); "
        f"in events/s: {rel_ev:.3f}"
    )
    # the other reading of "as many arrivals": the model's arrivals are its trips (the
    # scenario's Poisson arrivals, each walked, and half of them charging), the floor's its
    # customers; the same count of each
    print(
        f"   per arrival: the floor with {floor_t.trips:,} customers (the 10x run's trips) "
        f"{floor_t.trips / floor_t.cpu_s:,.0f}/cpu-s, the model {big.trips / big.cpu_s:,.0f} "
        f"trips/cpu-s: model / floor {rel_trip:.3f} [{rel_t[0]:.3f}-{rel_t[-1]:.3f}] (aim "
        f">= 0.25: {'ok' if rel_trip >= 0.25 else 'MISS'}; per charging session above)"
    )
    print(
        f"   events per session: model {big.events / max(big.sessions, 1):.1f}, "
        f"floor {floor.events / floor.trips:.1f}"
    )
    # where a session's CPU goes: SimPy's own scheduling (the model's events at the floor's
    # cost per event) and the rest (routing, policy, charging, pricing, trace rows)
    per_session_us = big.cpu_s / max(big.sessions, 1) * 1e6
    simpy_us = big.events / max(big.sessions, 1) * floor.cpu_s / max(floor.events, 1) * 1e6
    print(
        f"   CPU per session: {per_session_us:.1f} us, of which SimPy scheduling ~{simpy_us:.1f}"
        f" us, the model's own work ~{per_session_us - simpy_us:.1f} us (the 0.25 aim "
        f"allows {1e6 / (0.25 * floor.sessions / floor.cpu_s):.1f} us in all)"
    )

    policy_report()
    print(f"   peak RSS so far {rss_mib():.0f} MiB (the synthetic network's setup included)")

    tracemalloc.start()
    run_model(sc)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print("\n5. memory")
    print(f"   tracemalloc peak of one default run: {peak / 2**20:8.1f} MiB")
    print(f"   peak RSS of this process:            {rss_mib():8.1f} MiB")
    print(f"\ntotal bench time {time.perf_counter() - t_all:.1f} s")


def sessions_report(target: int) -> None:
    sc = load_scenario()
    # sessions per scenario-length of time, from a 4x probe (a 1x run loses a larger share
    # of its sessions to trips still on the road at the horizon)
    probe = run_model(scaled(sc, 4))
    per_unit = max(probe.sessions / 4, 1.0)
    factor = max(target / per_unit, 1.0)
    big = scaled(sc, factor)
    print(
        f"target ~{target:,} sessions: a 4x probe had {per_unit:,.0f} sessions per scenario "
        f"length; scaling trips and duration by {factor:.1f}x "
        f"({big.demand.trips:,.0f} trips over {big.duration_min / 1440:,.1f} days)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="evsim-bench-") as tmp:
        path = Path(tmp) / "trace.parquet"
        t0 = time.perf_counter()
        stats = run_model(big, trace_path=path, progress=True)
        total = time.perf_counter() - t0
        size = path.stat().st_size
    print(f"wall (run) {stats.wall_s:10.1f} s   wall (incl. setup and count) {total:10.1f} s")
    print(f"trips {stats.trips:,}  sessions {stats.sessions:,}  events {stats.events:,}")
    print(
        f"{stats.events_per_s:,.0f} events/s   {stats.sessions_per_s:,.0f} sessions/s   "
        f"(cpu {stats.cpu_s:,.1f} s)"
    )
    print(f"trace {size / 2**20:.1f} MiB (Parquet, zstd)   peak RSS {rss_mib():.1f} MiB")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="repeats for medians (default 3)")
    ap.add_argument(
        "--sessions",
        type=int,
        default=None,
        help="instead: run a scaled scenario until about N sessions (trace to Parquet)",
    )
    args = ap.parse_args(argv)
    if args.sessions is not None:
        sessions_report(args.sessions)
    else:
        default_report(max(1, args.repeats))


if __name__ == "__main__":
    main()
