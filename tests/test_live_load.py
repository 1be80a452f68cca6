"""Issue 7, promise 1: no double booking under load.

Hundreds of vehicles race at once for the 20 connectors of a three-company network (real
Mosquitto broker, three company servers as uvicorn subprocesses with SQLite WAL databases,
built by ``bench/live_load.py``): every vehicle asks for the same 30-minute window, most for
one stop, some for a two- or three-company trip.  Afterwards:

* every request was answered 201 (BOOKED) or 409 (REJECTED / FAILED, with a reason) -- no
  5xx, no transport error, nothing left pending;
* replaying every company's protocol log from its database shows no connector with two
  overlapping active bookings, and no PENDING hold left behind;
* the counts add up: 201 answers = BOOKED trips; the stops of BOOKED trips = RESERVED
  bookings in the databases (at most one per connector); one trips row per request.

The 100-vehicle race runs in the default suite; 500 vehicles is ``slow``
(``python bench/live_load.py --race 500`` prints the same counts).
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from live.broker import find_mosquitto

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not found"),
]

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    name = "evsim_bench_live_load"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "live_load.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _race(tmp_path: Path, n: int) -> None:
    bench = _bench()
    with bench.LoadNetwork(tmp_path / "net") as net:
        res = asyncio.run(bench.race(net, n))
        logs = {c: net.log_tail(c) for c in bench.COMPANIES}
    report = "\n".join(res.lines())
    print(report)
    assert not res.errors, (res.errors[:5], logs)
    assert sum(res.codes.values()) == n, report
    assert set(res.codes) <= {201, 409}, report  # no 5xx, no 202 left: all decided in time
    assert res.overlaps == [], report
    assert sum(res.pending.values()) == 0, report
    booked = res.outcomes.get("BOOKED", 0)
    assert res.codes.get(201, 0) == booked, report
    assert booked + res.outcomes.get("REJECTED", 0) + res.outcomes.get("FAILED", 0) == n
    assert res.booked_stops == sum(res.reserved.values()) <= bench.N_CONNECTORS, report
    assert booked > 0, report
    assert sum(res.trips_rows.values()) == n, report  # one trip per request, coordinated once
    for line in logs.values():
        assert "Traceback" not in line, line


def test_no_double_booking_100_vehicles(tmp_path: Path) -> None:
    _race(tmp_path, 100)


@pytest.mark.slow
def test_no_double_booking_500_vehicles(tmp_path: Path) -> None:
    _race(tmp_path, 500)
