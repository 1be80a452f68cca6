"""Protocol: the seeded simulated network and cluster driver, end to end; diagram script."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from evsim.protocol import (
    BookingState,
    Coordinator,
    Participant,
    StopRequest,
    TripRequest,
    TripResult,
    TripState,
)
from evsim.protocol.network import Cluster, SimNetwork
from evsim.protocol.states import BOOKING_TRANSITIONS, TRIP_TRANSITIONS

ROOT = Path(__file__).resolve().parents[1]
STATIONS = {p: {f"S{p}": [f"{p}-a", f"{p}-b"]} for p in ("P1", "P2", "P3")}


def build_cluster(seed: int, **net: float) -> Cluster:
    cl = Cluster(SimNetwork(seed, **net))
    for cid, off in (("C1", 0.0), ("C2", 0.4)):
        cl.add(Coordinator(cid), lambda r, c=cid: Coordinator.from_log(c, r), off)
    for pid, off in (("P1", -0.3), ("P2", 0.0), ("P3", 0.2)):
        st = STATIONS[pid]
        cl.add(Participant(pid, st), lambda r, p=pid, s=st: Participant.from_log(p, s, r), off)
    return cl


def submit(cl: Cluster, k: int) -> TripRequest:
    stops = tuple(
        StopRequest(p, f"S{p}", 500.0 + 7 * ((k + j) % 5), 530.0 + 7 * ((k + j) % 5), 5.0)
        for j, p in enumerate(("P1", "P2", "P3")[: 1 + k % 3])
    )
    req = TripRequest(f"V{k}:req", f"V{k}", f"T{k}", f"V{k}", stops)
    coord = "C1" if k % 2 else "C2"
    cl.call(coord, lambda n, now: n.request_trip(req, now))
    return req


def outcome_is_atomic(cl: Cluster, req: TripRequest, coord: str) -> TripState:
    node = cl.nodes[coord]
    assert isinstance(node, Coordinator)
    state = node.trip_state(req.trip_id)
    bstates = [cl.nodes[s.participant].booking(f"{req.trip_id}/{i}") for i, s in
               enumerate(req.stops)]
    held = [b is not None and b.state in (BookingState.PENDING, BookingState.RESERVED)
            for b in bstates]
    if state is TripState.BOOKED:
        assert all(b is not None and b.state is BookingState.RESERVED for b in bstates)
    else:
        assert state in (TripState.ABORTED, TripState.FAILED)
        assert not any(held)
    return state


@pytest.mark.parametrize("seed", range(4))
def test_lossy_cluster_with_crashes_ends_atomic(seed: int) -> None:
    cl = build_cluster(seed, drop_p=0.2, dup_p=0.2, delay_min=0.05, jitter_min=0.6)
    reqs = []
    for k in range(30):
        reqs.append(submit(cl, k))
        cl.run(cl.now_min + 0.5, 0.25)
        if k % 7 == 3:
            cl.crash(["C1", "C2", "P1", "P2", "P3"][k % 5])
    cl.network.drop_p = cl.network.dup_p = 0.0
    cl.run(cl.now_min + 40.0, 0.25)
    assert len(cl.network) == 0
    states = [outcome_is_atomic(cl, r, "C1" if k % 2 else "C2") for k, r in enumerate(reqs)]
    assert TripState.BOOKED in states
    assert cl.network.dropped > 0
    assert cl.network.duplicated > 0
    # every vehicle that got answers got one kind of answer, matching the coordinator
    for k, r in enumerate(reqs):
        got = {m.outcome for m in cl.inbox.get(r.vehicle_id, []) if isinstance(m, TripResult)}
        assert len(got) <= 1
        expect = {"BOOKED": "BOOKED", "ABORTED": "REJECTED", "FAILED": "FAILED"}[states[k].value]
        assert got <= {expect}


def test_same_seed_same_run() -> None:
    def run() -> list[str]:
        cl = build_cluster(7, drop_p=0.3, dup_p=0.1, jitter_min=1.0)
        reqs = [submit(cl, k) for k in range(12)]
        cl.run(40.0, 0.25)
        return [str(cl.nodes["C1" if k % 2 else "C2"].trip_state(r.trip_id))
                for k, r in enumerate(reqs)]

    assert run() == run()


def test_make_diagrams_writes_dot_and_png(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_diagrams", ROOT / "docs/make_diagrams.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = sys.argv
    sys.argv = ["make_diagrams", "--out", str(tmp_path)]
    try:
        mod.main()
    finally:
        sys.argv = argv
    dot = (tmp_path / "booking_states.dot").read_text()
    for (src, ev), dst in BOOKING_TRANSITIONS.items():
        assert f"{src.value} -> {dst.value}" in dot
        assert ev.value in dot
    trip_dot = (tmp_path / "trip_states.dot").read_text()
    assert all(f"{s.value} -> {d.value}" in trip_dot for (s, _), d in TRIP_TRANSITIONS.items())
    assert (tmp_path / "booking_states.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "trip_states.png").stat().st_size > 1000
