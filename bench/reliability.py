"""All-or-nothing trips under faults: run the whole fault matrix on a live network and print
one row per case (``make reliability``).

Every case books ``--trips`` two-company trips (zap then acme, coordinated by acme) at once on
the tiny scenario while the fault happens: a server killed with ``os._exit(137)`` at a
protocol step and restarted on the same database, a SIGKILL at a random moment, the broker
killed and brought back on the same port, a company cut off the bus or frozen (SIGSTOP) for
longer than the lease.  After recovery :func:`live.fault_matrix.check` replays every company's
protocol log and :func:`live.fault_matrix.lost` compares it with the snapshot taken at the fault.

Columns: trips (logged by the coordinator), booked (every stop RESERVED), released (every stop
released: REJECTED or compensated), failed (neither, or no final outcome: must be 0), lost
(log records, trip rows, completed sessions or vehicle-acknowledged bookings missing after
recovery: must be 0), not logged (requests cut by a coordinator crash before the trip was
logged: nothing held; the vehicle's retry -- same ``Idempotency-Key`` -- books it afresh),
recovered (logged trips whose POST was cut: the retried POST, same key hence same trip id,
returned the trip and its outcome), unaware (logged trips whose vehicle never got the trip
id: POST cut, notification lost with the process, and the retry did not find it either --
0 now that trip ids derive from the key), max recovery (wall seconds from restart /
heal until every trip of the run is final and every invariant holds), problems (anything
the checker reported, plus faults that never fired).

    python bench/reliability.py [--runs 3] [--case NAME ...] [--time-scale 120] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from live.fault_matrix import CASES, CaseRun, run_matrix, table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs of every case")
    p.add_argument("--case", action="append", default=[], help="only these cases")
    p.add_argument("--time-scale", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="run dir (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write every run as JSON here")
    a = p.parse_args(argv)
    cases = [c for c in CASES if not a.case or c.name in a.case]
    if not cases:
        p.error(f"no such case; known: {', '.join(c.name for c in CASES)}")
    out = a.out or Path(tempfile.mkdtemp(prefix="evsim-reliability-"))
    t0 = time.monotonic()

    def progress(r: CaseRun) -> None:
        print(f"  {r.case} run {r.run}: {r.count('booked')} booked, {r.count('released')} "
              f"released, {r.failed} failed, {len(r.lost)} lost, {r.recovery_s:.1f}s"
              + (f"  PROBLEMS: {r.problems}" if r.problems or not r.fired else "")
              + (f"  LOST: {r.lost}" if r.lost else ""), flush=True)

    print(f"{len(cases)} cases x {a.runs} runs, time scale {a.time_scale:g}, logs in {out}")
    results = run_matrix(out, cases, a.runs, time_scale=a.time_scale, seed=a.seed,
                         progress=progress)
    print()
    print(table(results))
    bad = [r for r in results if r.problems or r.lost or r.failed or not r.fired]
    trips = sum(len(r.outcomes) for r in results)
    print(f"\n{len(results)} case runs, {trips} trips, {len(bad)} with problems, "
          f"{time.monotonic() - t0:.0f}s")
    if a.json:
        a.json.write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
