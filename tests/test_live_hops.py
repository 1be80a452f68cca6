"""``bench/live_hops.py``: a lone booking's critical path, split at the servers' notes.

The bench is only as good as its two halves: the notes (``bench/hoptrace/sitecustomize.py``
wraps server methods by name, so a rename must fail here and not print an empty table) and
the split (every segment between two notes of the right process, adding up to the
booking's time exactly).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def hops():
    sys.path.insert(0, str(BENCH))
    try:
        import live_hops
    finally:
        sys.path.remove(str(BENCH))
    return live_hops


def test_the_notes_load_in_a_server_process_and_are_written_at_exit(tmp_path: Path) -> None:
    env = {**os.environ, "EVSIM_HOPTRACE": str(tmp_path), "EVSIM_COMPANY": "acme",
           "PYTHONPATH": os.pathsep.join([str(BENCH / "hoptrace"), str(ROOT)])}
    code = (
        "import fastapi.routing, live.mqtt, live.server.node as n, live.server.service as s\n"
        "import live.server.steps as st\n"
        "for f in (n.ProtocolHost.execute, n.ProtocolHost._commit, st.QueuedStep.write_all,\n"
        "          s.CompanyService.book_async, live.mqtt.MqttBus._dispatch,\n"
        "          fastapi.routing.solve_dependencies):\n"
        "    assert hasattr(f, '__wrapped__'), f\n"
        "import sitecustomize; sitecustomize.note('hello')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    files = list(tmp_path.glob("acme-*.tsv"))
    assert len(files) == 1
    t, thread, what = files[0].read_text().splitlines()[-1].split("\t")
    assert (thread, what) == ("MainThread", "hello") and int(t) > 0
    # without EVSIM_HOPTRACE the module does nothing
    env.pop("EVSIM_HOPTRACE")
    r = subprocess.run([sys.executable, "-c", "import live.server.node as n\n"
                        "assert not hasattr(n.ProtocolHost.execute, '__wrapped__')"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _booking(hops, t0: int = 1000, step: int = 10) -> tuple[list, int]:
    """The notes of one lone booking (acme coordinating, zap and volt), each ``step`` ns
    after the previous one, volt always a little later than zap."""
    out = []
    t = t0

    def at(who: str, what: str, thread: str = "w") -> None:
        nonlocal t
        t += step
        out.append(hops.Note(t, who, thread, what))

    def commit(who: str) -> None:
        for what in ("_commit", "_write-end", "_commit-end"):
            at(who, what)

    def to_coordinator(p: str) -> None:  # a participant's commit, then its answer
        commit(p)
        at(p, f"tx evsim/protocol/acme.coord/{p}")

    at("acme", "http in", "MainThread")
    at("acme", "book_async", "MainThread")
    for p in ("zap", "volt"):
        at("acme", f"tx evsim/protocol/{p}/acme", "MainThread")
    for p in ("zap", "volt"):
        at(p, f"rx evsim/protocol/{p}/acme", "paho")
    for p in ("zap", "volt"):
        to_coordinator(p)  # the votes
    for p in ("zap", "volt"):
        at("acme", f"rx evsim/protocol/acme.coord/{p}", "paho")
    commit("acme")  # the decision
    for p in ("zap", "volt"):
        at("acme", f"tx evsim/protocol/{p}/acme")
    for p in ("zap", "volt"):
        at(p, f"rx evsim/protocol/{p}/acme", "paho")
        to_coordinator(p)  # the ACKs
    for p in ("zap", "volt"):
        at("acme", f"rx evsim/protocol/acme.coord/{p}", "paho")
    at("acme", "wait_result_async-end", "MainThread")
    at("acme", "http http.response.body", "MainThread")
    return out, t + step


def test_a_booking_splits_into_its_segments_along_the_slower_participant(hops) -> None:
    notes, t1 = _booking(hops)
    seg = hops.segments(1000, t1, notes, ["zap", "volt"])
    assert seg is not None and len(seg) == len(hops.SEGMENTS)
    assert sum(seg) == pytest.approx((t1 - 1000) / 1e3)  # the segments add up exactly
    named = dict(zip((n for n, _ in hops.SEGMENTS), seg, strict=True))
    assert len(named) == len(seg)  # every segment has a name of its own
    # the path follows volt, the later voter: its PREPARE left 10 ns after zap's and
    # arrived 20 ns later (zap's rx between); its hold commit is 3 notes
    assert named["PREPARE in flight"] == pytest.approx(0.020)
    assert named["participant: hold, statements"] == pytest.approx(0.010)
    assert named["coordinator: decision, COMMIT (fsync)"] == pytest.approx(0.010)
    # the COMMIT to volt left 10 ns after the decision was durable (zap's first)
    assert named["coordinator: COMMIT published"] == pytest.approx(0.020)


def test_a_booking_with_a_note_missing_is_left_out(hops) -> None:
    notes, t1 = _booking(hops)
    without = [n for n in notes if not (n.who == "acme" and n.what == "_commit")]
    assert hops.segments(1000, t1, without, ["zap", "volt"]) is None
